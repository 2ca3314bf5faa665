"""Orchestrate reaches REST clients as Server-Sent Events, as they happen."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest

from agentlab.devstack import Stack
from tests.helpers.sse import aread_events, read_events
from tests.helpers.stacks import StackFactory


def kind(event: dict[str, object]) -> str:
    return next(key for key in event if key not in ("sequence", "time", "execution_id"))


@pytest.mark.model
def test_rest_stream_is_incremental(model_stack: Stack) -> None:
    request = {"prompt": "Describe the sea in two sentences.", "max_tokens": 40, "temperature": 0}
    with httpx.stream(
        "POST", f"{model_stack.url}/api/v1/orchestrate", json=request, timeout=120
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        received = read_events(response)

    events = [r.event for r in received]
    assert [e["sequence"] for e in events] == list(range(1, len(events) + 1))
    assert kind(events[0]) == "execution_started"
    assert kind(events[-1]) == "execution_completed"
    assert sum(kind(e) == "token_delta" for e in events) > 10

    first, last = received[0], received[-1]
    run_time = last.produced - first.produced
    assert run_time > 0.5, f"the run took {run_time:.2f} s: too short to tell buffering apart"
    # Buffering would deliver the first event only once the last one exists.
    assert first.arrived < last.produced - 0.4 * run_time, (
        f"first event arrived {first.arrived - first.produced:.2f} s after it was produced; "
        f"the last was produced {run_time:.2f} s after the first"
    )
    tokens = [r for r in received if kind(r.event) == "token_delta"]
    assert tokens[0].arrived < last.produced


def test_get_binding_serves_browsers_eventsource(echo_stack: Stack) -> None:
    with httpx.stream(
        "GET",
        f"{echo_stack.url}/api/v1/orchestrate",
        params={"prompt": "hola que tal", "model": "echo", "mode": "EXECUTION_MODE_INFERENCE"},
        headers={"Accept": "text/event-stream"},
        timeout=30,
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [r.event for r in read_events(response)]
    assert kind(events[-1]) == "execution_completed"
    result = events[-1]["execution_completed"]["result"]
    assert result["output"] == "hola que tal"
    # The same result Execute answers with, state included.
    assert result["state"] == "EXECUTION_STATE_SUCCEEDED"
    assert [step["node"] for step in result["flow"]] == ["inference"]
    assert result["metrics"]["backend"] == "echo"
    text = "".join(e["token_delta"]["text"] for e in events if kind(e) == "token_delta")
    assert text == result["output"]


# More than a browser tab or two: each stream is an execution, a request
# through Envoy and an HTTP/1.1 connection of its own. Opened in waves of
# 100 a second, as arriving clients would.
CONCURRENT_STREAMS = 300
WAVE = 100
WORDS = 8


@pytest.mark.timeout(300)
async def test_hundreds_of_concurrent_streams_through_envoy_each_get_every_event(
    start_stack: StackFactory,
) -> None:
    stack = start_stack(
        {
            "AGENTLAB_DEFAULT_BACKEND": "echo",
            # Long enough that the first streams are still open when the
            # last ones open.
            "AGENTLAB_ECHO_TOKEN_DELAY_S": "0.75",
            "AGENTLAB_MAX_RUNNING_EXECUTIONS": str(CONCURRENT_STREAMS),
        }
    )
    prompt = " ".join(f"w{i}" for i in range(WORDS))
    request = {"prompt": prompt, "model": "echo", "mode": "EXECUTION_MODE_INFERENCE"}
    first_arrivals: list[float] = []
    last_arrivals: list[float] = []

    async def stream(client: httpx.AsyncClient) -> list[dict[str, Any]]:
        async with client.stream("POST", f"{stack.url}/api/v1/orchestrate", json=request) as answer:
            assert answer.status_code == 200, await answer.aread()
            received = [r async for r in aread_events(answer)]
        first_arrivals.append(received[0].arrived)
        last_arrivals.append(received[-1].arrived)
        return [r.event for r in received]

    limits = httpx.Limits(max_connections=None, max_keepalive_connections=0)
    async with httpx.AsyncClient(limits=limits, timeout=120) as client:
        tasks = []
        for _ in range(CONCURRENT_STREAMS // WAVE):
            tasks += [asyncio.create_task(stream(client)) for _ in range(WAVE)]
            await asyncio.sleep(1.0)
        streams = await asyncio.gather(*tasks)

    # Every stream open at once: each had begun before any had ended.
    assert max(first_arrivals) < min(last_arrivals)
    ids = set()
    for events in streams:
        assert [e["sequence"] for e in events] == list(range(1, WORDS + 5))
        assert [kind(e) for e in events] == [
            "execution_started",
            "node_started",
            *["token_delta"] * WORDS,
            "node_finished",
            "execution_completed",
        ]
        assert "".join(e["token_delta"]["text"] for e in events[2:-2]) == prompt
        assert events[-1]["execution_completed"]["result"]["output"] == prompt
        ids.add(events[0]["execution_id"])
    assert len(ids) == CONCURRENT_STREAMS
