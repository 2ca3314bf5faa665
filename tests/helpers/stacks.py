"""Starting stacks (agentlab.devstack.Stack: the service and Envoy as real
processes on free ports) for tests, and stopping every one started, as
aiohttp's ``aiohttp_server`` does for servers. The fixtures ``start_stack``
(one test) and ``start_module_stack`` (one module) in conftest.py hand out a
StackFactory. ``start_replicas``: several service processes behind one
Envoy, for the tests of replicas sharing PostgreSQL and Redis."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from agentlab.api.auth import digest
from agentlab.devstack import EnvoyProcess, Ports, ServiceProcess, Stack, free_port

__all__ = ["Replicas", "StackFactory", "numbered", "start_replicas"]


class StackFactory:
    """Starts stacks, each in a directory of its own from ``directory()``
    (its logs, its data dir, the files written for it), and stops every one
    it started when closed, in the reverse order, even if a test failed."""

    def __init__(self, directory: Callable[[], Path]) -> None:
        self._directory = directory
        self._started: list[Stack] = []
        # Async fixtures start stacks in a thread (asyncio.to_thread) while
        # their event loop serves a fake backend.
        self._lock = threading.Lock()

    def __call__(
        self,
        env: Mapping[str, str] | None = None,
        *,
        keys: Mapping[str, str] | None = None,
        models: str | None = None,
    ) -> Stack:
        """A started stack, ready to serve. ``env``: AGENTLAB_* settings for
        the service; ``keys``: caller name -> API key, written as the keys
        file the README describes (AGENTLAB_API_KEYS_FILE); ``models``: the
        routing file's YAML (AGENTLAB_MODELS_FILE). AGENTLAB_RATE_LIMIT in
        ``env`` sets Envoy's per-client limit, as for make run."""
        with self._lock:
            directory = self._directory()
        settings = dict(env or {})
        if keys is not None:
            keys_file = directory / "keys.yaml"
            keys_file.write_text(
                "keys:\n"
                + "".join(
                    f"  - {{caller: {caller}, sha256: {digest(key)}}}\n"
                    for caller, key in keys.items()
                )
            )
            settings["AGENTLAB_API_KEYS_FILE"] = str(keys_file)
        if models is not None:
            models_file = directory / "models.yaml"
            models_file.write_text(models)
            settings["AGENTLAB_MODELS_FILE"] = str(models_file)
        stack = Stack.start(directory, settings)
        with self._lock:
            self._started.append(stack)
        return stack

    def stop_all(self) -> None:
        """Stops every stack started (Stack.stop does nothing to a stopped
        one); the first error is raised once all were tried."""
        errors: list[BaseException] = []
        with self._lock:
            started, self._started = self._started, []
        for stack in reversed(started):
            try:
                stack.stop()
            except BaseException as error:
                errors.append(error)
        if errors:
            raise errors[0]

    def __enter__(self) -> StackFactory:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop_all()


def numbered(parent: Path, name: str = "stack") -> Callable[[], Path]:
    """``parent/stack``, then ``parent/stack-2``, ...: directories next to
    the test's own files, so a failed test's logs are where its tmp_path is."""
    count = 0

    def directory() -> Path:
        nonlocal count
        count += 1
        path = parent / (name if count == 1 else f"{name}-{count}")
        path.mkdir()
        return path

    return directory


@dataclass
class Replicas:
    services: list[ServiceProcess]
    # In front of them all: services[0] is its main host, the others its
    # replicas (Ports.replicas).
    envoy: EnvoyProcess


@contextmanager
def start_replicas(n: int, env: Mapping[str, str], directory: Path) -> Iterator[Replicas]:
    """``n`` service processes with ``env`` (their shared database and Redis
    in it), started, then one Envoy in front of them; their output in
    ``directory`` (service-0.log, ..., envoy.log). On exit, even after a
    failed start, Envoy is stopped first (nothing new reaches a draining
    service), then the services, and the logs are closed."""
    with ExitStack() as cleanup:
        logs = [
            cleanup.enter_context((directory / f"service-{i}.log").open("wb")) for i in range(n)
        ]
        envoy_log = cleanup.enter_context((directory / "envoy.log").open("wb"))
        services = [ServiceProcess(port=free_port(), env=env, output=log) for log in logs]
        first, *others = services
        envoy = EnvoyProcess(
            ports=Ports(
                gateway=free_port(),
                service=first.port,
                admin=free_port(),
                replicas=tuple(s.port for s in others),
            ),
            output=envoy_log,
        )
        # ExitStack unwinds in reverse and goes on past a failed stop: each
        # stop is registered before its start, which may fail half-way.
        for service in services:
            cleanup.callback(service.stop)
            service.start()
        cleanup.callback(envoy.stop)
        envoy.start()
        yield Replicas(services, envoy)
