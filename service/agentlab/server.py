"""Composition root: builds the labs, the use cases and the gRPC server, and
runs it until SIGTERM or SIGINT, draining gracefully."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import socket
import sys
import uuid
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from agentlab import preflight
from agentlab.api.auth import AuthInterceptor, load_keys
from agentlab.api.interceptors import CheckRequests, MapErrors
from agentlab.api.observe import ObserveCalls
from agentlab.api.servicer import LabServicer
from agentlab.api.validation import RequestRules
from agentlab.config import ConfigError, Settings
from agentlab.core.errors import AgentLabError
from agentlab.core.runner import Runner
from agentlab.executions.local_bus import LocalBus
from agentlab.executions.model import EventBus, ExecutionStore
from agentlab.executions.redis_bus import RedisBus
from agentlab.executions.retention import RetentionPolicy, Sweeper
from agentlab.executions.service import Executions
from agentlab.executions.stores import open_store
from agentlab.health import OVERALL, Health
from agentlab.lab.factory import build_registry
from agentlab.lab.registry import LabRegistry
from agentlab.metrics import exposition as metrics_http
from agentlab.metrics import record as metrics
from agentlab.telemetry import logs, tracing
from agentlab.v1 import lab_service_pb2, lab_service_pb2_grpc

__all__ = ["LAB_SERVICE", "Server", "backend_service", "main"]

logger = logging.getLogger("agentlab")

LAB_SERVICE = lab_service_pb2.DESCRIPTOR.services_by_name["LabService"].full_name

# Seconds calls get after the shutdown's grace period to deliver the final
# events of the executions it cut.
_DELIVERY_S = 5.0


# Calls that reached grpc-core but not yet the event loop: beyond 1,000 of
# them (grpcio's default) core starts cancelling new ones at random, all of
# them past 3,000, and each caller gets a bare CANCELLED it cannot act on
# (seen: 6,091 of 10,000 streams opened at once through Envoy). A burst is
# for the executions' limits to answer, with RESOURCE_EXHAUSTED and a retry
# delay, once the loop takes the calls in: core holds as many as Envoy may
# have open towards one replica (its circuit breaker, gateway/envoy.yaml).
MAX_PENDING_CALLS = 50_000


@dataclass
class Server:
    """A bound, not yet started server with everything it serves."""

    server: grpc.aio.Server
    port: int
    health: Health
    registry: LabRegistry
    executions: Executions
    health_interval_s: float = 5.0
    _monitor: asyncio.Task[None] | None = None

    @classmethod
    def create(cls, settings: Settings, registry: LabRegistry) -> Server:
        # A second server on a taken port must fail, not split the traffic.
        # Errors become statuses in the outermost interceptor, for all the
        # others. The key is checked next: a caller without one learns
        # nothing, not even whether its bytes parse.
        rules = RequestRules(max_prompt_chars=settings.max_prompt_chars)
        interceptors: list[grpc.aio.ServerInterceptor] = [MapErrors(), CheckRequests(rules)]
        if settings.api_keys_file:
            interceptors.insert(1, AuthInterceptor(load_keys(settings.api_keys_file)))
        # Outermost, so the error path's log lines carry the call's ids too;
        # absent while there is nothing to observe (no cost per call).
        if tracing.enabled() or settings.log_format == "json":
            interceptors.insert(0, ObserveCalls())
        server = grpc.aio.server(
            interceptors=interceptors,
            options=[
                ("grpc.so_reuseport", 0),
                ("grpc.server.max_pending_requests", MAX_PENDING_CALLS),
                ("grpc.server.max_pending_requests_hard_limit", MAX_PENDING_CALLS),
            ],
        )
        health = Health([LAB_SERVICE, *(backend_service(b.name) for b in registry.backends)])
        runner = Runner(registry.route, default_max_tokens=settings.default_max_tokens)
        executions = build_executions(settings, runner)
        lab_service_pb2_grpc.add_LabServiceServicer_to_server(  # type: ignore[no-untyped-call]
            LabServicer(executions, health, registry.models), server
        )
        health_pb2_grpc.add_HealthServicer_to_server(health.servicer, server)
        reflection.enable_server_reflection(
            (
                LAB_SERVICE,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ),
            server,
        )
        # grpcio raises RuntimeError for a taken port (older releases
        # returned 0): either way one line, not a traceback.
        try:
            port = server.add_insecure_port(settings.grpc_address)
        except RuntimeError:
            port = 0
        if port == 0:
            raise ConfigError(f"cannot listen on {settings.grpc_address} (is the port in use?)")
        return cls(server, port, health, registry, executions, settings.health_interval_s)

    async def open(self) -> None:
        """Reach the execution store and the event bus before serving: a
        database or Redis that cannot be reached stops start-up with one line
        (ConfigError) rather than a traceback after the port is open."""
        try:
            await self.executions.open()
        except Exception as error:
            with contextlib.suppress(Exception):
                await self.executions.close()
            raise ConfigError(
                "cannot open the execution store or the event bus "
                f"(AGENTLAB_DATABASE_URL, AGENTLAB_REDIS_URL): {type(error).__name__}: {error}"
            ) from None

    async def start(self) -> None:
        """Serve at once (health NOT_SERVING), load the labs, then report
        what the backends' first check found, and keep checking."""
        await self.health.set_serving(False)
        await self.server.start()
        await self.registry.start()
        await self.executions.start()
        await self._report()
        self._monitor = asyncio.create_task(self._watch(), name="backend-health")

    async def stop(self, grace_s: float) -> None:
        """Drain: NOT_SERVING first so balancers stop sending, and no new
        calls; executions get the grace period to finish, then are cut, each
        ending with its final event, which the calls still deliver (a stream
        cut without one would look complete to a REST client); then the calls
        left are cancelled."""
        if self._monitor is not None:
            self._monitor.cancel()
        await self.health.set_serving(False)
        server_stopped = asyncio.create_task(self.server.stop(grace_s + _DELIVERY_S))
        await asyncio.sleep(0)  # new calls are refused from its first step on
        await self.executions.drain(grace_s)
        await server_stopped
        await self.executions.close()
        await self.registry.close()

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(max(self.health_interval_s, 0.05))
            await self.registry.check()
            await self._report()

    async def _report(self) -> None:
        """Each backend under its own health name; the gateway as a whole
        serves while a backend of a model other than echo can."""
        for backend in self.registry.backends:
            reachable = self.registry.state(backend.name).reachable
            await self.health.set(backend_service(backend.name), reachable)
            metrics.backend_checked(backend.name, reachable)
        serving = self.registry.serving()
        await self.health.set(OVERALL, serving)
        await self.health.set(LAB_SERVICE, serving)


def build_executions(settings: Settings, runner: Runner) -> Executions:
    """SQLite in the data directory unless a database URL says otherwise;
    Redis for live events when configured, else in-process."""
    bus: EventBus = RedisBus(settings.redis_url) if settings.redis_url else LocalBus()
    store = open_store(settings.database_url, settings.data_dir)
    executions = Executions(
        runner,
        store,
        bus,
        owner=f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}",
        heartbeat_s=settings.execution_heartbeat_s,
        lease_s=settings.execution_lease_s,
        max_running=settings.max_running_executions,
        max_queued=settings.max_queued_executions,
    )
    executions.retain(build_sweeper(settings, store))
    return executions


def build_sweeper(settings: Settings, store: ExecutionStore) -> Sweeper:
    """The retention settings applied to ``store``; an execution that ended
    within the lease is kept whatever they say (see executions/retention.py)."""
    policy = RetentionPolicy(
        max_age_s=settings.retention_max_age.seconds,
        max_count=settings.retention_max_count,
        grace_s=settings.execution_lease_s,
    )
    return Sweeper(
        store,
        policy,
        interval_s=settings.retention_interval_s,
        batch_size=settings.retention_batch_size,
    )


def backend_service(backend: str) -> str:
    """The grpc.health.v1 service name that reports one backend."""
    return f"agentlab.backend.{backend}"


async def serve(settings: Settings) -> None:
    server = Server.create(settings, build_registry(settings))
    # Served until the process exits, the drain included (its thread is a
    # daemon): stopping it would only add its poll interval (0.5 s) to exit.
    try:
        metrics_http.serve(settings.metrics_address)
    except OSError as error:
        raise ConfigError(
            f"cannot serve metrics on {settings.metrics_address} (AGENTLAB_METRICS_ADDRESS; "
            f"is the port in use?): {error}"
        ) from None
    await server.open()
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    try:
        logger.info(
            "gRPC listening on %s (port %d); loading the lab", settings.grpc_address, server.port
        )
        await server.start()
        # What start-up built (modules, the contract's descriptors, the labs)
        # lives as long as the process: out of the collector's sight, a full
        # collection scans only what requests allocate, instead of pausing
        # every request for ~70 ms (measured under load) to scan it all.
        gc.freeze()
        logger.info(
            "serving: %s",
            ", ".join(
                f"{m.name} -> {m.backend}/{m.backend_model}" for m in server.registry.models()
            ),
        )
        await stopping.wait()
        logger.info("stopping: draining for up to %.0f s", settings.shutdown_grace_s)
    finally:
        await server.stop(settings.shutdown_grace_s)
    logger.info("stopped")


def main() -> None:
    try:
        settings = Settings.from_env()
        applied = preflight.check(settings, os.environ)
    except ConfigError as error:
        sys.exit(f"agentlab: configuration error: {error}")
    logs.configure(settings.log_level, settings.log_format)
    try:
        traced = tracing.configure_from_env("agentlab-gateway")
    except tracing.TracingError as error:
        sys.exit(f"agentlab: configuration error: {error}")
    logger.info("configuration from the environment: %s", applied.from_env())
    if traced:
        logger.info("tracing: OTLP to %s", _otlp_endpoint())
    try:
        asyncio.run(serve(settings))
    except (ConfigError, AgentLabError) as error:
        sys.exit(f"agentlab: {error}")
    finally:
        tracing.shutdown()  # the spans still buffered


def _otlp_endpoint() -> str:
    return os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or os.environ.get(
        "OTEL_EXPORTER_OTLP_ENDPOINT", ""
    )
