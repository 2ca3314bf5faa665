"""kill -9 under load: every execution a client was told about is in the
store after the restart, and ends in a final state (issue 11, goal 6).

Clients call through Envoy over gRPC, as users do, mixing Execute,
background Execute and Orchestrate at once, while the echo backend's
per-token delay keeps executions running and queued. A client is told of
an execution by a completed Execute's response, a background Execute's
reply and an Orchestrate stream's first event; each carries the id. The
service is killed (SIGKILL: nothing of it runs after), restarted on the same
store, and then every one of those ids must be found and end final: those
that had completed as they were, the rest finished by recovery (the queued
background ones run, the running ones failed with the reason).
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Iterator
from dataclasses import dataclass, field

import grpc
import pytest

from agentlab.devstack import Stack
from agentlab.v1 import execution_pb2 as pb
from agentlab.v1 import lab_service_pb2 as svc
from agentlab.v1 import lab_service_pb2_grpc as svc_grpc
from tests.helpers.services import postgres_schema, postgres_url, redis_url
from tests.helpers.stacks import StackFactory

pytestmark = pytest.mark.e2e

# Forty words at 5 ms each: an execution runs for about 0.2 s.
PROMPT = " ".join(f"word{i}" for i in range(40))
SETTINGS = {
    "AGENTLAB_DEFAULT_BACKEND": "echo",
    "AGENTLAB_ECHO_TOKEN_DELAY_S": "0.005",
    # The restarted process takes over the dead one's executions soon.
    "AGENTLAB_EXECUTION_HEARTBEAT_S": "0.2",
    "AGENTLAB_EXECUTION_LEASE_S": "1",
}
FINAL = {pb.EXECUTION_STATE_SUCCEEDED, pb.EXECUTION_STATE_FAILED, pb.EXECUTION_STATE_CANCELLED}


@dataclass
class Told:
    """The ids clients were given, by how they were given."""

    completed: set[str] = field(default_factory=set)
    accepted: set[str] = field(default_factory=set)
    streamed: set[str] = field(default_factory=set)
    # Streams past their first event, before their last.
    open: set[str] = field(default_factory=set)
    # Streams cut by the kill after their first event: in flight then.
    cut: set[str] = field(default_factory=set)

    def ready(self) -> bool:
        """Whether clients were told of each kind, and streams are open."""
        return bool(self.completed and self.accepted and len(self.open) >= 2)


@pytest.fixture(params=["sqlite", "postgres+redis"])
def settings(request: pytest.FixtureRequest) -> Iterator[dict[str, str]]:
    if request.param == "sqlite":
        yield SETTINGS
        return
    with postgres_schema("crash") as schema:
        yield {
            **SETTINGS,
            "AGENTLAB_DATABASE_URL": f"{postgres_url()}?search_path={schema}",
            "AGENTLAB_REDIS_URL": redis_url(),
        }


async def execute(stub: svc_grpc.LabServiceStub, told: Told) -> None:
    response = await stub.Execute(svc.ExecuteRequest(prompt=PROMPT, model="echo"), timeout=30)
    told.completed.add(response.execution_id)


async def execute_in_background(stub: svc_grpc.LabServiceStub, told: Told) -> None:
    response = await stub.Execute(
        svc.ExecuteRequest(prompt=PROMPT, model="echo", background=True), timeout=30
    )
    told.accepted.add(response.execution_id)
    # Paced: enough to queue some behind the running ones, not so many
    # that the queue is full and the other calls are refused.
    await asyncio.sleep(0.5)


async def orchestrate(stub: svc_grpc.LabServiceStub, told: Told) -> None:
    execution_id = ""
    final = False
    try:
        async for response in stub.Orchestrate(
            svc.OrchestrateRequest(prompt=PROMPT, model="echo"), timeout=30
        ):
            if not execution_id:
                execution_id = response.event.execution_id
                told.streamed.add(execution_id)
                told.open.add(execution_id)
            final = response.event.HasField("execution_completed") or response.event.HasField(
                "execution_failed"
            )
    finally:
        told.open.discard(execution_id)
        if execution_id and not final:
            told.cut.add(execution_id)


async def keep_calling(stub: svc_grpc.LabServiceStub, told: Told, worker: int) -> None:
    """Calls of one kind, one after another, until the service is gone."""
    call = (execute, execute_in_background, orchestrate)[worker % 3]
    while True:
        try:
            await call(stub, told)
        except grpc.aio.AioRpcError as error:
            if error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                await asyncio.sleep(0.01)  # refused at the door: told nothing
                continue
            return  # the service was killed


async def wait_until_final(
    stub: svc_grpc.LabServiceStub, execution_id: str, timeout_s: float = 30
) -> pb.Execution:
    """The record once it is final; fails if it is missing or never ends."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        answer: svc.GetExecutionResponse = await stub.GetExecution(
            svc.GetExecutionRequest(execution_id=execution_id, view=pb.EXECUTION_VIEW_BASIC),
            timeout=10,
        )
        execution: pb.Execution = answer.execution
        if execution.state in FINAL:
            return execution
        assert loop.time() < deadline, f"{execution_id} is still {execution.state}"
        await asyncio.sleep(0.1)


@pytest.mark.timeout(240)
async def test_kill_9_under_load_loses_no_execution_a_client_was_told_about(
    start_stack: StackFactory, settings: dict[str, str]
) -> None:
    # The load comes from one address: Envoy's per-client rate limit is off
    # by default (AGENTLAB_RATE_LIMIT).
    stack: Stack = await asyncio.to_thread(start_stack, settings)
    told = Told()
    async with grpc.aio.insecure_channel(stack.gateway_grpc) as channel:
        stub = svc_grpc.LabServiceStub(channel)
        workers = [asyncio.create_task(keep_calling(stub, told, i)) for i in range(24)]
        # A moment into the load, once every kind of call has told its
        # clients ids, with streams open.
        await asyncio.sleep(0.5)
        for _ in range(300):
            if told.ready():
                break
            await asyncio.sleep(0.05)
        assert told.ready(), told
        assert stack.service.proc is not None
        stack.service.proc.send_signal(signal.SIGKILL)
        await asyncio.to_thread(stack.service.proc.wait)
        _, pending = await asyncio.wait(workers, timeout=30)
        assert not pending, "calls still running after the kill"
        for worker in workers:
            worker.result()

    # Each kind of call told clients of executions, and the kill cut some
    # streams mid-way: the test saw the cases it is about.
    counts = {name: len(ids) for name, ids in vars(told).items() if name != "open"}
    assert all(counts.values()), counts

    await asyncio.to_thread(stack.service.start)
    async with grpc.aio.insecure_channel(stack.gateway_grpc) as channel:
        stub = svc_grpc.LabServiceStub(channel)
        everything = told.completed | told.accepted | told.streamed
        executions = dict(
            zip(
                everything,
                await asyncio.gather(*(wait_until_final(stub, i) for i in everything)),
                strict=True,
            )
        )
    for execution_id in told.completed:
        assert executions[execution_id].state == pb.EXECUTION_STATE_SUCCEEDED
    for execution_id in told.cut:
        execution = executions[execution_id]
        # Finished by recovery (or, if the kill came between its last event
        # and the client reading it, as it ended).
        assert execution.state in (pb.EXECUTION_STATE_FAILED, pb.EXECUTION_STATE_SUCCEEDED)
        if execution.state == pb.EXECUTION_STATE_FAILED:
            assert execution.error.code == grpc.StatusCode.UNAVAILABLE.value[0]
            assert "stopped before it finished" in execution.error.message
