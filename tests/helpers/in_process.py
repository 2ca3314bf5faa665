"""A server in the test's event loop, behind a real Envoy: for labs that
tests construct themselves."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from agentlab.config import Settings
from agentlab.devstack import EnvoyProcess, Ports, free_port
from agentlab.lab.registry import LabRegistry
from agentlab.server import Server


@dataclass
class InProcess:
    """A server running in the test's event loop, with Envoy in front."""

    server: Server
    envoy: EnvoyProcess

    @property
    def url(self) -> str:
        return self.envoy.url

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.server.port}"


async def serve_in_process(registry: LabRegistry, tmp_path: Path) -> AsyncIterator[InProcess]:
    """Serve ``registry`` from this event loop behind a real Envoy. Clients in
    such tests must be async: a blocking call would stall the server."""
    port = free_port()
    server = Server.create(
        Settings(grpc_address=f"127.0.0.1:{port}", data_dir=tmp_path / "data"), registry
    )
    await server.start()
    with (tmp_path / "envoy.log").open("wb") as log:
        envoy = EnvoyProcess(
            ports=Ports(gateway=free_port(), service=port, admin=free_port()), output=log
        )
        try:
            envoy.start()
            yield InProcess(server, envoy)
        finally:
            envoy.stop()
            await server.stop(0)
