"""`make run`'s supervisor: it serves the frontend's request, and Ctrl-C
stops the service and Envoy, leaving nothing behind. What the user configures
(AGENTLAB_* variables, the files they name) reaches the service, is printed
without secrets, and a setting that cannot be honoured stops `make run`
before anything listens."""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from agentlab.devstack import ROOT, free_port

# Every test runs `make run` or its supervisor script.
pytestmark = pytest.mark.e2e


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


def free_ports() -> dict[str, int]:
    return {"gateway": free_port(), "service": free_port(), "admin": free_port()}


def make_run(ports: dict[str, int], env: dict[str, str]) -> subprocess.Popen[str]:
    """`make run ARGS=...` as a user types it, with ``env`` exported; in its
    own process group, which is what a terminal's Ctrl-C reaches."""
    make = shutil.which("make")
    if make is None:
        pytest.fail("make is not installed")
    args = " ".join(f"--{name}-port={port}" for name, port in ports.items())
    return subprocess.Popen(
        [make, "--no-print-directory", "run", f"ARGS={args}"],
        cwd=ROOT,
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def until_ready(supervisor: subprocess.Popen[str]) -> str:
    assert supervisor.stdout is not None
    printed = []
    for line in supervisor.stdout:
        printed.append(line)
        if line.startswith("Ctrl-C stops both"):
            return "".join(printed)
    pytest.fail(f"make run ended before it was ready:\n{''.join(printed)}")


def ctrl_c(supervisor: subprocess.Popen[str]) -> str:
    os.killpg(supervisor.pid, signal.SIGINT)
    rest, _ = supervisor.communicate(timeout=60)
    return rest


def nothing_listens(ports: dict[str, int]) -> None:
    deadline = time.monotonic() + 5
    while any(listening(port) for port in ports.values()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(listening(port) for port in ports.values()), "a process was left behind"


def digest_as_the_readme_says(key: str) -> str:
    """`echo -n "$KEY" | .venv/bin/python -m agentlab.api.auth`, as printed
    in README.md (API keys), with the test's interpreter."""
    done = subprocess.run(
        ["bash", "-c", f'echo -n "$KEY" | {sys.executable} -m agentlab.api.auth'],
        env={**os.environ, "KEY": key},
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout.strip()


FRONTEND = secrets.token_urlsafe(24)
SECOND = secrets.token_urlsafe(24)
ROUTING = """
backends:
  lab-echo: {kind: echo}
models:
  mistral7b: {backend: lab-echo}
  tiny: {backend: lab-echo, max_tokens: 8}
"""


@pytest.fixture
def configured(tmp_path: Path) -> dict[str, str]:
    """Two API keys and a routing file, written as README.md says."""
    keys = tmp_path / "keys.yaml"
    keys.write_text(
        "keys:\n"
        f"  - {{caller: frontend, sha256: {digest_as_the_readme_says(FRONTEND)}}}\n"
        f"  - {{caller: second, sha256: {digest_as_the_readme_says(SECOND)}}}\n"
    )
    models = tmp_path / "models.yaml"
    models.write_text(ROUTING)
    return {
        "AGENTLAB_API_KEYS_FILE": str(keys),
        "AGENTLAB_MODELS_FILE": str(models),
        "AGENTLAB_DATA_DIR": str(tmp_path / "data"),
    }


def test_the_users_configuration_reaches_the_service(configured: dict[str, str]) -> None:
    ports = free_ports()
    supervisor = make_run(ports, configured)
    url = f"http://127.0.0.1:{ports['gateway']}"

    def bearer(key: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {key}"}

    try:
        output = until_ready(supervisor)
        # The configuration it applied, without a secret.
        keys_file = re.escape(configured["AGENTLAB_API_KEYS_FILE"])
        assert re.search(rf"^  AGENTLAB_API_KEYS_FILE +{keys_file}  \(", output, re.M), output
        assert "2 key(s); callers: frontend, second" in output
        assert "models: mistral7b -> lab-echo, tiny -> lab-echo" in output, output
        for secret in (FRONTEND, SECOND, digest_as_the_readme_says(FRONTEND)):
            assert secret not in output
        assert 'Authorization: Bearer $KEY"' in output  # the example call shows a key

        prompt = {"prompt": "Dime 3 números primos", "model": "mistral7b"}
        without = httpx.post(f"{url}/api/v1/execute", json=prompt, timeout=30)
        assert without.status_code == 401, without.text
        first = httpx.post(
            f"{url}/api/v1/execute", json=prompt, headers=bearer(FRONTEND), timeout=30
        )
        assert first.status_code == 200, first.text
        assert first.json()["output"] == prompt["prompt"]  # echo, as the routing file says
        execution = f"{url}/api/v1/executions/{first.json()['execution_id']}"
        assert httpx.get(execution, headers=bearer(FRONTEND), timeout=30).status_code == 200
        others = httpx.get(execution, headers=bearer(SECOND), timeout=30)
        assert others.status_code == 404, others.text

        models = httpx.get(f"{url}/api/v1/models", headers=bearer(SECOND), timeout=30)
        assert models.status_code == 200, models.text
        served = {m["name"]: m["backend"] for m in models.json()["models"]}
        assert served == {"echo": "echo", "mistral7b": "lab-echo", "tiny": "lab-echo"}, served

        rest = ctrl_c(supervisor)
        assert "stopped (service exit code 0)" in rest, output + rest
    finally:
        if supervisor.poll() is None:
            os.killpg(supervisor.pid, signal.SIGKILL)
    nothing_listens(ports)


@pytest.mark.parametrize(
    ("problem", "message"),
    [
        ("keys file missing", "cannot read the API keys file"),
        ("keys file empty", "the API keys file is empty"),
        ("keys file is a directory", "cannot read the API keys file"),
        ("routing file does not parse", "not valid YAML"),
        ("a misspelt variable", "AGENTLAB_API_KEY_FILE is not a setting (did you mean"),
        ("a bad number", "AGENTLAB_MAX_RUNNING_EXECUTIONS must be an integer"),
    ],
)
def test_a_setting_that_cannot_be_honoured_stops_make_run(
    configured: dict[str, str], tmp_path: Path, problem: str, message: str
) -> None:
    env = dict(configured)
    keys = Path(env["AGENTLAB_API_KEYS_FILE"])
    match problem:
        case "keys file missing":
            keys.unlink()
        case "keys file empty":
            keys.write_text("")
        case "keys file is a directory":
            env["AGENTLAB_API_KEYS_FILE"] = str(tmp_path)
        case "routing file does not parse":
            Path(env["AGENTLAB_MODELS_FILE"]).write_text("models: {mistral7b: [")
        case "a misspelt variable":
            env["AGENTLAB_API_KEY_FILE"] = env.pop("AGENTLAB_API_KEYS_FILE")
        case "a bad number":
            env["AGENTLAB_MAX_RUNNING_EXECUTIONS"] = "lots"
    ports = free_ports()
    supervisor = make_run(ports, env)
    try:
        output, _ = supervisor.communicate(timeout=120)
    finally:
        if supervisor.poll() is None:
            os.killpg(supervisor.pid, signal.SIGKILL)
    assert supervisor.returncode != 0, output
    assert "make run: configuration error: " in output, output
    assert message in output, output
    assert "starting the service" not in output
    nothing_listens(ports)
