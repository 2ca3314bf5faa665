"""The FastAPI peer (bench/peers/fastapi_app.py) as a process: uvicorn, one
worker, on a free port, as the app this gateway replaces was deployed."""

from __future__ import annotations

import sys
import time
import urllib.request
from pathlib import Path

from server_process import ServerProcess

__all__ = ["FastApiPeer"]

APP_DIR = Path(__file__).with_name("peers")


class FastApiPeer(ServerProcess):
    """``with FastApiPeer(log) as peer:`` serves at ``peer.url``; ``peer.pid``
    is the one process that does all of its work (uvicorn runs one worker in
    its own process, without a supervisor)."""

    name = "the FastAPI peer"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        return [
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
        ]

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/docs", timeout=1):
                return True
        except OSError:
            time.sleep(0.05)
            return False
