"""Command-line tools run as a user runs them, and reading what they print."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from agentlab.devstack import ROOT

BIN = Path(sys.executable).parent


# Execs its arguments with SIGINT at its default, as a terminal's foreground
# command has it. A test run started in the background by a shell without
# job control (`pytest &`, nohup) has SIGINT ignored, which its children
# inherit, and a command that ignores SIGINT rightly ignores a test's Ctrl-C.
_INTERRUPTIBLE = (
    "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
    "os.execv(sys.argv[1], sys.argv[1:])"
)


def interruptible(cmd: list[str]) -> list[str]:
    """``cmd`` (its program an absolute path) to run as a foreground
    command would: for the tests that send it a Ctrl-C."""
    return [sys.executable, "-c", _INTERRUPTIBLE, *cmd]


def tool(name: str) -> str:
    """A command-line tool from the venv (grpcurl, buf, envoy) or PATH."""
    found = shutil.which(name, path=str(BIN)) or shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed: run `make setup`")
    return found


def run(
    cmd: list[str], timeout: float = 60.0, cwd: Path = ROOT
) -> subprocess.CompletedProcess[str]:
    """Run a command as a user would from the repository (or ``cwd``)."""
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=cwd)


def json_stream(text: str) -> list[dict[str, Any]]:
    """grpcurl prints one JSON document per message."""
    decoder, documents, position = json.JSONDecoder(), [], 0
    while position < len(text):
        if text[position].isspace():
            position += 1
            continue
        document, position = decoder.raw_decode(text, position)
        documents.append(document)
    return documents


def run_service(
    settings: dict[str, str], timeout: float = 60.0
) -> subprocess.CompletedProcess[str]:
    """`python -m agentlab` to its exit, configured by ``settings`` alone (no
    AGENTLAB_* variable of this process): for start-ups that must refuse."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTLAB_")}
    return subprocess.run(
        [sys.executable, "-m", "agentlab"],
        env=env | settings,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
