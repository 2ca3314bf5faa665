"""The seam between the use cases and whatever runs the models.

A ``Lab`` runs a task and reports what happens as ``LabEvent`` values; the
runner in ``core`` times them, numbers them and builds the flow and metrics.
A ``ChatModel`` is one model behind a chat-completion call, streamed.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import Protocol

from agentlab.core.types import GenerationOptions, Task

__all__ = [
    "Backend",
    "ChatMessage",
    "ChatModel",
    "Lab",
    "LabEvent",
    "LabNodeEnded",
    "LabNodeStarted",
    "LabOutput",
    "LabToken",
    "ModelChunk",
    "Route",
    "TextChunk",
    "Usage",
]


@dataclass(frozen=True)
class ChatMessage:
    role: str
    content: str


@dataclass(frozen=True)
class TextChunk:
    text: str


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    # Generation time as the backend measured it (Ollama's eval_duration);
    # None lets the runner time it from the tokens' arrival.
    generation_s: float | None = None


ModelChunk = TextChunk | Usage


class ChatModel(Protocol):
    """A model that streams a chat completion."""

    @property
    def backend(self) -> str:
        """The backend's name, as metrics report it (for example "embedded")."""
        ...

    @property
    def name(self) -> str:
        """The model the backend really runs."""
        ...

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    def stream(
        self, messages: list[ChatMessage], options: GenerationOptions
    ) -> AsyncGenerator[ModelChunk, None]:
        """Yield text as it is generated, then one ``Usage``. Closing the
        iterator early stops the generation."""
        ...


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


class Backend(Protocol):
    """A configured place where models run: the embedded model, an Ollama
    server, an OpenAI-compatible server, or the HTTP lab service."""

    @property
    def name(self) -> str:
        """The configured name; metrics report it as the backend."""
        ...

    @property
    def kind(self) -> str:
        """One of "embedded", "echo", "ollama", "openai", "http_lab"."""
        ...

    @property
    def address(self) -> str:
        """Where it is reached ("" when it runs in this process)."""
        ...

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def check(self) -> None:
        """Return if the backend is reachable now; raise ``LabUnavailable``
        (or ``LabFailed``) saying why not. Cheap: health probes call it."""
        ...

    def lab(self, model: str) -> Lab:
        """The lab that runs tasks on ``model``, the backend's own model name
        (for example "mistral:7b"). Its ``backend`` is this backend's name."""
        ...


@dataclass(frozen=True)
class Route:
    """Where a model name leads: the lab that serves it, and the defaults and
    time limit configured for it."""

    lab: Lab
    defaults: GenerationOptions = field(default_factory=GenerationOptions)
    timeout_s: float | None = None
