"""In-process: a google.rpc.Status becomes the exception of its code with
its details unpacked, and the retry policy's waits honour RetryInfo. (The
same, end to end through Envoy, is in test_client.py and
test_client_retries.py.)"""

from __future__ import annotations

import grpc
import pytest
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2

from agentlab.client import (
    Internal,
    InvalidArgument,
    LabServiceError,
    ResourceExhausted,
    RetryPolicy,
    Unavailable,
    Unknown,
    error_for_status,
)
from agentlab.client.settings import resolve_target


def packed(message: object) -> any_pb2.Any:
    detail = any_pb2.Any()
    detail.Pack(message)  # type: ignore[arg-type]
    return detail


def status(code: grpc.StatusCode, *details: object) -> status_pb2.Status:
    return status_pb2.Status(
        code=code.value[0], message="it went wrong", details=[packed(d) for d in details]
    )


@pytest.mark.parametrize("code", [c for c in grpc.StatusCode if c != grpc.StatusCode.OK])
def test_one_exception_type_per_status_code(code: grpc.StatusCode) -> None:
    error = error_for_status(status(code))
    assert isinstance(error, LabServiceError)
    assert error.code == code
    assert type(error).__name__.upper() == code.name.replace("_", "")
    assert str(error) == f"{code.name}: it went wrong"


def test_an_unknown_code_number_is_unknown() -> None:
    assert isinstance(error_for_status(status_pb2.Status(code=99, message="?")), Unknown)


def test_details_are_unpacked() -> None:
    delay = duration_pb2.Duration()
    delay.FromMilliseconds(1500)
    error = error_for_status(
        status(
            grpc.StatusCode.INVALID_ARGUMENT,
            error_details_pb2.ErrorInfo(
                reason="INVALID_ARGUMENT", domain="agentlab.v1", metadata={"x": "y"}
            ),
            error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(field="prompt", description="empty")
                ]
            ),
            error_details_pb2.RetryInfo(retry_delay=delay),
        )
    )
    assert isinstance(error, InvalidArgument)
    assert error.reason == "INVALID_ARGUMENT"
    assert error.error_info is not None
    assert dict(error.error_info.metadata) == {"x": "y"}
    assert [(v.field, v.description) for v in error.violations] == [("prompt", "empty")]
    assert error.retry_delay_s == 1.5
    assert error.from_service


def test_envoy_s_own_errors_and_bare_statuses_are_not_the_service_s() -> None:
    envoy = error_for_status(
        status(
            grpc.StatusCode.UNAVAILABLE,
            error_details_pb2.ErrorInfo(
                reason="UNAVAILABLE", domain="agentlab.v1", metadata={"source": "gateway"}
            ),
        )
    )
    bare = error_for_status(status(grpc.StatusCode.INTERNAL))
    assert isinstance(envoy, Unavailable)
    assert isinstance(bare, Internal)
    assert not envoy.from_service
    assert not bare.from_service
    assert bare.reason == ""
    assert bare.retry_delay_s is None


def test_the_wait_grows_is_capped_and_never_undercuts_retry_info() -> None:
    policy = RetryPolicy(initial_backoff_s=0.1, max_backoff_s=0.3, multiplier=2, jitter=0)
    assert [policy.delay_s(n) for n in (1, 2, 3, 4)] == pytest.approx([0.1, 0.2, 0.3, 0.3])

    delay = duration_pb2.Duration(seconds=2)
    asked = error_for_status(
        status(grpc.StatusCode.RESOURCE_EXHAUSTED, error_details_pb2.RetryInfo(retry_delay=delay))
    )
    assert isinstance(asked, ResourceExhausted)
    assert policy.delay_s(1, asked) == 2.0
    assert policy.retryable(asked)
    assert not policy.retryable(error_for_status(status(grpc.StatusCode.INTERNAL)))


def test_jitter_only_shortens_the_backoff() -> None:
    policy = RetryPolicy(initial_backoff_s=1.0, jitter=0.5)
    waits = [policy.delay_s(1) for _ in range(200)]
    assert all(0.5 <= wait <= 1.0 for wait in waits)
    assert len(set(waits)) > 1


@pytest.mark.parametrize(
    ("given", "dialled"),
    [
        ("localhost", "localhost:8000"),
        ("10.0.0.7", "10.0.0.7:8000"),
        ("gateway.internal:9000", "gateway.internal:9000"),
        ("http://localhost:8000/", "localhost:8000"),
        ("http://localhost", "localhost:8000"),
        ("unix:/run/agentlab.sock", "unix:/run/agentlab.sock"),
        ("dns:///gateway:8000", "dns:///gateway:8000"),
        ("[::1]:8000", "[::1]:8000"),
    ],
)
def test_a_target_without_a_port_dials_the_gateway_port_not_443(given: str, dialled: str) -> None:
    assert resolve_target(given, env={}) == dialled
    assert resolve_target(None, env={"AGENTLAB_TARGET": given}) == dialled
