"""Executions as resources, through the real Envoy and service processes:
history, pagination, background runs, watch and resume, cancel, idempotency,
and a service killed mid-execution."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest

from agentlab.core.ports import Route
from agentlab.core.runner import Runner
from agentlab.core.types import ExecutionMode, Task
from agentlab.devstack import Stack
from agentlab.executions import codec
from agentlab.executions.local_bus import LocalBus
from agentlab.executions.model import NewExecution, StoredEvent
from agentlab.executions.service import Executions
from agentlab.executions.sqlite_store import SqliteStore
from agentlab.executions.watch import watch as watch_events
from agentlab.v1 import execution_pb2 as pb
from agentlab.v1 import lab_service_pb2 as svc
from agentlab.v1 import lab_service_pb2_grpc as svc_grpc
from tests.helpers.labs import InstantLab
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


# Long enough to act on mid-way: one inference, a token every 50 ms, about
# 3 s in all.
TOKEN_DELAY_S = 0.05
LONG_PROMPT = " ".join(f"word{i}" for i in range(60))
# Events stored before the resume starts: the first three the client saw,
# and at least this many more, which the resume must read from the store.
STORED_BEFORE_RESUME = 5


@pytest.fixture
def slow_echo_stack(start_stack: StackFactory) -> Stack:
    return start_stack(
        {"AGENTLAB_DEFAULT_BACKEND": "echo", "AGENTLAB_ECHO_TOKEN_DELAY_S": str(TOKEN_DELAY_S)}
    )


def running_with_stored(stub: svc_grpc.LabServiceStub, execution_id: str, at_least: int) -> int:
    """Waits until ``at_least`` events are stored; the execution must still
    be running then. Returns its last sequence."""
    deadline = time.monotonic() + 30
    while True:
        execution: pb.Execution = stub.GetExecution(
            svc.GetExecutionRequest(execution_id=execution_id), timeout=10
        ).execution
        assert execution.state == pb.EXECUTION_STATE_RUNNING, execution
        if execution.last_sequence >= at_least:
            return execution.last_sequence
        assert time.monotonic() < deadline, execution
        time.sleep(0.02)


def still_running(stub: svc_grpc.LabServiceStub, execution_id: str) -> int:
    """The execution's last sequence, asserting it has not finished."""
    execution: pb.Execution = stub.GetExecution(
        svc.GetExecutionRequest(execution_id=execution_id), timeout=10
    ).execution
    assert execution.state == pb.EXECUTION_STATE_RUNNING, execution
    return execution.last_sequence


def assert_handed_over_exactly_once(
    sequences: list[int], stored_before: int, last_when_resumed: int
) -> None:
    """Every event once, in order, through the final one; those up to
    ``stored_before`` were in the store before the resume began, those after
    ``last_when_resumed`` did not exist when it had begun: the resume read
    the store, then followed live."""
    assert sequences == list(range(1, len(sequences) + 1))
    assert stored_before >= 3 + STORED_BEFORE_RESUME
    assert sequences[-1] > last_when_resumed


def test_a_grpc_stream_resumes_exactly_once_from_store_to_live(slow_echo_stack: Stack) -> None:
    with grpc.insecure_channel(slow_echo_stack.gateway_grpc) as channel:
        stub = svc_grpc.LabServiceStub(channel)
        request = svc.OrchestrateRequest(
            prompt=LONG_PROMPT,
            model="echo",
            mode=pb.EXECUTION_MODE_INFERENCE,
            on_disconnect=svc.DISCONNECT_POLICY_CONTINUE,
        )
        call = stub.Orchestrate(request, timeout=60)
        first = [next(call).event for _ in range(3)]
        call.cancel()  # the client goes away
        execution_id = first[0].execution_id
        stored_before = running_with_stored(stub, execution_id, 3 + STORED_BEFORE_RESUME)

        watch = svc.WatchExecutionRequest(execution_id=execution_id, after_sequence=3)
        resumed = stub.WatchExecution(watch, timeout=60)
        rest = [next(resumed).event]
        # The resume has begun (an event came) and the final event is not
        # there yet.
        last_when_resumed = still_running(stub, execution_id)
        rest += [received.event for received in resumed]

        events = first + rest
        assert_handed_over_exactly_once(
            [e.sequence for e in events], stored_before, last_when_resumed
        )
        assert events[-1].HasField("execution_completed")
        # The same as one uninterrupted stream of the execution.
        whole = stub.WatchExecution(svc.WatchExecutionRequest(execution_id=execution_id))
        assert events == [received.event for received in whole]


def sse_events(lines: Iterator[str], count: int | None = None) -> list[dict[str, Any]]:
    """Up to ``count`` (default all) events of an SSE stream, each checked to
    carry its sequence as its id."""
    events: list[dict[str, Any]] = []
    event_id = None
    for line in lines:
        if line.startswith("id:"):
            event_id = line[3:].strip()
        elif line.startswith("data:"):
            event = json.loads(line[5:])["event"]
            assert event_id == str(event["sequence"]), (event_id, event)
            events.append(event)
            if len(events) == count:
                break
    return events


def test_an_sse_stream_resumes_exactly_once_from_store_to_live(slow_echo_stack: Stack) -> None:
    """As a browser's EventSource does: GET /orchestrate with a request_id,
    and after a drop the same URL again with Last-Event-ID."""
    url = f"{slow_echo_stack.url}/api/v1/orchestrate"
    params = {
        "prompt": LONG_PROMPT,
        "model": "echo",
        "mode": "EXECUTION_MODE_INFERENCE",
        "request_id": f"resume-{time.time_ns()}",
    }
    with httpx.stream("GET", url, params=params, timeout=60) as response:
        assert response.status_code == 200
        first = sse_events(response.iter_lines(), 3)  # then the connection drops
    execution_id = first[0]["execution_id"]
    with grpc.insecure_channel(slow_echo_stack.service_grpc) as channel:
        stub = svc_grpc.LabServiceStub(channel)
        stored_before = running_with_stored(stub, execution_id, 3 + STORED_BEFORE_RESUME)

        headers = {"Last-Event-ID": str(first[-1]["sequence"])}
        with httpx.stream("GET", url, params=params, headers=headers, timeout=60) as response:
            assert response.status_code == 200
            lines = response.iter_lines()
            rest = sse_events(lines, 1)
            last_when_resumed = still_running(stub, execution_id)
            rest += sse_events(lines)

    events = first + rest
    assert {e["execution_id"] for e in events} == {execution_id}
    assert_handed_over_exactly_once(
        [e["sequence"] for e in events], stored_before, last_when_resumed
    )
    assert kind(events[-1]) == "execution_completed"
    assert events == watch(slow_echo_stack, execution_id)


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


@pytest.mark.parametrize("published_before", [2, 4])
async def test_a_watch_that_starts_on_the_bus_still_gets_events_published_before_it(
    tmp_path: Path, published_before: int
) -> None:
    # replay_first=False is a hint that nothing was published yet; when it
    # is wrong, the gap (or the quiet bus) sends the watcher to the store,
    # and every event still arrives once, in order.
    store = SqliteStore(tmp_path / "agentlab.db")
    await store.open()
    bus = LocalBus()
    execution_id = "b" * 32
    await store.create(
        NewExecution(
            id=execution_id,
            request_id="",
            caller="",
            model="echo",
            mode="inference",
            prompt="p",
            options={},
            background=False,
            created_at=datetime.now(UTC),
            owner="t",
        )
    )
    messages = [
        pb.ExecutionEvent(sequence=1, execution_id=execution_id, execution_started={}),
        pb.ExecutionEvent(sequence=2, execution_id=execution_id, node_started={"node": "n"}),
        pb.ExecutionEvent(sequence=3, execution_id=execution_id, token_delta={"text": "t"}),
        pb.ExecutionEvent(sequence=4, execution_id=execution_id, execution_completed={}),
    ]

    async def write(batch: list[pb.ExecutionEvent]) -> None:
        final = batch[-1] if codec.is_final(batch[-1]) else None
        ending = codec.ending(execution_id, final) if final else None
        await store.append_events(execution_id, [codec.stored(m) for m in batch], ending=ending)
        for message in batch:
            await bus.publish(execution_id, codec.stored(message))

    try:
        await write(messages[:published_before])
        events = watch_events(store, bus, execution_id, 0, poll_s=0.05, replay_first=False)
        first = await anext(events)
        if published_before < 4:
            await write(messages[published_before:])
        rest = [event async for event in events]
        assert [e.sequence for e in [first, *rest]] == [1, 2, 3, 4]
    finally:
        await store.close()


class _SlowToSubscribe(LocalBus):
    """A subscription that becomes live only after the execution has
    published its final event: a bus whose subscribe takes a round trip
    (Redis), racing an execution that finishes within it."""

    def __init__(self) -> None:
        super().__init__()
        self.final_published = asyncio.Event()

    async def publish(self, execution_id: str, *events: StoredEvent) -> None:
        await super().publish(execution_id, *events)
        if any(codec.is_final(codec.parsed(event)) for event in events):
            self.final_published.set()

    @asynccontextmanager
    async def subscribe(self, execution_id: str) -> AsyncIterator[AsyncIterator[StoredEvent]]:
        await self.final_published.wait()
        async with super().subscribe(execution_id) as live:
            yield live


async def test_a_stream_whose_execution_ended_before_it_subscribed_reads_the_store(
    tmp_path: Path,
) -> None:
    # A stream follows its own new execution on the bus first, as long as
    # nothing was published. Here everything was, while it subscribed: it
    # must read the store at once, not wait out the quiet bus (poll_s).
    bus = _SlowToSubscribe()
    store = SqliteStore(tmp_path / "agentlab.db")
    runner = Runner(lambda model: Route(InstantLab()), default_max_tokens=16)
    executions = Executions(runner, store, bus, owner="t", poll_s=60.0)
    await executions.start()
    try:
        task = Task(prompt="go", model="m", mode=ExecutionMode.INFERENCE)

        async def follow() -> list[pb.ExecutionEvent]:
            async with executions.call(task, leaving_cancels=True) as call:
                return [event async for event in call.events()]

        events = await asyncio.wait_for(follow(), timeout=10.0)
        assert [event.sequence for event in events] == list(range(1, len(events) + 1))
        assert events[-1].HasField("execution_completed")
    finally:
        await executions.stop(5.0)
