"""Models served by an Ollama server, over its native API.

The native ``/api/chat`` is used rather than Ollama's OpenAI-compatible one
because its final chunk carries Ollama's own generation time
(``eval_duration``): tokens per second then measure the model, not the network.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from contextlib import aclosing
from typing import Any

from agentlab.core.types import GenerationOptions
from agentlab.lab.base import ChatMessage, ModelChunk, TextChunk, Usage
from agentlab.lab.graph_lab import GraphLab
from agentlab.lab.upstream import HttpBackend, Upstream, iter_ndjson

__all__ = ["OllamaBackend", "OllamaChatModel"]


class OllamaBackend(HttpBackend):
    """An Ollama server at ``url`` (for example ``http://127.0.0.1:11434``)."""

    kind = "ollama"

    def __init__(
        self,
        name: str,
        url: str,
        *,
        connect_attempts: int = 3,
        connect_timeout_s: float = 5.0,
        backoff_s: float = 0.1,
    ) -> None:
        super().__init__(
            Upstream(
                name,
                url,
                connect_timeout_s=connect_timeout_s,
                connect_attempts=connect_attempts,
                backoff_s=backoff_s,
            )
        )

    async def check(self) -> None:
        await self.models()

    async def models(self) -> list[str]:
        """The models the server has pulled, as ``lab()`` accepts them."""
        body = await self._upstream.get_json("/api/tags")
        models = body.get("models") if isinstance(body, dict) else None
        if not isinstance(models, list):
            raise self._upstream.failed("GET /api/tags answered no list of models")
        return [str(model["name"]) for model in models if isinstance(model, dict)]

    def chat_model(self, model: str) -> OllamaChatModel:
        return OllamaChatModel(self._upstream, model)

    def lab(self, model: str) -> GraphLab:
        return GraphLab(self.chat_model(model))


class OllamaChatModel:
    """One Ollama model; ``backend`` is the backend's configured name."""

    def __init__(self, upstream: Upstream, model: str) -> None:
        self._upstream = upstream
        self._model = model

    @property
    def backend(self) -> str:
        return self._upstream.backend

    @property
    def name(self) -> str:
        return self._model

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None  # the connection pool is the backend's to close

    async def stream(
        self, messages: list[ChatMessage], options: GenerationOptions
    ) -> AsyncGenerator[ModelChunk, None]:
        upstream = self._upstream
        request = self._request(messages, options)
        done: dict[str, Any] | None = None
        async with (
            upstream.stream("POST", "/api/chat", json_body=request) as response,
            aclosing(iter_ndjson(upstream, response)) as lines,
        ):
            async for line in lines:
                if done is not None:
                    # Read on to the end of the body (it ends here) so that
                    # the connection goes back to the pool.
                    continue
                if not isinstance(line, dict):
                    raise upstream.failed(f"a streamed line is not an object: {line!r:.200}")
                if "error" in line:
                    raise upstream.failed(str(line["error"]))
                message = line.get("message")
                text = message.get("content") if isinstance(message, dict) else None
                if text:
                    yield TextChunk(str(text))
                if line.get("done"):
                    done = line
        if done is None:
            raise upstream.failed("the stream ended before its done chunk")
        yield _usage(done)

    def _request(self, messages: list[ChatMessage], options: GenerationOptions) -> dict[str, Any]:
        request: dict[str, Any] = {
            "model": self._model,
            "messages": [{"role": m.role, "content": m.content} for m in messages],
            "stream": True,
        }
        # Only what the caller set: the rest stays the model's own defaults
        # (its Modelfile's parameters).
        settings = {
            "temperature": options.temperature,
            "num_predict": options.max_tokens,
            "seed": options.seed,
        }
        if given := {key: value for key, value in settings.items() if value is not None}:
            request["options"] = given
        return request


def _usage(done: dict[str, Any]) -> Usage:
    eval_ns = _count(done.get("eval_duration"))
    return Usage(
        # Ollama leaves prompt_eval_count out when the whole prompt came from
        # its cache.
        prompt_tokens=_count(done.get("prompt_eval_count")),
        completion_tokens=_count(done.get("eval_count")),
        generation_s=eval_ns / 1e9 if eval_ns > 0 else None,
    )


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0
