"""The labs' own seams: a ``Backend`` is a configured place where models
run, a ``ChatModel`` one model behind a chat-completion call, streamed.

What the use cases need from a lab (``Lab``, ``LabEvent``, ``Route``) is
declared with them, in ``agentlab.core.ports``.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Protocol

from agentlab.core.ports import Lab
from agentlab.core.types import GenerationOptions

__all__ = [
    "Backend",
    "ChatMessage",
    "ChatModel",
    "ModelChunk",
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
