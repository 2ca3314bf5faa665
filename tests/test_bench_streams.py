"""`make bench`'s rows of streams held open at once (goal 4) stay runnable: a
quick run of each, as a user runs them, opens every stream through Envoy,
checks every event and reports the memory of the service and Envoy. How
much memory is not judged here (the goal lives in make bench)."""

from __future__ import annotations

import re
import sys

import pytest

from tests.helpers.tools import run

pytestmark = pytest.mark.e2e


@pytest.mark.parametrize(
    ("script", "path"),
    [
        ("bench/streams.py", "SSE streams open at once via Envoy (echo)"),
        ("bench/grpc_streams.py", "gRPC Orchestrate streams open at once via Envoy (echo)"),
    ],
)
def test_a_quick_run_opens_every_stream_and_reports_both_processes(script: str, path: str) -> None:
    result = run([sys.executable, script, "--quick"], timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert path in result.stdout
    found = re.search(r"(\d+) of (\d+) streams got every event", result.stdout)
    assert found, result.stdout
    assert found.group(1) == found.group(2) != "0", result.stdout
    assert re.search(r"service \d+ MiB, Envoy \d+ MiB", result.stdout), result.stdout
