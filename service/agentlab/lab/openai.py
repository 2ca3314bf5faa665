"""Models served by an OpenAI-compatible server: OpenAI itself, vLLM, the
llama.cpp server, LM Studio, Ollama's ``/v1``…

Token counts come from the usage chunk that ``stream_options.include_usage``
asks for. A server that ignores it sends none: the call still succeeds, its
token counts are reported as 0 (unknown, not zero work) and a warning says so
once per model. Counting the streamed chunks instead would pass a guess for a
measurement, since a chunk need not be one token.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncGenerator
from contextlib import aclosing
from typing import Any

from agentlab.core.types import GenerationOptions
from agentlab.lab.base import ChatMessage, ModelChunk, TextChunk, Usage
from agentlab.lab.graph_lab import GraphLab
from agentlab.lab.upstream import HttpBackend, Upstream, iter_sse_data

__all__ = ["OpenAIBackend", "OpenAIChatModel"]

logger = logging.getLogger(__name__)

_DONE = "[DONE]"


class OpenAIBackend(HttpBackend):
    """An OpenAI-compatible API whose base is ``url``, *including* its
    version path, as OpenAI's own clients take it: ``https://api.openai.com/v1``
    or ``http://127.0.0.1:8080/v1``. Nothing is appended, so servers that
    mount the API elsewhere (``…/openai/v1``) work too.

    ``api_key``, when given, is sent as ``Authorization: Bearer``."""

    kind = "openai"

    def __init__(
        self,
        name: str,
        url: str,
        *,
        api_key: str | None = None,
        connect_attempts: int = 3,
        connect_timeout_s: float = 5.0,
        backoff_s: float = 0.1,
    ) -> None:
        super().__init__(
            Upstream(
                name,
                url,
                headers={"Authorization": f"Bearer {api_key}"} if api_key else None,
                connect_timeout_s=connect_timeout_s,
                connect_attempts=connect_attempts,
                backoff_s=backoff_s,
            )
        )

    async def check(self) -> None:
        await self.models()

    async def models(self) -> list[str]:
        """The model ids the server lists at ``{url}/models``."""
        body = await self._upstream.get_json("/models")
        models = body.get("data") if isinstance(body, dict) else None
        if not isinstance(models, list):
            raise self._upstream.failed("GET /models answered no list of models")
        return [str(model["id"]) for model in models if isinstance(model, dict)]

    def chat_model(self, model: str) -> OpenAIChatModel:
        return OpenAIChatModel(self._upstream, model)

    def lab(self, model: str) -> GraphLab:
        return GraphLab(self.chat_model(model))


class OpenAIChatModel:
    """One model behind ``/chat/completions``; ``backend`` is the backend's
    configured name."""

    def __init__(self, upstream: Upstream, model: str) -> None:
        self._upstream = upstream
        self._model = model
        self._warned_no_usage = False

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
        usage: Usage | None = None
        done = False
        async with (
            upstream.stream("POST", "/chat/completions", json_body=request) as response,
            aclosing(iter_sse_data(upstream, response)) as events,
        ):
            async for data in events:
                if data == _DONE:
                    # Leaving before the end of the body closes the connection
                    # instead of pooling it: the llama.cpp server closes it
                    # after every stream while announcing keep-alive, and a
                    # pooled one would fail the next request now and then.
                    done = True
                    break
                chunk = self._decode(data)
                for text in _texts(chunk):
                    yield TextChunk(text)
                # Some servers repeat a running usage in every chunk: the
                # last one is the total.
                usage = _usage(chunk) or usage
        if not done:
            raise upstream.failed(f"the stream ended before {_DONE}")
        if usage is None:
            self._warn_no_usage()
            usage = Usage(prompt_tokens=0, completion_tokens=0)
        yield usage

    def _request(self, messages: list[ChatMessage], options: GenerationOptions) -> dict[str, Any]:
        request: dict[str, Any] = {
            "model": self._model,
            "messages": [{"role": m.role, "content": m.content} for m in messages],
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        # Only what the caller set: the rest stays the server's defaults.
        settings = {
            "temperature": options.temperature,
            "max_tokens": options.max_tokens,
            "seed": options.seed,
        }
        request.update((key, value) for key, value in settings.items() if value is not None)
        return request

    def _decode(self, data: str) -> dict[str, Any]:
        try:
            chunk = json.loads(data)
        except ValueError:
            raise self._upstream.failed(f"a streamed event is not JSON: {data:.200}") from None
        if not isinstance(chunk, dict):
            raise self._upstream.failed(f"a streamed event is not an object: {data:.200}")
        if "error" in chunk:
            raise self._upstream.failed(_error_message(chunk["error"]))
        return chunk

    def _warn_no_usage(self) -> None:
        if not self._warned_no_usage:
            self._warned_no_usage = True
            logger.warning(
                "%s at %s sent no token usage for %s (does it ignore "
                "stream_options.include_usage?): its token counts are reported as 0",
                self._upstream.backend,
                self._upstream.address,
                self._model,
            )


def _texts(chunk: dict[str, Any]) -> list[str]:
    texts = []
    for choice in chunk.get("choices") or ():
        delta = choice.get("delta") if isinstance(choice, dict) else None
        text = delta.get("content") if isinstance(delta, dict) else None
        if text:
            texts.append(str(text))
    return texts


def _usage(chunk: dict[str, Any]) -> Usage | None:
    usage = chunk.get("usage")
    if not isinstance(usage, dict):
        return None
    return Usage(
        prompt_tokens=_count(usage.get("prompt_tokens")),
        completion_tokens=_count(usage.get("completion_tokens")),
        generation_s=_generation_s(chunk),
    )


def _generation_s(chunk: dict[str, Any]) -> float | None:
    """The server's own generation time, when it tells it: the llama.cpp
    server adds ``timings.predicted_ms``. Otherwise None, and the runner times
    the tokens' arrival."""
    timings = chunk.get("timings")
    predicted_ms = timings.get("predicted_ms") if isinstance(timings, dict) else None
    if isinstance(predicted_ms, int | float) and predicted_ms > 0:
        return predicted_ms / 1000
    return None


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _error_message(error: Any) -> str:
    """OpenAI sends ``{"error": {"message": ...}}``; some servers a string."""
    if isinstance(error, dict) and "message" in error:
        return str(error["message"])
    return str(error)
