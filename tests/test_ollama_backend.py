"""The Ollama backend against a fake Ollama: streaming, usage into metrics,
options on the wire, errors, and cancellation reaching the server."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import aclosing

import pytest

from agentlab.core.errors import LabFailed, LabUnavailable
from agentlab.core.ports import Route
from agentlab.core.runner import Runner
from agentlab.core.types import ExecutionMode, GenerationOptions, Result, Task
from agentlab.devstack import free_port
from agentlab.lab.base import ChatMessage, ModelChunk, TextChunk, Usage
from agentlab.lab.ollama import OllamaBackend
from tests.helpers.fake_ollama import FakeOllama
from tests.helpers.runs import run_to_end

MODEL = "llama3.2:1b"
HELLO = [ChatMessage("user", "Name three colours.")]


@pytest.fixture
async def fake() -> AsyncIterator[FakeOllama]:
    server = FakeOllama()
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
async def backend(fake: FakeOllama) -> AsyncIterator[OllamaBackend]:
    ollama = OllamaBackend("ollama-test", fake.url)
    yield ollama
    await ollama.close()


async def collect(backend: OllamaBackend, options: GenerationOptions) -> list[ModelChunk]:
    stream = backend.chat_model(MODEL).stream(HELLO, options)
    async with aclosing(stream):
        return [chunk async for chunk in stream]


async def execute(backend: OllamaBackend, mode: ExecutionMode) -> Result:
    lab = backend.lab(MODEL)
    await lab.start()
    runner = Runner(lambda model: Route(lab), default_max_tokens=16)
    return await run_to_end(runner, Task("Name three colours.", "colours", mode))


async def test_streams_text_then_usage(fake: FakeOllama, backend: OllamaBackend) -> None:
    chunks = await collect(backend, GenerationOptions())
    assert chunks == [
        *(TextChunk(word) for word in fake.words),
        Usage(prompt_tokens=12, completion_tokens=5, generation_s=0.25),
    ]


async def test_usage_becomes_the_metrics(backend: OllamaBackend) -> None:
    result = await execute(backend, ExecutionMode.INFERENCE)

    assert result.output == "Blue, green and red"
    metrics = result.metrics
    assert (metrics.prompt_tokens, metrics.completion_tokens) == (12, 5)
    # Ollama's own eval_duration, not the time the tokens took to arrive.
    assert metrics.tokens_per_second == pytest.approx(5 / 0.25)
    assert (metrics.backend, metrics.model, metrics.requested_model) == (
        "ollama-test",
        MODEL,
        "colours",
    )


async def test_orchestration_runs_every_node_on_ollama(
    fake: FakeOllama, backend: OllamaBackend
) -> None:
    result = await execute(backend, ExecutionMode.ORCHESTRATION)

    assert [step.node for step in result.flow] == ["plan", "answer", "review"]
    assert all(step.metrics.backend == "ollama-test" for step in result.flow)
    assert len(fake.requests) == 3
    assert result.metrics.completion_tokens == 3 * 5
    assert result.metrics.tokens_per_second == pytest.approx(15 / 0.75)


async def test_options_are_sent_as_ollama_names_them(
    fake: FakeOllama, backend: OllamaBackend
) -> None:
    await collect(backend, GenerationOptions(temperature=0.3, max_tokens=7, seed=42))
    await collect(backend, GenerationOptions(max_tokens=9))
    await collect(backend, GenerationOptions())

    assert fake.requests[0] == {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Name three colours."}],
        "stream": True,
        "options": {"temperature": 0.3, "num_predict": 7, "seed": 42},
    }
    # Options left unset stay the model's own defaults.
    assert fake.requests[1]["options"] == {"num_predict": 9}
    assert "options" not in fake.requests[2]


async def test_models_and_check(fake: FakeOllama, backend: OllamaBackend) -> None:
    fake.models = ["llama3.2:1b", "mistral:7b"]
    await backend.check()
    assert await backend.models() == ["llama3.2:1b", "mistral:7b"]
    assert (backend.kind, backend.name, backend.address) == ("ollama", "ollama-test", fake.url)


async def test_an_unknown_model_fails_with_ollamas_status_and_message(
    backend: OllamaBackend,
) -> None:
    stream = backend.chat_model("nope:1b").stream(HELLO, GenerationOptions())
    with pytest.raises(LabFailed) as raised:
        await anext(stream)
    error = raised.value
    assert error.upstream_status == 404
    assert "model 'nope:1b' not found" in error.message
    assert error.metadata["backend"] == "ollama-test"
    assert error.metadata["address"] == backend.address


@pytest.mark.parametrize(
    ("setup", "expected"),
    [
        ({"error_line": "out of memory"}, "out of memory"),
        ({"garbage_line": "<html>proxy error</html>"}, "not JSON"),
        ({"garbage_line": "[1, 2]"}, "not an object"),
        ({"omit_done": True}, "ended before its done chunk"),
    ],
)
async def test_a_broken_stream_fails_after_its_text(
    fake: FakeOllama, backend: OllamaBackend, setup: dict[str, object], expected: str
) -> None:
    for attribute, value in setup.items():
        setattr(fake, attribute, value)
    received: list[ModelChunk] = []

    async def read() -> None:
        stream = backend.chat_model(MODEL).stream(HELLO, GenerationOptions())
        async with aclosing(stream):
            async for chunk in stream:
                received.append(chunk)

    with pytest.raises(LabFailed) as raised:
        await read()
    assert expected in raised.value.message
    assert "ollama-test" in raised.value.message
    assert received == [TextChunk(word) for word in fake.words]


async def test_connection_refused_names_the_backend_and_address() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    ollama = OllamaBackend("ollama-down", url, connect_attempts=2, backoff_s=0.01)
    try:
        with pytest.raises(LabUnavailable) as raised:
            await collect(ollama, GenerationOptions())
        assert "ollama-down" in raised.value.message
        assert url in raised.value.message

        with pytest.raises(LabUnavailable, match="ollama-down"):
            await ollama.check()
    finally:
        await ollama.close()


async def test_a_refused_connection_is_retried_until_the_server_is_up() -> None:
    port = free_port()
    fake = FakeOllama()
    ollama = OllamaBackend("ollama-late", f"http://127.0.0.1:{port}", backoff_s=0.2)

    async def start_late() -> None:
        await asyncio.sleep(0.1)  # after the first attempt, before the retry
        await fake.start(port)

    starting = asyncio.create_task(start_late())
    try:
        chunks = await collect(ollama, GenerationOptions())
        assert chunks[-1] == Usage(12, 5, 0.25)
    finally:
        await starting
        await ollama.close()
        await fake.stop()


async def test_closing_the_stream_disconnects_from_ollama(
    fake: FakeOllama, backend: OllamaBackend
) -> None:
    fake.words = [f" word{i}" for i in range(100)]
    fake.delay_s = 0.05
    stream = backend.chat_model(MODEL).stream(HELLO, GenerationOptions())
    received = [await anext(stream), await anext(stream)]
    await stream.aclose()
    closed_at = time.monotonic()

    assert received == [TextChunk(" word0"), TextChunk(" word1")]
    await asyncio.wait_for(fake.disconnected.wait(), timeout=1.0)
    assert fake.disconnected_at is not None
    assert fake.disconnected_at - closed_at < 1.0
    assert fake.lines_sent < 10, "Ollama stopped streaming soon after the close"
