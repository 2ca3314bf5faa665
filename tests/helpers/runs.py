"""Running a task through the runner's one path (prepare, then stream) to
its end, for tests of the runner and the labs without the executions."""

from __future__ import annotations

from contextlib import aclosing

from agentlab.core.events import ExecutionCompleted, ExecutionFailed
from agentlab.core.runner import Runner
from agentlab.core.types import Result, Task

__all__ = ["run_to_end"]


async def run_to_end(runner: Runner, task: Task) -> Result:
    """The execution's result; raises its error if it failed (or the
    routing error ``prepare`` raises)."""
    async with aclosing(runner.stream(runner.prepare(task))) as events:
        async for event in events:
            if isinstance(event.kind, ExecutionCompleted):
                return event.kind.result
            if isinstance(event.kind, ExecutionFailed):
                raise event.kind.error
    raise AssertionError("the stream ended without a final event")
