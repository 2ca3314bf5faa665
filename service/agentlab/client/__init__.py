"""A Python client for the Agent Lab Gateway (agentlab.v1.LabService).

``AsyncClient`` (grpc.aio) and ``Client`` (blocking) call every RPC; the
target and API key come from arguments or AGENTLAB_TARGET / AGENTLAB_API_KEY.
Reads (CompareExecutions among them) and keyed Execute, Orchestrate and
ReplayExecution calls are retried on UNAVAILABLE and RESOURCE_EXHAUSTED
(``RetryPolicy``, honouring RetryInfo); ``orchestrate``
and ``watch`` resume after a dropped connection, each event exactly once;
failures raise one ``LabServiceError`` subclass per gRPC status.

It depends on the generated stubs (agentlab.v1) and grpcio only, never on
the service's own packages (import-linter holds it to that).
"""

from agentlab.client.aio import AsyncClient, is_final, new_request_id
from agentlab.client.errors import (
    Aborted,
    AlreadyExists,
    Cancelled,
    DataLoss,
    DeadlineExceeded,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    LabServiceError,
    NotFound,
    OutOfRange,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
    Unimplemented,
    Unknown,
    error_for_status,
)
from agentlab.client.retries import NO_RETRIES, Retry, RetryPolicy
from agentlab.client.sync import Client

__all__ = [
    "NO_RETRIES",
    "Aborted",
    "AlreadyExists",
    "AsyncClient",
    "Cancelled",
    "Client",
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
    "Retry",
    "RetryPolicy",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
    "Unknown",
    "error_for_status",
    "is_final",
    "new_request_id",
]
