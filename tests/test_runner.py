"""The execute and orchestrate use cases on the echo model: event order,
flow and metrics, the same for every backend. (Request rules are checked
before the runner: tests/test_validation.py.)"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from dataclasses import replace

import pytest

from agentlab.core.errors import Cancelled, DeadlineExceeded, LabUnavailable
from agentlab.core.events import (
    ExecutionCompleted,
    ExecutionFailed,
    ExecutionStarted,
    NodeFinished,
    NodeStarted,
    TokenDelta,
)
from agentlab.core.ports import Route
from agentlab.core.runner import Runner, Stop
from agentlab.core.types import ExecutionMode, GenerationOptions, StepStatus, Task
from agentlab.lab.base import ChatMessage, ModelChunk, TextChunk, Usage
from agentlab.lab.echo import EchoModel
from agentlab.lab.graph_lab import GraphLab
from agentlab.lab.local import LocalBackend
from agentlab.lab.registry import ANY_MODEL, LabRegistry
from tests.helpers.runs import run_to_end


@pytest.fixture
async def runner() -> Runner:
    registry = LabRegistry.serving_everything(LocalBackend("echo", EchoModel()))
    await registry.start()
    return Runner(registry.route, default_max_tokens=50)


def task(prompt: str, mode: ExecutionMode = ExecutionMode.INFERENCE, **options: object) -> Task:
    return Task(prompt, "mistral7b", mode, GenerationOptions(**options))  # type: ignore[arg-type]


async def test_inference_events_and_result(runner: Runner) -> None:
    events = [event async for event in runner.stream(runner.prepare(task("one two three")))]
    kinds = [type(event.kind) for event in events]
    assert kinds == [
        ExecutionStarted,
        NodeStarted,
        TokenDelta,
        TokenDelta,
        TokenDelta,
        NodeFinished,
        ExecutionCompleted,
    ]
    assert [event.sequence for event in events] == list(range(1, 8))
    assert len({event.execution_id for event in events}) == 1
    times = [event.time for event in events]
    assert times == sorted(times)

    final = events[-1].kind
    assert isinstance(final, ExecutionCompleted)
    result = final.result
    assert result.execution_id == events[0].execution_id
    assert result.output == "one two three"
    [step] = result.flow
    assert (step.node, step.status, step.output) == (
        "inference",
        StepStatus.SUCCEEDED,
        "one two three",
    )
    assert result.metrics.completion_tokens == 3
    assert result.metrics.backend == "echo"
    assert result.metrics.requested_model == "mistral7b"
    assert result.metrics.latency_ms >= step.duration_ms > 0


async def test_the_default_max_tokens_applies(runner: Runner) -> None:
    result = await run_to_end(runner, task(" ".join(["w"] * 80)))
    assert result.metrics.completion_tokens == 50


async def test_orchestration_runs_plan_answer_review(runner: Runner) -> None:
    result = await run_to_end(runner, task("Why is the sky blue?", ExecutionMode.ORCHESTRATION))
    assert [step.node for step in result.flow] == ["plan", "answer", "review"]
    assert all(step.status is StepStatus.SUCCEEDED for step in result.flow)
    assert result.output == result.flow[-1].output
    assert result.metrics.completion_tokens == sum(s.metrics.completion_tokens for s in result.flow)


async def test_a_lab_that_is_not_ready_is_unavailable() -> None:
    registry = LabRegistry.serving_everything(LocalBackend("echo", EchoModel()))  # never started
    runner = Runner(registry.route, default_max_tokens=10)
    with pytest.raises(LabUnavailable):
        await run_to_end(runner, task("hi"))
    assert registry.models()[-1].name == ANY_MODEL
    assert registry.models()[-1].ready is False


class SlowModel:
    """One word every 20 ms; remembers whether its stream was closed."""

    backend = "slow"
    name = "slow"

    def __init__(self) -> None:
        self.closed = False

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def stream(
        self, messages: list[ChatMessage], options: GenerationOptions
    ) -> AsyncGenerator[ModelChunk, None]:
        try:
            for index in range(500):
                await asyncio.sleep(0.02)
                yield TextChunk(f"w{index} ")
            yield Usage(1, 500)
        finally:
            self.closed = True


@pytest.mark.parametrize("mode", list(ExecutionMode))
async def test_a_deadline_stops_the_lab_and_keeps_the_partial_flow(mode: ExecutionMode) -> None:
    model = SlowModel()
    lab = GraphLab(model)
    await lab.start()
    runner = Runner(lambda _: Route(lab, timeout_s=60), default_max_tokens=500)

    events = [
        e async for e in runner.stream(runner.prepare(replace(task("go", mode), timeout_s=0.3)))
    ]
    final = events[-1].kind
    assert isinstance(final, ExecutionFailed)
    assert isinstance(final.error, DeadlineExceeded)
    assert "0.3 s" in final.error.message
    # What was generated before the deadline is kept, marked failed.
    step = final.flow[-1]
    assert step.status is StepStatus.FAILED
    assert step.output.startswith("w0 w1 ")
    assert sum(isinstance(e.kind, TokenDelta) for e in events) == len(step.output.split())
    assert model.closed, "the model call must be closed, not left running"


async def test_the_shorter_of_the_callers_and_the_models_timeout_wins() -> None:
    lab = GraphLab(SlowModel())
    await lab.start()
    runner = Runner(lambda _: Route(lab, timeout_s=0.2), default_max_tokens=500)
    with pytest.raises(DeadlineExceeded, match=r"0\.2 s"):
        await run_to_end(runner, replace(task("go"), timeout_s=30))


@pytest.mark.parametrize("mode", list(ExecutionMode))
async def test_a_stop_request_cancels_the_lab_and_keeps_the_partial_flow(
    mode: ExecutionMode,
) -> None:
    model = SlowModel()
    lab = GraphLab(model)
    await lab.start()
    runner = Runner(lambda _: Route(lab), default_max_tokens=500)
    stop = Stop()
    events = []
    async for event in runner.stream(
        runner.prepare(task("go", mode)), execution_id="e1", stop=stop
    ):
        events.append(event)
        if isinstance(event.kind, TokenDelta) and len(events) > 4:
            stop.request()
    final = events[-1].kind
    assert isinstance(final, ExecutionFailed)
    assert isinstance(final.error, Cancelled)
    cut = final.flow[-1]
    assert cut.status is StepStatus.CANCELLED
    assert cut.output
    # What the cut node streamed is counted (the playground showed "tokens 0").
    streamed = [
        event.kind.text
        for event in events
        if isinstance(event.kind, TokenDelta) and event.kind.node == cut.node
    ]
    assert cut.output == "".join(streamed)
    assert cut.metrics.completion_tokens == len(streamed) > 0
    assert cut.metrics.tokens_per_second > 0
    assert {event.execution_id for event in events} == {"e1"}
    assert model.closed
