"""The ports of the use cases: what the runner needs from whatever runs the
models, declared here so the use cases depend on nothing below them.

A ``Lab`` runs a task and reports what happens as ``LabEvent`` values; the
runner (``core.runner``) times them, numbers them and builds the flow and
metrics. A ``Route`` is where the runner's router sends a model name. The
labs (``agentlab.lab``) implement these; how a lab talks to a model
(``ChatModel``) is the lab's own seam and lives there.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import Protocol

from agentlab.core.types import GenerationOptions, Task

__all__ = [
    "Lab",
    "LabEvent",
    "LabNodeEnded",
    "LabNodeStarted",
    "LabOutput",
    "LabToken",
    "Route",
]


@dataclass(frozen=True)
class LabNodeStarted:
    node: str
    input: str


@dataclass(frozen=True)
class LabToken:
    node: str
    text: str


@dataclass(frozen=True)
class LabNodeEnded:
    node: str
    output: str
    prompt_tokens: int
    completion_tokens: int
    # Generation time as the backend measured it, in seconds; None lets the
    # runner time it from the tokens' arrival.
    generation_s: float | None = None


@dataclass(frozen=True)
class LabOutput:
    """The last event of a run: its final text."""

    output: str


LabEvent = LabNodeStarted | LabToken | LabNodeEnded | LabOutput


class Lab(Protocol):
    """Runs tasks. Errors are raised as ``agentlab.core.errors`` types."""

    @property
    def backend(self) -> str: ...

    @property
    def model_name(self) -> str: ...

    @property
    def ready(self) -> bool: ...

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    def run(self, task: Task) -> AsyncGenerator[LabEvent, None]:
        """Yield the run's events, ending with one ``LabOutput``. Closing the
        iterator early stops the work."""
        ...


@dataclass(frozen=True)
class Route:
    """Where a model name leads: the lab that serves it, and the defaults and
    time limit (seconds) configured for it."""

    lab: Lab
    defaults: GenerationOptions = field(default_factory=GenerationOptions)
    timeout_s: float | None = None
