"""Prometheus metrics (README, Operating it > Metrics): the service's series,
read through Envoy's GET /metrics after real calls through Envoy, with the
names, labels and buckets agreed in METRIC_NAMES (OpenTelemetry GenAI
conventions, per graph node, and the gateway's own)."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from agentlab.config import ConfigError, Settings
from agentlab.core.errors import Cancelled
from agentlab.core.events import ExecutionFailed
from agentlab.core.types import ExecutionMode, FlowStep, Metrics, StepStatus, Task
from agentlab.devstack import Stack
from agentlab.executions.model import FINISHED_STATES
from agentlab.lab.graph import NODES
from agentlab.metrics import instruments
from agentlab.metrics.record import ENDED_STATES, MAX_MODELS, OTHER_MODEL, execution_finished
from tests.helpers.sse import read_events
from tests.helpers.stacks import StackFactory

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(url: str) -> Samples:
    """Every sample of a Prometheus text page, by name and label set."""
    answer = httpx.get(url, timeout=10)
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"].startswith("text/plain")
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(answer.text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sample ``name`` with exactly ``labels``; 0 when it is absent."""
    return samples.get((name, frozenset(labels.items())), 0.0)


def matching(samples: Samples, name: str, **labels: str) -> Samples:
    """The samples ``name`` whose labels include ``labels``."""
    wanted = set(labels.items())
    return {key: v for key, v in samples.items() if key[0] == name and wanted <= key[1]}


def buckets(samples: Samples, name: str, **labels: str) -> list[float]:
    """The upper bounds of a histogram's buckets, +Inf left out."""
    bounds = {dict(key[1])["le"] for key in matching(samples, f"{name}_bucket", **labels)}
    return sorted(float(b) for b in bounds if b != "+Inf")


def wait_for(check: Callable[[], bool], what: str, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def gen_ai(operation: str, model: str) -> dict[str, str]:
    """The GenAI labels of a call on the echo backend for ``model``."""
    return {
        "gen_ai_operation_name": operation,
        "gen_ai_request_model": model,
        "gen_ai_response_model": "echo",
        "gen_ai_provider_name": "echo",
    }


def test_execute_and_orchestrate_via_envoy_are_measured(start_stack: StackFactory) -> None:
    stack = start_stack({"AGENTLAB_DEFAULT_BACKEND": "echo"})
    executed = [
        httpx.post(
            f"{stack.url}/api/v1/execute",
            json={"prompt": prompt, "model": "mistral7b"},
            timeout=30,
        ).json()
        for prompt in ("one two three", "four five six seven")
    ]
    with httpx.stream(
        "POST",
        f"{stack.url}/api/v1/orchestrate",
        json={"prompt": "name three primes", "model": "mistral7b"},
        timeout=30,
    ) as response:
        assert response.status_code == 200
        events = [r.event for r in read_events(response)]
    orchestrated = events[-1]["execution_completed"]["result"]
    samples = scrape(f"{stack.url}/metrics")

    chat, agent = gen_ai("chat", "mistral7b"), gen_ai("invoke_agent", "mistral7b")
    duration = "gen_ai_server_request_duration_seconds"
    assert value(samples, f"{duration}_count", **chat, error_type="") == 2
    assert value(samples, f"{duration}_count", **agent, error_type="") == 1
    assert buckets(samples, duration, **chat) == list(instruments.DURATION_BUCKETS)
    # What the answers reported is what was recorded.
    latency = sum(e["metrics"]["latency_ms"] for e in executed) / 1000
    assert value(samples, f"{duration}_sum", **chat, error_type="") == pytest.approx(latency)

    ttft = "gen_ai_server_time_to_first_token_seconds"
    assert value(samples, f"{ttft}_count", **chat) == 2
    assert value(samples, f"{ttft}_count", **agent) == 1
    assert buckets(samples, ttft, **chat) == list(instruments.TIME_TO_FIRST_TOKEN_BUCKETS)
    firsts = sum(e["metrics"]["time_to_first_token_ms"] for e in executed) / 1000
    assert value(samples, f"{ttft}_sum", **chat) == pytest.approx(firsts)

    tpot = "gen_ai_server_time_per_output_token_seconds"
    assert value(samples, f"{tpot}_count", **chat) == 2
    assert buckets(samples, tpot, **chat) == list(instruments.TIME_PER_OUTPUT_TOKEN_BUCKETS)

    usage = "gen_ai_client_token_usage"
    for token_type, field in (("input", "prompt_tokens"), ("output", "completion_tokens")):
        reported = sum(e["metrics"][field] for e in executed)
        assert reported > 0
        assert value(samples, f"{usage}_sum", **chat, gen_ai_token_type=token_type) == reported
        assert value(samples, f"{usage}_count", **chat, gen_ai_token_type=token_type) == 2
        assert (
            value(samples, f"{usage}_sum", **agent, gen_ai_token_type=token_type)
            == orchestrated["metrics"][field]
        )
    assert buckets(samples, usage, **chat) == list(instruments.TOKEN_BUCKETS)

    # Per graph node: each node of the orchestration, and the inference step.
    steps = [step for e in executed for step in e["flow"]] + orchestrated["flow"]
    assert {step["node"] for step in orchestrated["flow"]} == set(NODES)
    for node in {step["node"] for step in steps}:
        ran = [step for step in steps if step["node"] == node]
        labels = {"node": node, "gen_ai_request_model": "mistral7b"}
        assert value(samples, "agentlab_node_duration_seconds_count", **labels) == len(ran)
        assert value(samples, "agentlab_node_duration_seconds_sum", **labels) == pytest.approx(
            sum(step["duration_ms"] for step in ran) / 1000
        )
        assert value(samples, "agentlab_node_time_to_first_token_seconds_count", **labels) == len(
            ran
        )
        assert value(samples, "agentlab_node_output_tokens_total", **labels) == sum(
            step["metrics"]["completion_tokens"] for step in ran
        )

    # The gateway's own.
    assert value(samples, "agentlab_executions_total", state="SUCCEEDED") == 3
    assert value(samples, "agentlab_executions_running") == 0
    assert value(samples, "agentlab_executions_queued") == 0
    assert value(samples, "agentlab_store_write_duration_seconds_count", operation="create") == 3
    appends = "agentlab_store_write_duration_seconds_count"
    assert value(samples, appends, operation="append_events") >= 3
    # The stream's events reached it through the bus.
    assert value(samples, "agentlab_bus_lag_seconds_count") > 0
    assert value(samples, "agentlab_backend_up", backend="echo") == 1
    # No `_created` twin per series.
    assert not [key for key in samples if key[0].endswith("_created")]


ROUTING = """
backends:
  echo: {kind: echo}
  nowhere: {kind: ollama, url: "http://127.0.0.1:%d"}
models:
  echo: {backend: echo}
  hasty: {backend: echo, timeout_s: 0.3}
  offline: {backend: nowhere}
"""


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def test_limits_failures_and_backend_health_are_measured(start_stack: StackFactory) -> None:
    stack = start_stack(
        {
            "AGENTLAB_MAX_RUNNING_EXECUTIONS": "1",
            "AGENTLAB_MAX_QUEUED_EXECUTIONS": "1",
            "AGENTLAB_ECHO_TOKEN_DELAY_S": "0.2",
            "AGENTLAB_HEALTH_INTERVAL_S": "0.2",
        },
        models=ROUTING % _closed_port(),
    )
    metrics = f"{stack.url}/metrics"
    long_prompt = " ".join(["word"] * 100)

    def start(model: str = "echo") -> httpx.Response:
        return httpx.post(
            f"{stack.url}/api/v1/execute",
            json={"prompt": long_prompt, "model": model, "background": True},
            timeout=30,
        )

    running, queued = start().json(), start().json()
    refused = start()
    assert refused.status_code == 429

    def one_running_one_queued() -> bool:
        samples = scrape(metrics)
        return (
            value(samples, "agentlab_executions_running") == 1
            and value(samples, "agentlab_executions_queued") == 1
        )

    wait_for(one_running_one_queued, "one execution running and one queued")
    samples = scrape(metrics)
    assert value(samples, "agentlab_requests_rejected_total", reason="TOO_MANY_EXECUTIONS") == 1
    for execution in (queued, running):
        cancel = f"{stack.url}/api/v1/executions/{execution['execution_id']}:cancel"
        assert httpx.post(cancel, json={}, timeout=30).status_code == 200
    wait_for(
        lambda: value(scrape(metrics), "agentlab_executions_total", state="CANCELLED") == 2,
        "both executions cancelled",
    )

    # Past its model's timeout: a failure, with its reason as error.type.
    answer = httpx.post(
        f"{stack.url}/api/v1/execute", json={"prompt": long_prompt, "model": "hasty"}, timeout=30
    )
    assert answer.status_code == 504
    samples = scrape(metrics)
    assert value(samples, "agentlab_executions_total", state="FAILED") == 1
    failed = {**gen_ai("chat", "hasty"), "error_type": "DEADLINE_EXCEEDED"}
    assert value(samples, "gen_ai_server_request_duration_seconds_count", **failed) == 1
    # No first token, output or usage is recorded for a failure.
    assert not matching(samples, "gen_ai_client_token_usage_count", gen_ai_request_model="hasty")
    # The backend nobody listens for is down, echo up.
    assert value(samples, "agentlab_backend_up", backend="nowhere") == 0
    assert value(samples, "agentlab_backend_up", backend="echo") == 1


def test_model_names_past_the_bound_share_one_label(start_stack: StackFactory) -> None:
    """Without a routing file any model name is served: past the bound, the
    names clients invent do not each get series of their own."""
    stack = start_stack({"AGENTLAB_DEFAULT_BACKEND": "echo"})
    with httpx.Client(base_url=stack.url, timeout=30) as client:
        for number in range(MAX_MODELS + 5):
            answer = client.post("/api/v1/execute", json={"prompt": "x", "model": f"m{number}"})
            assert answer.status_code == 200
    samples = scrape(f"{stack.url}/metrics")
    models = {
        dict(key[1])["gen_ai_request_model"]
        for key in matching(samples, "gen_ai_server_request_duration_seconds_count")
    }
    assert len(models) == MAX_MODELS + 1
    assert OTHER_MODEL in models
    other = {**gen_ai("chat", OTHER_MODEL), "error_type": ""}
    assert value(samples, "gen_ai_server_request_duration_seconds_count", **other) == 5


@pytest.mark.parametrize("address", ["off", "OFF", "127.0.0.1:9464", "0.0.0.0:1", "[::1]:65535"])
def test_metrics_address_takes_off_or_host_and_port(address: str) -> None:
    settings = Settings.from_env({"AGENTLAB_METRICS_ADDRESS": address})
    expected = "off" if address.lower() == "off" else address
    assert settings.metrics_address == expected


@pytest.mark.parametrize("address", ["9464", "localhost", ":9464", "host:0", "host:65536", "h:x"])
def test_a_metrics_address_that_cannot_be_honoured_is_refused(address: str) -> None:
    with pytest.raises(ConfigError, match="AGENTLAB_METRICS_ADDRESS must be off or <host>:<port>"):
        Settings.from_env({"AGENTLAB_METRICS_ADDRESS": address})


def _service(env: Mapping[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agentlab"],
        env={"PATH": "/usr/bin:/bin", **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.e2e
def test_a_taken_metrics_port_stops_start_up(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = _service(
            {
                "AGENTLAB_DEFAULT_BACKEND": "echo",
                "AGENTLAB_GRPC_ADDRESS": "127.0.0.1:0",
                "AGENTLAB_DATA_DIR": str(tmp_path),
                "AGENTLAB_METRICS_ADDRESS": f"127.0.0.1:{port}",
            }
        )
    assert done.returncode != 0
    assert f"cannot serve metrics on 127.0.0.1:{port} (AGENTLAB_METRICS_ADDRESS" in done.stderr


def test_envoys_rate_limit_spares_metrics_and_counts_its_429s(start_stack: StackFactory) -> None:
    stack = start_stack({"AGENTLAB_DEFAULT_BACKEND": "echo", "AGENTLAB_RATE_LIMIT": "1/1"})
    statuses = [
        httpx.post(
            f"{stack.url}/api/v1/execute", json={"prompt": "x", "model": "echo"}, timeout=30
        ).status_code
        for _ in range(3)
    ]
    assert statuses.count(429) >= 2
    for _ in range(3):
        scrape(f"{stack.url}/metrics")  # each 200, within a 1/s limit
    envoy = scrape(f"http://127.0.0.1:{stack.envoy.ports.admin}/stats/prometheus")
    limited = value(
        envoy,
        # prometheus-client's parser names a counter's sample with _total.
        "envoy_http_local_rate_limit_rate_limited_total",
        envoy_local_http_ratelimit_prefix="lab_rate_limit",
    )
    assert limited == statuses.count(429)


def test_metrics_off_serves_none_and_envoy_says_so(start_stack: StackFactory) -> None:
    stack: Stack = start_stack(
        {"AGENTLAB_DEFAULT_BACKEND": "echo", "AGENTLAB_METRICS_ADDRESS": "off"}
    )
    answer = httpx.get(f"{stack.url}/metrics", timeout=10)
    assert answer.status_code == 503
    # The API itself is unaffected.
    executed = httpx.post(
        f"{stack.url}/api/v1/execute", json={"prompt": "x", "model": "echo"}, timeout=30
    )
    assert executed.status_code == 200


def test_a_failure_records_its_finished_nodes_only() -> None:
    """In process: a failed execution's duration is recorded with its reason;
    of its flow, the nodes that finished count, the one cut short does not
    (its numbers are partial), and no first token or usage is recorded."""

    class Lab:
        backend, model_name = "embedded", "SmolLM2"

    model = "test-failure-model"

    def step(node: str, status: StepStatus) -> FlowStep:
        metrics = Metrics(time_to_first_token_ms=5.0, completion_tokens=7)
        return FlowStep(node, status, "in", "out", datetime.now(UTC), 20.0, metrics)

    def sample(name: str, **labels: str) -> float:
        return REGISTRY.get_sample_value(name, labels) or 0.0

    failed = ExecutionFailed(
        Cancelled(), (step("plan", StepStatus.SUCCEEDED), step("answer", StepStatus.CANCELLED))
    )
    task = Task("prompt", model, ExecutionMode.ORCHESTRATION)
    execution_finished(task, Lab(), failed, 0.25)  # type: ignore[arg-type]

    labels = {
        "gen_ai_operation_name": "invoke_agent",
        "gen_ai_request_model": model,
        "gen_ai_response_model": "SmolLM2",
        "gen_ai_provider_name": "embedded",
    }
    duration = "gen_ai_server_request_duration_seconds"
    assert sample(f"{duration}_count", **labels, error_type="CANCELLED") == 1
    assert sample(f"{duration}_sum", **labels, error_type="CANCELLED") == 0.25
    assert sample("gen_ai_server_time_to_first_token_seconds_count", **labels) == 0
    plan = {"node": "plan", "gen_ai_request_model": model}
    answer = {"node": "answer", "gen_ai_request_model": model}
    assert sample("agentlab_node_duration_seconds_count", **plan) == 1
    assert sample("agentlab_node_output_tokens_total", **plan) == 7
    assert sample("agentlab_node_duration_seconds_count", **answer) == 0
    assert sample("agentlab_node_output_tokens_total", **answer) == 0


def test_end_states_and_refusal_reasons_are_series_from_start_up(
    start_stack: StackFactory,
) -> None:
    """A fresh service already serves 0 for every end state and 429 reason:
    rate() of a series born at its first increment misses that increment,
    and a dashboard shows "no data" rather than 0 until it comes."""
    stack = start_stack({"AGENTLAB_DEFAULT_BACKEND": "echo"})
    samples = scrape(f"{stack.url}/metrics")
    for state in ("SUCCEEDED", "FAILED", "CANCELLED"):
        key = ("agentlab_executions_total", frozenset({("state", state)}))
        assert samples.get(key) == 0.0, state
    key = ("agentlab_requests_rejected_total", frozenset({("reason", "TOO_MANY_EXECUTIONS")}))
    assert samples.get(key) == 0.0


def test_the_end_states_are_the_stores_finished_states() -> None:
    assert tuple(state.value for state in FINISHED_STATES) == ENDED_STATES
