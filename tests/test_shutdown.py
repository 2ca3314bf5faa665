"""SIGTERM drains the service: a stream in flight ends with its final event
(completed, or failed with CANCELLED and its flow if the grace period ran
out), a new call meanwhile is refused with a clean status, and the process
exits with code 0."""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator
from typing import Any

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from agentlab.devstack import Stack
from agentlab.v1 import lab_service_pb2 as svc
from agentlab.v1 import lab_service_pb2_grpc as svc_grpc
from tests.helpers.stacks import StackFactory

UNAVAILABLE = grpc.StatusCode.UNAVAILABLE.value[0]


@pytest.fixture
def stack(start_stack: StackFactory) -> Stack:
    # A grace period no busy machine runs out of: see the next test for that.
    return start_stack({"AGENTLAB_SHUTDOWN_GRACE_S": "60"})


def _events(lines: Iterator[str]) -> list[dict[str, Any]]:
    return [json.loads(line[5:])["event"] for line in lines if line.startswith("data:")]


def _draining(stack: Stack) -> bool:
    """The service no longer serves: its health is not SERVING, or it no
    longer takes calls at all."""
    with grpc.insecure_channel(stack.service_grpc) as channel:
        try:
            answer = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=1.0
            )
        except grpc.RpcError:
            return True
    return bool(answer.status != health_pb2.HealthCheckResponse.SERVING)


@pytest.mark.model
def test_sigterm_drains_the_stream_in_flight_refuses_new_calls_and_exits_0(stack: Stack) -> None:
    service = stack.service.proc
    assert service is not None
    events: list[dict[str, Any]] = []
    with (
        httpx.Client(timeout=60) as client,
        client.stream(
            "POST",
            f"{stack.url}/api/v1/orchestrate",
            json={"prompt": "Name three fruits.", "max_tokens": 60, "temperature": 0},
        ) as response,
    ):
        assert response.status_code == 200
        lines = response.iter_lines()
        for line in lines:
            if line.startswith("data:"):
                events.append(json.loads(line[5:])["event"])
                break
        service.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 5
        while not _draining(stack):
            assert time.monotonic() < deadline, "SIGTERM did not start the drain"
            time.sleep(0.01)

        # While the stream goes on, a new call is refused at once, cleanly:
        # the service closed its port, so Envoy answers 503 with its JSON
        # body, or UNAVAILABLE to a gRPC client.
        started = time.monotonic()
        refused = httpx.post(
            f"{stack.url}/api/v1/execute", json={"prompt": "Hi", "max_tokens": 5}, timeout=10
        )
        assert refused.status_code == 503, refused.text
        assert refused.headers["content-type"].startswith("application/json")
        assert refused.json()["code"] == UNAVAILABLE
        with (
            grpc.insecure_channel(stack.gateway_grpc) as channel,
            pytest.raises(grpc.RpcError) as raised,
        ):
            svc_grpc.LabServiceStub(channel).ListModels(svc.ListModelsRequest(), timeout=10)
        assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
        assert time.monotonic() - started < 5
        assert service.poll() is None, "the service had already exited: no drain was tested"

        events += _events(lines)

    assert "execution_started" in events[0]
    assert "execution_completed" in events[-1], events[-1]
    assert events[-1]["execution_completed"]["result"]["output"]
    assert [event["sequence"] for event in events] == list(range(1, len(events) + 1))
    assert service.wait(30) == 0


@pytest.fixture
def short_grace(start_stack: StackFactory) -> Stack:
    return start_stack({"AGENTLAB_SHUTDOWN_GRACE_S": "0.3"})


@pytest.mark.model
def test_a_stream_cut_by_the_end_of_the_grace_period_ends_with_its_failure(
    short_grace: Stack,
) -> None:
    """Cut, the stream still ends with execution_failed (CANCELLED, the flow
    so far): without it a REST client could not tell it from a complete one."""
    service = short_grace.service.proc
    assert service is not None
    with (
        httpx.Client(timeout=60) as client,
        client.stream(
            "POST",
            f"{short_grace.url}/api/v1/orchestrate",
            json={"prompt": "Name three fruits.", "max_tokens": 200},
        ) as response,
    ):
        assert response.status_code == 200
        lines = response.iter_lines()
        first: list[dict[str, Any]] = []
        for line in lines:
            if line.startswith("data:"):
                first.append(json.loads(line[5:])["event"])
                break
        service.send_signal(signal.SIGTERM)
        events = first + _events(lines)

    failed = events[-1]["execution_failed"]
    assert failed["error"]["code"] == grpc.StatusCode.CANCELLED.value[0]
    assert failed["flow"], "the flow so far"
    assert {step["status"] for step in failed["flow"]} <= {
        "STEP_STATUS_SUCCEEDED",
        "STEP_STATUS_CANCELLED",
    }
    assert [event["sequence"] for event in events] == list(range(1, len(events) + 1))
    assert service.wait(30) == 0
