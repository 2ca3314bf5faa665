"""How an execution is kept: the one encoding of its events, its end and its
errors, as agentlab.v1 and google.rpc messages.

Events are stored as serialized ``agentlab.v1.ExecutionEvent`` messages, so
a watcher can send exactly what was stored; a failed execution's error is a
``google.rpc.Status`` with one ErrorInfo (reason, domain "agentlab.v1",
metadata) plus BadRequest, ResourceInfo or RetryInfo where they apply.
``rpc_status`` is the one place a domain error becomes a status, also for
errors no execution stores (a refused key, a bad request): the API layer
sends every status over gRPC (api/errors.py), so a stored failure and one
raised at the door read alike. It lives here, beside the stored format,
because the layers below the API must be able to build it. Codes are
google.rpc.code_pb2 numbers, the same as gRPC's.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime

from google.protobuf import any_pb2, duration_pb2, timestamp_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2

from agentlab.core import events
from agentlab.core.errors import (
    AgentLabError,
    Cancelled,
    DeadlineExceeded,
    IdempotencyKeyReused,
    InternalError,
    InvalidArgument,
    LabFailed,
    LabUnavailable,
    NotFinished,
    NotFound,
    NotServing,
    ResourceExhausted,
    Unauthenticated,
)
from agentlab.core.types import ExecutionMode, FlowStep, Metrics, Result, StepStatus
from agentlab.executions.model import Ending, ExecutionState, StoredEvent
from agentlab.v1 import execution_pb2 as pb

__all__ = [
    "DOMAIN",
    "MODE_NUMBERS",
    "cut_short",
    "ending",
    "event",
    "finished_steps",
    "is_final",
    "parsed",
    "retry_after_s",
    "rpc_status",
    "stored",
    "timestamp",
]

DOMAIN = "agentlab.v1"

MODE_NUMBERS = {
    ExecutionMode.INFERENCE: pb.EXECUTION_MODE_INFERENCE,
    ExecutionMode.ORCHESTRATION: pb.EXECUTION_MODE_ORCHESTRATION,
}

_STEP_STATUS_NUMBERS = {
    StepStatus.RUNNING: pb.STEP_STATUS_RUNNING,
    StepStatus.SUCCEEDED: pb.STEP_STATUS_SUCCEEDED,
    StepStatus.FAILED: pb.STEP_STATUS_FAILED,
    StepStatus.CANCELLED: pb.STEP_STATUS_CANCELLED,
}

_FINAL = ("execution_completed", "execution_failed")

_CODES: list[tuple[type[AgentLabError], int]] = [
    (InvalidArgument, code_pb2.INVALID_ARGUMENT),
    (NotFound, code_pb2.NOT_FOUND),
    # The key names an execution that exists already, for another request:
    # 409 through Envoy. (The IETF draft suggests 422, which no gRPC code
    # becomes.)
    (IdempotencyKeyReused, code_pb2.ALREADY_EXISTS),
    # Not yet: 400 through Envoy, with the reason saying to wait.
    (NotFinished, code_pb2.FAILED_PRECONDITION),
    (NotServing, code_pb2.UNAVAILABLE),
    (LabUnavailable, code_pb2.UNAVAILABLE),
    (ResourceExhausted, code_pb2.RESOURCE_EXHAUSTED),
    (LabFailed, code_pb2.INTERNAL),
    (Cancelled, code_pb2.CANCELLED),
    (DeadlineExceeded, code_pb2.DEADLINE_EXCEEDED),
    (InternalError, code_pb2.INTERNAL),
    (Unauthenticated, code_pb2.UNAUTHENTICATED),
]

# What a backend's own HTTP status means for our caller. Anything else a
# backend fails with is INTERNAL: the caller cannot fix it.
_UPSTREAM_CODES: dict[int, int] = {
    400: code_pb2.INVALID_ARGUMENT,
    404: code_pb2.NOT_FOUND,
    408: code_pb2.DEADLINE_EXCEEDED,
    413: code_pb2.INVALID_ARGUMENT,
    429: code_pb2.RESOURCE_EXHAUSTED,
    502: code_pb2.UNAVAILABLE,
    503: code_pb2.UNAVAILABLE,
    504: code_pb2.DEADLINE_EXCEEDED,
}


_INTERNAL: int = code_pb2.INTERNAL


def _code(error: AgentLabError) -> int:
    if isinstance(error, LabFailed) and error.upstream_status is not None:
        return _UPSTREAM_CODES.get(error.upstream_status, _INTERNAL)
    for error_type, code in _CODES:
        if isinstance(error, error_type):
            return code
    return _INTERNAL


def _pack(message: object) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)  # type: ignore[arg-type]
    return packed


def rpc_status(error: AgentLabError) -> status_pb2.Status:
    """The error as a google.rpc.Status, with its details."""
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
    if (delay_s := retry_after_s(error)) is not None:
        delay = duration_pb2.Duration()
        delay.FromMilliseconds(int(delay_s * 1000))
        details.append(_pack(error_details_pb2.RetryInfo(retry_delay=delay)))
    return status_pb2.Status(code=_code(error), message=error.message, details=details)


def retry_after_s(error: AgentLabError) -> float | None:
    """Seconds after which a retry may succeed, for the errors that say so."""
    if isinstance(error, LabUnavailable | ResourceExhausted):
        return error.retry_after_s
    return None


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def timestamp(moment: datetime) -> timestamp_pb2.Timestamp:
    """``moment`` as a Timestamp; a naive datetime is taken as UTC."""
    if moment.tzinfo is None:
        stamp = timestamp_pb2.Timestamp()
        stamp.FromDatetime(moment)
        return stamp
    # The same value as FromDatetime, a quarter of its cost (it goes through
    # a time tuple and calendar.timegm): every event has one or more.
    since = moment - _EPOCH
    return timestamp_pb2.Timestamp(
        seconds=since.days * 86_400 + since.seconds, nanos=since.microseconds * 1000
    )


def _metrics(metrics: Metrics) -> pb.Metrics:
    return pb.Metrics(
        latency_ms=metrics.latency_ms,
        time_to_first_token_ms=metrics.time_to_first_token_ms,
        prompt_tokens=metrics.prompt_tokens,
        completion_tokens=metrics.completion_tokens,
        tokens_per_second=metrics.tokens_per_second,
        backend=metrics.backend,
        model=metrics.model,
        requested_model=metrics.requested_model,
    )


def _step(step: FlowStep) -> pb.FlowStep:
    return pb.FlowStep(
        node=step.node,
        status=_STEP_STATUS_NUMBERS[step.status],
        input=step.input,
        output=step.output,
        start_time=timestamp(step.start_time),
        duration_ms=step.duration_ms,
        metrics=_metrics(step.metrics),
    )


def _result(value: Result) -> pb.ExecuteResponse:
    return pb.ExecuteResponse(
        execution_id=value.execution_id,
        output=value.output,
        flow=[_step(step) for step in value.flow],
        metrics=_metrics(value.metrics),
        # The same result Execute and Get show: a completed one SUCCEEDED.
        state=pb.EXECUTION_STATE_SUCCEEDED,
    )


def event(value: events.Event) -> pb.ExecutionEvent:
    """A core event as the message that is stored and sent."""
    message = pb.ExecutionEvent(
        sequence=value.sequence,
        time=timestamp(value.time),
        execution_id=value.execution_id,
    )
    match value.kind:
        case events.ExecutionStarted(mode, requested_model):
            message.execution_started.mode = MODE_NUMBERS[mode]
            message.execution_started.requested_model = requested_model
        case events.NodeStarted(node, node_input):
            message.node_started.node = node
            message.node_started.input = node_input
        case events.TokenDelta(node, text):
            message.token_delta.node = node
            message.token_delta.text = text
        case events.NodeFinished(step):
            message.node_finished.step.CopyFrom(_step(step))
        case events.ExecutionCompleted(completed):
            message.execution_completed.result.CopyFrom(_result(completed))
        case events.ExecutionFailed(error, flow):
            message.execution_failed.error.CopyFrom(rpc_status(error))
            message.execution_failed.flow.extend(_step(step) for step in flow)
    return message


def is_final(message: pb.ExecutionEvent) -> bool:
    return message.WhichOneof("kind") in _FINAL


def stored(message: pb.ExecutionEvent) -> StoredEvent:
    return StoredEvent(message.sequence, message.SerializeToString())


def parsed(kept: StoredEvent) -> pb.ExecutionEvent:
    message = pb.ExecutionEvent()
    message.ParseFromString(kept.payload)
    return message


def finished_steps(kept: Iterable[StoredEvent]) -> list[pb.FlowStep]:
    """The steps the stored events report finished, in order."""
    return [
        message.node_finished.step
        for message in map(parsed, kept)
        if message.HasField("node_finished")
    ]


def ending(execution_id: str, final: pb.ExecutionEvent) -> Ending:
    """What the store records of an execution's final event: its state, and
    the result (or, when it failed, the flow so far) and error as bytes."""
    now = datetime.now(UTC)
    if final.HasField("execution_completed"):
        result = final.execution_completed.result
        return Ending(ExecutionState.SUCCEEDED, now, result.SerializeToString(), None)
    failed = final.execution_failed
    state = (
        ExecutionState.CANCELLED
        if failed.error.code == code_pb2.CANCELLED
        else ExecutionState.FAILED
    )
    flow = pb.ExecuteResponse(execution_id=execution_id, flow=failed.flow)
    return Ending(state, now, flow.SerializeToString(), failed.error.SerializeToString())


def cut_short(
    execution_id: str, sequence: int, owner: str, steps: Iterable[pb.FlowStep]
) -> pb.ExecutionEvent:
    """The final event of an execution whose process (``owner``) stopped
    before it finished: UNAVAILABLE, with the steps it completed."""
    final = pb.ExecutionEvent(sequence=sequence, execution_id=execution_id)
    final.time.GetCurrentTime()
    final.execution_failed.error.CopyFrom(
        status_pb2.Status(
            code=code_pb2.UNAVAILABLE,
            message=(
                f"the process running this execution ({owner}) stopped before it "
                "finished; the flow holds the steps it completed"
            ),
        )
    )
    final.execution_failed.flow.extend(steps)
    return final
