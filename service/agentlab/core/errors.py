"""Domain errors. Each has a stable UPPER_SNAKE reason and metadata; the api
layer is the one place that turns them into gRPC statuses."""

from __future__ import annotations

__all__ = [
    "AgentLabError",
    "Cancelled",
    "InternalError",
    "InvalidArgument",
    "LabFailed",
    "LabUnavailable",
    "ModelNotFound",
    "NotFound",
    "NotServing",
]


class AgentLabError(Exception):
    """Base of every error the service reports to its callers."""

    reason = "AGENTLAB_ERROR"

    def __init__(self, message: str, **metadata: str) -> None:
        super().__init__(message)
        self.message = message
        self.metadata = metadata


class InvalidArgument(AgentLabError):
    """A request field is wrong; the caller must change it."""

    reason = "INVALID_ARGUMENT"

    def __init__(self, field: str, description: str) -> None:
        super().__init__(f"{field}: {description}", field=field)
        self.field = field
        self.description = description


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


class NotServing(AgentLabError):
    """The gateway, or one of its parts, is not serving (starting or draining)."""

    reason = "NOT_SERVING"

    def __init__(self, service: str) -> None:
        super().__init__(f"{service or 'the gateway'} is not serving", service=service)


class LabUnavailable(AgentLabError):
    """The lab cannot take work now (starting, stopping, or unreachable)."""

    reason = "LAB_UNAVAILABLE"

    def __init__(self, backend: str, detail: str, retry_after_s: float = 1.0) -> None:
        super().__init__(f"lab backend {backend!r} is unavailable: {detail}", backend=backend)
        self.retry_after_s = retry_after_s


class LabFailed(AgentLabError):
    """The lab took the work and failed it."""

    reason = "LAB_FAILED"

    def __init__(self, backend: str, detail: str) -> None:
        super().__init__(f"lab backend {backend!r} failed: {detail}", backend=backend)


class Cancelled(AgentLabError):
    reason = "CANCELLED"

    def __init__(self, detail: str = "the execution was cancelled") -> None:
        super().__init__(detail)


class InternalError(AgentLabError):
    """An unexpected failure. The message is generic on purpose: the details
    go to the log under ``error_id``, never to the caller."""

    reason = "INTERNAL"

    def __init__(self, error_id: str) -> None:
        super().__init__(f"internal error (error id {error_id})", error_id=error_id)
        self.error_id = error_id
