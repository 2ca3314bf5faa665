"""Shared fixtures: real processes (service, Envoy) on free ports, and
in-process servers for labs that tests construct themselves."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from agentlab.config import Settings
from agentlab.devstack import ROOT, EnvoyProcess, Ports, Stack, free_port
from agentlab.lab.registry import LabRegistry
from agentlab.server import Server

BIN = Path(sys.executable).parent


def tool(name: str) -> str:
    """A command-line tool from the venv (grpcurl, buf, envoy) or PATH."""
    found = shutil.which(name, path=str(BIN)) or shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed: run `make setup`")
    return found


@pytest.fixture(autouse=True)
def _clean_agentlab_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Settings come from AGENTLAB_* variables: tests start from none."""
    for name in list(os.environ):
        if name.startswith("AGENTLAB_"):
            monkeypatch.delenv(name)


@pytest.fixture(scope="session")
def model_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """The real thing, as `make run` starts it: the embedded lab with the
    local model, behind Envoy."""
    stack = Stack.start(tmp_path_factory.mktemp("model-stack"))
    yield stack
    stack.stop()


@pytest.fixture
def echo_stack(tmp_path: Path) -> Iterator[Stack]:
    """A stack of its own for tests that stop or break its processes; the echo
    backend makes it start in a moment."""
    stack = Stack.start(tmp_path, {"AGENTLAB_DEFAULT_BACKEND": "echo"})
    yield stack
    stack.stop()


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
    envoy = EnvoyProcess(
        ports=Ports(gateway=free_port(), service=port, admin=free_port()),
        output=(tmp_path / "envoy.log").open("wb"),
    )
    try:
        envoy.start()
        yield InProcess(server, envoy)
    finally:
        envoy.stop()
        await server.stop(0)


def run(
    cmd: list[str], timeout: float = 60.0, cwd: Path = ROOT
) -> subprocess.CompletedProcess[str]:
    """Run a command as a user would from the repository (or ``cwd``)."""
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=cwd)
