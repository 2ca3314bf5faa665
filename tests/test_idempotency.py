"""Idempotent retries (issue 9, items 1 and 2), through the real Envoy and
over gRPC: a call with a request_id outlives its caller, a retry attaches to
the same execution and gets its result, a second caller leaving cancels
nothing, an explicit cancel still does; the key is bound to the request it
first came with (409 ALREADY_EXISTS otherwise), belongs to one caller, is
looked up before the model is routed, and yields one execution however many
calls race with it. Where the store decides, on SQLite and PostgreSQL.

The model behind "mistral7b" is a fake Ollama that takes DELAY_S per word:
slow enough that a client giving up after 1 s leaves mid-execution."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import closing
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import httpx
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from agentlab.core.errors import IdempotencyKeyReused, ModelNotFound
from agentlab.core.ports import Route
from agentlab.core.runner import Runner
from agentlab.core.types import ExecutionMode, GenerationOptions, Task
from agentlab.devstack import Stack
from agentlab.executions import migrations
from agentlab.executions.local_bus import LocalBus
from agentlab.executions.migrations import quote_ident
from agentlab.executions.model import ExecutionStore
from agentlab.executions.postgres_store import PostgresStore
from agentlab.executions.service import Executions
from agentlab.executions.sqlite_store import SqliteStore
from agentlab.v1 import execution_pb2 as pb
from agentlab.v1 import lab_service_pb2 as svc
from agentlab.v1 import lab_service_pb2_grpc as svc_grpc
from tests.helpers.callers import ALICE, BOB, CALLERS
from tests.helpers.fake_ollama import FakeOllama
from tests.helpers.services import postgres_schema, postgres_url
from tests.helpers.sse import aread_events
from tests.helpers.stacks import StackFactory
from tests.helpers.statuses import details_of

WORDS = ["Dos", ",", " tres", " y", " cinco", "."]
ANSWER = "".join(WORDS)
# Six words at 0.5 s: 3 s per execution, so at 1 s it is surely running.
DELAY_S = 0.5
# The case 1, exactly.
CASE_1 = {"prompt": "Dime 3 números primos", "model": "mistral7b", "request_id": "retry-1"}
SUCCEEDED = "EXECUTION_STATE_SUCCEEDED"
ALREADY_EXISTS = grpc.StatusCode.ALREADY_EXISTS.value[0]
CANCELLED = grpc.StatusCode.CANCELLED.value[0]


# --- the stack ----------------------------------------------------------------


@pytest.fixture
async def ollama() -> AsyncIterator[FakeOllama]:
    fake = FakeOllama(models=["mistral:7b"], words=list(WORDS), delay_s=DELAY_S)
    await fake.start()
    yield fake
    await fake.stop()


def routing_file(path: Path, ollama: FakeOllama, *names: str) -> Path:
    """A routing file serving ``names`` from the fake Ollama (and "echo",
    which every routing file serves)."""
    models = "".join(f'  {name}: {{backend: ollama, model: "mistral:7b"}}\n' for name in names)
    path.write_text(
        f'backends:\n  ollama: {{kind: ollama, url: "{ollama.url}"}}\nmodels:\n{models}'
    )
    return path


async def start_routed_stack(
    start_stack: StackFactory, tmp_path: Path, ollama: FakeOllama, env: Mapping[str, str]
) -> Stack:
    models = routing_file(tmp_path / "models.yaml", ollama, "mistral7b")
    # In a thread: the fake Ollama answers from this event loop meanwhile.
    return await asyncio.to_thread(start_stack, {"AGENTLAB_MODELS_FILE": str(models), **env})


@pytest.fixture
def pg_schema() -> Iterator[str]:
    with postgres_schema("idempotency") as name:
        yield name


@pytest.fixture(params=["sqlite", "postgres"])
def store_env(request: pytest.FixtureRequest) -> dict[str, str]:
    """The service's store settings: SQLite in the data dir, or PostgreSQL."""
    if request.param == "sqlite":
        return {}
    schema = request.getfixturevalue("pg_schema")
    # asyncpg passes unknown query parameters on as server settings.
    return {"AGENTLAB_DATABASE_URL": f"{postgres_url()}?search_path={schema}"}


@pytest.fixture
async def stack(
    start_stack: StackFactory, tmp_path: Path, ollama: FakeOllama
) -> AsyncIterator[Stack]:
    started = await start_routed_stack(start_stack, tmp_path, ollama, {})
    yield started
    # In a thread, while the fake Ollama still answers from this event loop.
    await asyncio.to_thread(started.stop)


@pytest.fixture
async def any_store_stack(
    start_stack: StackFactory, tmp_path: Path, ollama: FakeOllama, store_env: dict[str, str]
) -> AsyncIterator[Stack]:
    started = await start_routed_stack(start_stack, tmp_path, ollama, store_env)
    yield started
    await asyncio.to_thread(started.stop)


async def executions_with(client: httpx.AsyncClient, url: str, key: str) -> list[dict[str, Any]]:
    """The executions recorded with request_id ``key``."""
    answer = await client.get(f"{url}/api/v1/executions", params={"page_size": 100})
    assert answer.status_code == 200, answer.text
    return [e for e in answer.json().get("executions", []) if e.get("request_id") == key]


async def wait_for_state(
    client: httpx.AsyncClient, url: str, key: str, states: set[str], timeout_s: float = 30.0
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        found = await executions_with(client, url, key)
        if found and found[0]["state"] in states:
            [execution] = found
            return execution
        assert time.monotonic() < deadline, f"{key}: {found}"
        await asyncio.sleep(0.05)


def assert_reused(answer: httpx.Response, key: str, execution_id: str) -> None:
    assert answer.status_code == 409, answer.text
    error = answer.json()
    assert error["code"] == ALREADY_EXISTS
    assert f"request_id {key!r} was first used for a different request" in error["message"]
    [info] = details_of(error, "ErrorInfo")
    assert info["reason"] == "IDEMPOTENCY_KEY_REUSED"
    assert info["domain"] == "agentlab.v1"
    assert info["metadata"] == {"request_id": key, "execution_id": execution_id}


# --- item 1: the caller going away does not cancel a keyed execution ---------


async def test_a_retry_after_the_client_gave_up_gets_the_result(
    stack: Stack, ollama: FakeOllama
) -> None:
    """The issue's case 1: the client gives up after 1 s, then retries."""
    url = f"{stack.url}/api/v1/execute"
    async with httpx.AsyncClient(timeout=1.0) as impatient:
        with pytest.raises(httpx.ReadTimeout):
            await impatient.post(url, json=CASE_1)

    async with httpx.AsyncClient(timeout=30) as client:
        # The first caller left mid-execution; its execution runs on, and a
        # retry now waits for it rather than starting another.
        [running] = await executions_with(client, stack.url, "retry-1")
        assert running["state"] in ("EXECUTION_STATE_QUEUED", "EXECUTION_STATE_RUNNING")
        retry = await client.post(url, json=CASE_1)
        assert retry.status_code == 200, retry.text
        result = retry.json()
        assert result["state"] == SUCCEEDED
        assert result["output"] == ANSWER
        assert result["execution_id"] == running["execution_id"]

        # Once it has ended, the stored result: the same answer.
        again = await client.post(url, json=CASE_1)
        assert again.status_code == 200, again.text
        assert again.json() == result

        [execution] = await executions_with(client, stack.url, "retry-1")
        assert execution["execution_id"] == result["execution_id"]
        assert execution["state"] == SUCCEEDED
    # The model ran once, to its end.
    assert len(ollama.requests) == 1
    assert not ollama.disconnected.is_set()


async def test_a_grpc_retry_after_the_deadline_gets_the_result(
    stack: Stack, ollama: FakeOllama
) -> None:
    request = svc.ExecuteRequest(
        prompt=CASE_1["prompt"], model=CASE_1["model"], request_id=CASE_1["request_id"]
    )
    async with grpc.aio.insecure_channel(stack.gateway_grpc) as channel:
        stub = svc_grpc.LabServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as gone:
            await stub.Execute(request, timeout=1.0)
        assert gone.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED

        # The first deadline bounded the call only, not the execution.
        retry = await stub.Execute(request, timeout=30)
        assert retry.state == pb.EXECUTION_STATE_SUCCEEDED
        assert retry.output == ANSWER
        got = await stub.GetExecution(svc.GetExecutionRequest(execution_id=retry.execution_id))
        assert got.execution.state == pb.EXECUTION_STATE_SUCCEEDED
        listed = await stub.ListExecutions(svc.ListExecutionsRequest(page_size=100))
        assert [e.execution_id for e in listed.executions if e.request_id == "retry-1"] == [
            retry.execution_id
        ]
    assert len(ollama.requests) == 1


async def test_a_second_caller_leaving_does_not_cancel_it_for_the_first(
    stack: Stack, ollama: FakeOllama
) -> None:
    ollama.delay_s = 0.8  # time enough for two callers to come and go
    url = f"{stack.url}/api/v1/execute"
    body = {**CASE_1, "request_id": "shared"}
    async with httpx.AsyncClient(timeout=30) as client:
        first = asyncio.create_task(client.post(url, json=body))
        running = await wait_for_state(client, stack.url, "shared", {"EXECUTION_STATE_RUNNING"})

        # REST: a second caller attaches through the key, then gives up.
        async with httpx.AsyncClient(timeout=0.5) as second:
            with pytest.raises(httpx.ReadTimeout):
                await second.post(url, json=body)
        # gRPC: a third one attaches and cancels its own call.
        async with grpc.aio.insecure_channel(stack.gateway_grpc) as channel:
            call = svc_grpc.LabServiceStub(channel).Execute(
                svc.ExecuteRequest(prompt=body["prompt"], model=body["model"], request_id="shared"),
                timeout=30,
            )
            await asyncio.sleep(0.3)
            assert call.cancel()
        # Both left while it ran.
        [execution] = await executions_with(client, stack.url, "shared")
        assert execution["state"] == "EXECUTION_STATE_RUNNING"

        answer = await first
        assert answer.status_code == 200, answer.text
        assert answer.json()["execution_id"] == running["execution_id"]
        assert answer.json()["output"] == ANSWER
        [execution] = await executions_with(client, stack.url, "shared")
        assert execution["state"] == SUCCEEDED


async def test_an_attached_stream_leaving_does_not_cancel_it_even_when_asked_to(
    stack: Stack, ollama: FakeOllama
) -> None:
    """An explicit DISCONNECT_POLICY_CANCEL is the creating call's: a caller
    attached through the key never cancels the execution for the others."""
    ollama.delay_s = 0.05  # three model calls per orchestration
    request = svc.OrchestrateRequest(
        prompt="Dime 3 números primos",
        model="mistral7b",
        request_id="stream-1",
        on_disconnect=svc.DISCONNECT_POLICY_CANCEL,
    )
    async with grpc.aio.insecure_channel(stack.gateway_grpc) as channel:
        stub = svc_grpc.LabServiceStub(channel)
        first = stub.Orchestrate(request, timeout=60)
        started = await first.read()
        assert started.event.HasField("execution_started")

        second = stub.Orchestrate(request, timeout=60)
        replayed = await second.read()
        # Attached: the same execution, from its first event.
        assert replayed.event == started.event
        assert second.cancel()

        rest = []
        while (response := await first.read()) is not grpc.aio.EOF:
            rest.append(response.event)
    assert rest[-1].HasField("execution_completed"), rest[-1]
    assert [e.sequence for e in [started.event, *rest]] == list(range(1, len(rest) + 2))


async def test_a_keyed_stream_runs_on_and_a_retry_streams_it_all(
    stack: Stack, ollama: FakeOllama
) -> None:
    """Without on_disconnect, a keyed Orchestrate runs on when its caller
    leaves; with an explicit CANCEL, the creating caller leaving cancels."""
    ollama.delay_s = 0.05
    url = f"{stack.url}/api/v1/orchestrate"
    body = {"prompt": "Dime 3 números primos", "model": "mistral7b", "request_id": "o-1"}
    first: dict[str, Any] = {}
    async with httpx.AsyncClient(timeout=60) as client:
        async with client.stream("POST", url, json=body) as response:
            assert response.status_code == 200
            async for received in aread_events(response):
                first = received.event
                break  # the client goes away after the first event
        finished = await wait_for_state(
            client, stack.url, "o-1", {SUCCEEDED, "EXECUTION_STATE_CANCELLED"}
        )
        assert finished["state"] == SUCCEEDED

        async with client.stream("POST", url, json=body) as response:
            events = [r.event async for r in aread_events(response)]
        assert events[0] == first
        assert [e["sequence"] for e in events] == list(range(1, len(events) + 1))
        assert "execution_completed" in events[-1]
        assert events[-1]["execution_completed"]["result"]["execution_id"] == first["execution_id"]

        cancelling = {**body, "request_id": "o-2", "on_disconnect": "DISCONNECT_POLICY_CANCEL"}
        async with client.stream("POST", url, json=cancelling) as response:
            async for _ in aread_events(response):
                break
        ended = await wait_for_state(
            client, stack.url, "o-2", {SUCCEEDED, "EXECUTION_STATE_CANCELLED"}
        )
        assert ended["state"] == "EXECUTION_STATE_CANCELLED"


async def test_an_explicit_cancel_still_ends_a_keyed_execution(stack: Stack) -> None:
    url = f"{stack.url}/api/v1/execute"
    body = {**CASE_1, "request_id": "to-cancel"}
    async with httpx.AsyncClient(timeout=30) as client:
        waiting = asyncio.create_task(client.post(url, json=body))
        running = await wait_for_state(client, stack.url, "to-cancel", {"EXECUTION_STATE_RUNNING"})
        cancelled = await client.post(
            f"{stack.url}/api/v1/executions/{running['execution_id']}:cancel", json={}
        )
        assert cancelled.status_code == 200, cancelled.text
        assert cancelled.json()["execution"]["state"] == "EXECUTION_STATE_CANCELLED"

        # The waiting caller hears of it (CANCELLED is 499 through Envoy),
        # and so does a retry: the key names a cancelled execution.
        for answer in (await waiting, await client.post(url, json=body)):
            assert answer.status_code == 499, answer.text
            assert answer.json()["code"] == CANCELLED
        [execution] = await executions_with(client, stack.url, "to-cancel")
        assert execution["state"] == "EXECUTION_STATE_CANCELLED"


# --- item 2: the key is bound to its request, per caller ----------------------


async def test_a_key_reused_for_another_request_is_409(any_store_stack: Stack) -> None:
    """The issue's case 2, then every other field that defines the work."""
    stack = any_store_stack
    url = f"{stack.url}/api/v1/execute"
    alpha = {"prompt": "alpha", "request_id": "k2", "model": "echo"}
    async with httpx.AsyncClient(timeout=30) as client:
        first = await client.post(url, json=alpha)
        assert first.status_code == 200, first.text
        execution_id = first.json()["execution_id"]
        assert first.json()["output"] == "alpha"

        refused = await client.post(
            url, json={"prompt": "beta", "request_id": "k2", "model": "echo"}
        )
        assert_reused(refused, "k2", execution_id)

        for changed in (
            {"temperature": 0.5},
            {"max_tokens": 1},
            {"seed": 7},
            {"model": "mistral7b"},
            {"mode": "EXECUTION_MODE_ORCHESTRATION"},
        ):
            assert_reused(await client.post(url, json={**alpha, **changed}), "k2", execution_id)
        # Orchestrate is another mode of work: refused before its stream starts.
        assert_reused(
            await client.post(f"{stack.url}/api/v1/orchestrate", json=alpha), "k2", execution_id
        )

        # The same request: the same execution. background says how to wait
        # for it, not what it is.
        again = await client.post(url, json=alpha)
        assert again.status_code == 200, again.text
        assert again.json() == first.json()
        background = await client.post(url, json={**alpha, "background": True})
        assert background.status_code == 200, background.text
        assert background.json()["execution_id"] == execution_id
        assert background.json()["state"] == SUCCEEDED

        [execution] = await executions_with(client, stack.url, "k2")
        assert execution["prompt"] == "alpha"

    async with grpc.aio.insecure_channel(stack.gateway_grpc) as channel:
        stub = svc_grpc.LabServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as refused_grpc:
            await stub.Execute(
                svc.ExecuteRequest(prompt="beta", request_id="k2", model="echo"), timeout=10
            )
    assert refused_grpc.value.code() == grpc.StatusCode.ALREADY_EXISTS
    status = rpc_status.from_call(refused_grpc.value)
    assert status is not None
    info = error_details_pb2.ErrorInfo()
    assert status.details[0].Unpack(info)
    assert (info.reason, info.domain) == ("IDEMPOTENCY_KEY_REUSED", "agentlab.v1")
    assert dict(info.metadata) == {"request_id": "k2", "execution_id": execution_id}


@pytest.fixture
def keyed_stack(start_stack: StackFactory) -> Stack:
    return start_stack({"AGENTLAB_DEFAULT_BACKEND": "echo"}, keys=CALLERS)


def test_each_caller_has_its_own_keys(keyed_stack: Stack) -> None:
    url = f"{keyed_stack.url}/api/v1/execute"

    def execute(key: str, prompt: str) -> httpx.Response:
        return httpx.post(
            url,
            json={"prompt": prompt, "request_id": "same-key"},
            headers={"Authorization": f"Bearer {key}"},
            timeout=10,
        )

    alice = execute(ALICE, "from alice")
    bob = execute(BOB, "from bob")
    assert alice.status_code == bob.status_code == 200, (alice.text, bob.text)
    assert alice.json()["execution_id"] != bob.json()["execution_id"]
    assert (alice.json()["output"], bob.json()["output"]) == ("from alice", "from bob")
    again = execute(ALICE, "from alice")
    assert again.json()["execution_id"] == alice.json()["execution_id"]
    # Bob's request is not Alice's: her key stays bound to hers.
    assert execute(ALICE, "from bob").status_code == 409


async def test_a_retry_finds_its_execution_after_the_model_left_the_routing_file(
    any_store_stack: Stack, ollama: FakeOllama, tmp_path: Path
) -> None:
    stack = any_store_stack
    ollama.delay_s = 0
    url = f"{stack.url}/api/v1/execute"
    body = {**CASE_1, "request_id": "before-the-change"}
    async with httpx.AsyncClient(timeout=30) as client:
        first = await client.post(url, json=body)
        assert first.status_code == 200, first.text

        # The model is removed from the routing file and the service restarted.
        models = routing_file(tmp_path / "models-after.yaml", ollama, "another")
        stack.service.stop()
        stack.service.env = {**stack.service.env, "AGENTLAB_MODELS_FILE": str(models)}
        await asyncio.to_thread(stack.service.start)

        fresh = await client.post(url, json={**body, "request_id": "after-the-change"})
        assert fresh.status_code == 404, fresh.text  # the model is gone indeed
        retry = await client.post(url, json=body)
        assert retry.status_code == 200, retry.text
        assert retry.json() == first.json()
        # And the key still refuses another request, rather than a 404.
        assert_reused(
            await client.post(url, json={**body, "prompt": "beta"}),
            "before-the-change",
            first.json()["execution_id"],
        )
    assert len(ollama.requests) == 1


async def test_concurrent_calls_with_one_key_make_one_execution(
    any_store_stack: Stack, ollama: FakeOllama
) -> None:
    stack = any_store_stack
    ollama.delay_s = 0.2
    url = f"{stack.url}/api/v1/execute"
    body = {**CASE_1, "request_id": "together"}
    async with httpx.AsyncClient(timeout=60) as client:
        answers = await asyncio.gather(*(client.post(url, json=body) for _ in range(8)))
        assert [a.status_code for a in answers] == [200] * 8, [a.text for a in answers]
        results = [a.json() for a in answers]
        assert all(result == results[0] for result in results)
        assert results[0]["output"] == ANSWER
        [execution] = await executions_with(client, stack.url, "together")
        assert execution["execution_id"] == results[0]["execution_id"]
        assert execution["state"] == SUCCEEDED
    assert len(ollama.requests) == 1


# --- records from before the fingerprint was stored ---------------------------


@pytest.fixture(params=["sqlite", "postgres"])
def old_store(request: pytest.FixtureRequest, tmp_path: Path) -> ExecutionStore:
    """A database at schema version 1 holding one finished execution with
    request_id "old-key", and an unopened store on it (opening migrates)."""
    row = {
        "id": "f" * 32,
        "request_id": "old-key",
        "caller": "",
        "model": "retired-model",
        "mode": "inference",
        "prompt": "Dime 3 números primos",
        "options": '{"temperature":0.5}',
        "state": "SUCCEEDED",
        "owner": "an-old-process",
    }
    now = datetime.now(UTC)
    columns = ", ".join([*row, "background", "created_at", "heartbeat_at"])
    with pytest.MonkeyPatch.context() as patch:
        if request.param == "sqlite":
            patch.setattr(migrations, "SQLITE", migrations.SQLITE[:1])
            path = tmp_path / "agentlab.db"
            with closing(sqlite3.connect(path, isolation_level=None)) as db:
                assert migrations.migrate_sqlite(db) == [1]
                micros = int(now.timestamp() * 1_000_000)
                db.execute(
                    f"INSERT INTO executions ({columns})"
                    f" VALUES ({', '.join('?' * (len(row) + 3))})",
                    (*row.values(), 0, micros, micros),
                )
            return SqliteStore(path)
        schema = request.getfixturevalue("pg_schema")
        patch.setattr(migrations, "POSTGRES", migrations.POSTGRES[:1])

        async def create() -> None:
            conn = await asyncpg.connect(
                postgres_url(), server_settings={"search_path": quote_ident(schema)}
            )
            try:
                assert await migrations.migrate_postgres(conn, schema) == [1]
                placeholders = ", ".join(f"${i}" for i in range(1, len(row) + 4))
                await conn.execute(
                    f"INSERT INTO executions ({columns}) VALUES ({placeholders})",
                    *row.values(),
                    False,
                    now,
                    now,
                )
            finally:
                await conn.close()

        asyncio.run(create())
        return PostgresStore(postgres_url(), schema=schema)


def _task(**changes: Any) -> Task:
    fields: dict[str, Any] = {
        "prompt": "Dime 3 números primos",
        "model": "retired-model",
        "mode": ExecutionMode.INFERENCE,
        "options": GenerationOptions(temperature=0.5),
    }
    return Task(**{**fields, **changes})


async def test_records_from_before_the_fingerprint_compare_their_request_fields(
    old_store: ExecutionStore,
) -> None:
    def no_model_is_served(model: str) -> Route:
        raise ModelNotFound(model, ["echo"])

    executions = Executions(
        Runner(no_model_is_served, default_max_tokens=16), old_store, LocalBus(), owner="now"
    )
    await executions.start()
    try:
        # Found before routing (which would refuse the retired model), and
        # compared by the request fields the old record keeps.
        same = await executions.submit(_task(), request_id="old-key")
        assert (same.record.id, same.created) == ("f" * 32, False)
        assert same.record.fingerprint == ""  # migrated, not backfilled
        for other in (
            _task(prompt="beta"),
            _task(options=GenerationOptions(temperature=0.7)),
            _task(options=GenerationOptions()),
            _task(mode=ExecutionMode.ORCHESTRATION),
        ):
            with pytest.raises(IdempotencyKeyReused) as reused:
                await executions.submit(other, request_id="old-key")
            assert reused.value.metadata == {"request_id": "old-key", "execution_id": "f" * 32}
        # A new key is new work, which is routed.
        with pytest.raises(ModelNotFound):
            await executions.submit(_task(), request_id="a-new-key")
    finally:
        await executions.stop(0)
