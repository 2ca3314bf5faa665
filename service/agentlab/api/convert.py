"""Conversions between protobuf messages and domain types."""

from __future__ import annotations

from datetime import datetime

from google.protobuf import timestamp_pb2

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
from agentlab.v1 import execution_pb2 as pb
from agentlab.v1 import lab_service_pb2 as svc

__all__ = ["event", "models", "result", "task"]

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
