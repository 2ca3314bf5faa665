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

from agentlab.devstack import ROOT, Ports, Stack, envoy_binary, free_port, render_envoy_config
from tests.helpers.tools import interruptible, run_service

# Every test runs `make run` or its supervisor script.
pytestmark = pytest.mark.e2e


def listening(port: int) -> bool:
    with socket.socket() as probe:
        probe.settimeout(0.5)
        return probe.connect_ex(("127.0.0.1", port)) == 0


def free_ports() -> dict[str, int]:
    return {
        "gateway": free_port(),
        "service": free_port(),
        "admin": free_port(),
        "metrics": free_port(),
    }


def make_run(ports: dict[str, int], env: dict[str, str]) -> subprocess.Popen[str]:
    """`make run ARGS=...` as a user types it, with ``env`` exported; in its
    own process group, which is what a terminal's Ctrl-C reaches."""
    make = shutil.which("make")
    if make is None:
        pytest.fail("make is not installed")
    args = " ".join(f"--{name}-port={port}" for name, port in ports.items())
    return subprocess.Popen(
        interruptible([make, "--no-print-directory", "run", f"ARGS={args}"]),
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


def refused(supervisor: subprocess.Popen[str]) -> str:
    """What `make run` printed before it stopped on its own, failing."""
    try:
        output, _ = supervisor.communicate(timeout=120)
    finally:
        if supervisor.poll() is None:
            os.killpg(supervisor.pid, signal.SIGKILL)
    assert supervisor.returncode != 0, output
    return output


def ctrl_c(supervisor: subprocess.Popen[str]) -> str:
    os.killpg(supervisor.pid, signal.SIGINT)
    rest, _ = supervisor.communicate(timeout=60)
    return rest


def nothing_listens(ports: dict[str, int]) -> None:
    deadline = time.monotonic() + 5
    while any(listening(port) for port in ports.values()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(listening(port) for port in ports.values()), "a process was left behind"


def process_tree(root: int) -> dict[int, tuple[str, str]]:
    """``root`` and every process under it: pid -> (its start time in clock
    ticks since boot, which tells a reused pid apart; its command line)."""
    children: dict[int, list[int]] = {}
    found: dict[int, tuple[str, str]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue  # gone meanwhile
        # The command name (field 2) may hold spaces and parentheses.
        fields = stat.rpartition(")")[2].split()
        children.setdefault(int(fields[1]), []).append(int(entry.name))
        found[int(entry.name)] = (fields[19], command)
    tree, todo = {}, [root]
    while todo:
        pid = todo.pop()
        if pid in found:
            tree[pid] = found[pid]
            todo.extend(children.get(pid, []))
    return tree


def still_running(tree: dict[int, tuple[str, str]]) -> list[str]:
    """The processes of ``tree`` alive now (zombies count: nobody reaped them)."""
    alive = []
    for pid, (started, command) in tree.items():
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        if stat.rpartition(")")[2].split()[19] == started:
            alive.append(f"{pid} {command}")
    return alive


def in_group(pgid: int) -> list[str]:
    """The processes of process group ``pgid`` alive now."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            stat = (entry / "stat").read_text() if entry.name.isdigit() else ""
        except OSError:
            continue
        if stat and int(stat.rpartition(")")[2].split()[2]) == pgid:
            found.append(stat.split(")")[0])
    return found


CTRL_C_BOUND_S = 20.0


def test_ctrl_c_stops_make_run_cleanly() -> None:
    """`make run` as a user types it, echo backend to start fast; Ctrl-C as a
    terminal sends it, to the foreground process group. Everything stops
    within a bound, the service drains with exit code 0, and no process it
    started is left, nor a port open."""
    ports = free_ports()
    supervisor = make_run(ports, {"AGENTLAB_DEFAULT_BACKEND": "echo"})
    tree: dict[int, tuple[str, str]] = {}
    try:
        output = until_ready(supervisor)
        assert f"curl -X POST http://localhost:{ports['gateway']}/api/v1/execute" in output
        answer = httpx.post(
            f"http://127.0.0.1:{ports['gateway']}/api/v1/execute",
            json={"prompt": "Dime 3 números primos", "model": "echo"},
            timeout=30,
        )
        assert answer.status_code == 200, answer.text
        assert answer.json()["output"] == "Dime 3 números primos"

        tree = process_tree(supervisor.pid)
        commands = " | ".join(command for _, command in tree.values())
        assert "scripts/run_local.py" in commands, commands
        assert "-m agentlab" in commands, commands
        assert "envoy" in commands, commands

        os.killpg(supervisor.pid, signal.SIGINT)
        try:
            rest, _ = supervisor.communicate(timeout=CTRL_C_BOUND_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"make run still running {CTRL_C_BOUND_S} s after Ctrl-C: {tree}")
    finally:
        if supervisor.poll() is None:
            os.killpg(supervisor.pid, signal.SIGKILL)
        # Whatever a broken stop leaves behind goes, so as not to outlive the test.
        left = still_running(tree)
        for line in left:
            os.kill(int(line.split()[0]), signal.SIGKILL)
    # make, like a shell, dies of the SIGINT it got once its child is done,
    # so that whatever ran it knows it was interrupted; the supervisor's own
    # account is the line it prints.
    assert supervisor.returncode == -signal.SIGINT
    assert "stopped (service exit code 0)" in rest, output + rest
    assert "Traceback" not in rest, rest
    # The service and Envoy run in sessions of their own: the tree, not only
    # the group, must be gone.
    assert left == []
    assert in_group(supervisor.pid) == []
    nothing_listens(ports)


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
    """Two API keys, a routing file and a rate limit, as README.md says."""
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
        # Enough for the calls below, not for a burst after them.
        "AGENTLAB_RATE_LIMIT": "1/10",
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
        # The metrics port it printed (once the default 9464 whatever
        # --metrics-port said) is where the service serves them.
        metrics = f"127.0.0.1:{ports['metrics']}"
        assert re.search(rf"^  AGENTLAB_METRICS_ADDRESS +{metrics}$", output, re.M), output
        assert f"the service's own http://{metrics}/metrics" in output, output
        assert "agentlab_executions_running" in httpx.get(f"http://{metrics}/metrics").text

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

        # The rate limit reached Envoy: its bucket of 10 runs out.
        assert "Envoy: 1 requests/s per client address, bursts of 10" in output, output
        statuses = [
            httpx.get(f"{url}/api/v1/models", headers=bearer(SECOND), timeout=30) for _ in range(20)
        ]
        limited = next((a for a in statuses if a.status_code == 429), None)
        assert limited is not None, [a.status_code for a in statuses]
        assert limited.json()["details"][0]["reason"] == "RATE_LIMITED"
        assert limited.headers["retry-after"] == "1"

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
        ("a bad rate limit", "AGENTLAB_RATE_LIMIT must be off or <requests per second>"),
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
        case "a bad rate limit":
            env["AGENTLAB_RATE_LIMIT"] = "100 per second"
    ports = free_ports()
    supervisor = make_run(ports, env)
    output = refused(supervisor)
    assert "make run: configuration error: " in output, output
    assert message in output, output
    assert "starting the service" not in output
    nothing_listens(ports)


def test_make_run_starts_while_every_backend_is_down(tmp_path: Path) -> None:
    """A routing file whose only backend is not up yet (Ollama still
    starting): `make run` starts at once and says so; health is 503 and the
    reserved echo answers, so the gateway is there when Ollama comes."""
    routing = tmp_path / "models.yaml"
    routing.write_text(
        "backends:\n"
        f'  ollama: {{kind: ollama, url: "http://127.0.0.1:{free_port()}"}}\n'
        "models:\n"
        '  mistral7b: {backend: ollama, model: "mistral:7b"}\n'
    )
    ports = free_ports()
    supervisor = make_run(ports, {"AGENTLAB_MODELS_FILE": str(routing)})
    try:
        started = time.monotonic()
        output = until_ready(supervisor)
        assert time.monotonic() - started < 30, output
        assert "warning: no backend of a model is reachable" in output, output
        gateway = f"http://127.0.0.1:{ports['gateway']}"
        assert httpx.get(f"{gateway}/api/v1/health", timeout=10).status_code == 503
        echo = httpx.post(
            f"{gateway}/api/v1/execute", json={"prompt": "hola", "model": "echo"}, timeout=10
        )
        assert echo.status_code == 200, echo.text
    finally:
        ctrl_c(supervisor)


@pytest.mark.parametrize("taken", ["service", "gateway", "admin"])
def test_a_second_make_run_on_taken_ports_stops_and_says_which(taken: str) -> None:
    """A port in use (another `make run`, say): a readiness probe would find
    that listener and call this stack ready while its own process failed, and
    Envoy, binding with SO_REUSEPORT, would share the port and split the
    traffic. `make run` stops instead, naming the port."""
    ports = free_ports()
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", ports[taken]))
        holder.listen()
        output = refused(make_run(ports, {"AGENTLAB_DEFAULT_BACKEND": "echo"}))
    assert f"port {ports[taken]} is in use" in output, output
    assert "Ctrl-C stops both" not in output, output
    nothing_listens(ports)


def test_the_service_on_a_taken_port_stops_with_one_line(tmp_path: Path) -> None:
    """`python -m agentlab` where the port is taken: a configuration error
    naming the address, no traceback."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        address = f"127.0.0.1:{holder.getsockname()[1]}"
        done = run_service(
            {
                "AGENTLAB_GRPC_ADDRESS": address,
                "AGENTLAB_DEFAULT_BACKEND": "echo",
                "AGENTLAB_DATA_DIR": str(tmp_path),
            }
        )
    assert done.returncode != 0
    assert f"cannot listen on {address}" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr, done.stderr


def test_a_second_envoy_cannot_share_the_gateway_port(echo_stack: Stack, tmp_path: Path) -> None:
    """Envoy binds with SO_REUSEPORT unless told not to; two gateways on one
    port would split the frontend's requests between two stacks."""
    taken = echo_stack.envoy.ports
    config = tmp_path / "envoy.yaml"
    config.write_text(
        render_envoy_config(Ports(gateway=taken.gateway, service=taken.service, admin=free_port()))
    )
    second = subprocess.run(
        [envoy_binary(), "-c", str(config), "--disable-hot-restart", "--log-level", "error"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert second.returncode != 0, second.stderr
    assert "ddress already in use" in second.stderr, second.stderr
