"""Two service processes behind one Envoy, sharing PostgreSQL and Redis: an
execution started on one is watched and cancelled through the other."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import pytest

from agentlab.devstack import EnvoyProcess, Ports, ServiceProcess, free_port
from agentlab.v1 import execution_pb2 as pb
from agentlab.v1 import lab_service_pb2 as svc
from agentlab.v1 import lab_service_pb2_grpc as svc_grpc
from tests.helpers.services import postgres_schema, postgres_url, redis_url

# Two service processes and an Envoy.
pytestmark = pytest.mark.e2e


@dataclass
class Replicas:
    first: ServiceProcess
    second: ServiceProcess
    envoy: EnvoyProcess


@pytest.fixture
def schema() -> Iterator[str]:
    with postgres_schema("replicas") as name:
        yield name


@pytest.fixture
def replicas(tmp_path: Path, schema: str) -> Iterator[Replicas]:
    env = {
        # asyncpg passes unknown query parameters on as server settings.
        "AGENTLAB_DATABASE_URL": f"{postgres_url()}?search_path={schema}",
        "AGENTLAB_REDIS_URL": redis_url(),
    }
    with (
        (tmp_path / "a.log").open("wb") as first_log,
        (tmp_path / "b.log").open("wb") as second_log,
        (tmp_path / "envoy.log").open("wb") as envoy_log,
    ):
        first = ServiceProcess(port=free_port(), env=env, output=first_log)
        second = ServiceProcess(port=free_port(), env=env, output=second_log)
        envoy = EnvoyProcess(
            ports=Ports(
                gateway=free_port(), service=first.port, admin=free_port(), replicas=(second.port,)
            ),
            output=envoy_log,
        )
        try:
            first.start()
            second.start()
            envoy.start()
            yield Replicas(first, second, envoy)
        finally:
            envoy.stop()
            second.stop()
            first.stop()


async def test_start_on_one_watch_and_cancel_through_the_other(replicas: Replicas) -> None:
    async with (
        grpc.aio.insecure_channel(replicas.first.address) as first,
        grpc.aio.insecure_channel(replicas.second.address) as second,
    ):
        started = await svc_grpc.LabServiceStub(first).Execute(
            svc.ExecuteRequest(
                prompt="Write a long essay about rivers.",
                model="mistral7b",
                max_tokens=2000,
                background=True,
            ),
            timeout=10,
        )
        other = svc_grpc.LabServiceStub(second)
        watch = other.WatchExecution(
            svc.WatchExecutionRequest(execution_id=started.execution_id), timeout=60
        )
        kinds: list[str] = []
        async for message in watch:
            kinds.append(message.event.WhichOneof("kind"))
            if kinds.count("token_delta") == 5:
                # The execution runs on the first replica; the second asks.
                cancelled = await other.CancelExecution(
                    svc.CancelExecutionRequest(execution_id=started.execution_id), timeout=30
                )
                assert cancelled.execution.state == pb.EXECUTION_STATE_CANCELLED
        assert kinds[0] == "execution_started"
        assert kinds[-1] == "execution_failed"
        assert message.event.execution_failed.error.code == grpc.StatusCode.CANCELLED.value[0]

    # Through Envoy, whichever replica answers, the record is the same.
    async with httpx.AsyncClient(timeout=10) as client:
        for _ in range(4):
            answer = await client.get(
                f"{replicas.envoy.url}/api/v1/executions/{started.execution_id}"
            )
            assert answer.json()["execution"]["state"] == "EXECUTION_STATE_CANCELLED"
