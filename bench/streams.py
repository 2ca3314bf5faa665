"""Server-Sent Events at scale (issue 11, goal 4): many Orchestrate streams
open at once through Envoy, every one receiving every event, and the memory
the service and Envoy hold for them.

Starts its own stack (the echo backend with a per-token delay, so that every
stream stays open while the rest are opened; the execution limits raised to
hold them all; no rate limit) and opens the streams from one asyncio process
over raw sockets: one HTTP/1.1 connection per stream, as browsers behind
Envoy have, read with a few lines of chunked-encoding and SSE parsing
(an HTTP client library costs several times the CPU per stream, and the
client must not be what limits the figure). Each stream is checked for
every event: ids 1..n in order, then ``execution_completed``.

The resident memory (VmRSS) of the service process and Envoy is sampled
while the streams are open; the row reports the largest sum, and whether all
the streams were open at one moment.

Run alone: ``.venv/bin/python bench/streams.py [--streams N] [--quick]``;
``make bench`` adds its row to the table (``measure``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import re
import resource
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from procstat import rss_kib
from table import Row, render

from agentlab.devstack import Stack

PATH = "SSE streams open at once via Envoy (echo)"
GOAL = "10,000 open, every event, RSS < 1 GiB"
GOAL_STREAMS = 10_000
GOAL_RSS_BYTES = 1 << 30


@dataclass(frozen=True)
class Plan:
    """``streams`` opened ``ramp`` at a time (connections being set up at
    once), each an echo of ``words`` words at ``token_delay_s`` seconds a
    word: long enough that the first is still open when the last opens."""

    streams: int
    words: int
    token_delay_s: float
    ramp: int = 200
    timeout_s: float = 300.0


FULL = Plan(streams=GOAL_STREAMS, words=2, token_delay_s=75.0, timeout_s=600.0)
QUICK = Plan(streams=300, words=5, token_delay_s=0.4)


@dataclass
class Tally:
    opened: int = 0  # answered 200 and not finished yet
    peak_open: int = 0
    complete: int = 0  # every event, in order, ending execution_completed
    refused: dict[str, int] = field(default_factory=dict)  # status or error -> count
    incomplete: int = 0
    events: int = 0
    first_event_s: list[float] = field(default_factory=list)

    def fail(self, reason: str) -> None:
        self.refused[reason] = self.refused.get(reason, 0) + 1


_ID = re.compile(rb"^id: (\d+)$", re.MULTILINE)


async def _stream(
    host: str, port: int, request: bytes, expected: int, tally: Tally, connecting: asyncio.Semaphore
) -> None:
    """One stream: connect (holding ``connecting`` until the answer's
    head), send, then read its SSE events to the end and check them. Never
    raises: what went wrong is counted in ``tally``."""
    writer: asyncio.StreamWriter | None = None
    counted_open = False
    try:
        async with connecting:
            start = time.perf_counter()
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
        status = head.split(b" ", 2)[1].decode()
        if status != "200":
            tally.fail(status)
            return
        tally.opened += 1
        counted_open = True
        tally.peak_open = max(tally.peak_open, tally.opened)
        buffer = bytearray()
        sequence = 0
        in_order = True
        final = b""
        while True:
            size = int((await reader.readuntil(b"\r\n")).strip(), 16)
            chunk = await reader.readexactly(size + 2)
            if size == 0:
                break
            buffer += chunk[:-2]
            while (end := buffer.find(b"\n\n")) >= 0:
                block = bytes(buffer[:end])
                del buffer[: end + 2]
                if sequence == 0:
                    tally.first_event_s.append(time.perf_counter() - start)
                found = _ID.search(block)
                number = int(found.group(1)) if found else -1
                in_order = in_order and number == sequence + 1
                sequence = number
                final = block
                tally.events += 1
        if in_order and sequence == expected and b'"execution_completed"' in final:
            tally.complete += 1
        else:
            tally.incomplete += 1
    except (OSError, asyncio.IncompleteReadError, ValueError, IndexError) as error:
        tally.fail(type(error).__name__)
    finally:
        if counted_open:
            tally.opened -= 1
        if writer is not None:
            writer.close()


class _Memory:
    """The largest summed VmRSS of ``pids``, sampled every ``every_s`` in a
    thread (the event loop is busy with the streams), and its value while
    the most streams were open."""

    def __init__(self, pids: Sequence[int], tally: Tally, every_s: float = 0.25) -> None:
        self.peak = 0
        # Each process's own largest VmRSS, in ``pids``' order: which side
        # holds the memory.
        self.peaks = [0] * len(pids)
        self.at_peak_open = (0, 0)  # (streams open, bytes)
        # Each process's VmRSS before any stream opened: what the streams
        # add is the peak less this, per stream open at once.
        self.idle = [rss_kib(pid) * 1024 for pid in pids]
        self._pids, self._tally, self._every_s = pids, tally, every_s
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> _Memory:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._done.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._done.wait(self._every_s):
            try:
                each = [rss_kib(pid) * 1024 for pid in self._pids]
            except OSError:
                return
            self.peaks = [max(a, b) for a, b in zip(self.peaks, each, strict=True)]
            total = sum(each)
            self.peak = max(self.peak, total)
            open_now = self._tally.opened
            if (open_now, total) > self.at_peak_open:
                self.at_peak_open = (open_now, total)


def _raise_open_files(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, needed), hard))
    if resource.getrlimit(resource.RLIMIT_NOFILE)[0] < needed:
        raise RuntimeError(
            f"{needed} streams need {needed} open files; the hard limit is {hard} (ulimit -Hn)"
        )


def _start_stack(log_dir: Path, plan: Plan) -> Stack:
    env = {
        "AGENTLAB_DEFAULT_BACKEND": "echo",
        "AGENTLAB_ECHO_TOKEN_DELAY_S": str(plan.token_delay_s),
        # Every stream's execution runs at once: the echo backend costs
        # nothing while it waits, and queued ones would not stream.
        "AGENTLAB_MAX_RUNNING_EXECUTIONS": str(plan.streams),
        "AGENTLAB_MAX_QUEUED_EXECUTIONS": str(plan.streams),
        "AGENTLAB_LOG_LEVEL": "WARNING",
    }
    # Envoy's per-client rate limit is off unless AGENTLAB_RATE_LIMIT sets one.
    return Stack.start(log_dir, env=env)


@dataclass(frozen=True)
class Result:
    plan: Plan
    tally: Tally
    peak_rss: int
    rss_at_peak_open: int
    elapsed_s: float
    # Each process's own peak: the service's and Envoy's.
    service_peak_rss: int = 0
    envoy_peak_rss: int = 0
    # Each process's RSS before the first stream opened.
    service_idle_rss: int = 0
    envoy_idle_rss: int = 0

    def per_stream_kib(self, peak: int, idle: int) -> float:
        """What one open stream adds to a process's RSS, in KiB."""
        return (peak - idle) / 1024 / max(self.tally.peak_open, 1)

    @property
    def all_open_at_once(self) -> bool:
        return self.tally.peak_open == self.plan.streams


async def _open_all(stack: Stack, plan: Plan, tally: Tally) -> None:
    body = json.dumps(
        {
            "prompt": " ".join(f"w{i}" for i in range(plan.words)),
            "model": "echo",
            "mode": "EXECUTION_MODE_INFERENCE",
        }
    ).encode()
    request = (
        b"POST /api/v1/orchestrate HTTP/1.1\r\nHost: localhost\r\n"
        b"Content-Type: application/json\r\n"
        b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body)
    ) + body
    # started, node_started, a token per word, node_finished, completed
    expected = plan.words + 4
    port = stack.envoy.ports.gateway
    # At most ``ramp`` streams between connecting and their answer: a
    # burst of thousands of connects would overflow the listen backlog.
    connecting = asyncio.Semaphore(plan.ramp)
    streams = (
        _stream("127.0.0.1", port, request, expected, tally, connecting)
        for _ in range(plan.streams)
    )
    await asyncio.wait_for(asyncio.gather(*streams), plan.timeout_s)


# Opens a plan's streams through a stack, counting them in the tally.
Opener = Callable[[Stack, Plan, Tally], Coroutine[Any, Any, None]]


def run(plan: Plan, open_all: Opener | None = None) -> Result:
    """Open ``plan.streams`` streams through a fresh stack and measure;
    ``open_all`` opens them (default: SSE, one connection each)."""
    open_all = open_all or _open_all
    _raise_open_files(plan.streams + 1024)
    with tempfile.TemporaryDirectory(prefix="agentlab-streams-") as log_dir:
        stack = _start_stack(Path(log_dir), plan)
        try:
            assert stack.service.proc is not None
            assert stack.envoy.proc is not None
            tally = Tally()
            start = time.perf_counter()
            with _Memory([stack.service.proc.pid, stack.envoy.proc.pid], tally) as memory:
                asyncio.run(open_all(stack, plan, tally))
            elapsed = time.perf_counter() - start
        finally:
            stack.stop()
    service_peak, envoy_peak = memory.peaks
    service_idle, envoy_idle = memory.idle
    return Result(
        plan,
        tally,
        memory.peak,
        memory.at_peak_open[1],
        elapsed,
        service_peak,
        envoy_peak,
        service_idle,
        envoy_idle,
    )


def row(result: Result) -> Row:
    plan, tally = result.plan, result.tally
    failed = sum(tally.refused.values()) + tally.incomplete
    first = sorted(tally.first_event_s)
    gib = result.peak_rss / (1 << 30)
    met = (
        plan.streams >= GOAL_STREAMS
        and tally.complete == plan.streams
        and result.all_open_at_once
        and result.peak_rss < GOAL_RSS_BYTES
    )
    refused = ", ".join(f"{k}: {v}" for k, v in sorted(tally.refused.items()))
    note = (
        f"{tally.complete:,} of {plan.streams:,} streams got every event "
        f"({tally.events:,} events); at most {tally.peak_open:,} open at once; "
        f"peak RSS service + Envoy {result.peak_rss / (1 << 20):,.0f} MiB ({gib:.2f} GiB; "
        f"each at its own peak: service {result.service_peak_rss / (1 << 20):,.0f} MiB, "
        f"Envoy {result.envoy_peak_rss / (1 << 20):,.0f} MiB; per open stream over idle: "
        f"service {result.per_stream_kib(result.service_peak_rss, result.service_idle_rss):.1f}"
        f" KiB, Envoy {result.per_stream_kib(result.envoy_peak_rss, result.envoy_idle_rss):.1f}"
        " KiB); "
        f"{plan.words} words at {plan.token_delay_s:g} s, {result.elapsed_s:.0f} s in all"
        + (f"; failed: {refused}" if refused else "")
        + (f"; {tally.incomplete} incomplete" if tally.incomplete else "")
    )
    return Row(
        path=PATH,
        ours=float(tally.peak_open),
        p50_ms=first[len(first) // 2] * 1000 if first else math.nan,
        p99_ms=first[int(len(first) * 0.99)] * 1000 if first else math.nan,
        non_2xx=failed,
        cpu=f"RSS {result.peak_rss / (1 << 20):,.0f} MiB",
        goal=GOAL,
        met=met if plan.streams >= GOAL_STREAMS else None,
        note=note,
    )


def measure(quick: bool) -> list[Row]:
    """The rows bench/bench.py adds to its table: ``quick`` opens a few
    hundred streams (the parts work), otherwise the goal's 10,000."""
    return [row(run(QUICK if quick else FULL))]


def main(
    argv: Sequence[str] | None = None,
    *,
    description: str = __doc__ or "",
    open_all: Opener | None = None,
    row: Callable[[Result], Row] = row,
) -> int:
    """The command line of this module, and of one that opens its streams
    another way (``open_all``) and names its row so (``row``)."""
    parser = argparse.ArgumentParser(description=description.split("\n\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="a few hundred streams")
    parser.add_argument("--streams", type=int, help="how many streams (default: the plan's)")
    parser.add_argument("--words", type=int, help="tokens per stream")
    parser.add_argument("--token-delay", type=float, help="seconds per token")
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else FULL
    changes = {
        "streams": args.streams,
        "words": args.words,
        "token_delay_s": args.token_delay,
    }
    plan = Plan(**{**plan.__dict__, **{k: v for k, v in changes.items() if v is not None}})
    result = run(plan, open_all)
    print(render([row(result)]))
    return 0 if result.tally.complete == plan.streams else 1


if __name__ == "__main__":
    sys.exit(main())
