"""The http_lab backend against the real lab service (``python -m
agentlab.labservice``): the same results as the embedded lab, streamed or
not, its errors as domain errors, outages and restarts, and cancellation
that reaches the lab service's model.

Labs that must be slow or fail on cue are served in-process by the same
``LabServer`` app."""

from __future__ import annotations

import asyncio
import itertools
import logging
import re
import time
from collections.abc import AsyncGenerator, AsyncIterator, Iterator
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
from aiohttp import web

from agentlab.core.errors import InvalidArgument, LabFailed, LabUnavailable
from agentlab.core.ports import (
    Lab,
    LabEvent,
    LabNodeEnded,
    LabNodeStarted,
    LabOutput,
    LabToken,
    Route,
)
from agentlab.core.runner import Runner
from agentlab.core.types import ExecutionMode, GenerationOptions, Result, Task
from agentlab.devstack import LabServiceProcess, free_port
from agentlab.lab.base import ChatMessage, ModelChunk, TextChunk, Usage
from agentlab.lab.echo import EchoModel
from agentlab.lab.graph import NODES
from agentlab.lab.graph_lab import GraphLab
from agentlab.lab.http_lab import HttpLabBackend
from agentlab.labservice.app import ANY_MODEL, LabServer, listen
from tests.helpers.runs import run_to_end

ECHO = {"AGENTLAB_DEFAULT_BACKEND": "echo"}
PROMPT = "the quick brown fox jumps over the lazy dog"

_L = TypeVar("_L", bound=Lab)


def task(
    prompt: str = PROMPT, mode: ExecutionMode = ExecutionMode.INFERENCE, **options: Any
) -> Task:
    return Task(prompt, "requested-model", mode, GenerationOptions(**options))


def runner(lab: Lab) -> Runner:
    return Runner(lambda model: Route(lab), default_max_tokens=32)


async def started(lab: _L) -> _L:
    await lab.start()
    return lab


def shape(result: Result) -> tuple[object, ...]:
    """What must not depend on where the lab runs (timings do)."""
    return (
        result.output,
        [
            (
                s.node,
                s.status,
                s.input,
                s.output,
                s.metrics.prompt_tokens,
                s.metrics.completion_tokens,
            )
            for s in result.flow
        ],
        result.metrics.prompt_tokens,
        result.metrics.completion_tokens,
    )


@pytest.fixture(scope="module")
def echo_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabServiceProcess]:
    """Shared by the tests that leave it running."""
    log = tmp_path_factory.mktemp("echo-lab") / "lab.log"
    service = LabServiceProcess(free_port(), log, ECHO).start()
    yield service
    service.stop()


@pytest.fixture
def own_echo_service(tmp_path: Path) -> Iterator[LabServiceProcess]:
    service = LabServiceProcess(free_port(), tmp_path / "lab.log", ECHO).start()
    yield service
    service.stop()


@pytest.fixture
async def backend(echo_service: LabServiceProcess) -> AsyncIterator[HttpLabBackend]:
    backend = HttpLabBackend("lab", echo_service.url)
    await backend.start()
    yield backend
    await backend.close()


# The lab service process, on the echo model.


@pytest.mark.e2e
@pytest.mark.parametrize("stream", [True, False], ids=["ndjson", "json"])
@pytest.mark.parametrize("mode", list(ExecutionMode), ids=lambda m: m.value)
async def test_same_result_as_the_embedded_lab(
    echo_service: LabServiceProcess, mode: ExecutionMode, stream: bool
) -> None:
    backend = HttpLabBackend("lab", echo_service.url, stream=stream)
    try:
        remote = await run_to_end(runner(await started(backend.lab("some-model"))), task(mode=mode))
    finally:
        await backend.close()
    local = await run_to_end(runner(await started(GraphLab(EchoModel()))), task(mode=mode))

    assert shape(remote) == shape(local)
    nodes = ["inference"] if mode is ExecutionMode.INFERENCE else list(NODES)
    assert [step.node for step in remote.flow] == nodes
    assert remote.output
    assert (remote.metrics.backend, remote.metrics.model) == ("lab", "some-model")
    if not stream:
        # No tokens cross the wire: the generation time must have.
        assert all(step.metrics.tokens_per_second > 0 for step in remote.flow)


@pytest.mark.e2e
async def test_health_check_and_request_log(
    echo_service: LabServiceProcess, backend: HttpLabBackend
) -> None:
    await backend.check()
    async with httpx.AsyncClient(base_url=echo_service.url) as client:
        health = await client.get("/orchestrate/")
    assert health.json() == {"status": "ok", "backend": "echo", "model": "echo"}

    await run_to_end(runner(await started(backend.lab("m"))), task())
    events = len(PROMPT.split()) + 3  # node started, the tokens, node finished, output
    assert re.search(rf"POST /inference/ -> 200, {events} events in \d+ ms", echo_service.log())


@pytest.mark.e2e
@pytest.mark.parametrize("stream", [True, False], ids=["ndjson", "json"])
async def test_a_task_the_lab_rejects_is_invalid_argument(
    echo_service: LabServiceProcess, stream: bool
) -> None:
    # Straight to the lab: the runner would reject the prompt before sending it.
    backend = HttpLabBackend("lab", echo_service.url, stream=stream)
    lab = await started(backend.lab("m"))
    try:
        with pytest.raises(InvalidArgument) as raised:
            async with aclosing(lab.run(task(" \n"))) as events:
                await anext(events)
    finally:
        await backend.close()
    assert raised.value.field == "prompt"
    assert raised.value.description == "must contain at least one non-whitespace character"


@pytest.mark.e2e
async def test_the_lab_names_every_field_it_rejects(echo_service: LabServiceProcess) -> None:
    """The lab service holds tasks to the contract's rules, as the gateway
    does, and its wire error carries each violation."""
    backend = HttpLabBackend("lab", echo_service.url, stream=True)
    lab = await started(backend.lab("m"))
    try:
        with pytest.raises(InvalidArgument) as raised:
            async with aclosing(lab.run(task(" ", temperature=9.0, max_tokens=0))) as events:
                await anext(events)
    finally:
        await backend.close()
    assert [(v.field, v.reason) for v in raised.value.violations] == [
        ("prompt", "PROMPT_NOT_BLANK"),
        ("temperature", "DOUBLE_GTE_LTE"),
        ("max_tokens", "INT32_GTE_LTE"),
    ]


@pytest.mark.e2e
@pytest.mark.parametrize(
    ("body", "status", "field"),
    [
        (b'{"prompt": 3}', 400, "prompt"),
        (b'{"model": "m"}', 400, "prompt"),
        (b'{"prompt": "hi", "options": {"max_tokens": 0}}', 400, "max_tokens"),
        (b'{"prompt": "hi", "options": {"temperature": "hot"}}', 400, "temperature"),
        (b'{"prompt": "hi", "stream": "yes"}', 400, "stream"),
        (b"not json", 422, None),
        (b"[1, 2]", 422, None),
    ],
)
async def test_bad_requests_get_a_status_and_the_field(
    echo_service: LabServiceProcess, body: bytes, status: int, field: str | None
) -> None:
    async with httpx.AsyncClient(base_url=echo_service.url) as client:
        answer = await client.post("/orchestrate/", content=body)
    assert answer.status_code == status
    error = answer.json()["error"]
    assert error["code"] == "INVALID_ARGUMENT"
    assert error.get("field") == field


@pytest.mark.e2e
async def test_stopped_lab_service_is_unavailable_until_it_restarts(
    own_echo_service: LabServiceProcess,
) -> None:
    service = own_echo_service
    backend = HttpLabBackend("lab", service.url)
    run = runner(await started(backend.lab("m")))
    try:
        before = await run_to_end(run, task())
        service.stop()

        with pytest.raises(LabUnavailable) as raised:
            await run_to_end(run, task())
        assert raised.value.backend == "lab"
        assert raised.value.address == service.url
        assert f"'lab' at {service.url}" in raised.value.message
        assert "connection refused" in raised.value.message
        with pytest.raises(LabUnavailable, match="connection refused"):
            await backend.check()

        service.start()  # the same port; the same client
        await backend.check()
        assert shape(await run_to_end(run, task())) == shape(before)
    finally:
        await backend.close()


# In-process lab services, for labs that must be slow or fail on cue.


class SlowEcho:
    """The echo model at one word per ``delay_s``; it notes what it generated
    and when its stream was closed."""

    backend = "slow"
    name = "slow-echo"

    def __init__(self, delay_s: float) -> None:
        self.delay_s = delay_s
        self.generated = 0
        self.closed_at: float | None = None
        self.closed = asyncio.Event()

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def stream(
        self, messages: list[ChatMessage], options: GenerationOptions
    ) -> AsyncGenerator[ModelChunk, None]:
        try:
            words = messages[-1].content.split()[: options.max_tokens]
            for word in words:
                await asyncio.sleep(self.delay_s)
                self.generated += 1
                yield TextChunk(word + " ")
            yield Usage(prompt_tokens=len(words), completion_tokens=len(words))
        finally:
            self.closed_at = time.monotonic()
            self.closed.set()


class Failing:
    """Generates two words, then fails with ``error``."""

    backend = "failing"
    name = "failing"

    def __init__(self, error: Exception) -> None:
        self.error = error

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def stream(
        self, messages: list[ChatMessage], options: GenerationOptions
    ) -> AsyncGenerator[ModelChunk, None]:
        yield TextChunk("partial ")
        yield TextChunk("answer ")
        raise self.error


@dataclass
class Served:
    url: str
    service: LabServer


@asynccontextmanager
async def serve(lab: Lab, *, start: bool = True) -> AsyncIterator[Served]:
    service = LabServer({ANY_MODEL: lab}, default_max_tokens=100)
    if start:
        await service.start()
    app_runner, port = await listen(service, "127.0.0.1", 0)
    try:
        yield Served(f"http://127.0.0.1:{port}", service)
    finally:
        await service.drain(0)
        await app_runner.cleanup()
        await service.close()


@pytest.fixture
async def slow() -> AsyncIterator[tuple[SlowEcho, Served]]:
    model = SlowEcho(delay_s=0.05)
    async with serve(GraphLab(model)) as served:
        yield model, served


async def test_events_arrive_as_the_lab_produces_them(slow: tuple[SlowEcho, Served]) -> None:
    model, served = slow
    backend = HttpLabBackend("lab", served.url)
    lab = await started(backend.lab("m"))
    arrivals: list[tuple[float, LabEvent]] = []
    try:
        async with aclosing(lab.run(task("one two three four five six seven eight"))) as events:
            async for event in events:
                arrivals.append((time.monotonic(), event))
    finally:
        await backend.close()

    kinds = [type(event) for _, event in arrivals]
    assert kinds == [LabNodeStarted, *[LabToken] * 8, LabNodeEnded, LabOutput]
    token_times = [at for at, event in arrivals if isinstance(event, LabToken)]
    # Eight words at 50 ms each: spread out, not delivered at the end in one go.
    assert token_times[-1] - token_times[0] > 7 * model.delay_s * 0.8
    assert all(b > a for a, b in itertools.pairwise(token_times))


@pytest.mark.parametrize("stream", [True, False], ids=["ndjson", "json"])
async def test_cancelling_a_run_stops_the_model_behind_the_lab_service(
    slow: tuple[SlowEcho, Served], stream: bool, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="agentlab.labservice")
    model, served = slow
    backend = HttpLabBackend("lab", served.url, stream=stream)
    lab = await started(backend.lab("m"))
    long_task = task(" ".join(["word"] * 100), max_tokens=100)  # 5 s if left alone
    try:
        if stream:
            events = lab.run(long_task)
            tokens = 0
            while tokens < 2:
                tokens += isinstance(await anext(events), LabToken)
            stopped = time.monotonic()
            await events.aclose()
        else:
            # A complete answer has nothing to read early: the caller's
            # deadline is what cuts it short.
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(run_to_end(runner(lab), long_task), 0.2)
            stopped = time.monotonic()
        await asyncio.wait_for(model.closed.wait(), 1.0)
    finally:
        await backend.close()

    assert model.closed_at is not None
    assert model.closed_at - stopped < 1.0
    assert model.generated < 10
    assert "client went away after" in caplog.text


@pytest.mark.parametrize(
    ("words", "grace_s", "finishes"),
    [(6, 5.0, True), (100, 0.2, False)],
    ids=["within-grace", "past-grace"],
)
async def test_draining_lets_runs_finish_within_the_grace_only(
    slow: tuple[SlowEcho, Served], words: int, grace_s: float, finishes: bool
) -> None:
    model, served = slow
    backend = HttpLabBackend("lab", served.url, connect_attempts=1)
    lab = await started(backend.lab("m"))
    events = lab.run(task(" ".join(["word"] * words), max_tokens=words))
    try:
        await anext(events)  # in flight
        drained = asyncio.create_task(served.service.drain(grace_s))
        await asyncio.sleep(0)
        with pytest.raises(LabUnavailable, match="stopping"):
            await backend.check()
        with pytest.raises(LabUnavailable, match="stopping"):
            await run_to_end(runner(lab), task())
        if finishes:
            rest = [event async for event in events]
            assert isinstance(rest[-1], LabOutput)
        else:
            with pytest.raises(LabUnavailable, match="broke mid-response"):
                async for _ in events:
                    pass
        await drained
    finally:
        await events.aclose()
        await backend.close()
    # Drained means the model has stopped: its models may be unloaded now.
    assert model.closed.is_set()
    assert (model.generated == words) is finishes


@pytest.mark.parametrize("stream", [True, False], ids=["ndjson", "json"])
@pytest.mark.parametrize(
    ("error", "expected", "message"),
    [
        (InvalidArgument("prompt", "too long for the context"), InvalidArgument, "too long"),
        (LabFailed("embedded", "the model ran out of memory"), LabFailed, "out of memory"),
        (RuntimeError("segfault at 0xdeadbeef"), LabFailed, "internal error (error id "),
    ],
    ids=["invalid-argument", "lab-failed", "unexpected"],
)
async def test_lab_errors_become_domain_errors(
    error: Exception, expected: type[Exception], message: str, stream: bool
) -> None:
    async with serve(GraphLab(Failing(error))) as served:
        backend = HttpLabBackend("lab", served.url, stream=stream)
        try:
            with pytest.raises(expected) as raised:
                await run_to_end(runner(await started(backend.lab("m"))), task())
        finally:
            await backend.close()
    assert message in str(raised.value)
    assert "0xdeadbeef" not in str(raised.value)  # internals stay in the lab service's log
    if isinstance(raised.value, InvalidArgument):
        assert raised.value.field == "prompt"
    elif isinstance(raised.value, LabFailed):
        assert raised.value.backend == "lab"


async def test_a_lab_service_still_loading_is_unavailable() -> None:
    async with serve(GraphLab(EchoModel()), start=False) as served:
        backend = HttpLabBackend("lab", served.url)
        try:
            with pytest.raises(LabUnavailable, match="HTTP 503"):
                await backend.check()
            with pytest.raises(LabUnavailable, match="starting"):
                await run_to_end(runner(await started(backend.lab("m"))), task())
        finally:
            await backend.close()


@pytest.mark.parametrize(
    ("content_type", "body", "message"),
    [
        (
            "application/x-ndjson",
            b'{"type": "node_started", "node": "n", "input": "i"}\n',
            "ended early",
        ),
        ("application/x-ndjson", b'{"type": "surprise"}\n', "off the wire format"),
        ("application/x-ndjson", b"not json\n", "not JSON"),
        ("application/json", b'{"output": "x"}', "off the wire format"),
        ("text/html", b"<html>", "unexpected content type"),
    ],
    ids=["truncated", "unknown-line", "not-json", "no-steps", "html"],
)
async def test_a_lab_off_the_wire_format_fails_the_run(
    content_type: str, body: bytes, message: str
) -> None:
    async def answer(request: web.Request) -> web.Response:
        return web.Response(body=body, headers={"Content-Type": content_type})

    app = web.Application()
    app.router.add_post("/inference/", answer)
    app_runner = web.AppRunner(app)
    await app_runner.setup()
    port = free_port()
    await web.TCPSite(app_runner, "127.0.0.1", port).start()
    backend = HttpLabBackend("lab", f"http://127.0.0.1:{port}")
    try:
        with pytest.raises(LabFailed, match=message):
            await run_to_end(runner(await started(backend.lab("m"))), task())
    finally:
        await backend.close()
        await app_runner.cleanup()


# The lab service process on the real model.


@pytest.fixture(scope="module")
def model_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabServiceProcess]:
    log = tmp_path_factory.mktemp("model-lab") / "lab.log"
    service = LabServiceProcess(free_port(), log).start(timeout_s=120)
    yield service
    service.stop()


@pytest.mark.e2e
@pytest.mark.model
async def test_orchestration_on_the_real_model(model_service: LabServiceProcess) -> None:
    backend = HttpLabBackend("lab", model_service.url)
    try:
        result = await run_to_end(
            runner(await started(backend.lab("smollm2"))),
            task("What is the capital of France?", ExecutionMode.ORCHESTRATION, max_tokens=24),
        )
    finally:
        await backend.close()
    assert [step.node for step in result.flow] == list(NODES)
    assert all(step.metrics.completion_tokens > 0 for step in result.flow)
    assert result.output.strip()
    assert result.metrics.backend == "lab"


@pytest.mark.e2e
@pytest.mark.model
async def test_closing_a_run_stops_the_real_model(model_service: LabServiceProcess) -> None:
    """The lab service logs "client went away" only after the model's
    generation has stopped (llama.cpp's worker is awaited on the way out),
    and only if the run had not finished: seeing it within 1 s of closing,
    a few events in, is seeing the 400-token generation cut short."""
    backend = HttpLabBackend("lab", model_service.url)
    lab = await started(backend.lab("smollm2"))
    story = task(
        "Write a very long story about a dragon who learns to cook, in many chapters.",
        max_tokens=400,
    )
    try:
        events = lab.run(story)
        tokens = 0
        while tokens < 2:
            tokens += isinstance(await anext(events), LabToken)
        await events.aclose()
        closed = time.monotonic()
        gone = None
        while gone is None and time.monotonic() - closed < 1.0:
            gone = re.search(r"client went away after (\d+) events", model_service.log())
            await asyncio.sleep(0.02)
        assert gone is not None, model_service.log()[-2000:]
        assert int(gone.group(1)) < 20

        # The slot it held is free again.
        after = await run_to_end(runner(lab), task("Say hi.", max_tokens=4))
        assert after.metrics.completion_tokens > 0
    finally:
        await backend.close()
