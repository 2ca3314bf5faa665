"""Retries through the real stack: a lab backend (a fake Ollama) that
answers 503 reaches the client as UNAVAILABLE; the client tries a keyed call
again and succeeds, and never repeats a call without a key (a replay
refused for want of room, the same).

A keyed execution that failed stays failed, and its key would only return
that failure: the client's later attempts carry keys of their own (the
original with a suffix), which the fake's requests and the records show."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from aiohttp import web

from agentlab.client import AsyncClient, ResourceExhausted, Retry, RetryPolicy, Unavailable
from agentlab.devstack import Stack
from agentlab.v1 import execution_pb2 as pb
from tests.helpers.fake_ollama import FakeOllama
from tests.helpers.stacks import StackFactory

AGENTLAB = str(Path(sys.executable).parent / "agentlab")
# Quick retries: the test is about how many, not how long.
QUICK = RetryPolicy(max_attempts=4, initial_backoff_s=0.05, max_backoff_s=0.2)


@dataclass
class FlakyOllama(FakeOllama):
    """Answers ``/api/chat`` with 503 the first ``failures`` times."""

    failures: int = 0

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        if self.failures > 0:
            self.failures -= 1
            self.requests.append(await request.json())
            return web.json_response({"error": "server busy"}, status=503)
        return await super()._chat(request)


@pytest.fixture
async def ollama() -> AsyncIterator[FlakyOllama]:
    fake = FlakyOllama(models=["mistral:7b"], words=["Blue", ",", " green"])
    await fake.start()
    yield fake
    await fake.stop()


@pytest.fixture
async def stack(start_stack: StackFactory, ollama: FlakyOllama) -> AsyncIterator[Stack]:
    models = f"""
backends:
  ollama: {{kind: ollama, url: "{ollama.url}"}}
models:
  mistral7b: {{backend: ollama, model: "mistral:7b"}}
"""
    # In a thread: the fake answers from this event loop meanwhile.
    started = await asyncio.to_thread(start_stack, {}, models=models)
    yield started
    await asyncio.to_thread(started.stop)


async def test_503_twice_then_200_is_one_success_after_two_retries(
    stack: Stack, ollama: FlakyOllama
) -> None:
    ollama.failures = 2
    retries: list[Retry] = []
    async with AsyncClient(stack.gateway_grpc, retry=QUICK, on_retry=retries.append) as lab:
        answer = await lab.execute("Name three colours.", model="mistral7b")

        assert answer.output == "Blue, green"
        assert [(r.method, r.attempt) for r in retries] == [("Execute", 1), ("Execute", 2)]
        assert all(isinstance(r.error, Unavailable) for r in retries)
        # The backend's own status travels to the client in ErrorInfo.
        assert retries[0].error.error_info is not None
        assert retries[0].error.error_info.metadata["upstream_status"] == "503"
        assert len(ollama.requests) == 3

        # The service recorded the two failures and the success, each under
        # a key of its own, derived from the first.
        executions = (await lab.list_executions(page_size=10)).executions
        keys = {e.request_id: e.state for e in executions}
        (first,) = [key for key in keys if "." not in key]
        assert keys == {
            first: pb.EXECUTION_STATE_FAILED,
            f"{first}.2": pb.EXECUTION_STATE_FAILED,
            f"{first}.3": pb.EXECUTION_STATE_SUCCEEDED,
        }


async def test_a_call_without_a_key_is_never_repeated(stack: Stack, ollama: FlakyOllama) -> None:
    ollama.failures = 2
    retries: list[Retry] = []
    async with AsyncClient(stack.gateway_grpc, retry=QUICK, on_retry=retries.append) as lab:
        with pytest.raises(Unavailable):
            await lab.execute("Name three colours.", model="mistral7b", idempotent=False)
        assert retries == []
        assert len(ollama.requests) == 1

        # The stream too: without a key, its failure is reported, not retried.
        events = [
            event
            async for event in lab.orchestrate(
                "Name three colours.", model="mistral7b", idempotent=False
            )
        ]
    assert events[-1].WhichOneof("kind") == "execution_failed"
    assert retries == []
    assert len(ollama.requests) == 2


async def test_too_many_failures_give_up_after_the_policy_s_attempts(
    stack: Stack, ollama: FlakyOllama
) -> None:
    ollama.failures = 10
    retries: list[Retry] = []
    policy = RetryPolicy(max_attempts=3, initial_backoff_s=0.05, max_backoff_s=0.1)
    async with AsyncClient(stack.gateway_grpc, retry=policy, on_retry=retries.append) as lab:
        with pytest.raises(Unavailable):
            await lab.execute("Name three colours.", model="mistral7b")
    assert len(retries) == 2
    assert len(ollama.requests) == 3


async def test_a_keyed_replay_is_retried_and_an_unkeyed_one_never(
    start_stack: StackFactory,
) -> None:
    """A lab backend's failure is a replay's FAILED record, not an error of
    the call: what the client retries is a refusal, here the service's
    RESOURCE_EXHAUSTED while its one running and one queued place are
    taken."""
    limited = await asyncio.to_thread(
        start_stack,
        {
            "AGENTLAB_DEFAULT_BACKEND": "echo",
            "AGENTLAB_ECHO_TOKEN_DELAY_S": "0.01",
            "AGENTLAB_MAX_RUNNING_EXECUTIONS": "1",
            "AGENTLAB_MAX_QUEUED_EXECUTIONS": "1",
        },
    )
    retries: list[Retry] = []
    retried = asyncio.Event()

    def on_retry(retry: Retry) -> None:
        retries.append(retry)
        retried.set()

    # Attempts to spare: each waits at least the service's RetryInfo.
    policy = RetryPolicy(max_attempts=10, initial_backoff_s=0.05, max_backoff_s=0.2)
    async with AsyncClient(limited.gateway_grpc, retry=policy, on_retry=on_retry) as lab:
        source = await lab.execute("again please", model="echo")
        long_prompt = " ".join(f"w{n}" for n in range(2000))  # 20 s of echo
        busy = [await lab.execute(long_prompt, model="echo", background=True) for _ in range(2)]

        with pytest.raises(ResourceExhausted) as refused:
            await lab.replay_execution(source.execution_id, idempotent=False)
        assert refused.value.reason == "TOO_MANY_EXECUTIONS"
        assert retries == []

        keyed = asyncio.create_task(
            lab.replay_execution(source.execution_id, request_id="replay-retried")
        )
        await asyncio.wait_for(retried.wait(), timeout=30)
        for execution in busy:
            await lab.cancel_execution(execution.execution_id)
        replay = await keyed

        assert retries[0].method == "ReplayExecution"
        assert all(isinstance(retry.error, ResourceExhausted) for retry in retries)
        assert replay.state == pb.EXECUTION_STATE_SUCCEEDED
        assert replay.result.output == "again please"
        # Refused by the service itself, so the retry carried a key of its own.
        assert replay.request_id.startswith("replay-retried.")
        page = await lab.list_executions(page_size=20)
        replays = [e.execution_id for e in page.executions if e.replay_of == source.execution_id]
        assert replays == [replay.execution_id]


async def test_the_command_retries_and_says_so_on_stderr(stack: Stack, ollama: FlakyOllama) -> None:
    ollama.failures = 2
    done = await asyncio.to_thread(
        subprocess.run,
        [AGENTLAB, "--target", stack.gateway_grpc, "run", "Name three colours.", "-m", "mistral7b"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == "Blue, green\n"
    assert done.stderr.count("retry ") == 2
    assert len(ollama.requests) == 3

    ollama.failures = 1
    once = await asyncio.to_thread(
        subprocess.run,
        [
            AGENTLAB,
            "--target",
            stack.gateway_grpc,
            "run",
            "Name three colours.",
            "-m",
            "mistral7b",
            "--no-request-id",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert once.returncode == 3, once.stderr  # unavailable
    assert "retry " not in once.stderr
    assert "UNAVAILABLE" in once.stderr
    assert len(ollama.requests) == 4
