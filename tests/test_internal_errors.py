"""An unexpected failure in any RPC of LabService: INTERNAL with an error id,
never the exception's text, for gRPC clients (straight to the service and
through Envoy) and, through Envoy, as HTTP 500 with a JSON google.rpc.Status.
The id names the log entry that holds the exception.

The faults are real: the execution store loses its tables under the running
service (sqlite3 raises "no such table"), the model registry and the health
state raise. A stream that fails after its first event ends with an
execution_failed event carrying the same status.
"""

from __future__ import annotations

import re
import sqlite3
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from google.protobuf import message as protobuf_message
from google.rpc import error_details_pb2, status_pb2

from agentlab.api.errors import DOMAIN
from agentlab.executions.stores import DEFAULT_SQLITE_NAME
from agentlab.lab.echo import EchoModel
from agentlab.lab.local import ECHO, LocalBackend
from agentlab.lab.registry import LabRegistry
from agentlab.v1 import execution_pb2 as pb
from agentlab.v1 import lab_service_pb2 as svc
from agentlab.v1 import lab_service_pb2_grpc as svc_grpc
from tests.helpers.in_process import InProcess, serve_in_process
from tests.helpers.sse import aread_events

# What the injected faults say; none of it may reach a caller.
SECRET = "password=hunter2 at 0xdeadbeef"
# What sqlite3 says once the tables are gone.
STORE_TEXT = ("no such table", "sqlite", "OperationalError")
ERROR_ID = re.compile(r"internal error \(error id ([0-9a-f]{12})\)")


class FaultyRegistry(LabRegistry):
    """The echo lab, whose model list raises once ``fault`` is set."""

    fault: Exception | None = None

    def models(self) -> Any:
        if self.fault is not None:
            raise self.fault
        return super().models()


@dataclass(frozen=True)
class Call:
    request: protobuf_message.Message
    rest_method: str
    rest_path: str
    fault: str  # "store", "models" or "health"
    rest_body: dict[str, Any] | None = None


# Every RPC of LabService, with what makes it fail; "{id}" is an execution
# made before the fault.
CALLS = {
    "Execute": Call(
        svc.ExecuteRequest(prompt="hi", model="echo"),
        "POST",
        "/api/v1/execute",
        "store",
        {"prompt": "hi", "model": "echo"},
    ),
    "Orchestrate": Call(
        svc.OrchestrateRequest(prompt="hi", model="echo"),
        "POST",
        "/api/v1/orchestrate",
        "store",
        {"prompt": "hi", "model": "echo"},
    ),
    "GetExecution": Call(
        svc.GetExecutionRequest(execution_id="{id}"), "GET", "/api/v1/executions/{id}", "store"
    ),
    "ListExecutions": Call(svc.ListExecutionsRequest(), "GET", "/api/v1/executions", "store"),
    "CancelExecution": Call(
        svc.CancelExecutionRequest(execution_id="{id}"),
        "POST",
        "/api/v1/executions/{id}:cancel",
        "store",
        {},
    ),
    "WatchExecution": Call(
        svc.WatchExecutionRequest(execution_id="{id}"),
        "GET",
        "/api/v1/executions/{id}:watch",
        "store",
    ),
    "ReplayExecution": Call(
        svc.ReplayExecutionRequest(execution_id="{id}", model="echo"),
        "POST",
        "/api/v1/executions/{id}:replay",
        "store",
        {"model": "echo"},
    ),
    # The store is gone: any well-formed ids reach it.
    "CompareExecutions": Call(
        svc.CompareExecutionsRequest(execution_ids=["0" * 32, "f" * 32]),
        "POST",
        "/api/v1/executions:compare",
        "store",
        {"execution_ids": ["0" * 32, "f" * 32]},
    ),
    "ListModels": Call(svc.ListModelsRequest(), "GET", "/api/v1/models", "models"),
    "GetHealth": Call(svc.GetHealthRequest(), "GET", "/api/v1/health", "health"),
}
SERVICE = svc.DESCRIPTOR.services_by_name["LabService"]


def test_every_rpc_is_covered() -> None:
    """A new RPC fails here until it is added to CALLS."""
    assert set(CALLS) == {method.name for method in SERVICE.methods}


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[InProcess]:
    registry = FaultyRegistry.serving_everything(LocalBackend(ECHO, EchoModel()))
    async for server in serve_in_process(registry, tmp_path):
        yield server


async def an_execution(served: InProcess) -> str:
    async with httpx.AsyncClient(timeout=30) as client:
        answer = await client.post(
            f"{served.url}/api/v1/execute", json={"prompt": "before", "model": "echo"}
        )
    assert answer.status_code == 200, answer.text
    execution_id: str = answer.json()["execution_id"]
    return execution_id


def break_(served: InProcess, fault: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if fault == "store":
        with sqlite3.connect(tmp_path / "data" / DEFAULT_SQLITE_NAME, timeout=30) as db:
            db.execute("PRAGMA foreign_keys = OFF")
            db.execute("DROP TABLE execution_events")
            db.execute("DROP TABLE executions")
    elif fault == "models":
        registry = served.server.registry
        assert isinstance(registry, FaultyRegistry)
        registry.fault = RuntimeError(SECRET)
    else:

        def serving(service: str = "") -> bool | None:
            raise KeyError(SECRET)

        monkeypatch.setattr(served.server.health, "serving", serving)


def filled(call: Call, execution_id: str) -> tuple[protobuf_message.Message, str]:
    request = type(call.request)()
    request.CopyFrom(call.request)
    if getattr(request, "execution_id", "") == "{id}":
        request.execution_id = execution_id  # type: ignore[attr-defined]
    return request, call.rest_path.replace("{id}", execution_id)


def assert_hidden(text: str) -> None:
    for secret in (SECRET, *STORE_TEXT, "Traceback", "Exception"):
        assert secret not in text, text


def error_id_of(status: status_pb2.Status) -> str:
    """The error id, checked to be in the message and in ErrorInfo."""
    assert status.code == grpc.StatusCode.INTERNAL.value[0]
    found = ERROR_ID.fullmatch(status.message)
    assert found, status.message
    infos = []
    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            infos.append(info)
    assert [(i.reason, i.domain) for i in infos] == [("INTERNAL", DOMAIN)]
    assert infos[0].metadata["error_id"] == found.group(1)
    return found.group(1)


async def responses_of(
    address: str, method: str, request: protobuf_message.Message, into: list[Any]
) -> None:
    """Call ``method``; what it answers goes ``into`` the list."""
    async with grpc.aio.insecure_channel(address) as channel:
        rpc = getattr(svc_grpc.LabServiceStub(channel), method)
        if SERVICE.methods_by_name[method].server_streaming:
            async for response in rpc(request, timeout=30):
                into.append(response)
        else:
            into.append(await rpc(request, timeout=30))


async def grpc_error_id(address: str, method: str, request: protobuf_message.Message) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await responses_of(address, method, request, [])
    error = raised.value
    assert error.code() == grpc.StatusCode.INTERNAL, error
    assert_hidden(str(error.details()))
    trailers = dict(error.trailing_metadata() or ())
    status = status_pb2.Status.FromString(trailers["grpc-status-details-bin"])
    assert status.message == error.details()
    return error_id_of(status)


async def rest_error_id(url: str, call: Call, path: str) -> str:
    async with httpx.AsyncClient(timeout=30) as client:
        answer = await client.request(call.rest_method, f"{url}{path}", json=call.rest_body)
    assert answer.status_code == 500, answer.text
    assert answer.headers["content-type"].startswith("application/json")
    assert_hidden(answer.text)
    body = answer.json()
    assert body["code"] == grpc.StatusCode.INTERNAL.value[0]
    [info] = [d for d in body["details"] if d["@type"].endswith("/google.rpc.ErrorInfo")]
    assert (info["reason"], info["domain"]) == ("INTERNAL", DOMAIN)
    found = ERROR_ID.fullmatch(body["message"])
    assert found, body["message"]
    assert info["metadata"]["error_id"] == found.group(1)
    return found.group(1)


def logged_with_the_exception(caplog: pytest.LogCaptureFixture, error_id: str) -> str:
    """The log entry of ``error_id``: the exception is there, with its text."""
    [record] = [r for r in caplog.records if error_id in r.getMessage()]
    assert record.exc_info is not None
    return str(record.exc_info[1])


@pytest.mark.e2e
@pytest.mark.parametrize("method", list(CALLS))
async def test_unexpected_failure_is_internal_with_an_error_id(
    served: InProcess,
    method: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    call = CALLS[method]
    request, path = filled(call, await an_execution(served))
    break_(served, call.fault, tmp_path, monkeypatch)

    ids = [
        await grpc_error_id(served.address, method, request),
        await grpc_error_id(f"127.0.0.1:{served.envoy.ports.gateway}", method, request),
        await rest_error_id(served.url, call, path),
    ]
    assert len(set(ids)) == 3, ids  # one id per failure
    for error_id in ids:
        text = logged_with_the_exception(caplog, error_id)
        if call.fault == "store":
            assert "no such table" in text
        else:
            assert SECRET in text


def breaking_after_first_step(
    real: Callable[..., AsyncGenerator[pb.ExecutionEvent, None]],
) -> Callable[..., AsyncGenerator[pb.ExecutionEvent, None]]:
    """``Executions._watch`` (what WatchExecution and an Orchestrate
    following its own execution both read) failing once a step has finished."""

    async def watch(
        execution_id: str, after_sequence: int, **options: Any
    ) -> AsyncGenerator[pb.ExecutionEvent, None]:
        async for event in real(execution_id, after_sequence, **options):
            yield event
            if event.HasField("node_finished"):
                raise RuntimeError(SECRET)

    return watch


@pytest.mark.e2e
@pytest.mark.parametrize("method", ["Orchestrate", "WatchExecution"])
async def test_a_stream_failing_after_its_first_event_ends_with_execution_failed(
    served: InProcess, method: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    execution_id = await an_execution(served)
    executions = served.server.executions
    monkeypatch.setattr(executions, "_watch", breaking_after_first_step(executions._watch))
    call = CALLS[method]
    request, path = filled(call, execution_id)

    # REST: the status cannot follow the body; the last event carries it.
    async with (
        httpx.AsyncClient(timeout=30) as client,
        client.stream(call.rest_method, f"{served.url}{path}", json=call.rest_body) as response,
    ):
        assert response.status_code == 200
        events = [r.event async for r in aread_events(response)]
    assert_hidden(str(events))
    # The stream's own failure event is not part of the execution's history:
    # sequence 0, so it takes no number a stored event has (and no SSE id).
    assert [e["sequence"] for e in events] == [*range(1, len(events)), 0]
    assert "node_finished" in events[-2], events
    failed = events[-1]["execution_failed"]
    assert failed["error"]["code"] == grpc.StatusCode.INTERNAL.value[0]
    assert ERROR_ID.fullmatch(failed["error"]["message"]), failed
    finished = events[-2]["node_finished"]["step"]["node"]
    assert [step["node"] for step in failed["flow"]] == [finished]

    # gRPC: the same final event, then the call ends with its status.
    responses: list[Any] = []
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await responses_of(served.address, method, request, responses)
    assert raised.value.code() == grpc.StatusCode.INTERNAL
    received: list[pb.ExecutionEvent] = [response.event for response in responses]
    last = received[-1]
    assert last.HasField("execution_failed")
    assert last.sequence == 0
    assert last.execution_failed.error.message == raised.value.details()
    error_id_of(last.execution_failed.error)
