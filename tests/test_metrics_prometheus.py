"""A real Prometheus (Debian's `prometheus` package) scraping a running
stack as the README says to: the service's metrics port and Envoy's admin
/stats/prometheus; its HTTP API then has the TTFT histogram with the model
label. Skipped without the `prometheus` binary, failed in CI."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from agentlab.devstack import ROOT, Stack, free_port
from agentlab.metrics import instruments
from tests.helpers.services import missing
from tests.helpers.stacks import StackFactory

pytestmark = pytest.mark.e2e


def _prometheus_binary() -> str:
    binary = shutil.which("prometheus")
    if binary is None:
        missing("prometheus is not installed (Debian: apt-get install prometheus)")
    return binary


class Prometheus:
    """A Prometheus on a free port with its own configuration and storage."""

    def __init__(self, url: str, proc: subprocess.Popen[bytes]) -> None:
        self.url = url
        self.proc = proc

    def query(self, promql: str) -> list[dict[str, Any]]:
        answer = httpx.get(f"{self.url}/api/v1/query", params={"query": promql}, timeout=10)
        answer.raise_for_status()
        body = answer.json()
        assert body["status"] == "success", body
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    def wait(self, promql: str, expected: float, timeout_s: float = 30.0) -> list[dict[str, Any]]:
        """The query's result once every series in it equals ``expected``."""
        deadline = time.monotonic() + timeout_s
        while True:
            result = self.query(promql)
            if result and all(float(r["value"][1]) == expected for r in result):
                return result
            if time.monotonic() > deadline:
                raise AssertionError(f"{promql} is {result}, not {expected}, after {timeout_s} s")
            time.sleep(0.25)


@pytest.fixture
def scraping(tmp_path: Path, start_stack: StackFactory) -> Iterator[tuple[Stack, Prometheus]]:
    binary = _prometheus_binary()
    stack = start_stack({"AGENTLAB_DEFAULT_BACKEND": "echo"})
    with prometheus_for(stack, tmp_path, binary) as prometheus:
        yield stack, prometheus


@contextmanager
def prometheus_for(stack: Stack, tmp_path: Path, binary: str) -> Iterator[Prometheus]:
    """A Prometheus scraping ``stack`` every second, as the README says."""
    ports = stack.envoy.ports
    config = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s"},
        "scrape_configs": [
            # Each replica's own metrics port (Envoy's GET /metrics reaches
            # only one of several replicas).
            {
                "job_name": "agentlab",
                "static_configs": [{"targets": [f"127.0.0.1:{ports.metrics}"]}],
            },
            {
                "job_name": "envoy",
                "metrics_path": "/stats/prometheus",
                "static_configs": [{"targets": [f"127.0.0.1:{ports.admin}"]}],
            },
        ],
    }
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    with (tmp_path / "prometheus.log").open("wb") as log:
        proc = subprocess.Popen(
            [
                binary,
                f"--config.file={tmp_path / 'prometheus.yml'}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    prometheus = Prometheus(f"http://127.0.0.1:{port}", proc)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{prometheus.url}/-/ready", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError((tmp_path / "prometheus.log").read_text(errors="replace"))
            time.sleep(0.1)
        yield prometheus
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_prometheus_scrapes_the_service_and_envoy(scraping: tuple[Stack, Prometheus]) -> None:
    stack, prometheus = scraping
    with httpx.Client(base_url=stack.url, timeout=30) as client:
        for prompt in ("uno dos tres", "cuatro cinco", "seis"):
            answer = client.post("/api/v1/execute", json={"prompt": prompt, "model": "mistral7b"})
            assert answer.status_code == 200

    # Both targets up: the service's metrics port and Envoy's admin.
    prometheus.wait('count(up{job=~"agentlab|envoy"} == 1)', 2)
    ttft = "gen_ai_server_time_to_first_token_seconds"
    [count] = prometheus.wait(f'{ttft}_count{{gen_ai_request_model="mistral7b"}}', 3)
    assert count["metric"]["job"] == "agentlab"
    assert count["metric"]["gen_ai_operation_name"] == "chat"
    assert count["metric"]["gen_ai_response_model"] == "echo"
    bounds = prometheus.query(f'{ttft}_bucket{{gen_ai_request_model="mistral7b"}}')
    assert sorted(float(b["metric"]["le"]) for b in bounds) == [
        *instruments.TIME_TO_FIRST_TOKEN_BUCKETS,
        float("inf"),
    ]
    # A quantile, as a dashboard draws it.
    [p50] = prometheus.query(
        f'histogram_quantile(0.5, sum by (le) ({ttft}_bucket{{gen_ai_request_model="mistral7b"}}))'
    )
    assert 0 < float(p50["value"][1]) <= instruments.TIME_TO_FIRST_TOKEN_BUCKETS[-1]

    # Envoy's own statistics, from its admin port: the three calls went
    # through its listener to the service's cluster.
    [upstream] = prometheus.wait(
        'envoy_cluster_upstream_rq_completed{envoy_cluster_name="agentlab_service"}', 3
    )
    assert upstream["metric"]["job"] == "envoy"


# Dashboard panels with no data in the traffic below, and why.
NEEDS_A_FAILED_EXECUTION = {
    "sum by (gen_ai_request_model, error_type) "
    '(rate(gen_ai_server_request_duration_seconds_count{error_type!=""}[$__rate_interval]))',
}


def test_every_dashboard_query_has_data_on_a_live_stack(
    tmp_path: Path, start_stack: StackFactory
) -> None:
    """Each query of deploy/grafana's dashboard, run by a real Prometheus
    scraping a stack after Execute, Orchestrate, a 429 from the service and
    one from Envoy's rate limit, returns series: a name, label or selector
    that only looked right would come back empty."""
    binary = _prometheus_binary()
    stack = start_stack(
        {
            "AGENTLAB_DEFAULT_BACKEND": "echo",
            "AGENTLAB_RATE_LIMIT": "20/20",
            "AGENTLAB_MAX_RUNNING_EXECUTIONS": "1",
            "AGENTLAB_MAX_QUEUED_EXECUTIONS": "1",
            "AGENTLAB_ECHO_TOKEN_DELAY_S": "0.05",
        }
    )
    with prometheus_for(stack, tmp_path, binary) as prometheus:
        prometheus.wait('count(up{job=~"agentlab|envoy"} == 1)', 2)
        with httpx.Client(base_url=stack.url, timeout=30) as client:
            execute = {"prompt": "uno dos", "model": "mistral7b"}
            assert client.post("/api/v1/execute", json=execute).status_code == 200
            streamed = client.post("/api/v1/orchestrate", json=execute)
            assert streamed.status_code == 200
            with ThreadPoolExecutor(4) as pool:
                statuses = list(
                    pool.map(
                        lambda _: client.post("/api/v1/execute", json=execute).status_code, range(4)
                    )
                )
            assert 429 in statuses, statuses  # the service's: one running, one waiting
            burst = [client.get("/api/v1/models").status_code for _ in range(40)]
            assert 429 in burst, burst  # Envoy's bucket of 20
        dashboard = json.loads((ROOT / "deploy/grafana/dashboards/agentlab.json").read_text())
        queries = [
            target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])
        ]
        empty = set(queries)
        deadline = time.monotonic() + 30
        while empty - NEEDS_A_FAILED_EXECUTION and time.monotonic() < deadline:
            time.sleep(1)
            empty = {q for q in empty if not prometheus.query(q.replace("$__rate_interval", "1m"))}
        assert not empty - NEEDS_A_FAILED_EXECUTION, empty - NEEDS_A_FAILED_EXECUTION
