"""Scale-out: three service processes behind one Envoy, sharing PostgreSQL
and Redis, under steady load through Envoy; one of them is killed with
kill -9 (issue 12).

What must hold: only the calls in flight on the killed process fail (Envoy
resends every call that process never saw: its health checks and outlier
detection take it out, and the retry policy of gateway/envoy.yaml moves the
calls that found it gone), the load goes on on the other two, and every
execution is accounted for afterwards: finished, failed with a reason, or
taken over by a survivor (the dead process's queued background ones run
there, its running ones end FAILED naming it).

Every call carries a request_id of its own, so that the records in the
store can be matched to the calls, failed ones included.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import grpc
import pytest

from agentlab.executions.migrations import quote_ident
from agentlab.v1 import execution_pb2 as pb
from agentlab.v1 import lab_service_pb2 as svc
from agentlab.v1 import lab_service_pb2_grpc as svc_grpc
from tests.helpers.services import postgres_schema, postgres_url, redis_url
from tests.helpers.stacks import Replicas, start_replicas

pytestmark = pytest.mark.e2e

# Forty words at 5 ms each: an execution runs for about 0.2 s, so under
# load each process has some running and some queued when one is killed.
PROMPT = " ".join(f"word{i}" for i in range(40))
SETTINGS = {
    "AGENTLAB_DEFAULT_BACKEND": "echo",
    "AGENTLAB_ECHO_TOKEN_DELAY_S": "0.005",
    "AGENTLAB_MAX_RUNNING_EXECUTIONS": "4",
    # A survivor takes the dead process's executions over soon.
    "AGENTLAB_EXECUTION_HEARTBEAT_S": "0.2",
    "AGENTLAB_EXECUTION_LEASE_S": "1",
}
FINAL = {pb.EXECUTION_STATE_SUCCEEDED, pb.EXECUTION_STATE_FAILED, pb.EXECUTION_STATE_CANCELLED}
WORKERS = 12
LOAD_BEFORE_KILL_S = 2.0
LOAD_AFTER_KILL_S = 3.0


@dataclass
class Call:
    kind: str
    request_id: str
    started: float
    ended: float = 0.0
    execution_id: str = ""
    # None: it succeeded (a stream: it reached its final event).
    error: str | None = None


@dataclass
class Load:
    calls: list[Call] = field(default_factory=list)
    stop: asyncio.Event = field(default_factory=asyncio.Event)


@pytest.fixture
def schema() -> Iterator[str]:
    with postgres_schema("scale_out") as name:
        yield name


@pytest.fixture
def replicas(tmp_path: Path, schema: str) -> Iterator[Replicas]:
    env = {
        **SETTINGS,
        "AGENTLAB_DATABASE_URL": f"{postgres_url()}?search_path={schema}",
        "AGENTLAB_REDIS_URL": redis_url(),
    }
    with start_replicas(3, env, tmp_path) as started:
        yield started


async def one_call(stub: svc_grpc.LabServiceStub, kind: str, load: Load) -> None:
    loop = asyncio.get_running_loop()
    call = Call(kind=kind, request_id=uuid.uuid4().hex, started=loop.time())
    load.calls.append(call)
    try:
        if kind == "orchestrate":
            final = False
            async for response in stub.Orchestrate(
                svc.OrchestrateRequest(prompt=PROMPT, model="echo", request_id=call.request_id),
                timeout=30,
            ):
                call.execution_id = response.event.execution_id
                final = response.event.HasField("execution_completed")
            if not final:
                call.error = "the stream ended without execution_completed"
        else:
            response = await stub.Execute(
                svc.ExecuteRequest(
                    prompt=PROMPT,
                    model="echo",
                    request_id=call.request_id,
                    background=kind == "background",
                ),
                timeout=30,
            )
            call.execution_id = response.execution_id
    except grpc.aio.AioRpcError as error:
        call.error = f"{error.code().name}: {error.details()}"
    finally:
        call.ended = loop.time()


async def keep_calling(stub: svc_grpc.LabServiceStub, worker: int, load: Load) -> None:
    """Calls of one kind, one after another, until the load stops."""
    kind = ("execute", "background", "orchestrate")[worker % 3]
    while not load.stop.is_set():
        await one_call(stub, kind, load)
        if kind == "background":
            # Paced, so they queue behind the running ones without filling
            # the queues (a refusal would be a 429, not what this is about).
            await asyncio.sleep(0.3)


async def all_executions(stub: svc_grpc.LabServiceStub) -> list[pb.Execution]:
    executions: list[pb.Execution] = []
    token = ""
    while True:
        page: svc.ListExecutionsResponse = await stub.ListExecutions(
            svc.ListExecutionsRequest(page_size=100, page_token=token), timeout=10
        )
        executions.extend(page.executions)
        token = page.next_page_token
        if not token:
            return executions


async def settled(stub: svc_grpc.LabServiceStub, timeout_s: float = 30) -> list[pb.Execution]:
    """Every execution in the store, once none is queued or running."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        executions = await all_executions(stub)
        active = [e.execution_id for e in executions if e.state not in FINAL]
        if not active:
            return executions
        assert loop.time() < deadline, f"still queued or running: {active}"
        await asyncio.sleep(0.2)


def host_value(admin_port: int, port: int, key: str) -> str:
    """What Envoy's admin /clusters says of the cluster's host on ``port``
    under ``key`` (health_flags, rq_active, ...)."""
    url = f"http://127.0.0.1:{admin_port}/clusters"
    with urllib.request.urlopen(url, timeout=5) as answer:
        text = answer.read().decode()
    pattern = rf"^agentlab_service::127\.0\.0\.1:{port}::{key}::(.*)$"
    found = re.search(pattern, text, re.MULTILINE)
    assert found, text
    return found.group(1)


async def calls_in_flight(admin_port: int, port: int, at_least: int, timeout_s: float = 10) -> None:
    """Returns once Envoy has ``at_least`` calls open on the host on ``port``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while int(await asyncio.to_thread(host_value, admin_port, port, "rq_active")) < at_least:
        assert loop.time() < deadline, f"never {at_least} calls at once on {port}"


async def running_on(schema: str, pid: int, at_least: int) -> int:
    """How many executions the store has RUNNING on the process ``pid``
    (its owner names the pid), once at least ``at_least``: returns 0 after
    a short wait when there are fewer."""
    connection = await asyncpg.connect(postgres_url())
    try:
        count: int = await connection.fetchval(
            f"SELECT count(*) FROM {quote_ident(schema)}.executions"
            " WHERE state = 'RUNNING' AND owner LIKE $1",
            f"%:{pid}:%",
        )
    finally:
        await connection.close()
    return count if count >= at_least else 0


async def busy(admin_port: int, port: int, schema: str, pid: int, timeout_s: float = 20) -> None:
    """Returns at a moment when Envoy has calls in flight on the process
    (what fails with it) and the store has executions running on it (what a
    survivor must take over): both cases the test is about. An in-flight
    call alone may not be recorded yet, or already be finished."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        await calls_in_flight(admin_port, port, at_least=2)
        if await running_on(schema, pid, at_least=2):
            return
        assert loop.time() < deadline, f"never calls in flight and executions running on {pid}"


async def failed_health_checks(admin_port: int, port: int, timeout_s: float = 10) -> str:
    """The host's health flags once they include failed_active_hc (or at
    ``timeout_s``, whatever they are then)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        flags = await asyncio.to_thread(host_value, admin_port, port, "health_flags")
        if "failed_active_hc" in flags or loop.time() > deadline:
            return flags
        await asyncio.sleep(0.2)


@pytest.mark.timeout(240)
async def test_kill_9_of_one_replica_fails_only_its_calls_in_flight(
    replicas: Replicas, schema: str
) -> None:
    load = Load()
    victim = replicas.services[2]
    assert victim.proc is not None
    async with grpc.aio.insecure_channel(f"127.0.0.1:{replicas.envoy.ports.gateway}") as channel:
        stub = svc_grpc.LabServiceStub(channel)
        workers = [asyncio.create_task(keep_calling(stub, i, load)) for i in range(WORKERS)]
        await asyncio.sleep(LOAD_BEFORE_KILL_S)
        # At a moment when the victim has calls in flight (streams, mostly)
        # and executions running: the case this test is about.
        victim_pid = victim.proc.pid
        await busy(replicas.envoy.ports.admin, victim.port, schema, victim_pid)
        signalled_at = asyncio.get_running_loop().time()
        victim.proc.send_signal(signal.SIGKILL)
        # Dead (reaped, its sockets closed) by here: a call that started
        # between the signal and now may have reached it.
        await asyncio.to_thread(victim.proc.wait)
        killed_at = asyncio.get_running_loop().time()
        await asyncio.sleep(LOAD_AFTER_KILL_S)
        # Envoy took the dead process out on its failed connections
        # (outlier detection), and its health checks keep it out once the
        # ejection ends.
        flags = await failed_health_checks(replicas.envoy.ports.admin, victim.port)
        load.stop.set()
        await asyncio.wait_for(asyncio.gather(*workers), timeout=60)
        executions = await settled(stub)

    failed = [c for c in load.calls if c.error is not None]
    after_kill = [c for c in load.calls if c.started > killed_at]
    summary = {
        "calls": len(load.calls),
        "failed": [(c.kind, c.error) for c in failed],
        "after the kill": len(after_kill),
        "victim's flags": flags,
    }
    print(json.dumps(summary, indent=1))

    assert "failed_active_hc" in flags, flags
    # The load went on, on the other two, and none of it failed: what
    # reached the dead process's address was resent.
    assert len(after_kill) >= WORKERS, summary
    assert all(c.error is None for c in after_kill), summary
    # What failed was in flight when the process died: started before it
    # was dead, and ended after the signal. And the dead process had calls
    # in flight: the test saw the case it is about.
    assert failed, summary
    for call in failed:
        assert call.started < killed_at, (call, killed_at)
        assert call.ended > signalled_at, (call, signalled_at)

    # Every execution is accounted for: each record is a call the clients
    # made, and final; each call that succeeded has its record SUCCEEDED.
    by_request = {e.request_id: e for e in executions}
    calls = {c.request_id: c for c in load.calls}
    assert set(by_request) <= set(calls), set(by_request) - set(calls)
    for call in load.calls:
        execution = by_request.get(call.request_id)
        if call.error is None:
            assert execution is not None, call
            if call.kind != "background":
                assert execution.state == pb.EXECUTION_STATE_SUCCEEDED, (call, execution)
    taken_over = 0
    for execution in executions:
        if execution.state == pb.EXECUTION_STATE_FAILED:
            # Failed with a reason: the process that ran it died, and a
            # survivor said so (every other cause would be a bug here).
            assert execution.error.code == grpc.StatusCode.UNAVAILABLE.value[0], execution
            assert "stopped before it finished" in execution.error.message, execution
            assert f":{victim_pid}:" in execution.error.message, execution
            taken_over += 1
        else:
            assert execution.state == pb.EXECUTION_STATE_SUCCEEDED, execution
    # A call that failed and was recorded ended with its process: failed by
    # a survivor, or finished before the answer was lost.
    for call in failed:
        execution = by_request.get(call.request_id)
        assert execution is None or execution.state in FINAL, (call, execution)
    assert taken_over, "no execution of the killed process was taken over"
