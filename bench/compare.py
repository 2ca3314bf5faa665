"""The peer table: each path of issue 11 measured on this gateway and on the
FastAPI app it replaces, back to back in one run, with the issue's goals.

Rates come from wrk (64 keep-alive connections by default, a warm-up, then
the measurement); time to first token from a minimal HTTP/1.1 client, one
stream at a time, alternating the two sides run by run. The real model's
overhead (goal 5) compares REST via Envoy with the embedded lab called in
this process, no gRPC and no store.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import math
import secrets
import socket
import statistics
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import wrk
from floor import FloorServer
from peer import FastApiPeer
from table import Row, skipped

from agentlab.devstack import EnvoyProcess, Ports, Stack, free_port

__all__ = [
    "EXECUTE_BODY",
    "SSE_BODY",
    "Options",
    "measure_model_overhead",
    "measure_peer_rows",
    "ttft",
]

# The frontend's request, as the issue measured it.
EXECUTE_BODY = {"prompt": "How much does the gateway itself cost per request?", "model": "echo"}
# Twenty words: the echo backend streams each as one token, so both sides send
# 20 token events (ours in inference mode: started, node, 20 tokens, node,
# completed; the peer the same shapes).
SSE_PROMPT = " ".join(f"w{i}" for i in range(1, 21))
SSE_BODY = {"prompt": SSE_PROMPT, "model": "echo", "mode": "EXECUTION_MODE_INFERENCE"}
MODEL_PROMPT, MODEL_NAME, MODEL_MAX_TOKENS, MODEL_SEED = "Dime 3 números primos", "mistral7b", 32, 7
MODEL_BODY = {
    "prompt": MODEL_PROMPT,
    "model": MODEL_NAME,
    "max_tokens": MODEL_MAX_TOKENS,
    "seed": MODEL_SEED,
}

DEFAULT_POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/test"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"

# The goals, as numbers.
GOAL1_RATIO, GOAL1_P99_MS = 0.5, 25.0
GOAL2_RATIO = 0.3
GOAL3_RATIO, GOAL3_TTFT_ADDED_MS = 0.5, 1.0
GOAL5_OVERHEAD = 0.02


@dataclass(frozen=True)
class Options:
    connections: int = 64
    warmup_s: float = 3.0
    duration_s: float = 10.0
    wrk_threads: int = 1
    ttft_runs: int = 200
    model_runs: int = 20
    database_url: str = DEFAULT_POSTGRES_URL
    redis_url: str = DEFAULT_REDIS_URL
    postgres: bool = True


def _progress(text: str) -> None:
    # Progress goes to stderr: stdout opens with the table.
    print(f"  ... {text}", file=sys.stderr, flush=True)


@dataclass
class Side:
    """A server measured: its base URL and the processes doing its work."""

    name: str
    url: str
    pids: Mapping[str, int]
    # Envoy's admin, to count our non-2xx answers by class (wrk counts, but
    # cannot say which); None for the peer.
    admin: str | None = None

    def status_classes(self) -> dict[str, int]:
        """Envoy's running count of downstream answers by class (4xx, 5xx)."""
        if self.admin is None:
            return {}
        with urllib.request.urlopen(
            f"{self.admin}/stats?filter=^http.lab_http.downstream_rq_[45]xx$", timeout=10
        ) as answer:
            text = answer.read().decode()
        return {
            name.rsplit("_", 1)[1]: int(value)
            for name, _, value in (line.partition(": ") for line in text.splitlines())
            if value.strip().isdigit()
        }


def _stack_side(name: str, stack: Stack) -> Side:
    assert stack.service.proc is not None
    assert stack.envoy.proc is not None
    pids = {"svc": stack.service.proc.pid, "envoy": stack.envoy.proc.pid}
    return Side(name, stack.url, pids, f"http://127.0.0.1:{stack.envoy.ports.admin}")


def _load(side: Side, path: str, body: Mapping[str, object], opts: Options) -> wrk.WrkResult:
    """A warm-up (its figures dropped: it opens the connections and brings
    the path to its steady state), then the measured run."""
    _progress(f"wrk {side.name} {path}: {opts.warmup_s:g} s warm-up, {opts.duration_s:g} s")
    common: dict[str, Any] = {"connections": opts.connections, "threads": opts.wrk_threads}
    if opts.warmup_s > 0:
        wrk.run(side.url + path, body, duration_s=opts.warmup_s, **common)
    before = side.status_classes()
    result = wrk.run(side.url + path, body, duration_s=opts.duration_s, pids=side.pids, **common)
    after = side.status_classes()
    result.status_classes = {
        k: after[k] - before.get(k, 0) for k in after if after[k] > before.get(k, 0)
    }
    return result


def _cpu(ours: wrk.WrkResult, peer: wrk.WrkResult | None, unit: str) -> str:
    mine = " + ".join(f"{k} {ours.cpu_ms[k]:.2f}" for k in ("svc", "envoy") if k in ours.cpu_ms)
    theirs = f"uvicorn {peer.cpu_ms['uvicorn']:.2f}" if peer else "-"
    return f"{mine} | {theirs} ms/{unit}"


def _check(url: str, path: str, body: Mapping[str, object], expect: bytes) -> None:
    """One call before the load: wrk counts statuses, not answers, so a side
    that answered 200 with the wrong body would otherwise pass unseen."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=30)
    try:
        payload = json.dumps(body)
        conn.request("POST", path, payload, {"Content-Type": "application/json"})
        answer = conn.getresponse()
        data = answer.read()
    finally:
        conn.close()
    if answer.status != 200 or expect not in data:
        raise RuntimeError(f"POST {url}{path}: HTTP {answer.status}, {data[:300]!r}")


# --------------------------------------------------------------------------
# Time to first token


class _RawHttp:
    """One keep-alive HTTP/1.1 connection, as little client as possible, so
    that what it adds is small and the same for both sides."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self._host = parts.hostname or "127.0.0.1"
        self._port = parts.port or 80
        self._sock: socket.socket | None = None

    def _connect(self) -> socket.socket:
        if self._sock is None:
            self._sock = socket.create_connection((self._host, self._port), timeout=30)
            self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return self._sock

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def stream(self, path: str, body: bytes, marker: bytes) -> tuple[float, float]:
        """Seconds to the first byte chunk holding ``marker``, and to the end
        of the (chunked) response. Raises RuntimeError on a non-200."""
        request = (
            f"POST {path} HTTP/1.1\r\nHost: {self._host}:{self._port}\r\n"
            "Content-Type: application/json\r\nAccept: text/event-stream\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode() + body
        sock = self._connect()
        start = time.perf_counter()
        sock.sendall(request)
        received = b""
        first = math.nan
        while not received.endswith(b"\r\n0\r\n\r\n"):
            chunk = sock.recv(1 << 16)
            if not chunk:
                self.close()
                raise RuntimeError(f"connection closed after {received[:200]!r}")
            received += chunk
            if math.isnan(first) and marker in received:
                first = time.perf_counter() - start
        total = time.perf_counter() - start
        if not received.startswith(b"HTTP/1.1 200"):
            self.close()
            raise RuntimeError(f"POST {path}: {received[:300]!r}")
        if math.isnan(first):
            raise RuntimeError(f"POST {path}: no {marker!r} in the stream")
        return first, total


def ttft(urls: Sequence[str], runs: int, warmup: int = 20) -> list[float]:
    """p50 milliseconds to the first token event of each URL's side, one
    stream at a time; the sides alternate run by run so a drift in the
    machine's load spreads over all of them."""
    body = json.dumps(SSE_BODY).encode()
    clients = [_RawHttp(url) for url in urls]
    firsts: list[list[float]] = [[] for _ in urls]
    try:
        for run in range(warmup + runs):
            for client, samples in zip(clients, firsts, strict=True):
                first, _ = client.stream("/api/v1/orchestrate", body, b"token_delta")
                if run >= warmup:
                    samples.append(first * 1000)
    finally:
        for client in clients:
            client.close()
    return [statistics.median(samples) for samples in firsts]


# --------------------------------------------------------------------------
# The rows


def _ratio(ours: float, peer: float) -> float:
    return ours / peer if peer > 0 else math.nan


def _wrk_row(path: str, mine: wrk.WrkResult, peer: wrk.WrkResult, **rest: Any) -> Row:
    """A row of one wrk run (``mine``: ours, or the floor's) read against the
    peer's run of the same path; ``rest``: the row's cpu, goal, met, note."""
    return Row(
        path=path,
        ours=mine.rate,
        peer=peer.rate,
        ratio=_ratio(mine.rate, peer.rate),
        p50_ms=mine.p50_ms,
        p99_ms=mine.p99_ms,
        non_2xx=mine.failures,
        **rest,
    )


def _peer_note(ours: wrk.WrkResult, peer: wrk.WrkResult) -> str:
    return (
        f"peer p50 {peer.p50_ms:.2f} / p99 {peer.p99_ms:.2f} ms, {peer.failures} non-2xx"
        + (f"; ours {ours.socket_errors} socket errors" if ours.socket_errors else "")
        + _classes(ours)
    )


def _execute_row(path: str, ours: wrk.WrkResult, peer: wrk.WrkResult, goal: str, met: bool) -> Row:
    return _wrk_row(
        path,
        ours,
        peer,
        cpu=_cpu(ours, peer, "req"),
        goal=goal,
        met=met,
        note=_peer_note(ours, peer),
    )


def _classes(result: wrk.WrkResult) -> str:
    if not result.status_classes:
        return ""
    counted = ", ".join(f"{n} {k}" for k, n in sorted(result.status_classes.items()))
    return f"; ours answered {counted} (Envoy's counts)"


def _goal1(ours: wrk.WrkResult, peer: wrk.WrkResult) -> bool:
    return (
        _ratio(ours.rate, peer.rate) >= GOAL1_RATIO
        and ours.p99_ms <= GOAL1_P99_MS
        and ours.failures == 0
    )


def measure_peer_rows(
    stack: Stack,
    opts: Options,
    log_dir: Path,
    details: list[dict[str, Any]],
    start_stack: Callable[[Mapping[str, str]], AbstractContextManager[Stack]],
) -> list[Row]:
    """The table's rows for REST Execute (SQLite, then PostgreSQL + Redis),
    the SSE relay and time to first token, each with the floor's figure
    beside it (bench/floor.py: the stack alone). ``stack`` is ours with the
    default store; ``start_stack(env)`` starts another (for PostgreSQL).
    Every wrk run is appended to ``details``."""
    rows: list[Row] = []
    ours = _stack_side("ours", stack)
    with (
        (log_dir / "fastapi-peer.log").open("wb") as log,
        FastApiPeer(log) as fastapi,
        _floor_side(log_dir) as floor,
    ):
        peer = Side("peer", fastapi.url, {"uvicorn": fastapi.pid})
        for side in (ours, peer, floor):
            _check(side.url, "/api/v1/execute", EXECUTE_BODY, b'"output"')
            _check(side.url, "/api/v1/orchestrate", SSE_BODY, b"execution_completed")

        def both(path: str, body: Mapping[str, object], label: str, mine: Side = ours) -> Any:
            results = (_load(mine, path, body, opts), _load(peer, path, body, opts))
            for side, result in zip((mine, peer), results, strict=True):
                details.append(_detail(label, side.name, result))
            return results

        def bare(path: str, label: str) -> wrk.WrkResult:
            body = EXECUTE_BODY if path.endswith("execute") else SSE_BODY
            result = _load(floor, path, body, opts)
            details.append(_detail(label, floor.name, result))
            return result

        a, b = both("/api/v1/execute", EXECUTE_BODY, "REST Execute, SQLite")
        rows.append(
            _execute_row(
                "REST Execute, echo, SQLite (req/s)",
                a,
                b,
                f">={GOAL1_RATIO}x, p99<={GOAL1_P99_MS:g}ms, 0 non-2xx",
                _goal1(a, b),
            )
        )
        rows.append(
            _floor_row(FLOOR_PATH, bare("/api/v1/execute", "REST Execute, floor"), a, b, "req")
        )

        pg_path = "REST Execute, echo, PostgreSQL+Redis (req/s)"
        pg_goal = f">={GOAL2_RATIO}x"
        if not opts.postgres:
            rows.append(skipped(pg_path, "--no-postgres", pg_goal))
        elif (reason := _unreachable(opts.database_url, opts.redis_url)) is not None:
            rows.append(skipped(pg_path, reason, pg_goal))
        else:
            with (
                _postgres_schema(opts.database_url) as url,
                start_stack(
                    {"AGENTLAB_DATABASE_URL": url, "AGENTLAB_REDIS_URL": opts.redis_url}
                ) as pg_stack,
            ):
                pg = _stack_side("ours-pg", pg_stack)
                _check(pg.url, "/api/v1/execute", EXECUTE_BODY, b'"output"')
                a, b = both("/api/v1/execute", EXECUTE_BODY, "REST Execute, PG+Redis", pg)
            rows.append(_execute_row(pg_path, a, b, pg_goal, _ratio(a.rate, b.rate) >= GOAL2_RATIO))

        a, b = both("/api/v1/orchestrate", SSE_BODY, "SSE 20 tokens")
        rows.append(
            _wrk_row(
                "SSE 20 tokens (streams/s)",
                a,
                b,
                cpu=_cpu(a, b, "stream"),
                goal=f">={GOAL3_RATIO}x, 0 non-2xx",
                met=_ratio(a.rate, b.rate) >= GOAL3_RATIO and a.failures == 0,
                note=_peer_note(a, b),
            )
        )
        rows.append(
            _floor_row(
                SSE_FLOOR_PATH, bare("/api/v1/orchestrate", "SSE 20 tokens, floor"), a, b, "stream"
            )
        )

        _progress(f"time to first token: {opts.ttft_runs} streams each, one at a time")
        mine_ms, theirs_ms, floor_ms = ttft((ours.url, peer.url, floor.url), opts.ttft_runs)
        added = mine_ms - theirs_ms
        rows.append(
            Row(
                path="TTFT, one stream at a time (ms p50)",
                ours=mine_ms,
                peer=theirs_ms,
                ratio=_ratio(mine_ms, theirs_ms),
                p50_ms=mine_ms,
                goal=f"added <={GOAL3_TTFT_ADDED_MS:g} ms",
                met=added <= GOAL3_TTFT_ADDED_MS,
                note=(
                    f"added {added:+.2f} ms over the peer ({opts.ttft_runs} streams each); "
                    f"the floor's first token came at {floor_ms:.2f} ms, "
                    f"{floor_ms - theirs_ms:+.2f} ms over the peer's: the stack alone"
                    + (
                        ""
                        if floor_ms <= mine_ms
                        else " (later than ours: the machine's load changed between the runs)"
                    )
                ),
            )
        )
    return rows


FLOOR_PATH = "REST Execute floor: bare grpc.aio + Envoy, nothing recorded (req/s)"
SSE_FLOOR_PATH = "SSE floor: bare grpc.aio + Envoy, nothing recorded (streams/s)"


@contextmanager
def _floor_side(log_dir: Path) -> Iterator[Side]:
    """bench/floor.py's do-nothing servicer behind an Envoy of the same
    config as ours: the ceiling of this stack on this machine."""
    with (
        (log_dir / "floor.log").open("wb") as log,
        FloorServer(log) as floor,
        (log_dir / "floor-envoy.log").open("wb") as envoy_log,
    ):
        ports = Ports(gateway=free_port(), service=floor.port, admin=free_port())
        envoy = EnvoyProcess(ports=ports, output=envoy_log).start()
        try:
            assert envoy.proc is not None
            yield Side(
                "floor",
                envoy.url,
                {"svc": floor.pid, "envoy": envoy.proc.pid},
                f"http://127.0.0.1:{ports.admin}",
            )
        finally:
            envoy.stop()


def _floor_row(
    path: str, floor: wrk.WrkResult, ours: wrk.WrkResult, peer: wrk.WrkResult, unit: str
) -> Row:
    """The floor's run read against the same peer run as ours: its ratio
    bounds what any change inside the service can reach."""
    return _wrk_row(
        path,
        floor,
        peer,
        cpu=_cpu(floor, None, unit).replace(" | -", ""),
        note=(
            "the stack alone: Envoy's transcoder in front of a grpc.aio servicer that answers "
            "at once (bench/floor.py); the service reached "
            f"{_ratio(ours.rate, floor.rate):.0%} of it"
            + (
                "; no change inside the service can pass it"
                if ours.rate <= floor.rate
                else "; ours above the floor: the machine's load changed between the runs"
            )
        ),
    )


def _detail(label: str, side: str, result: wrk.WrkResult) -> dict[str, Any]:
    return {
        "path": label,
        "side": side,
        "rate": result.rate,
        "requests": result.requests,
        "p50_ms": result.p50_ms,
        "p99_ms": result.p99_ms,
        "max_ms": result.max_ms,
        "non_2xx": result.non_2xx,
        "socket_errors": result.socket_errors,
        "status_classes": result.status_classes,
        "cpu_ms": result.cpu_ms,
    }


def _unreachable(*urls: str) -> str | None:
    for url in urls:
        parts = urlsplit(url)
        host = parts.hostname or "127.0.0.1"
        port = parts.port or (6379 if parts.scheme.startswith("redis") else 5432)
        try:
            with socket.create_connection((host, port), timeout=1.0):
                pass
        except OSError as error:
            return f"{parts.scheme} not reachable at {host}:{port} ({error})"
    return None


class _postgres_schema(AbstractContextManager[str]):
    """A schema of its own for the run, dropped after: the database may be
    shared (the tests' "test" database)."""

    def __init__(self, url: str) -> None:
        self._url = url
        self._schema = f"bench_{secrets.token_hex(6)}"

    def _run(self, statement: str) -> None:
        import asyncpg  # the service's own dependency

        async def run() -> None:
            connection = await asyncpg.connect(self._url)
            try:
                await connection.execute(statement)
            finally:
                await connection.close()

        asyncio.run(run())

    def __enter__(self) -> str:
        self._run(f'CREATE SCHEMA "{self._schema}"')
        joiner = "&" if "?" in self._url else "?"
        return f"{self._url}{joiner}search_path={self._schema}"

    def __exit__(self, *exc: object) -> None:
        self._run(f'DROP SCHEMA IF EXISTS "{self._schema}" CASCADE')


# --------------------------------------------------------------------------
# Goal 5: the gateway's share of a real model's Execute


@dataclass
class _ModelRun:
    wall_ms: float  # what the caller waited, connection included
    lab_ms: float  # the lab's part: metrics.latency_ms, measured by Runner.stream
    output: str


def measure_model_overhead(stack: Stack, runs: int, warmup: int = 2) -> Row:
    """REST Execute via Envoy against the same task run by the embedded lab in
    this process (the registry and Runner the server builds, no gRPC, no
    store), one at a time, alternating; the same prompt, max_tokens and seed,
    so both generate the same tokens.

    Two figures. The difference of the two medians, as the issue states the
    goal; but a small model on a shared machine varies by tens of percent
    from run to run, more than the 2 % sought. So the goal is judged per run:
    each REST answer carries the lab's own time for that very run
    (metrics.latency_ms, timed by the Runner.stream the in-process call runs
    too), and the wall time beyond it is what the gateway added. The
    in-process runs check that latency_ms is the whole in-process cost."""
    from agentlab.config import Settings
    from agentlab.core.events import ExecutionCompleted
    from agentlab.core.runner import Runner
    from agentlab.core.types import ExecutionMode, GenerationOptions, Task
    from agentlab.lab.factory import build_registry

    path = "Execute, real model: REST via Envoy vs lab in process (ms p50)"
    goal = f"overhead <{GOAL5_OVERHEAD:.0%}"
    parts = urlsplit(stack.url)
    task = Task(
        prompt=MODEL_PROMPT,
        model=MODEL_NAME,
        mode=ExecutionMode.INFERENCE,
        options=GenerationOptions(max_tokens=MODEL_MAX_TOKENS, seed=MODEL_SEED),
    )

    def rest() -> _ModelRun:
        conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=300)
        try:
            # The connection opens inside the timing, as a new caller's would.
            start = time.perf_counter()
            conn.request(
                "POST",
                "/api/v1/execute",
                json.dumps(MODEL_BODY),
                {"Content-Type": "application/json"},
            )
            answer = conn.getresponse()
            data = answer.read()
            elapsed = time.perf_counter() - start
        finally:
            conn.close()
        if answer.status != 200:
            raise RuntimeError(f"model Execute: HTTP {answer.status}: {data[:300]!r}")
        body = json.loads(data)
        return _ModelRun(elapsed * 1000, float(body["metrics"]["latency_ms"]), body["output"])

    async def measure() -> tuple[list[_ModelRun], list[_ModelRun]]:
        settings = Settings.from_env({})
        registry = build_registry(settings)
        await registry.start()
        runner = Runner(registry.route, default_max_tokens=settings.default_max_tokens)
        remote: list[_ModelRun] = []
        local: list[_ModelRun] = []
        try:
            for run in range(warmup + runs):
                through = await asyncio.to_thread(rest)
                start = time.perf_counter()
                last = None
                async for event in runner.stream(runner.prepare(task)):
                    last = event
                elapsed = time.perf_counter() - start
                if last is None or not isinstance(last.kind, ExecutionCompleted):
                    raise RuntimeError(f"the lab in process did not complete: {last}")
                result = last.kind.result
                if run >= warmup:
                    remote.append(through)
                    local.append(
                        _ModelRun(elapsed * 1000, result.metrics.latency_ms, result.output)
                    )
            return remote, local
        finally:
            await registry.close()

    _progress(f"real model: {runs} Executes via Envoy and in process, alternating")
    remote, local = asyncio.run(measure())
    ours = statistics.median(r.wall_ms for r in remote)
    lab = statistics.median(r.wall_ms for r in local)
    per_run = [(r.wall_ms - r.lab_ms) / r.wall_ms for r in remote]
    share = statistics.median(per_run)
    added_ms = statistics.median(r.wall_ms - r.lab_ms for r in remote)
    uncounted_ms = statistics.median(r.wall_ms - r.lab_ms for r in local)
    spread = (max(r.wall_ms for r in local) - min(r.wall_ms for r in local)) / lab
    same = all(a.output == b.output for a, b in zip(remote, local, strict=True))
    return Row(
        path=path,
        ours=ours,
        peer=lab,
        ratio=_ratio(ours, lab),
        p50_ms=ours,
        non_2xx=0,
        goal=goal,
        met=share < GOAL5_OVERHEAD,
        note=(
            f"the gateway's share of each run {share:.2%} p50 ({added_ms:.1f} ms over the lab's "
            f"own time in that run; worst {max(per_run):.2%}); the two medians differ by "
            f"{(ours - lab) / ours:+.1%}, but the lab alone varied by {spread:.0%} "
            f"(max-min)/p50 over {runs} runs; in process, {uncounted_ms:.2f} ms beyond its "
            "latency_ms; peer = the embedded lab in this process"
            + ("" if same else "; WARNING: the two generated different outputs")
        ),
    )
