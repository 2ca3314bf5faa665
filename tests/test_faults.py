"""Faults, each followed by the frontend's request answered correctly: a
backend unreachable, slower than the deadline, answering garbage, dying
mid-stream; the service killed mid-stream; Envoy restarted under it."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator
from typing import Any

import grpc
import httpx
import pytest

from agentlab.devstack import Stack
from tests.helpers.fake_ollama import FakeOllama
from tests.helpers.sse import aread_events
from tests.helpers.stacks import StackFactory

pytestmark = pytest.mark.model

FLAKY = {"prompt": "x", "model": "flaky", "mode": "EXECUTION_MODE_INFERENCE"}
FRONTEND = {"prompt": "Dime 3 números primos", "model": "mistral7b", "max_tokens": 16}


@pytest.fixture
async def ollama() -> AsyncIterator[FakeOllama]:
    fake = FakeOllama(models=["flaky:1b"])
    await fake.start()
    yield fake
    await fake.stop()


@pytest.fixture
async def stack(start_stack: StackFactory, ollama: FakeOllama) -> AsyncIterator[Stack]:
    models = f"""
backends:
  embedded: {{kind: embedded}}
  flaky: {{kind: ollama, url: "{ollama.url}"}}
  gone: {{kind: http_lab, url: "http://127.0.0.1:9"}}
models:
  mistral7b: {{backend: embedded}}
  flaky: {{backend: flaky, model: "flaky:1b", timeout_s: 1}}
  gone: {{backend: gone}}
"""
    # In a thread: the fake Ollama answers from this event loop meanwhile, at
    # the start and at the stop (start_stack's own stop would come too late).
    started = await asyncio.to_thread(start_stack, models=models)
    yield started
    await asyncio.to_thread(started.stop)


async def frontend_request_works(stack: Stack) -> None:
    async with httpx.AsyncClient(timeout=60) as client:
        answer = await client.post(f"{stack.url}/api/v1/execute", json=FRONTEND)
    assert answer.status_code == 200, answer.text
    assert answer.json()["output"].strip()
    assert answer.json()["metrics"]["backend"] == "embedded"


async def stream(stack: Stack, body: dict[str, Any]) -> list[dict[str, Any]]:
    async with (
        httpx.AsyncClient(timeout=60) as client,
        client.stream("POST", f"{stack.url}/api/v1/orchestrate", json=body) as response,
    ):
        assert response.status_code == 200
        return [r.event async for r in aread_events(response)]


async def test_backend_unreachable(stack: Stack) -> None:
    async with httpx.AsyncClient(timeout=30) as client:
        answer = await client.post(
            f"{stack.url}/api/v1/execute", json={"prompt": "x", "model": "gone"}
        )
    assert answer.status_code == 503
    assert "'gone'" in answer.json()["message"]
    await frontend_request_works(stack)


async def test_backend_slower_than_the_deadline(stack: Stack, ollama: FakeOllama) -> None:
    ollama.words = [f"w{i} " for i in range(200)]
    ollama.delay_s = 0.05
    events = await stream(
        stack, {"prompt": "x", "model": "flaky", "mode": "EXECUTION_MODE_INFERENCE"}
    )
    failed = events[-1]["execution_failed"]
    assert failed["error"]["code"] == grpc.StatusCode.DEADLINE_EXCEEDED.value[0]
    assert failed["flow"][0]["output"]  # the partial flow is kept
    await frontend_request_works(stack)


@pytest.mark.parametrize("fault", ["garbage", "error", "no-done", "dies"])
async def test_backend_answering_badly(stack: Stack, ollama: FakeOllama, fault: str) -> None:
    ollama.words = ["one ", "two ", "three "]
    if fault == "garbage":
        ollama.garbage_line = "<html>502 Bad Gateway</html>"
    elif fault == "error":
        ollama.error_line = "CUDA out of memory"
    elif fault == "no-done":
        ollama.omit_done = True
    else:
        ollama.die_after = 2
    events = await stream(
        stack, {"prompt": "x", "model": "flaky", "mode": "EXECUTION_MODE_INFERENCE"}
    )
    final = events[-1]
    assert "execution_failed" in final, final
    error = final["execution_failed"]["error"]
    assert error["code"] in (
        grpc.StatusCode.INTERNAL.value[0],
        grpc.StatusCode.UNAVAILABLE.value[0],
    )
    assert "'flaky'" in error["message"]
    # What arrived before the fault is delivered and kept.
    assert final["execution_failed"]["flow"][0]["output"].startswith("one two")
    await frontend_request_works(stack)


async def test_service_killed_mid_stream(stack: Stack) -> None:
    body = {**FRONTEND, "max_tokens": 400, "prompt": "Write a long story."}
    seen: list[dict[str, Any]] = []
    cut = False
    async with httpx.AsyncClient(timeout=60) as client:
        try:
            async with client.stream(
                "POST", f"{stack.url}/api/v1/orchestrate", json=body
            ) as response:
                async for received in aread_events(response):
                    seen.append(received.event)
                    if len(seen) == 5:
                        assert stack.service.proc is not None
                        stack.service.proc.send_signal(signal.SIGKILL)
        except httpx.HTTPError:
            cut = True
    # The stream ends cut (Envoy resets it), never as if it had completed.
    assert cut or "execution_failed" in seen[-1]
    assert not any("execution_completed" in event for event in seen)
    execution_id = seen[0]["execution_id"]
    assert stack.service.proc is not None
    await asyncio.to_thread(stack.service.proc.wait)
    await asyncio.to_thread(stack.service.start)
    async with httpx.AsyncClient(timeout=30) as client:
        recorded = await client.get(f"{stack.url}/api/v1/executions/{execution_id}")
    assert recorded.status_code == 200, recorded.text
    assert recorded.json()["execution"]["last_sequence"] >= 5
    await frontend_request_works(stack)


async def test_envoy_restarted_while_the_service_runs(stack: Stack) -> None:
    await frontend_request_works(stack)
    await asyncio.to_thread(stack.envoy.stop)
    await asyncio.to_thread(stack.envoy.start)
    await frontend_request_works(stack)


async def test_a_rest_grpc_timeout_header_bounds_the_execution(
    stack: Stack, ollama: FakeOllama
) -> None:
    ollama.words = [f"w{i} " for i in range(200)]
    ollama.delay_s = 0.02
    async with httpx.AsyncClient(timeout=30) as client:
        answer = await client.post(
            f"{stack.url}/api/v1/execute",
            json={"prompt": "x", "model": "flaky"},
            # Shorter than the model's own 1 s timeout: the client's wins.
            headers={"grpc-timeout": "400m"},
        )
    assert answer.status_code == 504, answer.text
    error = answer.json()
    assert error["code"] == grpc.StatusCode.DEADLINE_EXCEEDED.value[0]
    # The service's own status (the lab was stopped), not Envoy's timeout.
    assert "did not finish within" in error["message"]
    await frontend_request_works(stack)
