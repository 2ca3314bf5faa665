"""Executions as resources, through the real Envoy and service processes:
history, pagination, background runs, watch and resume, cancel, idempotency,
and a service killed mid-execution."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest

from agentlab.devstack import Stack
from agentlab.executions.model import NewExecution
from agentlab.executions.sqlite_store import SqliteStore
from agentlab.v1 import execution_pb2 as pb
from agentlab.v1 import lab_service_pb2 as svc
from agentlab.v1 import lab_service_pb2_grpc as svc_grpc
from tests.helpers.sse import read_events
from tests.helpers.stacks import StackFactory

SLOW = {"model": "mistral7b", "max_tokens": 300, "temperature": 0.8}


def kind(event: dict[str, Any]) -> str:
    return next(key for key in event if key not in ("sequence", "time", "execution_id"))


def get_execution(stack: Stack, execution_id: str) -> dict[str, Any]:
    answer = httpx.get(f"{stack.url}/api/v1/executions/{execution_id}", timeout=10)
    assert answer.status_code == 200, answer.text
    execution: dict[str, Any] = answer.json()["execution"]
    return execution


def watch(stack: Stack, execution_id: str, after: int = 0) -> list[dict[str, Any]]:
    with httpx.stream(
        "GET",
        f"{stack.url}/api/v1/executions/{execution_id}:watch",
        params={"after_sequence": after},
        timeout=120,
    ) as response:
        assert response.status_code == 200
        return [r.event for r in read_events(response)]


def wait_for_state(
    stack: Stack, execution_id: str, states: set[str], timeout_s: float = 30
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        execution = get_execution(stack, execution_id)
        if execution["state"] in states:
            return execution
        assert time.monotonic() < deadline, execution
        time.sleep(0.1)


def test_an_execute_is_recorded_and_listed(echo_stack: Stack) -> None:
    answer = httpx.post(
        f"{echo_stack.url}/api/v1/execute", json={"prompt": "uno dos tres", "seed": 3}, timeout=10
    )
    assert answer.status_code == 200, answer.text
    result = answer.json()
    assert result["state"] == "EXECUTION_STATE_SUCCEEDED"

    execution = get_execution(echo_stack, result["execution_id"])
    assert execution["state"] == "EXECUTION_STATE_SUCCEEDED"
    assert execution["prompt"] == "uno dos tres"
    assert execution["seed"] == "3"  # int64 is a string in proto3 JSON
    assert execution["result"]["output"] == "uno dos tres"
    assert execution["result"]["flow"][0]["node"] == "inference"
    assert execution["result"]["metrics"]["completion_tokens"] == 3
    # As times: RFC 3339 text does not sort (".517Z" > ".517513Z").
    created, started, ended = (
        datetime.fromisoformat(execution[name])
        for name in ("create_time", "start_time", "end_time")
    )
    assert created <= started <= ended

    listed = httpx.get(f"{echo_stack.url}/api/v1/executions", timeout=10).json()
    assert listed["executions"][0]["execution_id"] == result["execution_id"]

    unknown = "0" * 32
    for method, path in [
        ("GET", unknown),
        ("GET", f"{unknown}:watch"),
        ("POST", f"{unknown}:cancel"),
    ]:
        missing = httpx.request(
            method,
            f"{echo_stack.url}/api/v1/executions/{path}",
            json={} if method == "POST" else None,
            timeout=10,
        )
        assert missing.status_code == 404, (path, missing.text)
        assert missing.json()["code"] == 5


def test_pagination_walks_120_executions_without_gaps(echo_stack: Stack) -> None:
    made = []
    with httpx.Client(timeout=10) as client:
        for index in range(120):
            answer = client.post(
                f"{echo_stack.url}/api/v1/execute",
                json={"prompt": f"p{index}", "model": "echo" if index % 2 else "other"},
            )
            made.append(answer.json()["execution_id"])
        seen: list[str] = []
        token = ""
        pages = 0
        while True:
            page = client.get(
                f"{echo_stack.url}/api/v1/executions",
                params={"page_size": 25, "page_token": token},
            ).json()
            seen += [e["execution_id"] for e in page["executions"]]
            pages += 1
            token = page["next_page_token"]
            if not token:
                break
        assert pages == 5
        assert seen == list(reversed(made)), "newest first, no duplicates, no gaps"

        echo_only = client.get(
            f"{echo_stack.url}/api/v1/executions",
            params={"page_size": 100, "model": "echo", "state": "EXECUTION_STATE_SUCCEEDED"},
        ).json()["executions"]
        assert [e["execution_id"] for e in echo_only] == list(reversed(made[1::2]))

        bad = client.get(f"{echo_stack.url}/api/v1/executions", params={"page_token": "nope"})
        assert bad.status_code == 400
        assert "page_token" in bad.json()["message"]


def test_the_same_request_id_gives_one_execution(echo_stack: Stack) -> None:
    body = {"prompt": "once", "request_id": "client-42"}
    first = httpx.post(f"{echo_stack.url}/api/v1/execute", json=body, timeout=10).json()
    second = httpx.post(f"{echo_stack.url}/api/v1/execute", json=body, timeout=10).json()
    assert first["execution_id"] == second["execution_id"]
    assert second["output"] == "once"
    listed = httpx.get(f"{echo_stack.url}/api/v1/executions", timeout=10).json()["executions"]
    assert [e["request_id"] for e in listed].count("client-42") == 1


def test_the_final_event_and_the_final_state_are_seen_together(echo_stack: Stack) -> None:
    """The last events and the execution's end are one transaction: a
    watcher that has the final event finds the record finished, never
    RUNNING."""
    with grpc.insecure_channel(echo_stack.service_grpc) as channel:
        stub = svc_grpc.LabServiceStub(channel)
        for _ in range(30):
            request = svc.ExecuteRequest(
                prompt="one two three " * 20, model="echo", background=True
            )
            execution_id = stub.Execute(request, timeout=10).execution_id
            watch = svc.WatchExecutionRequest(execution_id=execution_id)
            for received in stub.WatchExecution(watch, timeout=10):
                if received.event.HasField("execution_completed"):
                    break
            got = stub.GetExecution(svc.GetExecutionRequest(execution_id=execution_id))
            assert got.execution.state == pb.EXECUTION_STATE_SUCCEEDED
            assert got.execution.last_sequence == received.event.sequence


@pytest.mark.model
def test_a_stream_resumes_exactly_once(model_stack: Stack) -> None:
    body = {"prompt": "Describe the sea.", **SLOW, "max_tokens": 40, "seed": 5}
    body["on_disconnect"] = "DISCONNECT_POLICY_CONTINUE"
    with httpx.stream(
        "POST", f"{model_stack.url}/api/v1/orchestrate", json=body, timeout=120
    ) as response:
        first_three = []
        for line in response.iter_lines():
            if line.startswith("data:"):
                first_three.append(json.loads(line[5:])["event"])
                if len(first_three) == 3:
                    break  # the client goes away here
    execution_id = first_three[0]["execution_id"]
    rest = watch(model_stack, execution_id, after=first_three[-1]["sequence"])
    resumed = first_three + rest
    assert [e["sequence"] for e in resumed] == list(range(1, len(resumed) + 1))
    assert kind(resumed[-1]) == "execution_completed"
    # The same as one uninterrupted stream of the same execution.
    assert resumed == watch(model_stack, execution_id)


@pytest.mark.model
def test_background_execute_answers_at_once_then_watch_follows(model_stack: Stack) -> None:
    answer = httpx.post(
        f"{model_stack.url}/api/v1/execute",
        json={"prompt": "Tell a story.", **SLOW, "background": True},
        timeout=10,
    )
    assert answer.status_code == 200, answer.text
    started = answer.json()
    assert started["state"] in ("EXECUTION_STATE_QUEUED", "EXECUTION_STATE_RUNNING")
    assert started["output"] == ""

    events = watch(model_stack, started["execution_id"])
    assert kind(events[0]) == "execution_started"
    assert kind(events[-1]) == "execution_completed"
    execution = get_execution(model_stack, started["execution_id"])
    assert execution["state"] == "EXECUTION_STATE_SUCCEEDED"
    assert execution["background"] is True
    assert execution["result"]["output"] == events[-1]["execution_completed"]["result"]["output"]


@pytest.mark.model
def test_cancel_stops_a_running_execution(model_stack: Stack) -> None:
    started = httpx.post(
        f"{model_stack.url}/api/v1/execute",
        json={"prompt": "Write a long essay.", **SLOW, "max_tokens": 2000, "background": True},
        timeout=10,
    ).json()
    execution_id = started["execution_id"]
    wait_for_state(model_stack, execution_id, {"EXECUTION_STATE_RUNNING"})
    cancelled = httpx.post(
        f"{model_stack.url}/api/v1/executions/{execution_id}:cancel", json={}, timeout=30
    )
    assert cancelled.status_code == 200, cancelled.text
    execution = cancelled.json()["execution"]
    assert execution["state"] == "EXECUTION_STATE_CANCELLED"
    assert execution["error"]["code"] == 1
    assert execution["result"]["flow"][-1]["status"] == "STEP_STATUS_CANCELLED"

    events = watch(model_stack, execution_id)
    assert kind(events[-1]) == "execution_failed"
    assert events[-1]["execution_failed"]["error"]["code"] == 1
    # Cancelling a finished execution changes nothing.
    again = httpx.post(
        f"{model_stack.url}/api/v1/executions/{execution_id}:cancel", json={}, timeout=30
    )
    assert again.json()["execution"]["end_time"] == execution["end_time"]


@pytest.fixture
def short_lease_stack(start_stack: StackFactory) -> Stack:
    return start_stack({"AGENTLAB_EXECUTION_HEARTBEAT_S": "0.2", "AGENTLAB_EXECUTION_LEASE_S": "1"})


@pytest.mark.model
def test_a_killed_service_leaves_a_failed_execution_with_a_reason(
    short_lease_stack: Stack,
) -> None:
    stack = short_lease_stack
    started = httpx.post(
        f"{stack.url}/api/v1/execute",
        json={"prompt": "Write a long essay.", **SLOW, "max_tokens": 2000, "background": True},
        timeout=10,
    ).json()
    execution_id = started["execution_id"]
    wait_for_state(stack, execution_id, {"EXECUTION_STATE_RUNNING"})
    time.sleep(0.5)
    assert stack.service.proc is not None
    stack.service.proc.send_signal(signal.SIGKILL)
    stack.service.proc.wait()

    stack.service.start()
    execution = wait_for_state(stack, execution_id, {"EXECUTION_STATE_FAILED"})
    assert execution["error"]["code"] == 14
    assert "stopped before it finished" in execution["error"]["message"]
    events = watch(stack, execution_id)
    assert [e["sequence"] for e in events] == list(range(1, len(events) + 1))
    assert kind(events[-1]) == "execution_failed"
    # The service answers the frontend's request again.
    answer = httpx.post(
        f"{stack.url}/api/v1/execute",
        json={"prompt": "Dime 3 números primos", "model": "mistral7b", "max_tokens": 8},
        timeout=60,
    )
    assert answer.status_code == 200, answer.text


def test_a_queued_background_execution_left_behind_is_run_at_start(
    tmp_path: Path, start_stack: StackFactory
) -> None:
    """A process died after accepting a background execution and before
    starting it: the next process runs it."""
    data = tmp_path / "data"
    long_ago = datetime.now(UTC) - timedelta(minutes=5)

    async def leave_one_behind() -> None:
        store = SqliteStore(data / "agentlab.db")
        await store.open()
        await store.create(
            NewExecution(
                id="a" * 32,
                request_id="",
                caller="",
                model="echo",
                mode="inference",
                prompt="left behind",
                options={},
                background=True,
                created_at=long_ago,
                owner="a-process-that-died",
            )
        )
        await store.close()

    asyncio.run(leave_one_behind())
    stack = start_stack({"AGENTLAB_DATA_DIR": str(data)})
    execution = wait_for_state(stack, "a" * 32, {"EXECUTION_STATE_SUCCEEDED"}, timeout_s=10)
    assert execution["result"]["output"] == "left behind"
