"""Unknown JSON fields: 400 INVALID_ARGUMENT naming each, as unknown query
parameters are, on every route with a body; explicit null stays accepted."""

from __future__ import annotations

import json
import subprocess
from typing import Any

import pytest
from google.api import annotations_pb2, http_pb2  # type: ignore[import-untyped]
from google.protobuf import descriptor_pb2, descriptor_pool

from agentlab.api.json_fields import JSON_FIELDS, MAX_NAMED, unknown_fields
from agentlab.devstack import Stack
from tests.helpers.tools import run, tool


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


@pytest.mark.parametrize(
    "body",
    [
        '{"prompt": "x", "model": "echo", "max_token": 5,}',
        "{'prompt': 'x', 'model': 'echo', 'max_token': 5}",
        '{prompt: "x", model: "echo", max_token: 5}',
    ],
)
def test_a_body_that_is_not_strict_json_is_refused(echo_stack: Stack, body: str) -> None:
    """The transcoder's parser would take these and drop max_token unseen."""
    status, answer = post(echo_stack, "/api/v1/execute", body)
    assert status == 400
    assert violations(answer) == [("body", "JSON_NOT_STRICT")]


def test_a_flood_of_unknown_keys_is_one_small_400_and_spares_other_streams(
    echo_stack: Stack,
) -> None:
    """Hundreds of unknown keys, or one huge one, are answered 400 with a
    bounded list; the answer's trailers once reset Envoy's connection to the
    service, cutting every stream on it."""
    stream = subprocess.Popen(
        [
            tool("curl"),
            "-sS",
            "-N",
            f"{echo_stack.url}/api/v1/orchestrate?prompt="
            + "+".join(f"w{i}" for i in range(300))
            + "&model=echo&mode=EXECUTION_MODE_INFERENCE",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    many = "{" + ", ".join(f'"u{i}": 1' for i in range(700)) + ', "prompt": "x"}'
    status, answer = post(echo_stack, "/api/v1/execute", many)
    assert status == 400
    named = violations(answer)
    assert named[:MAX_NAMED] == [(f"u{i}", "UNKNOWN_FIELD") for i in range(MAX_NAMED)]
    assert named[MAX_NAMED:] == [("body", "UNKNOWN_FIELD")]
    status, answer = post(echo_stack, "/api/v1/execute", '{"' + "k" * 20_000 + '": 1}')
    assert status == 400
    assert ("k" * 64, "UNKNOWN_FIELD") in violations(answer)
    out, _ = stream.communicate(timeout=60)
    assert stream.returncode == 0
    assert '"execution_completed"' in out.strip().splitlines()[-1]


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


def test_a_body_bound_to_one_field_is_checked_against_that_fields_message() -> None:
    # No method of the contract has one yet (every body is "*"): a method
    # made for the test, with `body: "options"`.
    file = descriptor_pb2.FileDescriptorProto(
        name="edge_test/nested_body.proto", package="edgetest.v1", syntax="proto3"
    )
    options = file.message_type.add(name="Options")
    options.field.add(name="max_tokens", json_name="maxTokens", number=1, type=5, label=1)
    request = file.message_type.add(name="Request")
    request.field.add(
        name="options",
        json_name="options",
        number=1,
        type=11,
        label=1,
        type_name=".edgetest.v1.Options",
    )
    method = file.service.add(name="Nested").method.add(
        name="Run", input_type=".edgetest.v1.Request", output_type=".edgetest.v1.Options"
    )
    method.options.Extensions[annotations_pb2.http].CopyFrom(
        http_pb2.HttpRule(post="/v1/run", body="options")
    )
    descriptor_pool.Default().Add(file)

    found = unknown_fields(
        "/edgetest.v1.Nested/Run", [(JSON_FIELDS, "maxTokens,max_tokens,options,x%2Cy")]
    )
    assert [(v.field, v.description) for v in found] == [
        ("options", "is not a field of edgetest.v1.Options"),
        ("x,y", "is not a field of edgetest.v1.Options"),
    ]
