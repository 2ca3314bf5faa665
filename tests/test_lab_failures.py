"""A lab that fails in the middle of a stream: REST clients get a final
execution_failed event, gRPC clients the events and then a proper status."""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from agentlab.core.errors import LabFailed
from agentlab.core.types import GenerationOptions
from agentlab.lab.base import ChatMessage, ModelChunk, TextChunk
from agentlab.lab.local import LocalBackend
from agentlab.lab.registry import LabRegistry
from agentlab.v1 import lab_service_pb2 as svc
from agentlab.v1 import lab_service_pb2_grpc as svc_grpc
from tests.helpers.in_process import InProcess, serve_in_process
from tests.helpers.sse import aread_events

# Each test serves its lab behind a real Envoy (serve_in_process).
pytestmark = pytest.mark.e2e

GENERATED_BEFORE_FAILING = ["partial ", "answer "]


class FailingModel:
    """Generates a little, then fails the way a broken backend does."""

    backend = "failing"
    name = "failing-model"

    def __init__(self, error: Exception) -> None:
        self._error = error

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def stream(
        self, messages: list[ChatMessage], options: GenerationOptions
    ) -> AsyncGenerator[ModelChunk, None]:
        for text in GENERATED_BEFORE_FAILING:
            yield TextChunk(text)
        raise self._error


def kind(event: dict[str, object]) -> str:
    return next(key for key in event if key not in ("sequence", "time", "execution_id"))


@dataclass
class Failing:
    served: InProcess
    message: str  # what the caller must read in the status message

    @property
    def url(self) -> str:
        return self.served.url


@pytest.fixture(
    params=[
        # An unexpected exception shows only an error id: internals stay in the log.
        pytest.param(
            (RuntimeError("segfault in the lab at 0xdeadbeef"), "internal error (error id "),
            id="unexpected",
        ),
        # A lab's own failure says what failed.
        pytest.param(
            (LabFailed("failing", "the model ran out of memory"), "ran out of memory"),
            id="lab-failed",
        ),
    ]
)
async def failing(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Failing]:
    error, message = request.param
    registry = LabRegistry.serving_everything(LocalBackend("failing", FailingModel(error)))
    async for served in serve_in_process(registry, tmp_path):
        yield Failing(served, message)


def check_message(failing: Failing, message: str) -> None:
    assert failing.message in message, message
    assert "segfault" not in message


@pytest.mark.parametrize("mode", ["EXECUTION_MODE_INFERENCE", "EXECUTION_MODE_ORCHESTRATION"])
async def test_rest_stream_ends_with_an_error_event(failing: Failing, mode: str) -> None:
    async with (
        httpx.AsyncClient(timeout=30) as client,
        client.stream(
            "POST", f"{failing.url}/api/v1/orchestrate", json={"prompt": "hi", "mode": mode}
        ) as response,
    ):
        assert response.status_code == 200
        events = [r.event async for r in aread_events(response)]

    assert [e["sequence"] for e in events] == list(range(1, len(events) + 1))
    kinds = [kind(e) for e in events]
    assert kinds[0] == "execution_started"
    assert kinds[-1] == "execution_failed", kinds
    assert "execution_completed" not in kinds
    # What was generated before the failure was delivered, not lost.
    deltas = "".join(e["token_delta"]["text"] for e in events if kind(e) == "token_delta")
    assert deltas == "".join(GENERATED_BEFORE_FAILING)

    failed = events[-1]["execution_failed"]
    assert failed["error"]["code"] == grpc.StatusCode.INTERNAL.value[0]
    check_message(failing, failed["error"]["message"])
    info = [d for d in failed["error"]["details"] if d["@type"].endswith("/google.rpc.ErrorInfo")]
    assert [d["domain"] for d in info] == ["agentlab.v1"]
    assert failed["flow"][-1]["status"] == "STEP_STATUS_FAILED"
    assert failed["flow"][-1]["output"] == "".join(GENERATED_BEFORE_FAILING)
    assert failed["flow"][-1]["metrics"]["latency_ms"] > 0


async def test_rest_execute_is_a_json_error(failing: Failing) -> None:
    async with httpx.AsyncClient(timeout=30) as client:
        answer = await client.post(f"{failing.url}/api/v1/execute", json={"prompt": "hi"})
    assert answer.status_code == 500, answer.text
    error = answer.json()
    assert error["code"] == grpc.StatusCode.INTERNAL.value[0]
    check_message(failing, error["message"])


@pytest.mark.parametrize("through", ["service", "envoy"])
async def test_grpc_stream_ends_with_the_status(failing: Failing, through: str) -> None:
    served = failing.served
    address = served.address if through == "service" else served.envoy.url.removeprefix("http://")
    async with grpc.aio.insecure_channel(address) as channel:
        call = svc_grpc.LabServiceStub(channel).Orchestrate(
            svc.OrchestrateRequest(prompt="hi", model="any"), timeout=30
        )
        kinds = []

        async def read_all() -> None:
            async for message in call:
                kinds.append(message.event.WhichOneof("kind"))

        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await read_all()
    # The failed event comes first, so a client that reads events sees the
    # flow; then the call ends with the same status.
    assert kinds[0] == "execution_started"
    assert kinds[-1] == "execution_failed"
    error = raised.value
    assert error.code() == grpc.StatusCode.INTERNAL
    check_message(failing, error.details() or "")
    status = rpc_status.from_call(error)
    assert status is not None
    info = error_details_pb2.ErrorInfo()
    assert any(detail.Unpack(info) for detail in status.details)
    assert info.domain == "agentlab.v1"
