"""What the metrics hooks cost per request, in process (issue 11 counts it):
the calls one Execute (one node) and one Orchestrate (three nodes, 20 live
events) make into agentlab.metrics, timed over many rounds.

    .venv/bin/python bench/metrics_cost.py [--rounds 20000]

Prints CPU microseconds per request for each shape, the median of 5 runs: a
figure to compare with the ~1,300 µs of service CPU a REST Execute costs
(README, Performance), not a test.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from datetime import UTC, datetime

from agentlab.core.events import ExecutionCompleted
from agentlab.core.types import ExecutionMode, FlowStep, Metrics, Result, StepStatus, Task
from agentlab.metrics import record

__all__ = ["main"]


class _Lab:
    backend = "echo"
    model_name = "echo"


def _completed(nodes: tuple[str, ...]) -> ExecutionCompleted:
    metrics = Metrics(
        latency_ms=12.0,
        time_to_first_token_ms=1.5,
        prompt_tokens=20,
        completion_tokens=20,
        tokens_per_second=2000.0,
        backend="echo",
        model="echo",
        requested_model="mistral7b",
    )
    steps = tuple(
        FlowStep(node, StepStatus.SUCCEEDED, "in", "out", datetime.now(UTC), 4.0, metrics)
        for node in nodes
    )
    return ExecutionCompleted(Result("id", "out", steps, metrics))


def _request(mode: ExecutionMode, nodes: tuple[str, ...], live_events: int) -> Callable[[], None]:
    """One request's calls into the metrics, as the hooks make them."""
    task = Task("prompt", "mistral7b", mode)
    final = _completed(nodes)
    lab = _Lab()
    create = record.store_write("create")
    append = record.store_write("append_events")
    now = time.time()

    def one() -> None:
        began = time.perf_counter()  # submission: the record's creation
        create.observe(time.perf_counter() - began)
        began = time.perf_counter()  # runs: the lab work begins
        for _ in range(live_events):  # watch: each event off the bus
            record.bus_delivered(now)
        record.execution_finished(task, lab, final, time.perf_counter() - began)  # type: ignore[arg-type]
        began = time.perf_counter()  # writer: the final batch
        append.observe(time.perf_counter() - began)
        record.execution_ended("SUCCEEDED")

    return one


def _per_call_us(call: Callable[[], None], rounds: int) -> float:
    """CPU microseconds per call: process time, which a busy machine's
    other processes do not inflate as they do wall time."""
    started = time.process_time()
    for _ in range(rounds):
        call()
    return (time.process_time() - started) / rounds * 1e6


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20_000)
    args = parser.parse_args(argv)
    shapes = {
        "Execute (1 node, unary: no bus)": _request(ExecutionMode.INFERENCE, ("inference",), 0),
        "Orchestrate (3 nodes, 20 live events)": _request(
            ExecutionMode.ORCHESTRATION, ("plan", "answer", "review"), 20
        ),
    }
    for name, call in shapes.items():
        _per_call_us(call, args.rounds // 10)  # warm: label children made
        runs = [_per_call_us(call, args.rounds) for _ in range(5)]
        print(f"{name}: {statistics.median(runs):.1f} µs per request (median of 5)")


if __name__ == "__main__":
    main()
