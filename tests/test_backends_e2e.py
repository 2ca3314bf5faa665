"""Remote backends through the real Envoy and the real service process: two
models on two backends from one routing file, the lab service going down and
coming back, health per backend, and cancellation reaching the upstream."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import httpx
import pytest

from agentlab.devstack import LabServiceProcess, Stack, free_port
from agentlab.v1 import execution_pb2
from agentlab.v1 import lab_service_pb2 as svc
from agentlab.v1 import lab_service_pb2_grpc as svc_grpc
from tests.helpers.fake_ollama import FakeOllama
from tests.helpers.sse import aread_events
from tests.helpers.stacks import StackFactory

OLLAMA_WORDS = ["Blue", ",", " green", " and", " red"]


@pytest.fixture
def lab_service(tmp_path: Path) -> Iterator[LabServiceProcess]:
    service = LabServiceProcess(
        free_port(), tmp_path / "lab.log", {"AGENTLAB_DEFAULT_BACKEND": "echo"}
    ).start()
    yield service
    service.stop()


@pytest.fixture
async def ollama() -> AsyncIterator[FakeOllama]:
    fake = FakeOllama(models=["mistral:7b"], words=list(OLLAMA_WORDS))
    await fake.start()
    yield fake
    await fake.stop()


@pytest.fixture
async def stack(
    start_stack: StackFactory, lab_service: LabServiceProcess, ollama: FakeOllama
) -> AsyncIterator[Stack]:
    models = f"""
backends:
  lab: {{kind: http_lab, url: "{lab_service.url}"}}
  ollama: {{kind: ollama, url: "{ollama.url}"}}
models:
  mistral7b: {{backend: ollama, model: "mistral:7b"}}
  orchestrator: {{backend: lab, model: any}}
  hasty: {{backend: ollama, model: "mistral:7b", timeout_s: 0.5}}
  unpulled: {{backend: ollama, model: "nope:1b"}}
"""
    env = {"AGENTLAB_HEALTH_INTERVAL_S": "0.2"}
    # In a thread: the fake Ollama answers from this event loop meanwhile, at
    # the start and at the stop (start_stack's own stop would come too late).
    started = await asyncio.to_thread(start_stack, env, models=models)
    yield started
    await asyncio.to_thread(started.stop)


async def post(url: str, body: dict[str, object]) -> httpx.Response:
    async with httpx.AsyncClient(timeout=30) as client:
        return await client.post(url, json=body)


async def get(url: str) -> httpx.Response:
    async with httpx.AsyncClient(timeout=30) as client:
        return await client.get(url)


async def test_two_models_on_two_backends_through_envoy(stack: Stack) -> None:
    ollama = await post(
        f"{stack.url}/api/v1/execute", {"prompt": "Name three colours.", "model": "mistral7b"}
    )
    assert ollama.status_code == 200, ollama.text
    answer = ollama.json()
    assert answer["output"] == "".join(OLLAMA_WORDS)
    metrics = answer["metrics"]
    assert (metrics["backend"], metrics["model"]) == ("ollama", "mistral:7b")
    # Ollama's own counts and eval_duration (5 tokens in 0.25 s).
    assert (metrics["prompt_tokens"], metrics["completion_tokens"]) == (12, 5)
    assert metrics["tokens_per_second"] == pytest.approx(20.0)

    lab = await post(
        f"{stack.url}/api/v1/execute",
        {"prompt": "hola que tal", "model": "orchestrator", "mode": "EXECUTION_MODE_ORCHESTRATION"},
    )
    assert lab.status_code == 200, lab.text
    result = lab.json()
    # The same shape as the embedded lab's orchestration.
    assert [step["node"] for step in result["flow"]] == ["plan", "answer", "review"]
    assert all(step["status"] == "STEP_STATUS_SUCCEEDED" for step in result["flow"])
    assert result["metrics"]["backend"] == "lab"
    assert result["metrics"]["completion_tokens"] > 0

    async with (
        httpx.AsyncClient(timeout=30) as client,
        client.stream(
            "POST",
            f"{stack.url}/api/v1/orchestrate",
            json={"prompt": "hola que tal", "model": "orchestrator"},
        ) as response,
    ):
        events = [r.event async for r in aread_events(response)]
    assert "execution_started" in events[0]
    assert any("token_delta" in e for e in events)
    completed = events[-1]["execution_completed"]["result"]
    assert [step["node"] for step in completed["flow"]] == ["plan", "answer", "review"]

    models = (await get(f"{stack.url}/api/v1/models")).json()["models"]
    assert {(m["name"], m["backend"], m["ready"]) for m in models} >= {
        ("mistral7b", "ollama", True),
        ("orchestrator", "lab", True),
    }


async def test_an_unknown_model_is_404_listing_the_known_ones(stack: Stack) -> None:
    answer = await post(f"{stack.url}/api/v1/execute", {"prompt": "hi", "model": "gpt-5"})
    assert answer.status_code == 404, answer.text
    error = answer.json()
    assert error["code"] == grpc.StatusCode.NOT_FOUND.value[0]
    assert "gpt-5" in error["message"]
    assert "mistral7b" in error["message"]
    assert "orchestrator" in error["message"]


async def wait_for(check: object, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if await check():  # type: ignore[operator]
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"not true within {timeout_s} s")


async def test_the_lab_service_down_is_503_naming_it_then_recovers(
    stack: Stack, lab_service: LabServiceProcess
) -> None:
    health_url = f"{stack.url}/api/v1/health?service=agentlab.backend.lab"
    assert (await get(health_url)).status_code == 200

    await asyncio.to_thread(lab_service.stop)
    down = await post(f"{stack.url}/api/v1/execute", {"prompt": "hi", "model": "orchestrator"})
    assert down.status_code == 503, down.text
    error = down.json()
    assert error["code"] == grpc.StatusCode.UNAVAILABLE.value[0]
    assert "'lab'" in error["message"]
    assert lab_service.url in error["message"]
    [info] = [d for d in error["details"] if d["@type"].endswith("ErrorInfo")]
    assert info["metadata"]["backend"] == "lab"

    async def lab_unhealthy() -> bool:
        return (await get(health_url)).status_code == 503

    await wait_for(lab_unhealthy)
    # The other backend, and so the gateway, still serve.
    assert (await get(f"{stack.url}/api/v1/health")).status_code == 200
    models = {m["name"]: m for m in (await get(f"{stack.url}/api/v1/models")).json()["models"]}
    assert models["orchestrator"]["ready"] is False
    assert models["mistral7b"]["ready"] is True

    # Back on the same port; the gateway was never restarted.
    await asyncio.to_thread(lab_service.start)
    again = await post(
        f"{stack.url}/api/v1/execute", {"prompt": "hi there", "model": "orchestrator"}
    )
    assert again.status_code == 200, again.text
    assert again.json()["output"] == "hi there"

    async def lab_healthy() -> bool:
        return (await get(health_url)).status_code == 200

    await wait_for(lab_healthy)


async def test_grpc_cancel_closes_the_upstream_request(stack: Stack, ollama: FakeOllama) -> None:
    ollama.words = [f"w{i} " for i in range(400)]
    ollama.delay_s = 0.05
    async with grpc.aio.insecure_channel(stack.gateway_grpc) as channel:
        call = svc_grpc.LabServiceStub(channel).Orchestrate(
            svc.OrchestrateRequest(
                prompt="go", model="mistral7b", mode=execution_pb2.EXECUTION_MODE_INFERENCE
            )
        )
        deltas = 0
        async for message in call:
            deltas += message.event.WhichOneof("kind") == "token_delta"
            if deltas == 3:
                break
        cancelled_at = time.monotonic()
        call.cancel()
    await asyncio.wait_for(ollama.disconnected.wait(), timeout=1.0)
    assert ollama.disconnected_at is not None
    assert ollama.disconnected_at - cancelled_at < 1.0
    assert ollama.lines_sent < 100, "the upstream kept generating after the cancel"


async def test_closing_a_rest_stream_closes_the_upstream_request(
    stack: Stack, ollama: FakeOllama
) -> None:
    ollama.words = [f"w{i} " for i in range(400)]
    ollama.delay_s = 0.05
    async with httpx.AsyncClient(timeout=30) as client:
        async with client.stream(
            "POST",
            f"{stack.url}/api/v1/orchestrate",
            json={"prompt": "go", "model": "mistral7b", "mode": "EXECUTION_MODE_INFERENCE"},
        ) as response:
            deltas = 0
            async for received in aread_events(response):
                deltas += "token_delta" in received.event
                if deltas == 3:
                    break
        closed_at = time.monotonic()
    await asyncio.wait_for(ollama.disconnected.wait(), timeout=1.0)
    assert ollama.disconnected_at is not None
    assert ollama.disconnected_at - closed_at < 1.0
    assert ollama.lines_sent < 100


async def test_a_models_timeout_is_504_and_the_stream_keeps_the_partial_flow(
    stack: Stack, ollama: FakeOllama
) -> None:
    ollama.words = [f"w{i} " for i in range(400)]
    ollama.delay_s = 0.02
    answer = await post(f"{stack.url}/api/v1/execute", {"prompt": "go", "model": "hasty"})
    assert answer.status_code == 504, answer.text
    error = answer.json()
    assert error["code"] == grpc.StatusCode.DEADLINE_EXCEEDED.value[0]
    assert "0.5 s" in error["message"]

    async with (
        httpx.AsyncClient(timeout=30) as client,
        client.stream(
            "POST",
            f"{stack.url}/api/v1/orchestrate",
            json={"prompt": "go", "model": "hasty", "mode": "EXECUTION_MODE_INFERENCE"},
        ) as response,
    ):
        events = [r.event async for r in aread_events(response)]
    failed = events[-1]["execution_failed"]
    assert failed["error"]["code"] == grpc.StatusCode.DEADLINE_EXCEEDED.value[0]
    [step] = failed["flow"]
    assert step["status"] == "STEP_STATUS_FAILED"
    deltas = "".join(e["token_delta"]["text"] for e in events if "token_delta" in e)
    assert deltas
    assert step["output"] == deltas


async def test_a_grpc_deadline_reaches_the_lab(stack: Stack, ollama: FakeOllama) -> None:
    ollama.words = [f"w{i} " for i in range(400)]
    ollama.delay_s = 0.02
    async with grpc.aio.insecure_channel(stack.gateway_grpc) as channel:
        stub = svc_grpc.LabServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await stub.Execute(svc.ExecuteRequest(prompt="go", model="mistral7b"), timeout=1.0)
    assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    # The lab's own status with its message, not the transport's bare one.
    assert "did not finish within" in (raised.value.details() or "")
    await asyncio.wait_for(ollama.disconnected.wait(), timeout=1.0)


async def test_an_upstream_http_error_keeps_its_status(stack: Stack) -> None:
    answer = await post(f"{stack.url}/api/v1/execute", {"prompt": "hi", "model": "unpulled"})
    assert answer.status_code == 404, answer.text
    error = answer.json()
    assert "nope:1b" in error["message"]
    [info] = [d for d in error["details"] if d["@type"].endswith("ErrorInfo")]
    assert info["metadata"]["upstream_status"] == "404"
    assert info["metadata"]["backend"] == "ollama"
