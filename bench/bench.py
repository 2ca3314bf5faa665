"""Benchmark of the Agent Lab Gateway on this machine.

Starts its own service and Envoy on free ports (as the end-to-end tests do),
with Envoy's per-client rate limit off, and prints first one table (issue
11): each path on this gateway against the FastAPI app it replaces
(bench/peers/fastapi_app.py, one uvicorn worker), HTTP load from wrk, the
ratio, p50/p99, non-2xx, CPU per request of each side, and each goal met or
not (bench/compare.py); the real model's Execute through the gateway against
the lab called in process (goal 5); rows of other modules (EXTRA_ROW_MODULES).

Then, in detail, for the echo backend (the gateway's own serving cost) and for
the real model:

* Execute under load: REST/JSON through Envoy's transcoder, native gRPC
  straight to the service, and native gRPC through Envoy (which separates the
  proxy hop from the JSON transcoding); requests/s and p50/p99 latency.
* Orchestrate one stream at a time: time to the first event, to the first
  token and to the end of the stream, over Server-Sent Events through Envoy
  versus gRPC.

Run it as ``.venv/bin/python bench/bench.py`` (``make bench`` does);
``--peer-only`` for the table alone, ``--quick`` for a short run of it all.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import importlib.metadata
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, astuple, dataclass, field
from pathlib import Path
from typing import Any

import compare
import grpc
import httpx
import wrk
from procstat import machine_cpu_s, process_cpu_s
from table import COLUMNS, Row, cells, render, skipped

from agentlab.devstack import Stack, envoy_binary
from agentlab.v1 import lab_service_pb2, lab_service_pb2_grpc

ECHO_EXECUTE = {"prompt": "How much does the gateway itself cost per request?", "model": "echo"}
MODEL_EXECUTE = {"prompt": "Dime 3 números primos", "model": "mistral7b", "max_tokens": 32}
ECHO_ORCHESTRATE = {"prompt": "Name a fruit.", "model": "echo", "max_tokens": 24}
MODEL_ORCHESTRATE = {"prompt": "Name a fruit.", "model": "mistral7b", "max_tokens": 24}

REST_ENVOY = "REST via Envoy"
GRPC_DIRECT = "gRPC direct"
GRPC_ENVOY = "gRPC via Envoy"

# Above this many cores used by other processes a measurement is flagged: the
# model backend's threads use every core here, and llama.cpp slows down
# sharply when a core it waits on is taken by someone else.
OTHERS_WARN_CORES = 0.25

# Modules of bench/ whose rows join the table: each has
# measure(quick: bool) -> list[table.Row] (bench/streams.py: SSE at scale;
# bench/grpc_streams.py: the same over gRPC).
EXTRA_ROW_MODULES = ("streams", "grpc_streams")

# The table's paths, for the rows printed as skipped when wrk is missing.
TABLE_PATHS = (
    "REST Execute, echo, SQLite (req/s)",
    "REST Execute, echo, PostgreSQL+Redis (req/s)",
    "SSE 20 tokens (streams/s)",
    "TTFT, one stream at a time (ms p50)",
)

# --quick: a run short enough for a test; its figures only show the parts work.
QUICK = {
    "table_warmup": 1.0,
    "table_duration": 2.0,
    "connections": 16,
    "ttft_runs": 10,
    "model_runs": 2,
    "requests": 20,
    "model_requests": 2,
    "runs": 2,
    "warmup": 0.0,
    "warmup_runs": 0,
    "model_rounds": 1,
}

# Both clients would otherwise honour http_proxy/HTTPS_PROXY from the
# environment and could send loopback traffic to a proxy.
GRPC_OPTIONS = [("grpc.enable_http_proxy", 0)]


def orchestrate_body(backend: str, seed: int | None) -> dict[str, Any]:
    """A fixed seed makes every run generate the same tokens, so transports
    are compared on identical streams rather than on the model's luck."""
    body = dict(ECHO_ORCHESTRATE if backend == "echo" else MODEL_ORCHESTRATE)
    if seed is not None:
        body["seed"] = seed
    return body


class BadResponse(Exception):
    """A call that completed without the answer a healthy gateway gives."""


# --------------------------------------------------------------------------
# Statistics and process accounting


def percentile(values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q
    low = math.floor(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


# The kernel counts CPU time in ticks (10 ms): shorter windows give noise.
MIN_CPU_WINDOW_S = 1.0


@dataclass(frozen=True)
class CpuUsage:
    """CPU seconds spent over one measurement, or over several added up."""

    wall: float = 0.0
    client: float = 0.0
    envoy: float = 0.0
    service: float = 0.0
    # Other processes on the machine: the benchmark cannot control them, but
    # it can show they were there.
    others: float = 0.0
    # Time the hypervisor gave this VM's CPUs to someone else.
    steal: float = 0.0

    def __add__(self, other: CpuUsage) -> CpuUsage:
        return CpuUsage(*(a + b for a, b in zip(astuple(self), astuple(other), strict=True)))

    @property
    def others_cores(self) -> float:
        return self.others / self.wall if self.wall >= MIN_CPU_WINDOW_S else math.nan

    @property
    def steal_cores(self) -> float:
        return self.steal / self.wall if self.wall >= MIN_CPU_WINDOW_S else math.nan


@dataclass
class CpuMeter:
    """CPU spent by the client (this process), Envoy, the service and anything
    else while a measurement runs: on a small machine they all compete for
    the same cores, so requests/s alone does not say where the time goes."""

    service_pid: int | None
    envoy_pid: int | None
    _start: tuple[float, ...] = ()

    def _now(self) -> tuple[float, ...]:
        return (
            time.perf_counter(),
            process_cpu_s(os.getpid()),
            process_cpu_s(self.envoy_pid),
            process_cpu_s(self.service_pid),
            *machine_cpu_s(),
        )

    def start(self) -> None:
        self._start = self._now()

    def stop(self) -> CpuUsage:
        wall, client, envoy, service, busy, steal = (
            b - a for a, b in zip(self._start, self._now(), strict=True)
        )
        return CpuUsage(
            wall=wall,
            client=client,
            envoy=envoy,
            service=service,
            others=max(0.0, busy - client - envoy - service),
            steal=steal,
        )


# --------------------------------------------------------------------------
# Clients


@dataclass
class StreamTiming:
    first_event_s: float
    first_token_s: float  # NaN when the stream had no token
    total_s: float
    events: int


def _check_stream_end(last_kind: str | None, events: int) -> None:
    if last_kind != "execution_completed":
        raise BadResponse(f"stream ended after {events} events with {last_kind!r}")


class RestClient:
    """REST/JSON through Envoy, over a pool of HTTP/1.1 keep-alive connections
    the way a browser or a backend-for-frontend would call it."""

    def __init__(self, base_url: str, *, connections: int, timeout_s: float) -> None:
        self._http = httpx.AsyncClient(
            base_url=base_url,
            timeout=timeout_s,
            limits=httpx.Limits(max_connections=connections, max_keepalive_connections=connections),
            trust_env=False,
        )

    async def close(self) -> None:
        await self._http.aclose()

    async def execute(self, body: dict[str, Any]) -> int:
        response = await self._http.post("/api/v1/execute", json=body)
        if response.status_code != 200:
            raise BadResponse(f"HTTP {response.status_code}: {response.text[:200]}")
        answer = response.json()
        return int(answer["metrics"]["completion_tokens"])

    async def orchestrate(self, body: dict[str, Any]) -> StreamTiming:
        start = time.perf_counter()
        first_event = first_token = math.nan
        events = 0
        last_kind: str | None = None
        data: list[str] = []
        headers = {"accept": "text/event-stream"}
        async with self._http.stream(
            "POST", "/api/v1/orchestrate", json=body, headers=headers
        ) as response:
            if response.status_code != 200:
                await response.aread()
                raise BadResponse(f"HTTP {response.status_code}: {response.text[:200]}")
            # An event is complete at the blank line after its data lines,
            # which is what a browser's EventSource waits for too.
            async for line in response.aiter_lines():
                if line.startswith("data:"):
                    data.append(line[5:])
                    continue
                if line.strip() or not data:
                    continue
                now = time.perf_counter() - start
                event = json.loads("\n".join(data))["event"]
                data = []
                events += 1
                if events == 1:
                    first_event = now
                if "token_delta" in event and math.isnan(first_token):
                    first_token = now
                last_kind = next(
                    (k for k in event if k not in ("sequence", "time", "execution_id")), None
                )
                if last_kind == "execution_failed":
                    raise BadResponse(f"execution failed: {event[last_kind]}")
        _check_stream_end(last_kind, events)
        return StreamTiming(first_event, first_token, time.perf_counter() - start, events)


class GrpcClient:
    """Native gRPC over one HTTP/2 channel, its calls multiplexed, the way a
    grpc.aio client normally runs."""

    def __init__(self, target: str, *, timeout_s: float) -> None:
        self._channel = grpc.aio.insecure_channel(target, options=GRPC_OPTIONS)
        self._stub = lab_service_pb2_grpc.LabServiceStub(self._channel)  # type: ignore[no-untyped-call]
        self._timeout_s = timeout_s

    async def close(self) -> None:
        await self._channel.close()

    async def model_names(self) -> list[str]:
        answer = await self._stub.ListModels(
            lab_service_pb2.ListModelsRequest(), timeout=self._timeout_s
        )
        return [f"{m.name} -> {m.backend}/{m.backend_model}" for m in answer.models]

    async def execute(self, body: dict[str, Any]) -> int:
        answer = await self._stub.Execute(
            lab_service_pb2.ExecuteRequest(**body), timeout=self._timeout_s
        )
        if not answer.execution_id:
            raise BadResponse("Execute answered without an execution_id")
        return int(answer.metrics.completion_tokens)

    async def orchestrate(self, body: dict[str, Any]) -> StreamTiming:
        start = time.perf_counter()
        first_event = first_token = math.nan
        events = 0
        last_kind: str | None = None
        call = self._stub.Orchestrate(
            lab_service_pb2.OrchestrateRequest(**body), timeout=self._timeout_s
        )
        async for message in call:
            now = time.perf_counter() - start
            events += 1
            if events == 1:
                first_event = now
            last_kind = message.event.WhichOneof("kind")
            if last_kind == "token_delta" and math.isnan(first_token):
                first_token = now
            if last_kind == "execution_failed":
                raise BadResponse(f"execution failed: {message.event.execution_failed}")
        _check_stream_end(last_kind, events)
        return StreamTiming(first_event, first_token, time.perf_counter() - start, events)


Client = RestClient | GrpcClient
CALL_ERRORS = (httpx.HTTPError, grpc.RpcError, BadResponse, KeyError, ValueError)


def describe(exc: BaseException) -> str:
    """One line for a failed call; an AioRpcError's own text spans several."""
    if isinstance(exc, grpc.RpcError) and hasattr(exc, "code"):
        return f"gRPC {exc.code().name}: {exc.details()}"[:300]
    return f"{type(exc).__name__}: {exc}"[:300]


# --------------------------------------------------------------------------
# Measurements


@dataclass
class LoadResult:
    backend: str
    transport: str
    concurrency: int
    ok: int
    errors: int
    elapsed_s: float
    rps: float
    p50_ms: float
    p99_ms: float
    max_ms: float
    tokens_per_request: float
    # CPU milliseconds per successful request, by process.
    cpu_client_ms: float
    cpu_envoy_ms: float
    cpu_service_ms: float
    # Cores, on average over the measurement; see CpuUsage.
    others_cores: float
    steal_cores: float
    first_error: str | None = None


async def closed_loop(
    call: Callable[[], Awaitable[int]],
    concurrency: int,
    *,
    requests: int | None,
    duration_s: float | None,
) -> tuple[list[float], list[int], int, float, str | None]:
    """``concurrency`` workers, each sending its next request as soon as the
    previous one answers, until ``requests`` were sent or ``duration_s``
    passed. Returns latencies, tokens, errors, elapsed time and one error."""
    latencies: list[float] = []
    tokens: list[int] = []
    errors = 0
    first_error: str | None = None
    sent = 0
    start = time.perf_counter()
    deadline = start + (duration_s or 0.0)

    async def worker() -> None:
        nonlocal errors, first_error, sent
        while True:
            if requests is not None:
                if sent >= requests:
                    return
                sent += 1
            elif time.perf_counter() >= deadline:
                return
            began = time.perf_counter()
            try:
                generated = await call()
            except CALL_ERRORS as exc:
                errors += 1
                first_error = first_error or describe(exc)
            else:
                latencies.append(time.perf_counter() - began)
                tokens.append(generated)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies, tokens, errors, time.perf_counter() - start, first_error


@dataclass
class _LoadSamples:
    latencies: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    errors: int = 0
    elapsed_s: float = 0.0
    cpu: CpuUsage = field(default_factory=CpuUsage)
    first_error: str | None = None


async def measure_loads(
    backend: str,
    clients: dict[str, Client],
    body: dict[str, Any],
    meter: CpuMeter,
    *,
    concurrency: int,
    requests: int | None,
    duration_s: float,
    warmup_s: float,
    rounds: int,
) -> list[LoadResult]:
    """Execute under closed-loop load through each transport. Each one's
    share can be cut into ``rounds`` slices the transports take in turns: the
    model's speed drifts by more than a transport costs, and taking turns
    spreads that drift over all of them instead of biasing one."""

    def caller(client: Client) -> Callable[[], Awaitable[int]]:
        async def call() -> int:
            return await client.execute(body)

        return call

    samples = {name: _LoadSamples() for name in clients}
    for index in range(rounds):
        for name, client in clients.items():
            share = None
            if requests is not None:
                share = requests // rounds + (1 if index < requests % rounds else 0)
                if share == 0:
                    continue
            # Right before each slice, not once up front: it opens the
            # connections (the HTTP pool, the HTTP/2 channels, Envoy's
            # upstream ones) and brings the path to its steady state, which
            # gRPC through Envoy only reaches after a second or so of load
            # (it starts faster, then settles lower). Its figures are dropped.
            if warmup_s > 0:
                await closed_loop(
                    caller(client), concurrency, requests=None, duration_s=warmup_s / rounds
                )
            meter.start()
            latencies, tokens, errors, elapsed, first_error = await closed_loop(
                caller(client),
                concurrency,
                requests=share,
                duration_s=None if share else duration_s / rounds,
            )
            sample = samples[name]
            sample.cpu += meter.stop()
            sample.latencies += latencies
            sample.tokens += tokens
            sample.errors += errors
            sample.elapsed_s += elapsed
            sample.first_error = sample.first_error or first_error
    return [_load_result(backend, name, concurrency, s) for name, s in samples.items()]


def _load_result(backend: str, transport: str, concurrency: int, s: _LoadSamples) -> LoadResult:
    ok = len(s.latencies)

    def per_request_ms(seconds: float) -> float:
        return seconds * 1000 / ok if ok else math.nan

    return LoadResult(
        backend=backend,
        transport=transport,
        concurrency=concurrency,
        ok=ok,
        errors=s.errors,
        elapsed_s=s.elapsed_s,
        rps=ok / s.elapsed_s if s.elapsed_s > 0 else math.nan,
        p50_ms=percentile(s.latencies, 0.50) * 1000,
        p99_ms=percentile(s.latencies, 0.99) * 1000,
        max_ms=max(s.latencies, default=math.nan) * 1000,
        tokens_per_request=sum(s.tokens) / ok if ok else math.nan,
        cpu_client_ms=per_request_ms(s.cpu.client),
        cpu_envoy_ms=per_request_ms(s.cpu.envoy),
        cpu_service_ms=per_request_ms(s.cpu.service),
        others_cores=s.cpu.others_cores,
        steal_cores=s.cpu.steal_cores,
        first_error=s.first_error,
    )


@dataclass
class StreamResult:
    backend: str
    transport: str
    runs: int
    errors: int
    events: float
    first_event_p50_ms: float
    first_token_p50_ms: float
    total_p50_ms: float
    total_max_ms: float
    others_cores: float
    first_error: str | None = None


@dataclass
class _StreamSamples:
    timings: list[StreamTiming] = field(default_factory=list)
    errors: int = 0
    first_error: str | None = None


async def measure_streams(
    backend: str,
    clients: dict[str, Client],
    body: dict[str, Any],
    *,
    runs: int,
    warmup_runs: int,
    meter: CpuMeter,
) -> list[StreamResult]:
    """One stream at a time, so the figures are latencies rather than queueing.
    Transports take turns run by run, so a drift in the machine's load (or the
    model's speed) spreads over all of them instead of biasing one."""
    samples = {name: _StreamSamples() for name in clients}
    meter.start()
    for run in range(warmup_runs + runs):
        for name, client in clients.items():
            try:
                timing = await client.orchestrate(body)
            except CALL_ERRORS as exc:
                if run >= warmup_runs:
                    samples[name].errors += 1
                    samples[name].first_error = samples[name].first_error or describe(exc)
                continue
            if run >= warmup_runs:
                samples[name].timings.append(timing)
    others_cores = meter.stop().others_cores
    results = []
    for name, sample in samples.items():
        timings = sample.timings
        results.append(
            StreamResult(
                backend=backend,
                transport=name,
                runs=len(timings),
                errors=sample.errors,
                events=sum(t.events for t in timings) / len(timings) if timings else math.nan,
                first_event_p50_ms=percentile([t.first_event_s for t in timings], 0.5) * 1000,
                first_token_p50_ms=percentile(
                    [t.first_token_s for t in timings if not math.isnan(t.first_token_s)], 0.5
                )
                * 1000,
                total_p50_ms=percentile([t.total_s for t in timings], 0.5) * 1000,
                total_max_ms=max((t.total_s for t in timings), default=math.nan) * 1000,
                others_cores=others_cores,
                first_error=sample.first_error,
            )
        )
    return results


# --------------------------------------------------------------------------
# Reporting


def _cell(value: Any) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        if abs(value) >= 100:
            return f"{value:,.0f}"
        if abs(value) >= 10:
            return f"{value:.1f}"
        return f"{value:.2f}"
    return str(value)


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]

    def line(values: Sequence[str]) -> str:
        # Text columns (the first two) read best left-aligned, numbers right.
        return "  ".join(
            v.ljust(w) if i < 2 else v.rjust(w)
            for i, (v, w) in enumerate(zip(values, widths, strict=True))
        )

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(headers), rule, *(line(r) for r in cells)])


def load_table(results: Sequence[LoadResult]) -> str:
    headers = [
        "backend",
        "transport",
        "conc",
        "ok",
        "err",
        "req/s",
        "p50 ms",
        "p99 ms",
        "max ms",
        "tok/req",
        "cpu ms/req client",
        "envoy",
        "service",
        "others",
        "steal",
    ]
    rows = [
        [
            r.backend,
            r.transport,
            r.concurrency,
            r.ok,
            r.errors,
            r.rps,
            r.p50_ms,
            r.p99_ms,
            r.max_ms,
            r.tokens_per_request,
            r.cpu_client_ms,
            r.cpu_envoy_ms,
            r.cpu_service_ms,
            r.others_cores,
            r.steal_cores,
        ]
        for r in results
    ]
    return table(headers, rows)


def stream_table(results: Sequence[StreamResult]) -> str:
    headers = [
        "backend",
        "transport",
        "runs",
        "err",
        "events",
        "first event p50 ms",
        "first token p50 ms",
        "total p50 ms",
        "total max ms",
        "others",
    ]
    rows = [
        [
            r.backend,
            r.transport,
            r.runs,
            r.errors,
            r.events,
            r.first_event_p50_ms,
            r.first_token_p50_ms,
            r.total_p50_ms,
            r.total_max_ms,
            r.others_cores,
        ]
        for r in results
    ]
    return table(headers, rows)


def overhead_lines(loads: Sequence[LoadResult], streams: Sequence[StreamResult]) -> list[str]:
    """What Envoy (and its JSON transcoding) adds over calling the service
    directly, per backend."""
    lines = []
    by_key = {(r.backend, r.transport): r for r in loads}
    for backend in dict.fromkeys(r.backend for r in loads):
        direct = by_key.get((backend, GRPC_DIRECT))
        if direct is None:
            continue
        for other in (REST_ENVOY, GRPC_ENVOY):
            via = by_key.get((backend, other))
            if via is None:
                continue
            lines.append(
                f"Execute {backend:5} {other:15} vs gRPC direct: "
                f"p50 {via.p50_ms - direct.p50_ms:+.2f} ms, "
                f"req/s x{via.rps / direct.rps:.2f}"
            )
    by_stream = {(r.backend, r.transport): r for r in streams}
    for backend in dict.fromkeys(r.backend for r in streams):
        direct_stream = by_stream.get((backend, GRPC_DIRECT))
        rest = by_stream.get((backend, REST_ENVOY))
        if direct_stream is None or rest is None:
            continue
        lines.append(
            f"Orchestrate {backend:5} REST SSE vs gRPC direct: "
            f"first event {rest.first_event_p50_ms - direct_stream.first_event_p50_ms:+.2f} ms, "
            f"total {rest.total_p50_ms - direct_stream.total_p50_ms:+.2f} ms (p50)"
        )
    return lines


def _json_safe(value: Any) -> Any:
    """NaN is not JSON: it becomes null."""
    if isinstance(value, float):
        return None if math.isnan(value) else round(value, 3)
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


# --------------------------------------------------------------------------
# Machine


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _envoy_version() -> str:
    try:
        envoy = envoy_binary()
        out = subprocess.run(
            [envoy, "--version"], capture_output=True, text=True, timeout=30, check=False
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    # "envoy  version: <commit>/<version>/Clean/RELEASE/BoringSSL"
    parts = out.rsplit("version:", 1)[-1].strip().split("/")
    return parts[1] if len(parts) > 1 else out.strip() or "unknown"


def _wrk_version() -> str:
    path = wrk.available()
    if path is None:
        return "not installed"
    # "wrk debian/4.1.0-3+b2 [epoll] Copyright ..." (and it exits 1)
    out = subprocess.run([path, "--version"], capture_output=True, text=True, check=False).stdout
    return out.split()[1] if len(out.split()) > 1 else "unknown"


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def machine_info() -> dict[str, Any]:
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count() or 0
    return {
        "cpu_count": os.cpu_count(),
        "cpus_usable": usable,
        "cpu_model": _cpu_model(),
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "grpcio": grpc.__version__,
        "httpx": httpx.__version__,
        "envoy": _envoy_version(),
        "wrk": _wrk_version(),
        "fastapi": _version("fastapi"),
        "uvicorn": _version("uvicorn"),
        "loadavg_start": [round(x, 2) for x in os.getloadavg()],
    }


# --------------------------------------------------------------------------
# Main


async def run(args: argparse.Namespace, stack: Stack, summary: dict[str, Any]) -> int:
    """Measures, prints the tables, fills ``summary`` and returns the number
    of failed calls."""
    timeout_s: float = args.timeout
    connections = max(args.concurrency, args.model_concurrency)
    clients: dict[str, Client] = {
        REST_ENVOY: RestClient(stack.envoy.url, connections=connections, timeout_s=timeout_s),
        GRPC_DIRECT: GrpcClient(stack.service.address, timeout_s=timeout_s),
        GRPC_ENVOY: GrpcClient(stack.gateway_grpc, timeout_s=timeout_s),
    }
    clients = {name: c for name, c in clients.items() if name in args.transports}
    meter = CpuMeter(
        service_pid=stack.service.proc.pid if stack.service.proc else None,
        envoy_pid=stack.envoy.proc.pid if stack.envoy.proc else None,
    )
    workloads = [("echo", args.concurrency, args.requests, args.duration, args.rounds)]
    if not args.skip_model:
        workloads.append(
            (
                "model",
                args.model_concurrency,
                args.model_requests,
                args.model_duration,
                args.model_rounds,
            )
        )
    try:
        probe = GrpcClient(stack.service.address, timeout_s=timeout_s)
        try:
            summary["models"] = await probe.model_names()
        finally:
            await probe.close()
        print("models:  " + "; ".join(summary["models"]))
        print()

        loads: list[LoadResult] = []
        for backend, concurrency, requests, duration, rounds in workloads:
            how = f"{requests} requests" if requests else f"{duration:g} s"
            print(
                f"  Execute {backend}: concurrency {concurrency}, {how} per transport "
                f"in {rounds} turn(s), after {args.warmup:g} s warm-up each ...",
                flush=True,
            )
            loads += await measure_loads(
                backend,
                clients,
                ECHO_EXECUTE if backend == "echo" else MODEL_EXECUTE,
                meter,
                concurrency=concurrency,
                requests=requests,
                duration_s=duration,
                warmup_s=args.warmup,
                rounds=rounds,
            )

        streams: list[StreamResult] = []
        for backend, *_ in workloads:
            body = orchestrate_body(backend, args.seed)
            print(
                f"  Orchestrate {backend}: {args.runs} runs per transport "
                f"after {args.warmup_runs} warm-up runs ...",
                flush=True,
            )
            streams.extend(
                await measure_streams(
                    backend,
                    clients,
                    body,
                    runs=args.runs,
                    warmup_runs=args.warmup_runs,
                    meter=meter,
                )
            )
    finally:
        for client in clients.values():
            await client.close()

    print()
    print("Execute (unary) under load: closed loop, latency per request")
    print(f"  echo body:  {json.dumps(ECHO_EXECUTE, ensure_ascii=False)}")
    print(f"  model body: {json.dumps(MODEL_EXECUTE, ensure_ascii=False)}")
    print()
    print(load_table(loads))
    print()
    print("  p99 from fewer than ~100 samples is close to the max.")
    print(
        "  cpu ms/req: CPU time of each process over the measurement, per request "
        "(counted in 10 ms ticks: needs a measurement of seconds)."
    )
    print("  others/steal: cores kept busy by other processes / taken by the hypervisor.")
    print()
    print("Orchestrate (server stream), one stream at a time")
    print(f"  echo body:  {json.dumps(orchestrate_body('echo', args.seed))}")
    print(f"  model body: {json.dumps(orchestrate_body('model', args.seed))}")
    print()
    print(stream_table(streams))
    print()
    print("Envoy overhead")
    for line in overhead_lines(loads, streams):
        print("  " + line)
    outcomes: list[LoadResult | StreamResult] = [*loads, *streams]
    disturbed = sorted(
        {f"{r.backend} {r.transport}" for r in outcomes if r.others_cores > OTHERS_WARN_CORES}
    )
    if disturbed:
        print()
        print(
            f"WARNING: other processes kept more than {OTHERS_WARN_CORES} core busy during: "
            + "; ".join(disturbed)
            + ". Those figures measure the contention too; run again on a quiet machine."
        )
    failures = [
        f"{'Execute' if isinstance(r, LoadResult) else 'Orchestrate'} {r.backend} "
        f"{r.transport}: {r.errors} errors, first {r.first_error}"
        for r in outcomes
        if r.errors
    ]
    if failures:
        print()
        print("ERRORS")
        for failure in failures:
            print("  " + failure)

    summary["execute"] = [asdict(r) for r in loads]
    summary["orchestrate"] = [asdict(r) for r in streams]
    return sum(r.errors for r in outcomes)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n", 1)[0] if __doc__ else None,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--concurrency", type=int, default=8, help="Execute workers, echo")
    parser.add_argument(
        "--model-concurrency",
        type=int,
        default=4,
        help="Execute workers, model (the service batches up to 4 generations by default)",
    )
    parser.add_argument(
        "--duration", type=float, default=8.0, help="seconds of Execute load per transport, echo"
    )
    parser.add_argument(
        "--model-duration",
        type=float,
        default=12.0,
        help="seconds of Execute load per transport, model",
    )
    parser.add_argument(
        "--requests",
        type=int,
        default=None,
        help="Execute requests per transport, echo (instead of --duration)",
    )
    parser.add_argument(
        "--model-requests",
        type=int,
        default=None,
        help="Execute requests per transport, model (instead of --model-duration)",
    )
    parser.add_argument(
        "--warmup",
        type=float,
        default=2.0,
        help="seconds of unmeasured load per transport before its Execute measurement, "
        "split over its turns",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="turns the transports take within the Execute measurement, echo",
    )
    parser.add_argument(
        "--model-rounds",
        type=int,
        default=3,
        help="turns the transports take within the Execute measurement, model",
    )
    parser.add_argument("--runs", type=int, default=10, help="Orchestrate streams per transport")
    parser.add_argument(
        "--seed",
        type=int,
        default=7,
        help="sampling seed of the Orchestrate streams; negative for random sampling",
    )
    parser.add_argument(
        "--warmup-runs", type=int, default=2, help="unmeasured Orchestrate streams first"
    )
    parser.add_argument(
        "--transports",
        nargs="+",
        choices=["rest", "grpc", "grpc-envoy"],
        default=["rest", "grpc", "grpc-envoy"],
        help="rest = REST via Envoy, grpc = gRPC direct, grpc-envoy = gRPC via Envoy",
    )
    parser.add_argument(
        "--service-env",
        nargs="+",
        default=[],
        metavar="NAME=VALUE",
        help="settings for the service, e.g. AGENTLAB_MODEL_THREADS=1",
    )
    parser.add_argument("--skip-model", action="store_true", help="echo backend only")
    table = parser.add_argument_group("the peer table (first: ours vs the FastAPI peer, wrk)")
    table.add_argument("--connections", type=int, default=64, help="wrk's connections")
    table.add_argument(
        "--table-warmup", type=float, default=3.0, help="seconds of wrk load before each run"
    )
    table.add_argument(
        "--table-duration", type=float, default=10.0, help="seconds of each measured wrk run"
    )
    table.add_argument(
        "--wrk-threads", type=int, default=1, help="wrk's threads (one leaves a core to servers)"
    )
    table.add_argument(
        "--ttft-runs", type=int, default=200, help="streams each side for time to first token"
    )
    table.add_argument(
        "--model-runs",
        type=int,
        default=20,
        help="real-model Executes each way for the gateway's overhead (goal 5)",
    )
    table.add_argument(
        "--database-url",
        default=os.environ.get("AGENTLAB_DATABASE_URL") or compare.DEFAULT_POSTGRES_URL,
        help="PostgreSQL for the PostgreSQL+Redis row (a schema of its own, dropped after); "
        "default AGENTLAB_DATABASE_URL or the local one",
    )
    table.add_argument(
        "--redis-url",
        default=os.environ.get("AGENTLAB_REDIS_URL") or compare.DEFAULT_REDIS_URL,
        help="Redis for that row; default AGENTLAB_REDIS_URL or the local one",
    )
    table.add_argument("--no-postgres", action="store_true", help="skip the PostgreSQL row")
    table.add_argument(
        "--peer-only",
        action="store_true",
        help="only the peer table: no real model, no detailed sections",
    )
    table.add_argument(
        "--no-extra",
        action="store_true",
        help=f"without the rows of {', '.join(EXTRA_ROW_MODULES)} (bench/<module>.py)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a short run of everything (for a test): figures are not meant to be read",
    )
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per call")
    parser.add_argument("--json", type=Path, default=None, help="also write the summary here")
    parser.add_argument(
        "--markdown",
        type=Path,
        default=None,
        help="also write the machine and the first table in Markdown here "
        "(bench/RESULTS.md; README's Performance section takes the table)",
    )
    parser.add_argument(
        "--log-dir",
        type=Path,
        default=None,
        help="keep the service and Envoy logs here (default: a temporary directory, "
        "deleted unless the run fails)",
    )
    args = parser.parse_args(argv)
    args.argv = None if argv is None else list(argv)
    if args.quick:
        for option, value in QUICK.items():
            setattr(args, option, value)
    names = {"rest": REST_ENVOY, "grpc": GRPC_DIRECT, "grpc-envoy": GRPC_ENVOY}
    args.transports = [names[t] for t in args.transports]
    if args.seed < 0:
        args.seed = None
    env: dict[str, str] = {}
    for item in args.service_env:
        name, sep, value = item.partition("=")
        if not sep or not name.startswith("AGENTLAB_"):
            parser.error(f"--service-env takes AGENTLAB_NAME=VALUE, not {item!r}")
        env[name] = value
    args.service_env = env
    for option in (
        "concurrency",
        "model_concurrency",
        "rounds",
        "model_rounds",
        "runs",
        "requests",
        "model_requests",
        "connections",
        "wrk_threads",
        "ttft_runs",
        "model_runs",
    ):
        if getattr(args, option) is not None and getattr(args, option) < 1:
            parser.error(f"--{option.replace('_', '-')} must be at least 1")
    return args


def peer_table(
    args: argparse.Namespace, stack: Stack, env: dict[str, str], log_dir: Path
) -> tuple[list[Row], list[dict[str, Any]]]:
    """The table's rows (ours vs the FastAPI peer, the real model's overhead,
    the extra modules' rows) and every wrk run behind them."""
    details: list[dict[str, Any]] = []
    if wrk.available() is None:
        reason = "wrk is not installed (apt-get install wrk)"
        rows = [skipped(path, reason) for path in TABLE_PATHS]
    else:
        opts = compare.Options(
            connections=args.connections,
            warmup_s=args.table_warmup,
            duration_s=args.table_duration,
            wrk_threads=args.wrk_threads,
            ttft_runs=args.ttft_runs,
            database_url=args.database_url,
            redis_url=args.redis_url,
            postgres=not args.no_postgres,
        )

        @contextmanager
        def start_stack(extra: Mapping[str, str]) -> Iterator[Stack]:
            directory = log_dir / "second-stack"
            directory.mkdir(exist_ok=True)
            other = Stack.start(directory, {**env, **extra, "AGENTLAB_DEFAULT_BACKEND": "echo"})
            try:
                yield other
            finally:
                other.stop()

        rows = compare.measure_peer_rows(stack, opts, log_dir, details, start_stack)
    if not (args.peer_only or args.skip_model):
        rows.append(compare.measure_model_overhead(stack, args.model_runs))
    if not args.no_extra:
        rows += extra_rows(args.quick)
    return rows, details


def extra_rows(quick: bool) -> list[Row]:
    """Rows other modules measure: each of EXTRA_ROW_MODULES that exists in
    bench/ has ``measure(quick: bool) -> list[Row]``."""
    rows: list[Row] = []
    for name in EXTRA_ROW_MODULES:
        if not Path(__file__).with_name(f"{name}.py").exists():
            continue
        print(f"  ... rows of bench/{name}.py", file=sys.stderr, flush=True)
        module = importlib.import_module(name)
        rows += module.measure(quick)
    return rows


def wrk_table(details: Sequence[dict[str, Any]]) -> str:
    processes = ("svc", "envoy", "uvicorn", "wrk")
    headers = ["path", "side", "req/s", "p50 ms", "p99 ms", "max ms", "non-2xx", "sock err"]
    headers += [f"cpu ms/req {p}" if i == 0 else p for i, p in enumerate(processes)]
    return table(
        headers,
        [
            [
                d["path"],
                d["side"],
                d["rate"],
                d["p50_ms"],
                d["p99_ms"],
                d["max_ms"],
                d["non_2xx"],
                d["socket_errors"],
                *(d["cpu_ms"].get(p, math.nan) for p in processes),
            ]
            for d in details
        ],
    )


def markdown(rows: Sequence[Row]) -> str:
    """The first table in Markdown (README's Performance section,
    bench/RESULTS.md), its notes as a list below it."""
    escape = str.maketrans({"|": "\\|"})
    head = [f"| {' | '.join(c or 'met' for c in COLUMNS)} |", f"|{' --- |' * len(COLUMNS)}"]
    body = [f"| {' | '.join(c.translate(escape) for c in cells(r))} |" for r in rows]
    notes = [f"- {r.path}: {r.note}" for r in rows if r.note]
    return "\n".join([*head, *body, *(["", *notes] if notes else [])])


def results_markdown(
    args: argparse.Namespace,
    machine: dict[str, Any],
    rows: Sequence[Row],
    details: Sequence[dict[str, Any]],
) -> str:
    command = " ".join(["bench/bench.py", *(sys.argv[1:] if args.argv is None else args.argv)])
    runs = wrk_table(details) if details else "(none)"
    return (
        "# Benchmark results\n\n"
        f"`{command.strip()}` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}: "
        f"wrk, {args.connections} connections, {args.table_warmup:g} s warm-up then "
        f"{args.table_duration:g} s per run, echo backend; Envoy's rate limit off. "
        "Ratios are ours / the FastAPI peer's (`bench/peers/fastapi_app.py`), measured back "
        "to back; p50, p99 and non-2xx are ours; CPU is milliseconds per request or stream of "
        "each process.\n\n"
        "## Machine\n\n"
        f"- CPUs: {machine['cpu_count']} ({machine['cpus_usable']} usable), "
        f"{machine['cpu_model']}\n"
        f"- {machine['implementation']} {machine['python']} on {machine['platform']}\n"
        f"- Envoy {machine['envoy']}, grpcio {machine['grpcio']}, wrk {machine['wrk']}; "
        f"peer: FastAPI {machine['fastapi']}, uvicorn {machine['uvicorn']} (one worker)\n"
        f"- load average before the run: {machine['loadavg_start']} (1/5/15 min)\n\n"
        "## The table\n\n"
        f"{markdown(rows)}\n\n"
        "## Each wrk run\n\n"
        f"```\n{runs}\n```\n"
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    machine = machine_info()
    log_dir: Path = args.log_dir or Path(tempfile.mkdtemp(prefix="agentlab-bench-"))
    log_dir.mkdir(parents=True, exist_ok=True)

    print("Agent Lab Gateway benchmark")
    print(
        f"  cpus:    {machine['cpu_count']} ({machine['cpus_usable']} usable), "
        f"{machine['cpu_model']}"
    )
    print(f"  python:  {machine['implementation']} {machine['python']} on {machine['platform']}")
    print(
        f"  clients: wrk {machine['wrk']}, grpcio {machine['grpcio']}, httpx {machine['httpx']}; "
        f"envoy {machine['envoy']}; peer fastapi {machine['fastapi']}, uvicorn {machine['uvicorn']}"
    )
    print(f"  load:    {machine['loadavg_start']} (1/5/15 min) before start")
    kept = "" if args.log_dir else " (deleted at the end unless something fails)"
    print(f"  logs:    {log_dir}{kept}")
    if args.service_env:
        print(f"  service: {' '.join(f'{k}={v}' for k, v in args.service_env.items())}")
    print(
        "  wrk, Envoy and both servers share this machine's CPUs: figures include their "
        "contention; compare the ratios, measured back to back."
    )

    summary: dict[str, Any] = {"machine": machine, "service_env": args.service_env}
    began = time.perf_counter()
    stack: Stack | None = None
    failed = True
    # One client address at full speed: Envoy's per-client rate limit off
    # (the default; said here so a changed default cannot skew the figures).
    env = {**args.service_env, "AGENTLAB_RATE_LIMIT": "off"}
    if args.peer_only or args.skip_model:
        env.setdefault("AGENTLAB_DEFAULT_BACKEND", "echo")  # no model to load
    try:
        stack = Stack.start(log_dir, env)
        print(
            f"  stack:   service {stack.service.address}, Envoy {stack.envoy.url} "
            f"(started in {time.perf_counter() - began:.1f} s)",
            flush=True,
        )
        rows, details = peer_table(args, stack, env, log_dir)
        print()
        print(
            f"Ours vs the FastAPI app it replaces: wrk, {args.connections} connections, "
            f"{args.table_warmup:g} s warm-up then {args.table_duration:g} s per run; echo backend"
        )
        print(render(rows))
        print(
            "  ours/peer: rates (or p50 times) of this gateway / of the peer; p50, p99 and "
            "non-2xx (with socket errors) are ours;\n"
            "  CPU: milliseconds of CPU per request or stream, ours (service + Envoy) | peer."
        )
        if details:
            print()
            print("Each wrk run")
            print(wrk_table(details))
        if args.markdown is not None:
            args.markdown.write_text(results_markdown(args, machine, rows, details))
        summary["table"] = [asdict(row) for row in rows]
        summary["wrk"] = details
        errors = 0
        if not args.peer_only:
            print()
            errors = asyncio.run(run(args, stack, summary))
        failed = errors > 0
    finally:
        if stack is not None:
            stack.stop()
        # Envoy's access log grows by megabytes a run: a temporary one is kept
        # only when something went wrong and it may explain why.
        if failed:
            print(f"logs kept in {log_dir}", file=sys.stderr)
        elif args.log_dir is None:
            shutil.rmtree(log_dir, ignore_errors=True)
    machine["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    summary["wall_s"] = round(time.perf_counter() - began, 1)

    print()
    print(f"Finished in {summary['wall_s']} s; load now {machine['loadavg_end']}")
    if args.json is not None:
        args.json.write_text(json.dumps(_json_safe(summary), indent=2, ensure_ascii=False) + "\n")
        print(f"full summary written to {args.json}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
