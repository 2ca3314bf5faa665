"""The API's side of the conversions: a request as a Task, a record as the
Execution message a view shows. Events and errors are encoded once, by the
executions' codec (executions/codec.py)."""

from __future__ import annotations

from agentlab.api import sizing
from agentlab.core.types import ExecutionMode, GenerationOptions, ModelInfo, Task
from agentlab.executions.codec import MODE_NUMBERS, timestamp
from agentlab.executions.model import ExecutionRecord, ExecutionState
from agentlab.v1 import execution_pb2 as pb
from agentlab.v1 import lab_service_pb2 as svc

__all__ = [
    "BASIC_TEXT_CHARS",
    "STATES",
    "accepted",
    "completed",
    "execution",
    "models",
    "replay_task",
    "task",
]

BASIC_TEXT_CHARS = 1000
"""How much of the prompt and the output the BASIC view keeps, in characters
(Unicode code points, as the contract counts a prompt's length)."""

_MODES = {number: mode for mode, number in MODE_NUMBERS.items()}


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


def replay_task(source: ExecutionRecord, request: svc.ReplayExecutionRequest) -> Task:
    """The source's prompt and mode on the requested model (the source's
    when none is named), with each option the request sets in place of the
    source's."""
    stored = source.options

    def option(name: str) -> float | int | None:
        return getattr(request, name) if request.HasField(name) else stored.get(name)

    temperature, max_tokens, seed = option("temperature"), option("max_tokens"), option("seed")
    return Task(
        prompt=source.prompt,
        model=request.model or source.model,
        mode=ExecutionMode(source.mode),
        options=GenerationOptions(
            temperature=None if temperature is None else float(temperature),
            max_tokens=None if max_tokens is None else int(max_tokens),
            seed=None if seed is None else int(seed),
        ),
    )


def accepted(record: ExecutionRecord) -> pb.ExecuteResponse:
    """A background execution's answer: its id and state, no result yet."""
    return pb.ExecuteResponse(execution_id=record.id, state=_STATES_PB[record.state])


def completed(final: pb.ExecutionEvent) -> pb.ExecuteResponse:
    """The result a completed execution's final event carries, SUCCEEDED."""
    result = pb.ExecuteResponse()
    result.CopyFrom(final.execution_completed.result)
    result.state = pb.EXECUTION_STATE_SUCCEEDED
    return result


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


def execution(
    record: ExecutionRecord, view: pb.ExecutionView = pb.EXECUTION_VIEW_FULL
) -> pb.Execution:
    """The record as ``view`` shows it, fit to sizing.MESSAGE_BUDGET_BYTES."""
    message = pb.Execution(
        execution_id=record.id,
        state=_STATES_PB[record.state],
        prompt=record.prompt,
        model=record.model,
        mode=MODE_NUMBERS[ExecutionMode(record.mode)],
        request_id=record.request_id,
        background=record.background,
        create_time=timestamp(record.created_at),
        last_sequence=record.last_sequence,
        replay_of=record.replay_of,
    )
    options = record.options
    if "temperature" in options:
        message.temperature = float(options["temperature"])
    if "max_tokens" in options:
        message.max_tokens = int(options["max_tokens"])
    if "seed" in options:
        message.seed = int(options["seed"])
    if record.started_at is not None:
        message.start_time.CopyFrom(timestamp(record.started_at))
    if record.ended_at is not None:
        message.end_time.CopyFrom(timestamp(record.ended_at))
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
