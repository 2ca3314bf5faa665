"""The contract is linted, formatted and checked for breaking changes with
buf, as `make lint` does."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import grpc_tools
import pytest
from google.protobuf import descriptor_pb2
from grpc_tools import protoc

from agentlab.devstack import ROOT
from tests.helpers.tools import run, tool

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


@pytest.mark.e2e
def test_buf_breaking_accepts_the_committed_contract() -> None:
    """What `make lint` runs: the work tree against the last commit."""
    result = run([tool("buf"), "breaking", "--against", ".git#ref=HEAD"])
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.e2e
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
