"""Traces of the remote model backends, in process: each model call is a
CLIENT span ``chat {model}`` under its node's span, and the HTTP request to
Ollama or an OpenAI-compatible server carries that span as its W3C
``traceparent`` (and the call's ``x-request-id``). Spans go to an in-memory
exporter; the servers are fakes that record the headers they get."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import aclosing
from dataclasses import dataclass, field

import pytest
from aiohttp import web
from aiohttp.typedefs import Middleware
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from agentlab.core.ports import LabToken
from agentlab.core.types import ExecutionMode, Task
from agentlab.lab.graph_lab import GraphLab
from agentlab.lab.ollama import OllamaBackend
from agentlab.lab.openai import OpenAIBackend
from agentlab.telemetry import logs, tracing
from tests.helpers.fake_ollama import FakeOllama
from tests.helpers.fake_server import FakeServer

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _recording(seen: list[dict[str, str]]) -> Middleware:
    @web.middleware
    async def record(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.method == "POST":
            seen.append({key.lower(): value for key, value in request.headers.items()})
        return await handler(request)

    return record


@dataclass
class HeadersSeenOllama(FakeOllama):
    headers: list[dict[str, str]] = field(default_factory=list)

    def add_routes(self, app: web.Application) -> None:
        app.middlewares.append(_recording(self.headers))
        super().add_routes(app)


@dataclass
class FakeOpenAI(FakeServer):
    """Just enough of POST /v1/chat/completions, streamed as SSE."""

    headers: list[dict[str, str]] = field(default_factory=list)

    def add_routes(self, app: web.Application) -> None:
        app.middlewares.append(_recording(self.headers))
        app.router.add_post("/v1/chat/completions", self._chat)

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        chunks = [
            {"choices": [{"delta": {"content": "Red"}}]},
            {"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 1}},
        ]
        for chunk in chunks:
            await response.write(f"data: {json.dumps(chunk)}\n\n".encode())
        await response.write(b"data: [DONE]\n\n")
        return response


@pytest.fixture
def exported() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    tracing.enable(SimpleSpanProcessor(exporter))
    yield exporter
    tracing.shutdown()


@pytest.fixture
async def ollama() -> AsyncIterator[HeadersSeenOllama]:
    server = HeadersSeenOllama()
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
async def openai() -> AsyncIterator[FakeOpenAI]:
    server = FakeOpenAI()
    await server.start()
    yield server
    await server.stop()


async def _run_under_a_span(lab: GraphLab) -> tuple[str, list[str]]:
    """Run an inference inside a span standing for the execution; returns
    its trace id and the tokens."""
    parent = tracing.start_span("execution inference")
    assert parent is not None
    tokens = []
    logs.request_id.set("request-7")
    with tracing.use_span(parent):
        task = Task(prompt="Name a colour", model="m", mode=ExecutionMode.INFERENCE)
        async with aclosing(lab.run(task)) as events:
            async for event in events:
                if isinstance(event, LabToken):
                    tokens.append(event.text)
    return format(parent.get_span_context().trace_id, "032x"), tokens


def _model_call(exporter: InMemorySpanExporter, name: str) -> ReadableSpan:
    spans = {span.name: span for span in exporter.get_finished_spans()}
    call, node = spans[name], spans["node inference"]
    assert call.parent is not None
    assert node.parent is not None
    assert call.parent.span_id == node.context.span_id
    assert node.parent.span_id == spans["execution inference"].context.span_id
    return call


def _ids(traceparent: str) -> tuple[str, str]:
    """A traceparent's trace and parent span ids (the flags vary: the SDK
    also sets W3C level 2's random-trace-id bit)."""
    version, trace_id, span_id, _flags = traceparent.split("-")
    assert version == "00"
    return trace_id, span_id


def _span_ids(span: ReadableSpan) -> tuple[str, str]:
    assert span.context is not None
    return f"{span.context.trace_id:032x}", f"{span.context.span_id:016x}"


async def test_an_ollama_call_is_a_span_and_carries_it(
    exported: InMemorySpanExporter, ollama: HeadersSeenOllama
) -> None:
    backend = OllamaBackend("ollama", ollama.url)
    try:
        _, tokens = await _run_under_a_span(backend.lab("llama3.2:1b"))
    finally:
        await backend.close()
    assert tokens
    call = _model_call(exported, "chat llama3.2:1b")
    assert call.attributes is not None
    assert call.attributes["gen_ai.provider.name"] == "ollama"
    assert call.attributes["gen_ai.usage.output_tokens"] == ollama.eval_count
    [headers] = ollama.headers
    assert _ids(headers["traceparent"]) == _span_ids(call)
    assert headers["x-request-id"] == "request-7"


async def test_an_openai_compatible_call_is_a_span_and_carries_it(
    exported: InMemorySpanExporter, openai: FakeOpenAI
) -> None:
    backend = OpenAIBackend("vllm", f"{openai.url}/v1")
    try:
        _, tokens = await _run_under_a_span(backend.lab("qwen"))
    finally:
        await backend.close()
    assert tokens == ["Red"]
    call = _model_call(exported, "chat qwen")
    assert call.attributes is not None
    assert call.attributes["gen_ai.usage.input_tokens"] == 7
    [headers] = openai.headers
    assert _ids(headers["traceparent"]) == _span_ids(call)


async def test_with_tracing_off_nothing_is_sent_and_nothing_recorded(
    ollama: HeadersSeenOllama,
) -> None:
    assert not tracing.enabled()
    backend = OllamaBackend("ollama", ollama.url)
    try:
        async with aclosing(
            backend.lab("llama3.2:1b").run(
                Task(prompt="x", model="m", mode=ExecutionMode.INFERENCE)
            )
        ) as events:
            async for _ in events:
                pass
    finally:
        await backend.close()
    [headers] = ollama.headers
    assert "traceparent" not in headers
