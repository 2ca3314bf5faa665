"""API keys through the real Envoy and gRPC: who may call, what each caller
sees of the others' executions, and that keys never reach a log."""

from __future__ import annotations

import subprocess
import sys

import grpc
import httpx
import pytest

from agentlab.api.auth import digest
from agentlab.devstack import Stack
from agentlab.v1 import lab_service_pb2 as svc
from agentlab.v1 import lab_service_pb2_grpc as svc_grpc
from tests.helpers.callers import ALICE, BOB, CALLERS
from tests.helpers.stacks import StackFactory
from tests.helpers.tools import run, tool


@pytest.fixture
def stack(start_stack: StackFactory) -> Stack:
    return start_stack({"AGENTLAB_DEFAULT_BACKEND": "echo"}, keys=CALLERS)


def as_caller(key: str | None) -> dict[str, str]:
    return {} if key is None else {"Authorization": f"Bearer {key}"}


def execute(stack: Stack, key: str | None, prompt: str = "hola") -> httpx.Response:
    return httpx.post(
        f"{stack.url}/api/v1/execute", json={"prompt": prompt}, headers=as_caller(key), timeout=10
    )


def test_rest_needs_a_valid_key(stack: Stack) -> None:
    for key, reason in [(None, "API_KEY_MISSING"), ("not-a-key", "API_KEY_INVALID")]:
        answer = execute(stack, key)
        assert answer.status_code == 401, answer.text
        error = answer.json()
        assert error["code"] == grpc.StatusCode.UNAUTHENTICATED.value[0]
        [info] = [d for d in error["details"] if d["@type"].endswith("ErrorInfo")]
        assert info["reason"] == reason
    malformed = httpx.post(
        f"{stack.url}/api/v1/execute",
        json={"prompt": "x"},
        headers={"Authorization": f"Basic {ALICE}"},
        timeout=10,
    )
    assert malformed.status_code == 401
    ok = execute(stack, ALICE)
    assert ok.status_code == 200, ok.text
    assert ok.json()["output"] == "hola"


def test_health_and_reflection_need_no_key(stack: Stack) -> None:
    assert httpx.get(f"{stack.url}/api/v1/health", timeout=10).status_code == 200
    for address in (stack.gateway_grpc, stack.service_grpc):
        listed = run([tool("grpcurl"), "-plaintext", address, "list"])
        assert "agentlab.v1.LabService" in listed.stdout, listed.stderr
        health = run([tool("grpcurl"), "-plaintext", address, "grpc.health.v1.Health/Check"])
        assert "SERVING" in health.stdout, health.stderr
    # Everything else does, ListModels included.
    assert httpx.get(f"{stack.url}/api/v1/models", timeout=10).status_code == 401


def test_grpc_needs_a_valid_key(stack: Stack) -> None:
    with grpc.insecure_channel(stack.service_grpc) as channel:
        stub = svc_grpc.LabServiceStub(channel)
        with pytest.raises(grpc.RpcError) as raised:
            stub.Execute(svc.ExecuteRequest(prompt="x"), timeout=10)
        assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as streamed:
            list(stub.Orchestrate(svc.OrchestrateRequest(prompt="x"), timeout=10))
        assert streamed.value.code() == grpc.StatusCode.UNAUTHENTICATED
        answer = stub.Execute(
            svc.ExecuteRequest(prompt="x y"),
            metadata=[("authorization", f"Bearer {BOB}")],
            timeout=10,
        )
        assert answer.output == "x y"


def test_a_caller_sees_only_its_own_executions(stack: Stack) -> None:
    mine = execute(stack, ALICE, "alice's secret").json()["execution_id"]
    base = f"{stack.url}/api/v1/executions"

    def as_bob(method: str, path: str) -> httpx.Response:
        return httpx.request(
            method,
            f"{base}/{path}",
            headers=as_caller(BOB),
            json={} if method == "POST" else None,
            timeout=10,
        )

    for method, path in [("GET", mine), ("GET", f"{mine}:watch"), ("POST", f"{mine}:cancel")]:
        answer = as_bob(method, path)
        assert answer.status_code == 404, (path, answer.text)
    listed = httpx.get(base, headers=as_caller(BOB), timeout=10).json()["executions"]
    assert mine not in [e["execution_id"] for e in listed]

    own = httpx.get(f"{base}/{mine}", headers=as_caller(ALICE), timeout=10)
    assert own.status_code == 200
    assert own.json()["execution"]["prompt"] == "alice's secret"


def test_keys_never_reach_a_log(stack: Stack) -> None:
    execute(stack, ALICE)
    execute(stack, "wrong-" + BOB)
    with grpc.insecure_channel(stack.service_grpc) as channel:
        svc_grpc.LabServiceStub(channel).Execute(
            svc.ExecuteRequest(prompt="z"), metadata=[("authorization", f"Bearer {BOB}")]
        )
    stack.stop()  # flush and close the logs
    logs = [path for path in stack.log_dir.glob("*.log")]
    assert logs
    text = "".join(path.read_text(errors="replace") for path in logs)
    assert "POST /api/v1/execute" in text  # the logs are the real ones
    assert ALICE not in text
    assert BOB not in text


@pytest.mark.e2e
def test_the_digest_tool() -> None:
    printed = subprocess.run(
        [sys.executable, "-m", "agentlab.api.auth"],
        input=ALICE + "\n",
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert printed == digest(ALICE)
