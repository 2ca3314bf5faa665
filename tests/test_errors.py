"""Bad input and broken parts: every error is a clear status, as JSON with the
matching HTTP status over REST, and the service goes on serving."""

from __future__ import annotations

import json
from typing import Any

import grpc
import httpx
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from agentlab.devstack import Stack
from agentlab.v1 import lab_service_pb2 as svc
from agentlab.v1 import lab_service_pb2_grpc as svc_grpc
from tests.helpers.statuses import details_of
from tests.helpers.tools import run, tool


@pytest.mark.parametrize("prompt", ["", "   \n\t"])
def test_empty_prompt_is_invalid_argument_naming_the_field(echo_stack: Stack, prompt: str) -> None:
    for route in ("execute", "orchestrate"):
        answer = httpx.post(
            f"{echo_stack.url}/api/v1/{route}", json={"prompt": prompt, "model": "x"}, timeout=10
        )
        assert answer.status_code == 400, answer.text
        assert answer.headers["content-type"].startswith("application/json")
        body = answer.json()
        assert body["code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0]
        assert "prompt" in body["message"]
        [bad_request] = details_of(body, "BadRequest")
        assert [v["field"] for v in bad_request["field_violations"]] == ["prompt"]
        [info] = details_of(body, "ErrorInfo")
        assert info["domain"] == "agentlab.v1"

    # The same status, with the same details, for a gRPC client.
    with grpc.insecure_channel(echo_stack.service_grpc) as channel:
        stub = svc_grpc.LabServiceStub(channel)
        with pytest.raises(grpc.RpcError) as raised:
            stub.Execute(svc.ExecuteRequest(prompt=prompt), timeout=10)
    status = rpc_status.from_call(raised.value)
    assert status is not None
    assert status.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    violations = error_details_pb2.BadRequest()
    assert any(detail.Unpack(violations) for detail in status.details)
    assert violations.field_violations[0].field == "prompt"


def test_out_of_range_option_names_its_field(echo_stack: Stack) -> None:
    answer = httpx.post(
        f"{echo_stack.url}/api/v1/execute", json={"prompt": "hi", "max_tokens": 0}, timeout=10
    )
    assert answer.status_code == 400
    [bad_request] = details_of(answer.json(), "BadRequest")
    assert bad_request["field_violations"][0]["field"] == "max_tokens"


@pytest.mark.parametrize(
    "body",
    ['{"prompt": ', "prompt=hi", '{"prompt": 42}', '{"max_tokens": "many"}'],
    ids=["truncated", "not-json", "wrong-type", "wrong-number"],
)
def test_malformed_json_is_400_with_a_json_body(echo_stack: Stack, body: str) -> None:
    answer = httpx.post(
        f"{echo_stack.url}/api/v1/execute",
        content=body,
        headers={"Content-Type": "application/json"},
        timeout=10,
    )
    assert answer.status_code == 400, answer.text
    assert answer.headers["content-type"].startswith("application/json")
    error = answer.json()
    assert error["code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert error["message"]
    assert gateway_reason(error) == "INVALID_ARGUMENT"


def gateway_reason(error: dict[str, Any]) -> str:
    """The reason of the ErrorInfo Envoy adds to a reply of its own."""
    [info] = error["details"]
    assert info["@type"] == "type.googleapis.com/google.rpc.ErrorInfo"
    assert (info["domain"], info["metadata"]) == ("agentlab.v1", {"source": "gateway"})
    return str(info["reason"])


@pytest.mark.parametrize(
    ("method", "path"),
    # GET / is the playground page; POST / and an asset it does not have are not.
    [
        ("GET", "/api/v1/nothing-here"),
        ("POST", "/api/v2/execute"),
        ("POST", "/"),
        ("GET", "/playground/missing.js"),
    ],
)
def test_unknown_route_is_404_with_a_json_body(echo_stack: Stack, method: str, path: str) -> None:
    answer = httpx.request(method, f"{echo_stack.url}{path}", timeout=10)
    assert answer.status_code == 404, answer.text
    assert answer.headers["content-type"].startswith("application/json")
    assert answer.json()["code"] == grpc.StatusCode.NOT_FOUND.value[0]
    assert gateway_reason(answer.json()) == "NOT_FOUND"


def test_a_body_over_the_limit_is_413_with_a_json_body(echo_stack: Stack) -> None:
    answer = httpx.post(
        f"{echo_stack.url}/api/v1/execute", json={"prompt": "x" * (2 * 1024 * 1024)}, timeout=10
    )
    assert answer.status_code == 413, answer.text
    assert answer.json()["code"] == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
    assert gateway_reason(answer.json()) == "REQUEST_TOO_LARGE"


def test_service_down_is_503_json_and_recovers(echo_stack: Stack) -> None:
    def execute() -> httpx.Response:
        return httpx.post(f"{echo_stack.url}/api/v1/execute", json={"prompt": "a b"}, timeout=10)

    assert execute().status_code == 200
    echo_stack.service.stop()

    down = execute()
    assert down.status_code == 503, down.text
    assert down.headers["content-type"].startswith("application/json")
    assert down.json()["code"] == grpc.StatusCode.UNAVAILABLE.value[0]
    assert gateway_reason(down.json()) == "UNAVAILABLE"

    stream = httpx.post(f"{echo_stack.url}/api/v1/orchestrate", json={"prompt": "a"}, timeout=10)
    assert stream.status_code == 503
    assert stream.json()["code"] == grpc.StatusCode.UNAVAILABLE.value[0]

    # Native gRPC through Envoy's port sees the status itself, not JSON.
    grpcurl = run(
        [
            tool("grpcurl"),
            "-plaintext",
            "-d",
            '{"prompt": "a"}',
            "-protoset",
            "build/agentlab.pb",
            echo_stack.gateway_grpc,
            "agentlab.v1.LabService/Execute",
        ]
    )
    assert grpcurl.returncode != 0
    assert "Unavailable" in grpcurl.stderr, grpcurl.stderr

    # Back on the same port, without touching Envoy.
    echo_stack.service.start()
    recovered = execute()
    assert recovered.status_code == 200, recovered.text
    assert recovered.json()["output"] == "a b"


def test_errors_do_not_stop_the_service(echo_stack: Stack) -> None:
    bad = [
        {"prompt": ""},
        {"prompt": "x", "max_tokens": -5},
        {"prompt": "x", "temperature": 99},
    ]
    for body in bad:
        assert httpx.post(f"{echo_stack.url}/api/v1/execute", json=body, timeout=10).is_client_error
    good = httpx.post(f"{echo_stack.url}/api/v1/execute", json={"prompt": "still here"}, timeout=10)
    assert good.status_code == 200
    assert good.json()["output"] == "still here"
    health = httpx.get(f"{echo_stack.url}/api/v1/health", timeout=10)
    assert json.loads(health.text)["status"] == "SERVING_STATUS_SERVING"
