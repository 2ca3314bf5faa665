"""Request rules are written in the contract (buf.validate) and checked in one
interceptor: a bad request is INVALID_ARGUMENT with a google.rpc.BadRequest
that names every violated field, over gRPC, through grpcurl, and as HTTP 400
JSON through Envoy."""

from __future__ import annotations

import json
import math
from typing import Any

import grpc
import httpx
import pytest
from google.protobuf.message import Message
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from agentlab.api.validation import RequestRules
from agentlab.core.errors import FieldViolation, InvalidArgument
from agentlab.devstack import Stack
from agentlab.v1 import lab_service_pb2 as svc
from agentlab.v1 import lab_service_pb2_grpc as svc_grpc
from tests.helpers.statuses import details_of
from tests.helpers.tools import run, tool


def undefined(number: int) -> Any:
    """An enum number the contract does not define: proto3 enums are open,
    the generated stubs' types are not."""
    return number


RULES = RequestRules(max_prompt_chars=50)
EXECUTION_ID = "0123456789abcdef0123456789abcdef"


def fields(request: Message, rules: RequestRules = RULES) -> list[str]:
    return [violation.field for violation in rules.violations(request)]


@pytest.mark.parametrize(
    "request_type", [svc.ExecuteRequest, svc.OrchestrateRequest], ids=["execute", "orchestrate"]
)
def test_a_valid_request_breaks_no_rule(request_type: type[Message]) -> None:
    request = request_type(
        prompt="Hello",
        model="llama3.1:8b-instruct",
        mode=1,
        temperature=0.0,
        max_tokens=32768,
        seed=-1,
        request_id="order-17/attempt:2",
    )
    assert fields(request) == []
    assert fields(request_type(prompt="x" * 50, temperature=2.0, max_tokens=1)) == []


@pytest.mark.parametrize(
    ("request_message", "expected"),
    [
        (svc.ExecuteRequest(prompt=""), ["prompt"]),
        (svc.ExecuteRequest(prompt=" \n\t"), ["prompt"]),
        (svc.ExecuteRequest(prompt="x" * 51), ["prompt"]),
        (svc.ExecuteRequest(prompt="hi", model="no spaces"), ["model"]),
        (svc.ExecuteRequest(prompt="hi", model="m" * 129), ["model"]),
        (svc.ExecuteRequest(prompt="hi", mode=undefined(9)), ["mode"]),
        (svc.ExecuteRequest(prompt="hi", temperature=-0.1), ["temperature"]),
        (svc.ExecuteRequest(prompt="hi", temperature=2.01), ["temperature"]),
        (svc.ExecuteRequest(prompt="hi", temperature=math.nan), ["temperature"]),
        (svc.ExecuteRequest(prompt="hi", max_tokens=0), ["max_tokens"]),
        (svc.ExecuteRequest(prompt="hi", max_tokens=32769), ["max_tokens"]),
        (svc.ExecuteRequest(prompt="hi", request_id="has space"), ["request_id"]),
        (svc.ExecuteRequest(prompt="hi", request_id="r" * 129), ["request_id"]),
        (svc.OrchestrateRequest(prompt="hi", on_disconnect=undefined(7)), ["on_disconnect"]),
        (svc.ListExecutionsRequest(page_size=-1), ["page_size"]),
        (svc.ListExecutionsRequest(page_size=101), ["page_size"]),
        (svc.ListExecutionsRequest(page_token="t" * 513), ["page_token"]),
        (svc.ListExecutionsRequest(state=undefined(42)), ["state"]),
        (svc.ListExecutionsRequest(view=undefined(3)), ["view"]),
        (svc.GetExecutionRequest(execution_id=EXECUTION_ID, view=undefined(3)), ["view"]),
        (svc.GetExecutionRequest(execution_id=""), ["execution_id"]),
        (svc.GetExecutionRequest(execution_id=EXECUTION_ID.upper()), ["execution_id"]),
        (svc.CancelExecutionRequest(execution_id="../etc"), ["execution_id"]),
        (svc.WatchExecutionRequest(execution_id=EXECUTION_ID + "0"), ["execution_id"]),
        (svc.GetHealthRequest(service="s" * 257), ["service"]),
    ],
)
def test_each_rule_names_its_field(request_message: Message, expected: list[str]) -> None:
    assert fields(request_message) == expected


def test_every_violated_field_is_named_once() -> None:
    request = svc.ExecuteRequest(
        prompt=" ", model="?", mode=undefined(5), temperature=3, max_tokens=-4, request_id="a b"
    )
    assert fields(request) == ["prompt", "model", "mode", "temperature", "max_tokens", "request_id"]
    # Over the contract's maximum too: one violation for the prompt, not two.
    assert fields(svc.ExecuteRequest(prompt="x" * 1_000_001)) == ["prompt"]


def test_the_configured_prompt_maximum_is_tighter_than_the_contract() -> None:
    [violation] = RULES.violations(svc.ExecuteRequest(prompt="x" * 51))
    assert violation == FieldViolation("prompt", "must be at most 50 characters", "STRING_MAX_LEN")
    roomy = RequestRules(max_prompt_chars=2_000_000)
    assert fields(svc.ExecuteRequest(prompt="x" * 1_000_000), roomy) == []
    assert fields(svc.ExecuteRequest(prompt="x" * 1_000_001), roomy) == ["prompt"]


def test_check_raises_one_error_listing_all() -> None:
    with pytest.raises(InvalidArgument) as raised:
        RULES.check(svc.ExecuteRequest(prompt="", max_tokens=0))
    error = raised.value
    assert [v.field for v in error.violations] == ["prompt", "max_tokens"]
    assert error.metadata == {"field": "prompt,max_tokens"}
    assert error.message.startswith("prompt: must be at least 1 characters; max_tokens: must be")


BAD_EXECUTE: dict[str, Any] = {
    "prompt": "   ",
    "model": "bad model",
    "mode": 9,
    "temperature": 7.5,
    "max_tokens": 0,
    "request_id": "with space",
}
BAD_FIELDS = ["prompt", "model", "mode", "temperature", "max_tokens", "request_id"]


def violations_of(body: dict[str, Any]) -> list[str]:
    [bad_request] = details_of(body, "BadRequest")
    return [violation["field"] for violation in bad_request["field_violations"]]


def test_rest_gets_400_listing_every_field(echo_stack: Stack) -> None:
    for route in ("execute", "orchestrate"):
        body = {**BAD_EXECUTE, "mode": 9}
        answer = httpx.post(f"{echo_stack.url}/api/v1/{route}", json=body, timeout=10)
        assert answer.status_code == 400, answer.text
        assert answer.headers["content-type"].startswith("application/json")
        error = answer.json()
        assert error["code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0]
        assert violations_of(error) == BAD_FIELDS
        [info] = details_of(error, "ErrorInfo")
        assert info["reason"] == "INVALID_ARGUMENT"
        assert info["domain"] == "agentlab.v1"
        assert info["metadata"]["field"] == ",".join(BAD_FIELDS)
        [bad_request] = details_of(error, "BadRequest")
        described = {
            v["field"]: (v["reason"], v["description"]) for v in bad_request["field_violations"]
        }
        assert described["temperature"] == (
            "DOUBLE_GTE_LTE",
            "must be greater than or equal to 0 and less than or equal to 2",
        )
        assert described["prompt"] == (
            "PROMPT_NOT_BLANK",
            "must contain at least one non-whitespace character",
        )
        assert described["mode"][0] == "ENUM_DEFINED_ONLY"


def test_rest_query_and_path_parameters_are_checked(echo_stack: Stack) -> None:
    listed = httpx.get(
        f"{echo_stack.url}/api/v1/executions",
        params={"page_size": 500, "model": "a b"},
        timeout=10,
    )
    assert listed.status_code == 400, listed.text
    assert violations_of(listed.json()) == ["page_size", "model"]

    for method, path in [
        ("GET", "not-an-id"),
        ("GET", "not-an-id:watch"),
        ("POST", "not-an-id:cancel"),
    ]:
        answer = httpx.request(
            method,
            f"{echo_stack.url}/api/v1/executions/{path}",
            json={} if method == "POST" else None,
            timeout=10,
        )
        assert answer.status_code == 400, (path, answer.text)
        assert violations_of(answer.json()) == ["execution_id"]


def test_grpc_gets_the_same_bad_request(echo_stack: Stack) -> None:
    request = svc.ExecuteRequest(**BAD_EXECUTE)
    with grpc.insecure_channel(echo_stack.service_grpc) as channel:
        stub = svc_grpc.LabServiceStub(channel)
        with pytest.raises(grpc.RpcError) as raised:
            stub.Execute(request, timeout=10)
        with pytest.raises(grpc.RpcError) as streamed:
            next(
                stub.Orchestrate(
                    svc.OrchestrateRequest(prompt="", on_disconnect=undefined(9)), timeout=10
                )
            )
        # Still serving: the next good request runs.
        assert stub.Execute(svc.ExecuteRequest(prompt="one two", model="echo"), timeout=10).output
    for error, expected in [
        (raised.value, BAD_FIELDS),
        (streamed.value, ["prompt", "on_disconnect"]),
    ]:
        status = rpc_status.from_call(error)
        assert status is not None
        assert status.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
        bad_request = error_details_pb2.BadRequest()
        [packed] = [d for d in status.details if d.Is(bad_request.DESCRIPTOR)]
        packed.Unpack(bad_request)
        assert [v.field for v in bad_request.field_violations] == expected


def test_grpcurl_shows_the_violations(echo_stack: Stack) -> None:
    result = run(
        [
            tool("grpcurl"),
            "-plaintext",
            "-format-error",
            "-d",
            json.dumps({"prompt": "", "temperature": -1}),
            echo_stack.service_grpc,
            "agentlab.v1.LabService/Execute",
        ]
    )
    assert result.returncode != 0
    error = json.loads(result.stderr)  # grpcurl prints a failed call's status there
    assert error["code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert violations_of(error) == ["prompt", "temperature"]
