"""Generate the Python stubs and Envoy's descriptor set from protos/.

Both are build output: made by `make setup`, never edited, never committed.
protovalidate's `buf/validate/validate.proto` gets Python stubs too: the
contract's stubs import them to register the rules' option extensions, and
the protovalidate wheel carries them only for its own protobuf runtime.
"""

from __future__ import annotations

import sys
from pathlib import Path

import gen_openapi
import grpc_tools
from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
GOOGLEAPIS = ROOT / "third_party" / "googleapis"
PROTOVALIDATE = ROOT / "third_party" / "protovalidate"
STUBS_ROOT = ROOT / "service"
DESCRIPTOR = ROOT / "build" / "agentlab.pb"
WELL_KNOWN = Path(grpc_tools.__file__).parent / "_proto"


def _protoc(*args: str) -> None:
    includes = [f"-I{PROTOS}", f"-I{GOOGLEAPIS}", f"-I{PROTOVALIDATE}", f"-I{WELL_KNOWN}"]
    if protoc.main(["protoc", *includes, *args]) != 0:
        sys.exit(f"protoc failed: {' '.join(args)}")


def main() -> None:
    contract = sorted(str(p.relative_to(PROTOS)) for p in PROTOS.rglob("*.proto"))
    rules = sorted(str(p.relative_to(PROTOVALIDATE)) for p in PROTOVALIDATE.rglob("*.proto"))
    _protoc(
        f"--python_out={STUBS_ROOT}",
        f"--pyi_out={STUBS_ROOT}",
        f"--grpc_python_out={STUBS_ROOT}",
        *contract,
    )
    _protoc(f"--python_out={STUBS_ROOT}", f"--pyi_out={STUBS_ROOT}", *rules)
    for package in {Path(p).parent for p in [*contract, *rules]}:
        for directory in (package, *package.parents[:-1]):
            (STUBS_ROOT / directory / "__init__.py").touch()

    DESCRIPTOR.parent.mkdir(parents=True, exist_ok=True)
    # error_details.proto is not imported by the contract, but Envoy needs it in
    # the set to print the google.rpc details of an error as JSON.
    _protoc(
        "--include_imports",
        "--include_source_info",
        f"--descriptor_set_out={DESCRIPTOR}",
        *contract,
        "google/rpc/error_details.proto",
    )
    print(f"generated stubs under {STUBS_ROOT / 'agentlab'} and {DESCRIPTOR}")
    gen_openapi.write_openapi(DESCRIPTOR)


if __name__ == "__main__":
    main()
