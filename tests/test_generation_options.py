"""Each generation option reaches the model on its own: a request through
Envoy that sets one option (temperature, seed or max_tokens) makes the
backend's request carry it, as Ollama names it, and nothing the request did
not set. A fake Ollama records what the gateway sent it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from agentlab.config import Settings
from agentlab.devstack import Stack
from tests.helpers.fake_ollama import FakeOllama
from tests.helpers.stacks import StackFactory

# (what the request sets, what Ollama's options must then say beside the
# gateway's default num_predict). Zeros included: an option set to zero is
# set, not absent.
CASES: list[tuple[dict[str, Any], dict[str, Any]]] = [
    ({}, {}),
    ({"temperature": 0.3}, {"temperature": 0.3}),
    ({"temperature": 0}, {"temperature": 0}),
    ({"seed": "42"}, {"seed": 42}),
    ({"seed": 0}, {"seed": 0}),
    ({"max_tokens": 7}, {"num_predict": 7}),
]


@pytest.fixture
async def ollama() -> AsyncIterator[FakeOllama]:
    fake = FakeOllama(models=["llama3.2:1b"])
    await fake.start()
    yield fake
    await fake.stop()


@pytest.fixture
async def stack(start_stack: StackFactory, ollama: FakeOllama) -> AsyncIterator[Stack]:
    # No per-model defaults: what reaches Ollama is the request's alone.
    models = (
        f"backends:\n  ollama: {{kind: ollama, url: '{ollama.url}'}}\n"
        "models:\n  llama: {backend: ollama, model: 'llama3.2:1b'}\n"
    )
    # In a thread: the fake Ollama answers from this event loop meanwhile, at
    # the start and at the stop (start_stack's own stop would come too late).
    started = await asyncio.to_thread(start_stack, models=models)
    yield started
    await asyncio.to_thread(started.stop)


@pytest.mark.parametrize("route", ["POST /api/v1/execute", "GET /api/v1/orchestrate"])
async def test_each_option_reaches_the_model_alone(
    stack: Stack, ollama: FakeOllama, route: str
) -> None:
    """POST sends the options in a JSON body, GET (EventSource's route) in
    the query string: both reach Ollama's request, one at a time."""
    method, path = route.split()
    async with httpx.AsyncClient(base_url=stack.url, timeout=30) as client:
        for given, expected in CASES:
            fields = {"prompt": "Name three colours.", "model": "llama", **given}
            if method == "POST":
                answer = await client.post(path, json=fields)
            else:
                query = {"mode": "EXECUTION_MODE_INFERENCE", **fields}
                answer = await client.get(path, params={k: str(v) for k, v in query.items()})
            assert answer.status_code == 200, (given, answer.text)
            sent = ollama.requests[-1]
            ollama.requests.clear()
            assert sent["options"] == {"num_predict": Settings.default_max_tokens, **expected}, (
                given
            )
