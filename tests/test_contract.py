"""The contract is linted, formatted and checked for breaking changes with
buf, as `make lint` does."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import grpc_tools
import pytest
from google.protobuf import descriptor_pb2
from grpc_tools import protoc

from agentlab.devstack import ROOT
from tests.helpers.tools import BIN, run, tool

sys.path.insert(0, str(ROOT / "scripts"))
import vendor_protovalidate


@pytest.mark.e2e
def test_buf_lint_is_clean() -> None:
    """STANDARD and COMMENTS (buf.yaml): every element of the contract documented."""
    result = run([tool("buf"), "lint"])
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.e2e
def test_buf_format_is_clean() -> None:
    result = run([tool("buf"), "format", "--diff", "--exit-code"])
    assert result.returncode == 0, result.stdout + result.stderr


def breaking_command() -> str:
    """The breaking check's line in the Makefile's lint recipe, as the shell
    would run it with this venv."""
    recipe = (ROOT / "Makefile").read_text().split("\nlint:", 1)[1].split("\n\n", 1)[0]
    [line] = [line.strip() for line in recipe.splitlines() if "breaking" in line]
    return line.replace("$(BIN)", str(BIN))


def check_breaking(cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        breaking_command(), shell=True, capture_output=True, text=True, timeout=60, cwd=cwd
    )


def git(repo: Path, *args: str) -> str:
    done = subprocess.run(
        ["git", *args], cwd=repo, capture_output=True, text=True, check=True, env=GIT_ENV
    )
    return done.stdout.strip()


GIT_ENV = {
    **os.environ,
    "GIT_AUTHOR_NAME": "test",
    "GIT_AUTHOR_EMAIL": "test@example.com",
    "GIT_COMMITTER_NAME": "test",
    "GIT_COMMITTER_EMAIL": "test@example.com",
}


@pytest.mark.e2e
def test_buf_breaking_compares_with_an_earlier_commit() -> None:
    """What `make lint` runs passes on this repository, and compares with a
    commit before HEAD, not with HEAD (on a clean clone, the work tree)."""
    result = check_breaking(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    match = re.search(r"against ([0-9a-f]{12}) ", result.stdout)
    assert match is not None, result.stdout
    head = git(ROOT, "rev-parse", "HEAD")
    assert not head.startswith(match.group(1)), result.stdout
    assert git(ROOT, "merge-base", "--is-ancestor", match.group(1), "HEAD") == ""


@pytest.fixture
def contract_repo(tmp_path: Path) -> Path:
    """A git repository of the contract alone, one commit on main: what a
    clone holds of it."""
    repo = tmp_path / "repo"
    shutil.copytree(ROOT / "protos", repo / "protos")
    shutil.copytree(ROOT / "third_party", repo / "third_party")
    shutil.copy(ROOT / "buf.yaml", repo / "buf.yaml")
    (repo / "scripts").mkdir()
    shutil.copy(ROOT / "scripts" / "check_breaking.py", repo / "scripts")
    git(repo, "init", "--quiet", "--initial-branch=main")
    git(repo, "add", ".")
    git(repo, "commit", "--quiet", "-m", "the released contract")
    return repo


# buf's exit code when the check ran and found something.
BUF_FOUND = 100
LAB_SERVICE = Path("protos/agentlab/v1/lab_service.proto")
EXECUTION = Path("protos/agentlab/v1/execution.proto")
# (file, text, its replacement, what buf's complaint names)
BREAKING_EDITS = {
    "a removed field": (
        EXECUTION,
        "  // The model name the request asked for.\n  string requested_model = 8;\n",
        "",
        "requested_model",
    ),
    "a renumbered field": (
        LAB_SERVICE,
        "optional int64 seed = 6;",
        "optional int64 seed = 9;",
        "seed",
    ),
    "a renamed RPC": (
        LAB_SERVICE,
        "rpc Execute(ExecuteRequest)",
        "rpc Run(ExecuteRequest)",
        "Execute",
    ),
}


@pytest.mark.e2e
@pytest.mark.parametrize("where", ["on a branch", "on main"])
@pytest.mark.parametrize("edit", list(BREAKING_EDITS))
def test_buf_breaking_catches_a_committed_breaking_edit(
    contract_repo: Path, edit: str, where: str
) -> None:
    """The edit committed on a branch (compared with where it left main) or
    on main itself (CI's clone of main: compared with HEAD's parent) fails
    the check, which names what broke."""
    path, old, new, named = BREAKING_EDITS[edit]
    if where == "on a branch":
        git(contract_repo, "switch", "--quiet", "-c", "change")
    proto = contract_repo / path
    text = proto.read_text()
    assert old in text
    proto.write_text(text.replace(old, new))
    assert check_breaking(contract_repo).returncode == BUF_FOUND  # uncommitted, too
    git(contract_repo, "commit", "--quiet", "-am", edit)

    result = check_breaking(contract_repo)
    assert result.returncode == BUF_FOUND, result.stdout + result.stderr
    assert f'"{named}"' in result.stdout + result.stderr


@pytest.mark.e2e
def test_buf_breaking_accepts_an_added_field(contract_repo: Path) -> None:
    proto = contract_repo / EXECUTION
    text = proto.read_text()
    old = "  string requested_model = 8;\n"
    proto.write_text(text.replace(old, old + "  // A new field.\n  string added = 99;\n"))
    git(contract_repo, "commit", "--quiet", "-am", "a field more")
    result = check_breaking(contract_repo)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.e2e
def test_a_clone_too_shallow_for_a_baseline_fails(contract_repo: Path, tmp_path: Path) -> None:
    """Not a silent pass: with no earlier commit to compare with, the check
    says how to fetch one."""
    (contract_repo / "README").write_text("second commit\n")
    git(contract_repo, "add", "README")
    git(contract_repo, "commit", "--quiet", "-m", "second")
    clone = tmp_path / "clone"
    git(tmp_path, "clone", "--quiet", "--depth=1", contract_repo.as_uri(), str(clone))
    result = check_breaking(clone)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "git fetch --unshallow" in result.stderr


def test_vendored_protovalidate_matches_the_installed_wheel(tmp_path: Path) -> None:
    """third_party/protovalidate is printed from the protovalidate wheel's
    descriptor (scripts/vendor_protovalidate.py): compiled again, it must give
    that descriptor byte for byte, so the rules protoc and buf see are the
    rules the validator runs. Upgrading the wheel without re-running the
    script fails here."""
    descriptor_set = tmp_path / "validate.binpb"
    vendored = ROOT / "third_party" / "protovalidate"
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    status = protoc.main(
        [
            "protoc",
            f"-I{vendored}",
            f"-I{well_known}",
            f"--descriptor_set_out={descriptor_set}",
            "buf/validate/validate.proto",
        ]
    )
    assert status == 0
    [compiled] = descriptor_pb2.FileDescriptorSet.FromString(descriptor_set.read_bytes()).file
    wheel = vendor_protovalidate.wheel_descriptor()
    assert compiled.SerializeToString() == wheel.SerializeToString()


@pytest.mark.e2e
def test_the_printer_reproduces_the_vendored_file(tmp_path: Path) -> None:
    """Nobody edited the vendored file by hand: printing it again gives it."""
    wheel = vendor_protovalidate.with_options_resolved(vendor_protovalidate.wheel_descriptor())
    printed = tmp_path / vendor_protovalidate.FILE
    printed.parent.mkdir(parents=True)
    printed.write_text(vendor_protovalidate.render(wheel))
    result = run([tool("buf"), "format", vendor_protovalidate.FILE], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout == vendor_protovalidate.TARGET.read_text()
