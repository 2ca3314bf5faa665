"""grpcurl, the real binary, with server reflection: straight to the service
and through Envoy's port."""

from __future__ import annotations

import json

import pytest

from agentlab.devstack import Stack
from tests.helpers.tools import json_stream, run, tool


@pytest.fixture(params=["service", "envoy"])
def address(request: pytest.FixtureRequest, model_stack: Stack) -> str:
    return model_stack.service_grpc if request.param == "service" else model_stack.gateway_grpc


def grpcurl(*args: str) -> str:
    result = run([tool("grpcurl"), "-plaintext", *args], timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_list_and_describe(address: str) -> None:
    services = grpcurl(address, "list").split()
    assert "agentlab.v1.LabService" in services
    assert "grpc.health.v1.Health" in services

    description = grpcurl(address, "describe", "agentlab.v1.LabService")
    for rpc in ("Execute", "Orchestrate", "ListModels", "GetHealth"):
        assert f"rpc {rpc}" in description
    assert "returns ( stream .agentlab.v1.OrchestrateResponse )" in description


def test_health_check_is_serving(address: str) -> None:
    assert json.loads(grpcurl(address, "grpc.health.v1.Health/Check")) == {"status": "SERVING"}
    lab = grpcurl(
        "-d", '{"service": "agentlab.v1.LabService"}', address, "grpc.health.v1.Health/Check"
    )
    assert json.loads(lab) == {"status": "SERVING"}


@pytest.mark.model
def test_execute(address: str) -> None:
    request = '{"prompt": "Dime 3 números primos", "model": "mistral7b", "max_tokens": 16}'
    answer = json.loads(grpcurl("-d", request, address, "agentlab.v1.LabService/Execute"))
    assert answer["output"].strip()
    # grpcurl 1.8 prints the proto field names, as the REST gateway does.
    assert answer["metrics"]["completion_tokens"] > 0
    assert answer["flow"][0]["node"] == "inference"


@pytest.mark.model
def test_orchestrate_streams_several_events(address: str) -> None:
    request = '{"prompt": "Name a fruit.", "max_tokens": 12, "temperature": 0}'
    events = [
        message["event"]
        for message in json_stream(
            grpcurl("-d", request, address, "agentlab.v1.LabService/Orchestrate")
        )
    ]
    assert len(events) > 5
    assert [event["sequence"] for event in events] == list(range(1, len(events) + 1))
    assert "execution_started" in events[0]
    assert "execution_completed" in events[-1]
    kinds = {
        next(key for key in event if key not in ("sequence", "time", "execution_id"))
        for event in events
    }
    assert {"node_started", "token_delta", "node_finished"} <= kinds


def test_health_watch_streams_the_serving_status(address: str) -> None:
    """grpc.health.v1.Health/Watch (what Envoy's, Kubernetes' and load
    balancers' gRPC health watchers call) sends the status, then holds the
    stream open for changes: it ends here only at grpcurl's -max-time
    (straight to the service as DEADLINE_EXCEEDED; Envoy resets a stream
    that outlives its grpc-timeout)."""
    result = run(
        [
            tool("grpcurl"),
            "-plaintext",
            "-max-time",
            "3",
            "-d",
            '{"service": ""}',
            address,
            "grpc.health.v1.Health/Watch",
        ],
        timeout=60,
    )
    assert json_stream(result.stdout) == [{"status": "SERVING"}], result.stdout + result.stderr
    assert "error id" not in result.stderr, result.stderr
    assert "DeadlineExceeded" in result.stderr or "RST_STREAM" in result.stderr, result.stderr
