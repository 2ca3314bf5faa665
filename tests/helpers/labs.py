"""Labs for in-process tests of the executions layer."""

from __future__ import annotations

from collections.abc import AsyncGenerator

from agentlab.core.ports import LabEvent, LabNodeEnded, LabNodeStarted, LabOutput, LabToken
from agentlab.core.types import Task


class InstantLab:
    """``tokens`` tokens and the output, all at once (no await between
    them), as the echo backend produces them."""

    backend = "instant"
    model_name = "instant"
    ready = True

    def __init__(self, tokens: int = 1) -> None:
        self.tokens = tokens

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def run(self, task: Task) -> AsyncGenerator[LabEvent, None]:
        yield LabNodeStarted("inference", task.prompt)
        for index in range(self.tokens):
            yield LabToken("inference", f"t{index} ")
        yield LabNodeEnded("inference", "done", 1, self.tokens)
        yield LabOutput("done")
