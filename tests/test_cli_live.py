"""The live view on a real terminal: tmux (Debian's package) runs
`agentlab orchestrate`, and its screen, read with capture-pane, shows the
graph's nodes while they run, then each node's row and the totals."""

from __future__ import annotations

import os
import secrets
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agentlab.devstack import Stack
from tests.helpers.services import missing
from tests.helpers.stacks import StackFactory

AGENTLAB = str(Path(sys.executable).parent / "agentlab")
DONE = "__agentlab_done__"


@pytest.fixture
def tmux(tmp_path: Path) -> Iterator[list[str]]:
    """``tmux -S <socket>``: a tmux server of the test's own."""
    binary = shutil.which("tmux")
    if binary is None:
        missing("tmux is not installed (apt-get install tmux)")
    command = [binary, "-S", str(tmp_path / f"tmux-{secrets.token_hex(4)}")]
    yield command
    subprocess.run([*command, "kill-server"], capture_output=True, timeout=10)


@pytest.fixture
def stack(start_stack: StackFactory) -> Stack:
    return start_stack({"AGENTLAB_DEFAULT_BACKEND": "echo", "AGENTLAB_ECHO_TOKEN_DELAY_S": "0.05"})


def screen(tmux: list[str]) -> str:
    return subprocess.run(
        [*tmux, "capture-pane", "-p", "-t", "live"],
        capture_output=True,
        text=True,
        timeout=10,
        check=True,
    ).stdout


def test_orchestrate_draws_the_nodes_live_then_the_totals(tmux: list[str], stack: Stack) -> None:
    prompt = " ".join(f"w{n}" for n in range(25))
    shell = (
        f"{shlex.quote(AGENTLAB)} orchestrate {shlex.quote(prompt)} -m echo; "
        f"echo {DONE} $?; sleep 600"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AGENTLAB_", "NO_COLOR"))}
    env["AGENTLAB_TARGET"] = stack.gateway_grpc
    subprocess.run(
        [*tmux, "new-session", "-d", "-s", "live", "-x", "160", "-y", "50", shell],
        env=env,
        check=True,
        timeout=10,
    )

    # While it runs: a node's row says "running" and its text streams below.
    seen_running = False
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        shown = screen(tmux)
        if DONE in shown:
            break
        if "running" in shown and "plan" in shown:
            seen_running = True
        time.sleep(0.1)
    else:
        pytest.fail(f"agentlab orchestrate did not finish:\n{screen(tmux)}")
    assert seen_running, "never saw a node running"

    lines = shown.splitlines()
    assert f"{DONE} 0" in shown

    def row(name: str) -> list[str]:
        (found,) = [line for line in lines if line.strip("│┃ ").startswith(f"{name} ")]
        return [cell.strip() for cell in found.strip("│┃").split("│")]

    for node in ("plan", "answer", "review"):
        cells = row(node)
        assert cells[1] == "succeeded", cells
        # ttft, tokens, tok/s and duration are all filled in.
        assert all(cells[2:]), cells
        assert int(cells[3]) > 0
    total = row("Total")
    assert total[1] == "succeeded"
    assert any(line.startswith("Total: ") and "tok/s on echo" in line for line in lines)
    # The output follows the view, on stdout.
    assert "Request: w0 w1" in shown


def test_a_narrow_terminal_shows_the_newest_text_and_whole_totals(
    tmux: list[str], stack: Stack
) -> None:
    """On 80 columns, the running node's text wraps rather than being cut at
    the width: its newest words show while it runs (cut, the screen kept the
    oldest 80 characters of the tail), and so does the end of the totals."""
    words = [f"w{n}" for n in range(60)]
    shell = (
        f"{shlex.quote(AGENTLAB)} orchestrate {shlex.quote(' '.join(words))} -m echo; "
        f"echo {DONE} $?; sleep 600"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AGENTLAB_", "NO_COLOR"))}
    env["AGENTLAB_TARGET"] = stack.gateway_grpc
    subprocess.run(
        [*tmux, "new-session", "-d", "-s", "live", "-x", "80", "-y", "60", shell],
        env=env,
        check=True,
        timeout=10,
    )
    newest_seen_running = False
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        shown = screen(tmux)
        if DONE in shown:
            break
        # The plan node echoes the prompt word by word: its last words are
        # beyond the first line of its text.
        if "plan: …" in shown and f" {words[-5]} " in f"{' '.join(shown.split())} ":
            newest_seen_running = True
        time.sleep(0.1)
    else:
        pytest.fail(f"agentlab orchestrate did not finish:\n{screen(tmux)}")
    assert f"{DONE} 0" in shown
    assert newest_seen_running, f"the running node's newest words never showed:\n{shown}"
    assert "tok/s on echo (echo)" in " ".join(shown.split()), shown
