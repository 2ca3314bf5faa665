"""A server the benchmark starts as a process of its own, on a free port,
and stops after: the FastAPI peer (peer.py) and the floor (floor.py)."""

from __future__ import annotations

import subprocess
import time
from types import TracebackType
from typing import IO, Self

from agentlab.devstack import free_port

__all__ = ["ServerProcess"]


class ServerProcess:
    """``with Subclass(log) as server:`` serves on ``server.port``
    (127.0.0.1); ``server.pid`` is the one process doing its work. A
    subclass names the command and says when it is ready."""

    name = "the server"
    start_timeout_s = 30.0

    def __init__(self, output: IO[bytes] | None = None) -> None:
        self.port = free_port()
        self._output = output
        self._proc: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        raise NotImplementedError

    def ready(self) -> bool:
        """Whether it answers yet; called until it does."""
        raise NotImplementedError

    @property
    def pid(self) -> int:
        assert self._proc is not None, "not started"
        return self._proc.pid

    def __enter__(self) -> Self:
        self._proc = subprocess.Popen(
            self.command(),
            stdout=self._output,
            stderr=subprocess.STDOUT if self._output else None,
            start_new_session=True,
        )
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self._proc.returncode}")
            if self.ready():
                return self
        self.__exit__(None, None, None)
        raise TimeoutError(f"{self.name} did not answer within {self.start_timeout_s:g} s")

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
