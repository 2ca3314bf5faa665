"""The one place where domain errors become gRPC statuses.

Every status carries exactly one google.rpc.ErrorInfo (reason, domain
"agentlab.v1", metadata) plus BadRequest or RetryInfo where they apply, in the
`grpc-status-details-bin` trailer that grpcio-status and Envoy's transcoder
read. A status with RetryInfo also carries a `retry-after` trailer (whole
seconds): on a call that fails before its first message gRPC sends one
trailers-only response, and Envoy's transcoder passes it on to REST clients
as the HTTP `Retry-After` header.
"""

from __future__ import annotations

import math
from typing import NoReturn

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2

from agentlab.core.errors import (
    AgentLabError,
    Cancelled,
    DeadlineExceeded,
    IdempotencyKeyReused,
    InternalError,
    InvalidArgument,
    LabFailed,
    LabUnavailable,
    NotFound,
    NotServing,
    ResourceExhausted,
    Unauthenticated,
)

__all__ = ["DOMAIN", "abort", "abort_with_status", "to_rpc_status"]

DOMAIN = "agentlab.v1"

_CODES: list[tuple[type[AgentLabError], grpc.StatusCode]] = [
    (InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (NotFound, grpc.StatusCode.NOT_FOUND),
    # The key names an execution that exists already, for another request:
    # 409 through Envoy. (The IETF draft suggests 422, which no gRPC code
    # becomes.)
    (IdempotencyKeyReused, grpc.StatusCode.ALREADY_EXISTS),
    (NotServing, grpc.StatusCode.UNAVAILABLE),
    (LabUnavailable, grpc.StatusCode.UNAVAILABLE),
    (ResourceExhausted, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (LabFailed, grpc.StatusCode.INTERNAL),
    (Cancelled, grpc.StatusCode.CANCELLED),
    (DeadlineExceeded, grpc.StatusCode.DEADLINE_EXCEEDED),
    (InternalError, grpc.StatusCode.INTERNAL),
    (Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
]


# What a backend's own HTTP status means for our caller. Anything else a
# backend fails with is INTERNAL: the caller cannot fix it.
_UPSTREAM_CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    404: grpc.StatusCode.NOT_FOUND,
    408: grpc.StatusCode.DEADLINE_EXCEEDED,
    413: grpc.StatusCode.INVALID_ARGUMENT,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    502: grpc.StatusCode.UNAVAILABLE,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}


def status_code(error: AgentLabError) -> grpc.StatusCode:
    if isinstance(error, LabFailed) and error.upstream_status is not None:
        return _UPSTREAM_CODES.get(error.upstream_status, grpc.StatusCode.INTERNAL)
    for error_type, code in _CODES:
        if isinstance(error, error_type):
            return code
    return grpc.StatusCode.INTERNAL


def _pack(message: object) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)  # type: ignore[arg-type]
    return packed


def to_rpc_status(error: AgentLabError) -> status_pb2.Status:
    code = status_code(error)
    details = [
        _pack(
            error_details_pb2.ErrorInfo(reason=error.reason, domain=DOMAIN, metadata=error.metadata)
        )
    ]
    if isinstance(error, InvalidArgument):
        violations = [
            error_details_pb2.BadRequest.FieldViolation(
                field=v.field, description=v.description, reason=v.reason
            )
            for v in error.violations
        ]
        details.append(_pack(error_details_pb2.BadRequest(field_violations=violations)))
    if isinstance(error, NotFound):
        details.append(
            _pack(
                error_details_pb2.ResourceInfo(
                    resource_type=error.resource_type,
                    resource_name=error.name,
                    description=error.message,
                )
            )
        )
    if (retry_after_s := _retry_after_s(error)) is not None:
        delay = duration_pb2.Duration()
        delay.FromMilliseconds(int(retry_after_s * 1000))
        details.append(_pack(error_details_pb2.RetryInfo(retry_delay=delay)))
    return status_pb2.Status(code=code.value[0], message=error.message, details=details)


def _retry_after_s(error: AgentLabError) -> float | None:
    if isinstance(error, LabUnavailable | ResourceExhausted):
        return error.retry_after_s
    return None


async def abort(
    context: grpc.aio.ServicerContext[object, object], error: AgentLabError
) -> NoReturn:
    """End the call with the error's status (raises grpc.aio.AbortError)."""
    retry_after_s = _retry_after_s(error)
    extra = () if retry_after_s is None else (("retry-after", str(math.ceil(retry_after_s))),)
    await abort_with_status(context, to_rpc_status(error), extra)


async def abort_with_status(
    context: grpc.aio.ServicerContext[object, object],
    status: status_pb2.Status,
    metadata: tuple[tuple[str, str], ...] = (),
) -> NoReturn:
    """End the call with a status already built (a stored execution's error);
    raises grpc.aio.AbortError."""
    code = _BY_NUMBER.get(status.code, grpc.StatusCode.UNKNOWN)
    await context.abort(
        code,
        status.message,
        trailing_metadata=(
            ("grpc-status-details-bin", status.SerializeToString()),
            *metadata,
        ),
    )
    # grpcio is untyped: its abort raises, but mypy cannot know.
    raise AssertionError("context.abort returned")


_BY_NUMBER = {code.value[0]: code for code in grpc.StatusCode}
