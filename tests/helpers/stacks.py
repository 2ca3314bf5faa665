"""Starting stacks (agentlab.devstack.Stack: the service and Envoy as real
processes on free ports) for tests, and stopping every one started, as
aiohttp's ``aiohttp_server`` does for servers. The fixtures ``start_stack``
(one test) and ``start_module_stack`` (one module) in conftest.py hand out a
StackFactory."""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from types import TracebackType

from agentlab.api.auth import digest
from agentlab.devstack import Stack

__all__ = ["StackFactory", "numbered"]


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
