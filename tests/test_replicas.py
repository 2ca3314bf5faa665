"""Two service processes behind one Envoy, sharing PostgreSQL and Redis: an
execution started on one is watched and cancelled through the other."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest

from agentlab.v1 import execution_pb2 as pb
from agentlab.v1 import lab_service_pb2 as svc
from agentlab.v1 import lab_service_pb2_grpc as svc_grpc
from tests.helpers.services import postgres_schema, postgres_url, redis_url
from tests.helpers.stacks import Replicas, start_replicas

# Two service processes and an Envoy.
pytestmark = pytest.mark.e2e


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
    with start_replicas(2, env, tmp_path) as started:
        yield started


async def test_start_on_one_watch_and_cancel_through_the_other(replicas: Replicas) -> None:
    async with (
        grpc.aio.insecure_channel(replicas.services[0].address) as first,
        grpc.aio.insecure_channel(replicas.services[1].address) as second,
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
