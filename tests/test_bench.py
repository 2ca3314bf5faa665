"""`make bench` stays runnable: a tiny run of the benchmark completes without
errors and reports every measurement. Its figures are not judged here."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests.helpers.tools import run

# The benchmark starts its own stack.
pytestmark = pytest.mark.e2e


# Longer than the run's own 180 s limit, which then fails it with its output.
# It took 166 s on a 2-core box busy with other work.
@pytest.mark.timeout(240)
def test_a_tiny_benchmark_run_reports_every_measurement(tmp_path: Path) -> None:
    summary = tmp_path / "bench.json"
    result = run(
        [
            sys.executable,
            "bench/bench.py",
            "--requests=20",
            "--model-requests=2",
            "--runs=2",
            "--warmup=0",
            "--warmup-runs=0",
            "--model-rounds=1",
            f"--json={summary}",
        ],
        timeout=180,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(summary.read_text())
    transports = {"REST via Envoy", "gRPC direct", "gRPC via Envoy"}
    for section, count in (("execute", "ok"), ("orchestrate", "runs")):
        rows = report[section]
        assert {(r["backend"], r["transport"]) for r in rows} == {
            (backend, transport) for backend in ("echo", "model") for transport in transports
        }
        assert all(r["errors"] == 0 and r[count] > 0 for r in rows), rows
