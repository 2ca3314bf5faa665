"""Limits, through the real Envoy: executions beyond the running and queued
bounds are refused (429, RetryInfo, Retry-After), prompts have a maximum
size, each client address has a rate limit at Envoy (health exempt), and a
client that stops reading a stream holds the service back instead of making
anything buffer it."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncGenerator, AsyncIterator
from datetime import datetime
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from agentlab.config import CONTRACT_MAX_PROMPT_CHARS
from agentlab.core.errors import ResourceExhausted
from agentlab.core.ports import LabEvent, LabNodeEnded, LabNodeStarted, LabOutput, LabToken, Route
from agentlab.core.runner import Runner
from agentlab.core.types import ExecutionMode, Task
from agentlab.devstack import ROOT, Stack, envoy_binary
from agentlab.executions import codec
from agentlab.executions.local_bus import LocalBus
from agentlab.executions.model import ExecutionState, StoredEvent
from agentlab.executions.service import Executions
from agentlab.executions.stores import open_store
from agentlab.v1 import lab_service_pb2 as svc
from agentlab.v1 import lab_service_pb2_grpc as svc_grpc
from tests.helpers.stacks import StackFactory
from tests.helpers.statuses import details_of

RESOURCE_EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]

# About 1.5 s of the real model per execution on a developer machine.
HOLD = {"prompt": "Write a long story about a cat.", "max_tokens": 200, "temperature": 0}


def _time(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def _execution(client: httpx.Client, url: str, execution_id: str) -> dict[str, Any]:
    answer = client.get(f"{url}/api/v1/executions/{execution_id}")
    assert answer.status_code == 200, answer.text
    execution: dict[str, Any] = answer.json()["execution"]
    return execution


def _wait_for(
    client: httpx.Client, url: str, execution_id: str, state: str, timeout_s: float = 120.0
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        execution = _execution(client, url, execution_id)
        if execution["state"] == state:
            return execution
        assert time.monotonic() < deadline, f"{execution_id} is still {execution['state']}"
        time.sleep(0.02)


def _assert_too_many(answer: httpx.Response) -> None:
    assert answer.status_code == 429, answer.text
    assert answer.headers["content-type"].startswith("application/json")
    assert answer.headers["retry-after"] == "1"
    error = answer.json()
    assert error["code"] == RESOURCE_EXHAUSTED
    assert "too many executions" in error["message"]
    [info] = details_of(error, "ErrorInfo")
    assert info["reason"] == "TOO_MANY_EXECUTIONS"
    assert info["metadata"] == {"max_running": "1", "max_queued": "1", "retry_after_s": "1"}
    [retry] = details_of(error, "RetryInfo")
    assert retry["retry_delay"] == "1s"


class _GatedLab:
    """A lab whose runs produce ``tokens`` tokens, one per turn of the event
    loop, once ``gate`` is open."""

    backend = "gated"
    model_name = "gated"
    ready = True

    def __init__(self, tokens: int = 3) -> None:
        self.tokens = tokens
        self.gate = asyncio.Event()
        self.runs = 0

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def run(self, task: Task) -> AsyncGenerator[LabEvent, None]:
        self.runs += 1
        await self.gate.wait()
        yield LabNodeStarted("inference", task.prompt)
        for index in range(self.tokens):
            await asyncio.sleep(0)
            yield LabToken("inference", f"t{index} ")
        yield LabNodeEnded("inference", "done", 1, self.tokens)
        yield LabOutput("done")


async def _executions(lab: _GatedLab, tmp_path: Path, **limits: int) -> Executions:
    runner = Runner(lambda model: Route(lab), default_max_tokens=16)
    executions = Executions(runner, open_store(None, tmp_path), LocalBus(), owner="t", **limits)
    await executions.start()
    return executions


def _task(prompt: str = "go") -> Task:
    return Task(prompt=prompt, model="m", mode=ExecutionMode.INFERENCE)


@pytest.fixture
async def gated(tmp_path: Path) -> AsyncIterator[tuple[_GatedLab, Executions]]:
    lab = _GatedLab()
    executions = await _executions(lab, tmp_path, max_running=1, max_queued=1)
    yield lab, executions
    lab.gate.set()
    await executions.stop(5.0)


async def test_concurrent_submits_never_overshoot_the_limits(
    gated: tuple[_GatedLab, Executions],
) -> None:
    lab, executions = gated
    answers = await asyncio.gather(
        *(executions.submit(_task(f"p{i}"), background=True) for i in range(6)),
        return_exceptions=True,
    )
    refused = [a for a in answers if isinstance(a, ResourceExhausted)]
    accepted = [a for a in answers if not isinstance(a, BaseException)]
    assert (len(accepted), len(refused)) == (2, 4), answers
    assert refused[0].reason == "TOO_MANY_EXECUTIONS"
    assert refused[0].metadata == {"max_running": "1", "max_queued": "1", "retry_after_s": "1"}
    records, _ = await executions.page(page_size=10, after=None)
    assert len(records) == 2  # the refused ones were never recorded
    await asyncio.sleep(0.1)
    assert lab.runs == 1  # one at the lab, one waiting for its turn
    states = {(await executions.get(a.record.id)).state for a in accepted}
    assert states == {ExecutionState.RUNNING, ExecutionState.QUEUED}

    lab.gate.set()
    for submitted in accepted:
        final = await executions.wait_for_final(submitted.record.id)
        assert final.HasField("execution_completed")
    # Their places are free again.
    final = await executions.wait_for_final((await executions.submit(_task())).record.id)
    assert final.HasField("execution_completed")


class _SlowAfterFinal(LocalBus):
    """A bus that delivers each final event, then keeps its publisher
    waiting until ``gate`` opens: the run is still writing its end while
    the client already has it."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()

    async def publish(self, execution_id: str, *events: StoredEvent) -> None:
        await super().publish(execution_id, *events)
        if any(codec.is_final(codec.parsed(event)) for event in events):
            await self.gate.wait()


async def test_a_stream_s_place_is_free_once_its_final_event_is_seen(tmp_path: Path) -> None:
    # A client that reads each stream to its end and opens the next one at
    # once is never refused: the ending, still being written, does not count.
    lab = _GatedLab()
    lab.gate.set()
    runner = Runner(lambda model: Route(lab), default_max_tokens=16)
    bus = _SlowAfterFinal()
    executions = Executions(
        runner, open_store(None, tmp_path), bus, owner="t", max_running=1, max_queued=1
    )
    await executions.start()
    try:
        for round_ in range(2):
            async with executions.call(_task(f"r{round_}"), leaving_cancels=True) as call:
                async for event in call.events():
                    if event.HasField("execution_completed"):
                        # Both places (running and queued) are free already.
                        await executions.submit(_task(f"next{round_}"), background=True)
                        await executions.submit(_task(f"other{round_}"), background=True)
            bus.gate.set()
            await asyncio.sleep(0.1)
            bus.gate.clear()
    finally:
        bus.gate.set()
        await executions.stop(5.0)


class _EndsWait:
    """A store whose executions' ends are written only once ``gate`` opens:
    the time between a client leaving and its execution's end recorded,
    stretched."""

    def __init__(self, store: Any) -> None:
        self._store = store
        self.gate = asyncio.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    async def append_events(self, execution_id: str, events: Any, **kwargs: Any) -> None:
        if kwargs.get("ending") is not None:
            await self.gate.wait()
        await self._store.append_events(execution_id, events, **kwargs)


async def test_a_client_that_leaves_frees_its_place_before_the_end_is_recorded(
    tmp_path: Path,
) -> None:
    # Two streams hold the two places (one at the lab, one queued); their
    # clients leave and come back at once, while the executions' ends are
    # still being written: the new calls are taken, not refused.
    lab = _GatedLab()
    runner = Runner(lambda model: Route(lab), default_max_tokens=16)
    store = _EndsWait(open_store(None, tmp_path))
    executions = Executions(runner, store, LocalBus(), owner="t", max_running=1, max_queued=1)
    await executions.start()

    async def stream(prompt: str, started: asyncio.Event) -> None:
        async with executions.call(_task(prompt), leaving_cancels=True) as call:
            started.set()
            async for _ in call.events():
                pass

    try:
        started = [asyncio.Event(), asyncio.Event()]
        streams = [asyncio.create_task(stream(f"s{i}", s)) for i, s in enumerate(started)]
        for event in started:
            await event.wait()
        for task in streams:
            task.cancel()
        await asyncio.sleep(0.1)
        assert not any(task.done() for task in streams)  # the ends wait for the gate
        again = [await executions.submit(_task(f"again{i}"), background=True) for i in range(2)]
        store.gate.set()
        lab.gate.set()
        await asyncio.gather(*streams, return_exceptions=True)
        for submitted in again:
            final = await executions.wait_for_final(submitted.record.id)
            assert final.HasField("execution_completed")
    finally:
        store.gate.set()
        lab.gate.set()
        await executions.stop(5.0)


async def test_a_queued_execution_cancelled_never_reaches_the_lab(
    gated: tuple[_GatedLab, Executions],
) -> None:
    lab, executions = gated
    running = await executions.submit(_task("first"), background=True)
    queued = await executions.submit(_task("second"), background=True)
    await asyncio.sleep(0.05)
    record = await asyncio.wait_for(executions.cancel(queued.record.id), 2.0)
    assert record.state is ExecutionState.CANCELLED
    assert record.started_at is None
    events = [event async for event in executions.watch(queued.record.id)]
    assert [event.WhichOneof("kind") for event in events] == [
        "execution_started",
        "execution_failed",
    ]
    assert lab.runs == 1
    lab.gate.set()
    assert (await executions.wait_for_final(running.record.id)).HasField("execution_completed")


async def test_a_stop_starts_nothing_that_waits_and_leaves_background_work_queued(
    gated: tuple[_GatedLab, Executions], tmp_path: Path
) -> None:
    lab, executions = gated
    running = await executions.submit(_task("first"), background=True)
    queued = await executions.submit(_task("second"), background=True)
    await asyncio.sleep(0.05)
    lab.gate.set()
    await executions.stop(5.0)
    assert lab.runs == 1
    # The next process (once this one's lease lapses) runs it.
    store = open_store(None, tmp_path)
    await store.open()
    try:
        finished = await store.get(running.record.id)
        waiting = await store.get(queued.record.id)
    finally:
        await store.close()
    assert finished is not None
    assert finished.state is ExecutionState.SUCCEEDED
    assert waiting is not None
    assert waiting.state is ExecutionState.QUEUED


async def test_a_watcher_that_falls_behind_still_gets_every_event_once(tmp_path: Path) -> None:
    """Live events beyond the watcher's buffer are dropped while its client
    does not read, and read back from the store when it does."""
    lab = _GatedLab(tokens=3000)
    lab.gate.set()
    executions = await _executions(lab, tmp_path)
    try:
        submitted = await executions.submit(_task())
        watcher = executions.watch(submitted.record.id)
        sequences = [(await anext(watcher)).sequence]
        await executions.wait_for_final(submitted.record.id)  # all produced meanwhile
        started = time.monotonic()
        sequences += [event.sequence async for event in watcher]
        assert sequences == list(range(1, 3000 + 5))
        # Straight to the store for the dropped ones, without waiting for a poll.
        assert time.monotonic() - started < 0.5
    finally:
        await executions.stop(5.0)


@pytest.fixture
def one_at_a_time(start_stack: StackFactory) -> Stack:
    """The real model, one execution running and one waiting at most."""
    return start_stack(
        {"AGENTLAB_MAX_RUNNING_EXECUTIONS": "1", "AGENTLAB_MAX_QUEUED_EXECUTIONS": "1"}
    )


# Two long generations on the real model, one after the other: 47 to 116 s
# measured on a 2-core box busy with other work.
@pytest.mark.timeout(360)
@pytest.mark.model
def test_executions_beyond_the_limits_are_refused_and_the_queued_one_runs_next(
    one_at_a_time: Stack,
) -> None:
    url = one_at_a_time.url
    with httpx.Client(timeout=120) as client:
        # Background executions hold the slots like any other.
        first = client.post(f"{url}/api/v1/execute", json={**HOLD, "background": True})
        assert first.status_code == 200, first.text
        first_id = first.json()["execution_id"]
        _wait_for(client, url, first_id, "EXECUTION_STATE_RUNNING")
        second = client.post(f"{url}/api/v1/execute", json={**HOLD, "background": True})
        assert second.status_code == 200, second.text
        assert second.json()["state"] == "EXECUTION_STATE_QUEUED"
        second_id = second.json()["execution_id"]

        # One running, one waiting: a third is refused, whatever the call.
        for route, body in (
            ("execute", HOLD),
            ("execute", {**HOLD, "background": True}),
            ("orchestrate", HOLD),
        ):
            _assert_too_many(client.post(f"{url}/api/v1/{route}", json=body))
        # The same status for a gRPC client, Retry-After in the trailers.
        with grpc.insecure_channel(one_at_a_time.gateway_grpc) as channel:
            stub = svc_grpc.LabServiceStub(channel)
            with pytest.raises(grpc.RpcError) as raised:
                stub.Execute(svc.ExecuteRequest(prompt="Hi", max_tokens=5), timeout=30)
        assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert ("retry-after", "1") in raised.value.trailing_metadata()
        status = rpc_status.from_call(raised.value)
        assert status is not None
        retry = error_details_pb2.RetryInfo()
        assert any(detail.Unpack(retry) for detail in status.details)
        assert retry.retry_delay.seconds == 1
        # Refused before anything was recorded.
        listed = client.get(f"{url}/api/v1/executions").json()["executions"]
        assert {e["execution_id"] for e in listed} == {first_id, second_id}

        # A queued execution cancelled never reaches the lab: no start time,
        # and its events are started, then failed with CANCELLED.
        cancelled = client.post(f"{url}/api/v1/executions/{second_id}:cancel", json={})
        assert cancelled.status_code == 200, cancelled.text
        record = cancelled.json()["execution"]
        assert record["state"] == "EXECUTION_STATE_CANCELLED"
        assert record.get("start_time") is None
        watched = client.get(f"{url}/api/v1/executions/{second_id}:watch")
        events = [
            json.loads(line[5:])["event"]
            for line in watched.text.splitlines()
            if line.startswith("data:")
        ]
        assert [sorted(set(e) - {"sequence", "time", "execution_id"}) for e in events] == [
            ["execution_started"],
            ["execution_failed"],
        ]
        assert events[1]["execution_failed"]["error"]["code"] == grpc.StatusCode.CANCELLED.value[0]

        # Its place is free again; the newcomer waits for the first to end.
        third = client.post(f"{url}/api/v1/execute", json={**HOLD, "background": True})
        assert third.status_code == 200, third.text
        third_id = third.json()["execution_id"]
        done = _wait_for(client, url, first_id, "EXECUTION_STATE_SUCCEEDED")
        after = _wait_for(client, url, third_id, "EXECUTION_STATE_SUCCEEDED")
        assert _time(after["start_time"]) >= _time(done["end_time"])
        assert after["result"]["metrics"]["completion_tokens"] > 0

        # Nothing left running: a call goes straight through.
        answer = client.post(f"{url}/api/v1/execute", json={"prompt": "Hi", "max_tokens": 5})
        assert answer.status_code == 200, answer.text


@pytest.fixture
def wide_limits(start_stack: StackFactory) -> Stack:
    return start_stack(
        {
            "AGENTLAB_DEFAULT_BACKEND": "echo",
            "AGENTLAB_MAX_RUNNING_EXECUTIONS": "4000",
            "AGENTLAB_MAX_QUEUED_EXECUTIONS": "4000",
            "AGENTLAB_LOG_LEVEL": "WARNING",
        }
    )


async def test_a_burst_of_calls_within_the_limits_is_served_whole(wide_limits: Stack) -> None:
    # 3,000 calls at once, more than grpc-core lets wait for the event loop
    # by default: it cancelled a random share of them (bare CANCELLED).
    burst = 3000
    request = svc.ExecuteRequest(prompt="burst", model="echo")
    channels = [
        grpc.aio.insecure_channel(
            wide_limits.service_grpc, options=[("grpc.use_local_subchannel_pool", 1)]
        )
        for _ in range(4)
    ]
    try:
        stubs = [svc_grpc.LabServiceStub(channel) for channel in channels]

        async def call(n: int) -> str:
            try:
                await stubs[n % len(stubs)].Execute(request, timeout=120)
            except grpc.aio.AioRpcError as error:
                return str(error.code().name)
            return "OK"

        outcomes = await asyncio.gather(*(call(n) for n in range(burst)))
    finally:
        for channel in channels:
            await channel.close()
    refused = {code: outcomes.count(code) for code in set(outcomes) - {"OK"}}
    assert refused == {}, refused


@pytest.fixture
def short_prompts(start_stack: StackFactory) -> Stack:
    return start_stack({"AGENTLAB_DEFAULT_BACKEND": "echo", "AGENTLAB_MAX_PROMPT_CHARS": "50"})


def test_a_prompt_over_the_limit_is_400_naming_the_prompt(short_prompts: Stack) -> None:
    for route in ("execute", "orchestrate"):
        answer = httpx.post(
            f"{short_prompts.url}/api/v1/{route}", json={"prompt": "x" * 51}, timeout=10
        )
        assert answer.status_code == 400, answer.text
        error = answer.json()
        assert error["code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0]
        assert error["message"] == "prompt: must be at most 50 characters"
        [bad_request] = details_of(error, "BadRequest")
        assert [v["field"] for v in bad_request["field_violations"]] == ["prompt"]
    answer = httpx.post(
        f"{short_prompts.url}/api/v1/execute", json={"prompt": "x" * 50}, timeout=10
    )
    assert answer.status_code == 200, answer.text
    listed = httpx.get(f"{short_prompts.url}/api/v1/executions", timeout=10).json()
    assert len(listed["executions"]) == 1  # the refused ones were never recorded


def test_the_documented_prompt_maximum_is_the_one_the_service_enforces(echo_stack: Stack) -> None:
    """The served OpenAPI document's prompt maxLength, through Envoy, with the
    default settings: that many characters pass, one more is 400 naming the
    prompt. Its description names the setting and the contract's ceiling."""
    document = httpx.get(f"{echo_stack.url}/api/v1/openapi.json", timeout=10).json()
    schemas = document["components"]["schemas"]
    for route, message in (("execute", "ExecuteRequest"), ("orchestrate", "OrchestrateRequest")):
        prompt = schemas[f"agentlab.v1.{message}"]["properties"]["prompt"]
        limit = prompt["maxLength"]

        url = f"{echo_stack.url}/api/v1/{route}"
        answer = httpx.post(url, json={"prompt": "x" * limit, "model": "echo"}, timeout=30)
        assert answer.status_code == 200, answer.text[:300]
        answer = httpx.post(url, json={"prompt": "x" * (limit + 1), "model": "echo"}, timeout=30)
        assert answer.status_code == 400, answer.text[:300]
        error = answer.json()
        assert error["message"] == f"prompt: must be at most {limit} characters"
        [bad_request] = details_of(error, "BadRequest")
        assert [v["field"] for v in bad_request["field_violations"]] == ["prompt"]
        assert "AGENTLAB_MAX_PROMPT_CHARS" in prompt["description"]
        assert f"ceiling of {CONTRACT_MAX_PROMPT_CHARS:,}" in prompt["description"]


@pytest.fixture
def tiny_rate_limit(start_stack: StackFactory) -> Stack:
    """Envoy with a bucket of 5 requests per client address, 1 more a second."""
    return start_stack({"AGENTLAB_DEFAULT_BACKEND": "echo", "AGENTLAB_RATE_LIMIT": "1/5"})


def test_each_client_address_has_its_own_rate_limit_and_health_has_none(
    tiny_rate_limit: Stack,
) -> None:
    url = tiny_rate_limit.url
    with httpx.Client(timeout=10) as client:
        answers = [client.get(f"{url}/api/v1/models") for _ in range(10)]
        statuses = [answer.status_code for answer in answers]
        assert statuses[:5] == [200] * 5, statuses
        # At most one token can have come back in the meantime.
        assert statuses[5:].count(429) >= 4, statuses
        limited = next(answer for answer in answers if answer.status_code == 429)
        assert limited.headers["content-type"].startswith("application/json")
        assert limited.headers["retry-after"] == "1"
        assert limited.json() == {
            "code": RESOURCE_EXHAUSTED,
            "message": "local_rate_limited",
            "details": [
                {
                    "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                    "reason": "RATE_LIMITED",
                    "domain": "agentlab.v1",
                    "metadata": {"source": "gateway"},
                }
            ],
        }
        assert client.post(f"{url}/api/v1/execute", json={"prompt": "hi"}).status_code == 429

        # Health answers however empty the bucket is.
        for _ in range(10):
            assert client.get(f"{url}/api/v1/health").status_code == 200
    with grpc.insecure_channel(tiny_rate_limit.gateway_grpc) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for _ in range(10):
            answer = health.Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert answer.status == health_pb2.HealthCheckResponse.SERVING
        # A gRPC client is limited by the same bucket: RESOURCE_EXHAUSTED.
        with pytest.raises(grpc.RpcError) as raised:
            svc_grpc.LabServiceStub(channel).ListModels(svc.ListModelsRequest(), timeout=10)
        assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED

    # Another address has a bucket of its own (Linux routes all of 127/8 to lo).
    other = httpx.HTTPTransport(local_address="127.0.0.2")
    with httpx.Client(transport=other, timeout=10) as client:
        statuses = [client.get(f"{url}/api/v1/models").status_code for _ in range(5)]
        assert statuses == [200] * 5


def test_by_default_no_address_is_rate_limited(echo_stack: Stack) -> None:
    """Off, the default, is no filter in Envoy at all: a burst beyond any
    bucket the file ever had (200) passes, and the running configuration has
    no rate limit in it."""
    admin = f"http://127.0.0.1:{echo_stack.envoy.ports.admin}"
    with httpx.Client(timeout=10) as client:
        statuses = {client.get(f"{echo_stack.url}/api/v1/models").status_code for _ in range(400)}
        config = client.get(f"{admin}/config_dump", params={"resource": "static_listeners"}).text
    assert statuses == {200}
    assert "envoy.filters.http.router" in config  # the dump is Envoy's filter chain
    assert "local_ratelimit" not in config


@pytest.mark.e2e
def test_compose_renders_the_rate_limit_into_envoys_configuration(tmp_path: Path) -> None:
    """docker-compose's envoy container runs scripts/start_envoy.py from the
    image's /app: it renders gateway/envoy.yaml with the setting (Envoy
    accepts the result) and refuses a bad value before Envoy starts."""

    def start_envoy(value: str, *args: str) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTLAB_")}
        return subprocess.run(
            [sys.executable, "scripts/start_envoy.py", *args],
            env={**env, "AGENTLAB_RATE_LIMIT": value},
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )

    for value, bucket in (("5/10", "max_tokens: 10"), ("off", None)):
        printed = start_envoy(value, "--print")
        assert printed.returncode == 0, printed.stderr
        assert ("local_ratelimit" in printed.stdout) == (bucket is not None)
        assert bucket is None or bucket in printed.stdout
        config = tmp_path / f"envoy-{value.replace('/', '_')}.yaml"
        config.write_text(printed.stdout)
        checked = subprocess.run(
            [envoy_binary(), "--mode", "validate", "-c", str(config), "--disable-hot-restart"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert checked.returncode == 0, checked.stdout + checked.stderr
    refused = start_envoy("fast")
    assert refused.returncode == 2
    assert "envoy: configuration error: AGENTLAB_RATE_LIMIT must be off or" in refused.stderr


def _memory_mib(pid: int) -> dict[str, float]:
    """VmRSS and VmHWM (the peak) of a process, in MiB."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            values[name] = int(value.split()[0]) / 1024
    return values


def _received_from_service(stack: Stack) -> int:
    """Bytes Envoy has read from the service so far."""
    stats = httpx.get(
        f"http://127.0.0.1:{stack.envoy.ports.admin}/stats",
        params={"filter": "^cluster.agentlab_service.upstream_cx_rx_bytes_total$"},
        timeout=10,
    ).text
    return int(stats.split(":")[1])


def test_a_client_that_stops_reading_holds_the_service_back(echo_stack: Stack) -> None:
    """A long echo stream (tens of thousands of events, ~7 MB from the
    service over gRPC, more as SSE): the client reads a few events, then
    nothing until the service has sent nothing more for 2 s. Once the
    sockets' buffers, Envoy's 32 KiB ones and its 64 KiB stream window are
    full, the service sends nothing more, its memory does not grow meanwhile,
    and the stream then completes with every event, in order, once each."""
    assert echo_stack.service.proc is not None
    pid = echo_stack.service.proc.pid
    body = {"prompt": "w " * 15_000, "max_tokens": 32_768}
    url = f"{echo_stack.url}/api/v1/orchestrate"

    # A small receive buffer: the kernel holds less for the client that stops.
    small = [(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)]
    with httpx.Client(transport=httpx.HTTPTransport(socket_options=small), timeout=60) as client:
        # A reader that keeps up, for the execution's own cost in memory.
        with client.stream("POST", url, json=body) as response:
            assert response.status_code == 200
            total = sum(1 for line in response.iter_lines() if line.startswith("data:"))
        peak = _memory_mib(pid)["VmHWM"]
        sent_before = _received_from_service(echo_stack)

        sequences: list[int] = []
        with client.stream("POST", url, json=body) as response:
            assert response.status_code == 200
            lines = response.iter_lines()
            for line in lines:
                if line.startswith("data:"):
                    sequences.append(json.loads(line[5:])["event"]["sequence"])
                    if len(sequences) == 3:
                        break
            # Sampled until nothing more has left the service for 2 s (at
            # most 20 s: on a busy machine the buffers take longer to fill).
            samples: list[tuple[float, int]] = []
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                time.sleep(0.5)
                samples.append((_memory_mib(pid)["VmRSS"], _received_from_service(echo_stack)))
                if len(samples) >= 5 and len({received for _, received in samples[-5:]}) == 1:
                    break
            final: dict[str, Any] = {}
            for line in lines:
                if line.startswith("data:"):
                    final = json.loads(line[5:])["event"]
                    sequences.append(final["sequence"])
        sent = _received_from_service(echo_stack) - sent_before

    rss = [mib for mib, _ in samples]
    stalled = [received - sent_before for _, received in samples]
    # Nothing more left the service for 2 s of the pause, and what had is a
    # fraction of the stream.
    assert len(set(stalled[-5:])) == 1, stalled
    assert stalled[-1] < sent / 2, (stalled, sent)
    # Memory stayed where a reader that keeps up puts it.
    assert max(rss) <= peak + 8, (rss, peak)
    assert rss[-1] - rss[0] < 8, rss
    assert "execution_completed" in final
    print(
        f"RSS {rss} MiB (a reader keeping up: peak {peak:.0f}); from the service: "
        f"{stalled} of {sent} bytes while paused"
    )
    assert sequences == list(range(1, total + 1))


class _CreateWaits:
    """A store whose records are written only once ``gate`` opens: a caller
    can leave while its record is being written."""

    def __init__(self, store: Any) -> None:
        self._store = store
        self.gate = asyncio.Event()
        self.creating = asyncio.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    async def create(self, new: Any) -> Any:
        self.creating.set()
        await self.gate.wait()
        return await self._store.create(new)


@pytest.mark.parametrize("cancels", [1, 2])
@pytest.mark.parametrize("background", [False, True])
async def test_a_caller_that_leaves_while_its_record_is_written_leaves_no_queued_orphan(
    tmp_path: Path, background: bool, cancels: int
) -> None:
    # The record is written anyway; nothing would run it, and it would stay
    # QUEUED until a restart. Tied to the call that left, it ends
    # CANCELLED; a background one runs. Also when the caller is cancelled
    # again meanwhile (its deadline, then the server's stop).
    lab = _GatedLab()
    lab.gate.set()
    runner = Runner(lambda model: Route(lab), default_max_tokens=16)
    store = _CreateWaits(open_store(None, tmp_path))
    executions = Executions(runner, store, LocalBus(), owner="t", max_running=1, max_queued=1)
    await executions.start()
    try:
        submitting = asyncio.create_task(executions.submit(_task(), background=background))
        await store.creating.wait()
        for _ in range(cancels):
            submitting.cancel()
            await asyncio.sleep(0.01)
        store.gate.set()
        with pytest.raises(asyncio.CancelledError):
            await submitting
        [record], _ = await store.page(page_size=10)
        final = await asyncio.wait_for(executions.wait_for_final(record.id), 5.0)
        expected = "execution_completed" if background else "execution_failed"
        assert final.HasField(expected)
        ended = await executions.get(record.id)
        assert ended.state is (ExecutionState.SUCCEEDED if background else ExecutionState.CANCELLED)
        # Its place is free again: both limits' worth of new work is taken.
        for index in range(2):
            await executions.submit(_task(f"after{index}"), background=True)
    finally:
        await executions.stop(5.0)
