"""The REST API through the real Envoy, in front of the real service with the
local model: the frontend's exact request first."""

from __future__ import annotations

import json
import re
from typing import Any

import httpx
import pytest

from agentlab.devstack import Stack
from tests.helpers.tools import run, tool

FRONTEND_BODY = '{"prompt": "Dime 3 números primos", "model": "mistral7b"}'
CAMEL_CASE = re.compile(r'"[a-z]+[A-Z]\w*"\s*:')


def curl(*args: str) -> tuple[int, dict[str, str], str]:
    """Run the real curl; return the status, the headers and the body."""
    result = run([tool("curl"), "-sS", "-D", "-", *args], timeout=120)
    assert result.returncode == 0, result.stderr
    # Text mode has already turned the CRLFs of the head into newlines.
    head, _, body = result.stdout.partition("\n\n")
    lines = head.splitlines()
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers, body


@pytest.mark.model
def test_the_frontends_exact_request_is_answered_by_the_real_model(model_stack: Stack) -> None:
    status, headers, body = curl(
        "-X",
        "POST",
        f"{model_stack.url}/api/v1/execute",
        "-H",
        "Content-Type: application/json",
        "--data-binary",
        FRONTEND_BODY.encode().decode("utf-8"),
    )
    assert status == 200, body
    assert headers["content-type"].startswith("application/json")
    assert not CAMEL_CASE.search(body), "REST JSON must use the proto field names"
    answer = json.loads(body)

    assert answer["output"].strip()
    assert answer["execution_id"]
    assert len(answer["flow"]) >= 1
    step = answer["flow"][0]
    assert step["node"] == "inference"
    assert step["status"] == "STEP_STATUS_SUCCEEDED"
    assert step["input"] == "Dime 3 números primos"
    assert step["output"] == answer["output"]
    assert step["duration_ms"] > 0

    metrics = answer["metrics"]
    assert metrics["latency_ms"] > 0
    assert 0 < metrics["time_to_first_token_ms"] <= metrics["latency_ms"]
    assert metrics["prompt_tokens"] > 0
    assert metrics["completion_tokens"] > 0
    assert metrics["tokens_per_second"] > 0
    # The metrics say honestly who answered: not Mistral 7B.
    assert metrics["backend"] == "embedded"
    assert metrics["model"] == "SmolLM2-135M-Instruct"
    assert metrics["requested_model"] == "mistral7b"


@pytest.mark.model
def test_orchestration_mode_runs_the_graph(model_stack: Stack) -> None:
    answer = httpx.post(
        f"{model_stack.url}/api/v1/execute",
        json={
            "prompt": "Name two colours.",
            "model": "mistral7b",
            "mode": "EXECUTION_MODE_ORCHESTRATION",
            "max_tokens": 24,
            "temperature": 0,
        },
        timeout=120,
    )
    assert answer.status_code == 200, answer.text
    result = answer.json()
    assert [step["node"] for step in result["flow"]] == ["plan", "answer", "review"]
    assert result["output"] == result["flow"][-1]["output"]
    assert result["metrics"]["completion_tokens"] == sum(
        step["metrics"]["completion_tokens"] for step in result["flow"]
    )
    # Each node got the previous node's output as part of its input.
    assert result["flow"][0]["output"] in result["flow"][1]["input"]
    assert result["flow"][1]["output"] in result["flow"][2]["input"]


@pytest.mark.model
def test_each_generation_option_reaches_the_model(model_stack: Stack) -> None:
    """One option per request, each shown by what it does to the real
    model's answer. llama.cpp's defaults, which an option that never arrived
    would leave in place: temperature 0.8, a random seed, and the gateway's
    max_tokens (256)."""

    def ask(**options: object) -> dict[str, Any]:
        body = {"prompt": "Write a short poem about the sea.", "max_tokens": 12, **options}
        answer = httpx.post(f"{model_stack.url}/api/v1/execute", json=body, timeout=60)
        assert answer.status_code == 200, answer.text
        result: dict[str, Any] = answer.json()
        return result

    # max_tokens: the answer stops there (a poem takes more than 5 tokens).
    assert ask(max_tokens=5)["metrics"]["completion_tokens"] == 5
    # seed, at the default temperature: the same seed, the same answer; other
    # seeds, other answers.
    seven = ask(seed=7)["output"]
    assert ask(seed=7)["output"] == seven
    assert {ask(seed=seed)["output"] for seed in (8, 9)} - {seven}
    # temperature, with a random seed each time: 0 is greedy, the same answer
    # every time; 1.5 is not.
    assert ask(temperature=0)["output"] == ask(temperature=0)["output"]
    assert ask(temperature=1.5)["output"] != ask(temperature=1.5)["output"]


def test_models_and_health_routes(model_stack: Stack) -> None:
    models = httpx.get(f"{model_stack.url}/api/v1/models", timeout=10)
    assert models.status_code == 200, models.text
    by_name = {model["name"]: model for model in models.json()["models"]}
    assert by_name["*"]["backend"] == "embedded"
    assert by_name["*"]["backend_model"] == "SmolLM2-135M-Instruct"
    assert by_name["*"]["ready"] is True
    assert by_name["echo"]["backend"] == "echo"

    health = httpx.get(f"{model_stack.url}/api/v1/health", timeout=10)
    assert health.status_code == 200, health.text
    assert health.json()["status"] == "SERVING_STATUS_SERVING"
    unknown = httpx.get(f"{model_stack.url}/api/v1/health?service=nope", timeout=10)
    assert unknown.status_code == 404
    assert unknown.json()["code"] == 5


def test_cors_preflight_allows_a_local_frontend_only(model_stack: Stack) -> None:
    def preflight(origin: str) -> httpx.Response:
        return httpx.options(
            f"{model_stack.url}/api/v1/execute",
            headers={
                "Origin": origin,
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "content-type",
            },
            timeout=10,
        )

    allowed = preflight("http://localhost:5173")
    assert allowed.status_code == 200
    assert allowed.headers["access-control-allow-origin"] == "http://localhost:5173"
    assert "POST" in allowed.headers["access-control-allow-methods"]
    assert "content-type" in allowed.headers["access-control-allow-headers"].lower()

    foreign = preflight("http://evil.example")
    assert "access-control-allow-origin" not in foreign.headers
