"""HTTP load from wrk (the Debian package): Python clients saturate before
the servers do. One closed-loop run of POSTs with a JSON body, its figures
parsed from wrk's output, and the CPU each server process spent meanwhile."""

from __future__ import annotations

import json
import math
import os
import resource
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from procstat import process_cpu_s

__all__ = ["WrkResult", "available", "parse", "run"]

SCRIPT = Path(__file__).with_name("post.lua")
_MARK = "WRK_JSON "


def available() -> str | None:
    """wrk's path, or None where it is not installed (apt-get install wrk)."""
    return shutil.which("wrk")


@dataclass
class WrkResult:
    """One wrk run: completed requests (or streams) over its duration."""

    requests: int
    duration_s: float
    p50_ms: float
    p99_ms: float
    max_ms: float
    non_2xx: int  # answers with a status other than 2xx/3xx
    socket_errors: int  # connect + read + write + timeout
    # CPU milliseconds per completed request: each named server process, and
    # wrk itself.
    cpu_ms: dict[str, float] = field(default_factory=dict)
    # Answers by status class ("4xx", "5xx") where the server counts them.
    status_classes: dict[str, int] = field(default_factory=dict)
    output: str = ""

    @property
    def rate(self) -> float:
        return self.requests / self.duration_s if self.duration_s > 0 else math.nan

    @property
    def failures(self) -> int:
        return self.non_2xx + self.socket_errors


def parse(output: str) -> WrkResult:
    """wrk's output with post.lua's summary line; raises ValueError without it."""
    lines = [line for line in output.splitlines() if line.startswith(_MARK)]
    if not lines:
        raise ValueError(f"wrk printed no summary (is post.lua its script?):\n{output[-2000:]}")
    figures = json.loads(lines[-1][len(_MARK) :])
    return WrkResult(
        requests=figures["requests"],
        duration_s=figures["duration_us"] / 1e6,
        p50_ms=figures["p50_us"] / 1000,
        p99_ms=figures["p99_us"] / 1000,
        max_ms=figures["max_us"] / 1000,
        non_2xx=figures["status"],
        socket_errors=sum(figures[k] for k in ("connect", "read", "write", "timeout")),
        output=output,
    )


def run(
    url: str,
    body: Mapping[str, object],
    *,
    connections: int,
    duration_s: float,
    threads: int = 1,
    timeout_s: float = 10.0,
    pids: Mapping[str, int] | None = None,
) -> WrkResult:
    """``connections`` keep-alive connections POSTing ``body`` to ``url`` for
    ``duration_s``; ``pids`` names the server processes whose CPU is counted.
    Raises RuntimeError if wrk fails."""
    wrk = available()
    if wrk is None:
        raise RuntimeError("wrk is not installed (apt-get install wrk)")
    pids = dict(pids or {})
    before = {name: process_cpu_s(pid) for name, pid in pids.items()}
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    done = subprocess.run(
        [
            wrk,
            f"--threads={threads}",
            f"--connections={connections}",
            f"--duration={max(1, round(duration_s))}s",
            f"--timeout={timeout_s:g}s",
            "--latency",
            f"--script={SCRIPT}",
            url,
        ],
        env={**os.environ, "WRK_BODY": json.dumps(body)},
        capture_output=True,
        text=True,
        timeout=duration_s + timeout_s + 60,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"wrk exited with {done.returncode}: {done.stderr or done.stdout}")
    after_children = resource.getrusage(resource.RUSAGE_CHILDREN)
    result = parse(done.stdout)
    spent = {name: process_cpu_s(pid) - before[name] for name, pid in pids.items()}
    spent["wrk"] = (after_children.ru_utime + after_children.ru_stime) - (
        children.ru_utime + children.ru_stime
    )
    result.cpu_ms = {
        name: seconds * 1000 / result.requests if result.requests else math.nan
        for name, seconds in spent.items()
    }
    return result
