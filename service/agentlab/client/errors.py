"""Failed calls as exceptions: one type per gRPC status code, each carrying
the ``google.rpc.Status`` the gateway sent (``grpc-status-details-bin``) and
its details unpacked (ErrorInfo, BadRequest, RetryInfo).

``LabServiceError`` is the base: ``except LabServiceError`` catches every
failed call; ``except Unavailable`` one kind. ``error_from_rpc`` turns a
grpcio error into one of these.
"""

from __future__ import annotations

from typing import ClassVar, TypeVar

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2

__all__ = [
    "DOMAIN",
    "Aborted",
    "AlreadyExists",
    "Cancelled",
    "DataLoss",
    "DeadlineExceeded",
    "FailedPrecondition",
    "Internal",
    "InvalidArgument",
    "LabServiceError",
    "NotFound",
    "OutOfRange",
    "PermissionDenied",
    "ResourceExhausted",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
    "Unknown",
    "error_for_status",
    "error_from_rpc",
]

# ErrorInfo.domain of every error the gateway (service or Envoy) makes.
DOMAIN = "agentlab.v1"
_DETAILS_KEY = "grpc-status-details-bin"


class LabServiceError(Exception):
    """A call that ended with a status other than OK.

    ``status`` is the google.rpc.Status (code number, message, details as
    Any); the details most callers need are unpacked: ``error_info`` (its
    ``reason``, ``domain``, ``metadata``), ``violations`` (BadRequest's field
    violations, ``field`` and ``description``), ``retry_delay_s`` (RetryInfo,
    seconds, or the ``retry-after`` trailer's; None if neither was sent)."""

    code: ClassVar[grpc.StatusCode] = grpc.StatusCode.UNKNOWN

    def __init__(self, status: status_pb2.Status, *, retry_after_s: float | None = None) -> None:
        super().__init__(f"{self.code.name}: {status.message}")
        self.status = status
        self.message = status.message
        self.error_info: error_details_pb2.ErrorInfo | None = _first(
            status, error_details_pb2.ErrorInfo
        )
        bad_request = _first(status, error_details_pb2.BadRequest)
        self.violations: list[error_details_pb2.BadRequest.FieldViolation] = (
            list(bad_request.field_violations) if bad_request is not None else []
        )
        retry_info = _first(status, error_details_pb2.RetryInfo)
        self.retry_delay_s: float | None = (
            retry_info.retry_delay.ToTimedelta().total_seconds()
            if retry_info is not None
            else retry_after_s
        )

    @property
    def reason(self) -> str:
        """ErrorInfo's reason (``LAB_UNAVAILABLE``, ``INVALID_ARGUMENT``...), or ''."""
        return self.error_info.reason if self.error_info is not None else ""

    @property
    def from_service(self) -> bool:
        """Whether the service itself decided this (its ErrorInfo, not
        Envoy's ``source: gateway`` one, nor grpcio's own transport error)."""
        info = self.error_info
        return (
            info is not None
            and info.domain == DOMAIN
            and info.metadata.get("source", "") != "gateway"
        )


class Cancelled(LabServiceError):
    code = grpc.StatusCode.CANCELLED


class Unknown(LabServiceError):
    code = grpc.StatusCode.UNKNOWN


class InvalidArgument(LabServiceError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class DeadlineExceeded(LabServiceError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class NotFound(LabServiceError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(LabServiceError):
    code = grpc.StatusCode.ALREADY_EXISTS


class PermissionDenied(LabServiceError):
    code = grpc.StatusCode.PERMISSION_DENIED


class ResourceExhausted(LabServiceError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class FailedPrecondition(LabServiceError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class Aborted(LabServiceError):
    code = grpc.StatusCode.ABORTED


class OutOfRange(LabServiceError):
    code = grpc.StatusCode.OUT_OF_RANGE


class Unimplemented(LabServiceError):
    code = grpc.StatusCode.UNIMPLEMENTED


class Internal(LabServiceError):
    code = grpc.StatusCode.INTERNAL


class Unavailable(LabServiceError):
    code = grpc.StatusCode.UNAVAILABLE


class DataLoss(LabServiceError):
    code = grpc.StatusCode.DATA_LOSS


class Unauthenticated(LabServiceError):
    code = grpc.StatusCode.UNAUTHENTICATED


_BY_NUMBER: dict[int, type[LabServiceError]] = {
    error.code.value[0]: error
    for error in (
        Cancelled,
        Unknown,
        InvalidArgument,
        DeadlineExceeded,
        NotFound,
        AlreadyExists,
        PermissionDenied,
        ResourceExhausted,
        FailedPrecondition,
        Aborted,
        OutOfRange,
        Unimplemented,
        Internal,
        Unavailable,
        DataLoss,
        Unauthenticated,
    )
}


def error_for_status(
    status: status_pb2.Status, *, retry_after_s: float | None = None
) -> LabServiceError:
    """The exception for a google.rpc.Status (an ``execution_failed`` event's
    error, or a call's); an unknown code number is Unknown."""
    return _BY_NUMBER.get(status.code, Unknown)(status, retry_after_s=retry_after_s)


def error_from_rpc(error: grpc.RpcError) -> LabServiceError:
    """The exception for a failed grpcio call (sync or aio). Without a
    details trailer (grpcio's own transport errors), the status is built from
    the call's code and message, with no details."""
    code: grpc.StatusCode = error.code()
    message: str = error.details() or ""
    trailers = error.trailing_metadata() or ()
    status = status_pb2.Status(code=code.value[0], message=message)
    retry_after_s: float | None = None
    for key, value in trailers:
        if key == _DETAILS_KEY and isinstance(value, bytes):
            parsed = status_pb2.Status.FromString(value)
            # The trailer is authoritative only when it agrees with the call.
            if parsed.code == status.code:
                status = parsed
        elif key == "retry-after":
            try:
                retry_after_s = float(value)
            except ValueError:
                retry_after_s = None
    return error_for_status(status, retry_after_s=retry_after_s)


_Detail = TypeVar(
    "_Detail",
    error_details_pb2.ErrorInfo,
    error_details_pb2.BadRequest,
    error_details_pb2.RetryInfo,
)


def _first(status: status_pb2.Status, kind: type[_Detail]) -> _Detail | None:
    for detail in status.details:
        if detail.Is(kind.DESCRIPTOR):
            unpacked = kind()
            _unpack(detail, unpacked)
            return unpacked
    return None


def _unpack(detail: any_pb2.Any, into: object) -> None:
    detail.Unpack(into)  # type: ignore[arg-type]
