"""The contract is linted, formatted and checked for breaking changes with
buf, as `make lint` does."""

from __future__ import annotations

import shutil
from pathlib import Path

from agentlab.devstack import ROOT
from tests.conftest import run, tool


def test_buf_lint_is_clean() -> None:
    """STANDARD and COMMENTS (buf.yaml): every element of the contract documented."""
    result = run([tool("buf"), "lint"])
    assert result.returncode == 0, result.stdout + result.stderr


def test_buf_format_is_clean() -> None:
    result = run([tool("buf"), "format", "--diff", "--exit-code"])
    assert result.returncode == 0, result.stdout + result.stderr


def test_buf_breaking_accepts_the_committed_contract() -> None:
    """What `make lint` runs: the work tree against the last commit."""
    result = run([tool("buf"), "breaking", "--against", ".git#ref=HEAD"])
    assert result.returncode == 0, result.stdout + result.stderr


def test_buf_breaking_catches_a_removed_field(tmp_path: Path) -> None:
    """The breaking check is configured to bite: a copy of the contract with
    a field removed fails against the original."""
    copy = tmp_path / "repo"
    shutil.copytree(ROOT / "protos", copy / "protos")
    shutil.copytree(ROOT / "third_party", copy / "third_party")
    shutil.copy(ROOT / "buf.yaml", copy / "buf.yaml")
    proto = copy / "protos" / "agentlab" / "v1" / "execution.proto"
    text = proto.read_text()
    field = "  // The model name the request asked for.\n  string requested_model = 8;\n"
    assert field in text
    proto.write_text(text.replace(field, ""))

    result = run([tool("buf"), "breaking", "--against", str(ROOT)], cwd=copy)
    assert result.returncode != 0
    assert "requested_model" in result.stdout + result.stderr
