"""The FastAPI peer (bench/peers/fastapi_app.py) as a process: uvicorn, one
worker, on a free port, as the app this gateway replaces was deployed."""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import IO

from agentlab.devstack import free_port

__all__ = ["FastApiPeer"]

APP_DIR = Path(__file__).with_name("peers")


class FastApiPeer:
    """``with FastApiPeer(log) as peer:`` serves at ``peer.url``; ``peer.pid``
    is the one process that does all of its work (uvicorn runs one worker in
    its own process, without a supervisor)."""

    def __init__(self, output: IO[bytes] | None = None) -> None:
        self.port = free_port()
        self._output = output
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self._proc is not None, "not started"
        return self._proc.pid

    def __enter__(self) -> FastApiPeer:
        self._proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "uvicorn",
                "--app-dir",
                str(APP_DIR),
                "fastapi_app:app",
                "--host=127.0.0.1",
                f"--port={self.port}",
                "--workers=1",
                "--no-access-log",
                "--log-level=warning",
            ],
            stdout=self._output,
            stderr=subprocess.STDOUT if self._output else None,
            start_new_session=True,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"the FastAPI peer exited with {self._proc.returncode}")
            try:
                with urllib.request.urlopen(f"{self.url}/docs", timeout=1):
                    return self
            except OSError:
                time.sleep(0.05)
        self.__exit__(None, None, None)
        raise TimeoutError("the FastAPI peer did not answer within 30 s")

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
