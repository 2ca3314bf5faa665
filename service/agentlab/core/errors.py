"""Domain errors. Each has a stable UPPER_SNAKE reason and metadata; the
executions' codec (executions/codec.py) is the one place that turns them into
google.rpc statuses."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "AgentLabError",
    "Cancelled",
    "DeadlineExceeded",
    "FieldViolation",
    "IdempotencyKeyReused",
    "InternalError",
    "InvalidArgument",
    "LabFailed",
    "LabUnavailable",
    "ModelNotFound",
    "NotFinished",
    "NotFound",
    "NotServing",
    "Unauthenticated",
    "new_error_id",
]


class AgentLabError(Exception):
    """Base of every error the service reports to its callers."""

    reason = "AGENTLAB_ERROR"

    def __init__(self, message: str, **metadata: str) -> None:
        super().__init__(message)
        self.message = message
        self.metadata = metadata


@dataclass(frozen=True)
class FieldViolation:
    field: str
    description: str
    # UPPER_SNAKE, for programs: which rule, as in google.rpc.BadRequest.
    reason: str = ""


class InvalidArgument(AgentLabError):
    """Request fields are wrong; the caller must change them. Every violated
    field is named, so one round trip shows the caller all it has to fix."""

    reason = "INVALID_ARGUMENT"

    def __init__(
        self, field: str, description: str, *more: FieldViolation, reason: str = ""
    ) -> None:
        self.violations = (FieldViolation(field, description, reason), *more)
        super().__init__(
            "; ".join(f"{v.field}: {v.description}" for v in self.violations),
            field=",".join(dict.fromkeys(v.field for v in self.violations)),
        )
        self.field = field
        self.description = description

    @classmethod
    def of(cls, violations: Sequence[FieldViolation]) -> InvalidArgument:
        first, *more = violations
        return cls(first.field, first.description, *more, reason=first.reason)


class NotFound(AgentLabError):
    """A named resource does not exist."""

    reason = "NOT_FOUND"

    def __init__(self, resource_type: str, name: str, message: str = "", **metadata: str) -> None:
        super().__init__(message or f"{resource_type} {name!r} not found", **metadata)
        self.resource_type = resource_type
        self.name = name


class ModelNotFound(NotFound):
    reason = "MODEL_NOT_FOUND"

    def __init__(self, model: str, known: list[str]) -> None:
        super().__init__(
            "model",
            model,
            f"model {model!r} is not served here; known models: {', '.join(known)}",
            model=model,
            known_models=",".join(known),
        )


class NotFinished(AgentLabError):
    """The request needs an execution that has ended, and this one has not
    (CompareExecutions of a running one): the caller must wait for its end."""

    reason = "EXECUTION_NOT_FINISHED"

    def __init__(self, execution_id: str, state: str) -> None:
        super().__init__(
            f"execution '{execution_id}' has not ended (it is {state}): compare it once it has",
            execution_id=execution_id,
            state=state,
        )


class IdempotencyKeyReused(AgentLabError):
    """A request_id came back with a different request than the one it was
    first sent with. The key is bound to that first request (the IETF
    Idempotency-Key draft, AIP-155): answering the new one with the old
    execution would hand the caller someone else's answer."""

    reason = "IDEMPOTENCY_KEY_REUSED"

    def __init__(self, request_id: str, execution_id: str) -> None:
        super().__init__(
            f"request_id {request_id!r} was first used for a different request (execution "
            f"{execution_id}); a retry must repeat the prompt, model, mode and options "
            "exactly, and a new request needs a new request_id",
            request_id=request_id,
            execution_id=execution_id,
        )
        self.request_id = request_id
        self.execution_id = execution_id


class NotServing(AgentLabError):
    """The gateway, or one of its parts, is not serving (starting or draining)."""

    reason = "NOT_SERVING"

    def __init__(self, service: str) -> None:
        super().__init__(f"{service or 'the gateway'} is not serving", service=service)


class LabUnavailable(AgentLabError):
    """The lab cannot take work now (starting, stopping, or unreachable)."""

    reason = "LAB_UNAVAILABLE"

    def __init__(
        self, backend: str, detail: str, retry_after_s: float = 1.0, address: str = ""
    ) -> None:
        where = f" at {address}" if address else ""
        super().__init__(
            f"lab backend {backend!r}{where} is unavailable: {detail}",
            backend=backend,
            **({"address": address} if address else {}),
        )
        self.backend = backend
        self.address = address
        self.retry_after_s = retry_after_s


class ResourceExhausted(AgentLabError):
    """The gateway is at its limit of executions (running plus waiting for a
    turn); the caller may retry after ``retry_after_s``."""

    reason = "TOO_MANY_EXECUTIONS"

    def __init__(self, max_running: int, max_queued: int, retry_after_s: float = 1.0) -> None:
        super().__init__(
            f"too many executions: {max_running} running and {max_queued} waiting already; "
            f"retry in {retry_after_s:g} s",
            max_running=str(max_running),
            max_queued=str(max_queued),
            retry_after_s=f"{retry_after_s:g}",
        )
        self.max_running = max_running
        self.max_queued = max_queued
        self.retry_after_s = retry_after_s


class LabFailed(AgentLabError):
    """The lab took the work and failed it, or answered something unusable.
    ``upstream_status`` is the backend's own HTTP status, when it gave one."""

    reason = "LAB_FAILED"

    def __init__(
        self, backend: str, detail: str, upstream_status: int | None = None, address: str = ""
    ) -> None:
        metadata = {"backend": backend}
        if address:
            metadata["address"] = address
        if upstream_status is not None:
            metadata["upstream_status"] = str(upstream_status)
        status = f" (HTTP {upstream_status})" if upstream_status is not None else ""
        super().__init__(f"lab backend {backend!r} failed{status}: {detail}", **metadata)
        self.backend = backend
        self.upstream_status = upstream_status


class DeadlineExceeded(AgentLabError):
    """The execution ran out of time: the caller's deadline or the model's
    configured timeout, whichever came first."""

    reason = "DEADLINE_EXCEEDED"

    def __init__(self, timeout_s: float, what: str = "the execution") -> None:
        super().__init__(
            f"{what} did not finish within {timeout_s:g} s", timeout_s=f"{timeout_s:g}"
        )


class Cancelled(AgentLabError):
    reason = "CANCELLED"

    def __init__(self, detail: str = "the execution was cancelled") -> None:
        super().__init__(detail)


class Unauthenticated(AgentLabError):
    """No API key, or not a valid one. ``reason`` says which."""

    reason = "UNAUTHENTICATED"

    def __init__(self, detail: str, reason: str) -> None:
        super().__init__(detail)
        self.reason = reason


class InternalError(AgentLabError):
    """An unexpected failure. The message is generic on purpose: the details
    go to the log under ``error_id``, never to the caller."""

    reason = "INTERNAL"

    def __init__(self, error_id: str) -> None:
        super().__init__(f"internal error (error id {error_id})", error_id=error_id)
        self.error_id = error_id

    @classmethod
    def logged(cls, logger: logging.Logger, what: str) -> InternalError:
        """For the exception being handled: logged with its stack under a new
        error id, which is all the caller will see."""
        error = cls(new_error_id())
        logger.exception("%s failed: error id %s", what, error.error_id)
        return error


def new_error_id() -> str:
    return uuid.uuid4().hex[:12]
