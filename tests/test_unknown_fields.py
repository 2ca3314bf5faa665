"""Unknown JSON fields: 400 INVALID_ARGUMENT naming each, as unknown query
parameters are, on every route with a body; explicit null stays accepted."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.conftest import Stack, run, tool


def post(stack: Stack, path: str, body: str) -> tuple[int, dict[str, Any]]:
    result = run(
        [
            "curl",
            "-sS",
            "-w",
            "\n%{http_code}",
            "-X",
            "POST",
            f"{stack.url}{path}",
            "-H",
            "Content-Type: application/json",
            "-d",
            body,
        ]
    )
    assert result.returncode == 0, result.stderr
    text, _, status = result.stdout.rpartition("\n")
    if path.endswith("orchestrate") and status == "200":
        return 200, {}
    return int(status), json.loads(text)


def violations(body: dict[str, Any]) -> list[tuple[str, str]]:
    [bad_request] = [d for d in body["details"] if d["@type"].endswith("google.rpc.BadRequest")]
    return [(v["field"], v["reason"]) for v in bad_request["field_violations"]]


@pytest.mark.parametrize("route", ["/api/v1/execute", "/api/v1/orchestrate"])
def test_a_misspelt_field_is_invalid_argument_naming_it(echo_stack: Stack, route: str) -> None:
    status, body = post(echo_stack, route, '{"prompt": "x", "model": "echo", "max_token": 5}')
    assert status == 400
    assert body["code"] == 3
    assert violations(body) == [("max_token", "UNKNOWN_FIELD")]
    assert "max_token" in body["message"]


def test_every_unknown_field_is_named_with_every_broken_rule(echo_stack: Stack) -> None:
    status, body = post(
        echo_stack,
        "/api/v1/execute",
        '{"prompt": "x", "temperature": 9, "options": {"max_tokens": 1}, "a\\"b": [1, "}"]}',
    )
    assert status == 400
    assert violations(body) == [
        ("options", "UNKNOWN_FIELD"),
        ('a"b', "UNKNOWN_FIELD"),
        ("temperature", "DOUBLE_GTE_LTE"),
    ]


def test_cancel_refuses_unknown_fields_too(echo_stack: Stack) -> None:
    execution_id = "0" * 32
    status, body = post(echo_stack, f"/api/v1/executions/{execution_id}:cancel", '{"force": true}')
    assert status == 400
    assert violations(body) == [("force", "UNKNOWN_FIELD")]


@pytest.mark.parametrize(
    "body",
    [
        '{"prompt": "x", "model": "echo", "max_tokens": null, "temperature": null, "seed": null}',
        # The transcoder takes JSON names as well as proto names.
        '{"prompt": "x", "model": "echo", "maxTokens": 3, "requestId": "json-names-1"}',
        '{"prompt": "x", "model": "echo", "mode": "EXECUTION_MODE_INFERENCE", "background": false}',
    ],
)
def test_known_fields_and_explicit_null_are_accepted(echo_stack: Stack, body: str) -> None:
    status, answer = post(echo_stack, "/api/v1/execute", body)
    assert status == 200, answer
    assert answer["output"] == "x"


def test_a_forged_field_list_is_replaced_by_envoy(echo_stack: Stack) -> None:
    result = run(
        [
            "curl",
            "-sS",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "-X",
            "POST",
            f"{echo_stack.url}/api/v1/execute",
            "-H",
            "x-agentlab-json-fields: bogus",
            "-d",
            '{"prompt": "x", "model": "echo"}',
        ]
    )
    assert result.stdout == "200"


def test_native_grpc_calls_are_not_affected(echo_stack: Stack) -> None:
    result = run(
        [
            tool("grpcurl"),
            "-plaintext",
            "-d",
            '{"prompt": "x", "model": "echo"}',
            echo_stack.gateway_grpc,
            "agentlab.v1.LabService/Execute",
        ]
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["output"] == "x"
