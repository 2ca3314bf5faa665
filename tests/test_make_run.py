"""`make run`'s supervisor: it serves the frontend's request, and Ctrl-C
stops the service and Envoy, leaving nothing behind."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time

import httpx

from agentlab.devstack import ROOT, free_port


def listening(port: int) -> bool:
    with socket.socket() as probe:
        probe.settimeout(0.5)
        return probe.connect_ex(("127.0.0.1", port)) == 0


def test_ctrl_c_stops_everything() -> None:
    ports = {"gateway": free_port(), "service": free_port(), "admin": free_port()}
    supervisor = subprocess.Popen(
        [
            sys.executable,
            "scripts/run_local.py",
            *(f"--{name}-port={port}" for name, port in ports.items()),
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert supervisor.stdout is not None
        printed = []
        for line in supervisor.stdout:
            printed.append(line)
            if line.startswith("Ctrl-C stops both"):
                break
        output = "".join(printed)
        assert f"curl -X POST http://localhost:{ports['gateway']}/api/v1/execute" in output, output

        answer = httpx.post(
            f"http://127.0.0.1:{ports['gateway']}/api/v1/execute",
            json={"prompt": "Dime 3 números primos", "model": "mistral7b", "max_tokens": 8},
            timeout=60,
        )
        assert answer.status_code == 200, answer.text
        assert answer.json()["output"]

        # What a terminal's Ctrl-C sends to the foreground process.
        supervisor.send_signal(signal.SIGINT)
        rest, _ = supervisor.communicate(timeout=30)
        assert supervisor.returncode == 0, output + rest
        assert "stopped (service exit code 0)" in rest
    finally:
        if supervisor.poll() is None:
            supervisor.kill()
    deadline = time.monotonic() + 5
    while any(listening(port) for port in ports.values()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(listening(port) for port in ports.values()), "a process was left behind"
