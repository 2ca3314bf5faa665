"""Conversions between protobuf messages and domain types."""

from __future__ import annotations

from datetime import datetime

from google.protobuf import timestamp_pb2

from agentlab.api import sizing
from agentlab.api.errors import to_rpc_status
from agentlab.core import events
from agentlab.core.types import (
    ExecutionMode,
    FlowStep,
    GenerationOptions,
    Metrics,
    ModelInfo,
    Result,
    StepStatus,
    Task,
)
from agentlab.executions.model import ExecutionRecord, ExecutionState
from agentlab.v1 import execution_pb2 as pb
from agentlab.v1 import lab_service_pb2 as svc

__all__ = [
    "BASIC_TEXT_CHARS",
    "STATES",
    "event",
    "execution",
    "models",
    "result",
    "state",
    "task",
]

BASIC_TEXT_CHARS = 1000
"""How much of the prompt and the output the BASIC view keeps, in characters
(Unicode code points, as the contract counts a prompt's length)."""

_MODES = {
    pb.EXECUTION_MODE_INFERENCE: ExecutionMode.INFERENCE,
    pb.EXECUTION_MODE_ORCHESTRATION: ExecutionMode.ORCHESTRATION,
}
_MODES_PB = {mode: number for number, mode in _MODES.items()}
_STEP_STATUS_PB = {
    StepStatus.RUNNING: pb.STEP_STATUS_RUNNING,
    StepStatus.SUCCEEDED: pb.STEP_STATUS_SUCCEEDED,
    StepStatus.FAILED: pb.STEP_STATUS_FAILED,
    StepStatus.CANCELLED: pb.STEP_STATUS_CANCELLED,
}


def task(request: svc.ExecuteRequest | svc.OrchestrateRequest, default_mode: ExecutionMode) -> Task:
    return Task(
        prompt=request.prompt,
        model=request.model,
        mode=_MODES.get(request.mode, default_mode),
        options=GenerationOptions(
            temperature=request.temperature if request.HasField("temperature") else None,
            max_tokens=request.max_tokens if request.HasField("max_tokens") else None,
            seed=request.seed if request.HasField("seed") else None,
        ),
    )


def _timestamp(moment: datetime) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(moment)
    return stamp


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
        status=_STEP_STATUS_PB[step.status],
        input=step.input,
        output=step.output,
        start_time=_timestamp(step.start_time),
        duration_ms=step.duration_ms,
        metrics=_metrics(step.metrics),
    )


def result(value: Result) -> pb.ExecuteResponse:
    return pb.ExecuteResponse(
        execution_id=value.execution_id,
        output=value.output,
        flow=[_step(step) for step in value.flow],
        metrics=_metrics(value.metrics),
    )


def event(value: events.Event) -> pb.ExecutionEvent:
    message = pb.ExecutionEvent(
        sequence=value.sequence,
        time=_timestamp(value.time),
        execution_id=value.execution_id,
    )
    match value.kind:
        case events.ExecutionStarted(mode, requested_model):
            message.execution_started.mode = _MODES_PB[mode]
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
            message.execution_completed.result.CopyFrom(result(completed))
            # The same result Execute and Get show: a completed one SUCCEEDED.
            message.execution_completed.result.state = pb.EXECUTION_STATE_SUCCEEDED
        case events.ExecutionFailed(error, flow):
            message.execution_failed.error.CopyFrom(to_rpc_status(error))
            message.execution_failed.flow.extend(_step(step) for step in flow)
    return message


def models(values: list[ModelInfo]) -> svc.ListModelsResponse:
    return svc.ListModelsResponse(
        models=[
            svc.Model(
                name=info.name,
                backend=info.backend,
                backend_model=info.backend_model,
                ready=info.ready,
                description=info.description,
            )
            for info in values
        ]
    )


_STATES_PB = {
    ExecutionState.QUEUED: pb.EXECUTION_STATE_QUEUED,
    ExecutionState.RUNNING: pb.EXECUTION_STATE_RUNNING,
    ExecutionState.SUCCEEDED: pb.EXECUTION_STATE_SUCCEEDED,
    ExecutionState.FAILED: pb.EXECUTION_STATE_FAILED,
    ExecutionState.CANCELLED: pb.EXECUTION_STATE_CANCELLED,
}
STATES = {number: state for state, number in _STATES_PB.items()}


def state(value: ExecutionState) -> pb.ExecutionState:
    return _STATES_PB[value]


def execution(
    record: ExecutionRecord, view: pb.ExecutionView = pb.EXECUTION_VIEW_FULL
) -> pb.Execution:
    """The record as ``view`` shows it, fit to sizing.MESSAGE_BUDGET_BYTES."""
    message = pb.Execution(
        execution_id=record.id,
        state=_STATES_PB[record.state],
        prompt=record.prompt,
        model=record.model,
        mode=_MODES_PB[ExecutionMode(record.mode)],
        request_id=record.request_id,
        background=record.background,
        create_time=_timestamp(record.created_at),
        last_sequence=record.last_sequence,
    )
    options = record.options
    if "temperature" in options:
        message.temperature = float(options["temperature"])
    if "max_tokens" in options:
        message.max_tokens = int(options["max_tokens"])
    if "seed" in options:
        message.seed = int(options["seed"])
    if record.started_at is not None:
        message.start_time.CopyFrom(_timestamp(record.started_at))
    if record.ended_at is not None:
        message.end_time.CopyFrom(_timestamp(record.ended_at))
    if record.result is not None:
        message.result.ParseFromString(record.result)
        message.result.state = message.state
    if record.error is not None:
        message.error.ParseFromString(record.error)
    if view == pb.EXECUTION_VIEW_BASIC:
        _basic(message)
    return sizing.fit(message)


def _basic(message: pb.Execution) -> None:
    """AIP-157's BASIC view: what a list of executions shows."""
    if len(message.prompt) > BASIC_TEXT_CHARS:
        message.prompt = message.prompt[:BASIC_TEXT_CHARS]
        message.prompt_truncated = True
    result = message.result
    if len(result.output) > BASIC_TEXT_CHARS:
        result.output = result.output[:BASIC_TEXT_CHARS]
        result.output_truncated = True
    for step in result.flow:
        step.input_truncated = bool(step.input)
        step.output_truncated = bool(step.output)
        step.ClearField("input")
        step.ClearField("output")
