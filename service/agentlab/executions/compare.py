"""CompareExecutions: stored executions lined up node by node against the
first one, the baseline.

Nodes are matched by name and by how many times the flow had run that name
before (a node the flow passes twice is two rows), so flows of different
lengths or orders still line up; a node only some executions ran is shown
as absent in the others. Outputs are compared word by word
(core/worddiff.py), metrics as differences from the baseline's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from agentlab.core.worddiff import DiffKind, word_diff
from agentlab.executions.model import ExecutionRecord, ExecutionState
from agentlab.v1 import execution_pb2 as pb
from agentlab.v1 import lab_service_pb2 as svc

__all__ = ["compare"]

_KINDS: dict[DiffKind, svc.DiffOpKind] = {
    "equal": svc.DIFF_OP_KIND_EQUAL,
    "insert": svc.DIFF_OP_KIND_INSERT,
    "delete": svc.DIFF_OP_KIND_DELETE,
}
_STATES = {
    ExecutionState.QUEUED: pb.EXECUTION_STATE_QUEUED,
    ExecutionState.RUNNING: pb.EXECUTION_STATE_RUNNING,
    ExecutionState.SUCCEEDED: pb.EXECUTION_STATE_SUCCEEDED,
    ExecutionState.FAILED: pb.EXECUTION_STATE_FAILED,
    ExecutionState.CANCELLED: pb.EXECUTION_STATE_CANCELLED,
}

# A node's key: its name and which run of that name it is, from 1.
_Key = tuple[str, int]


@dataclass(frozen=True)
class _Run:
    record: ExecutionRecord
    result: pb.ExecuteResponse  # empty while the execution has none
    steps: dict[_Key, pb.FlowStep]
    order: list[_Key]


def compare(records: Sequence[ExecutionRecord]) -> svc.CompareExecutionsResponse:
    """``records`` (two or more, the baseline first) compared. CPU-bound in
    the outputs' lengths: callers run it off the event loop."""
    runs = [_run(record) for record in records]
    baseline = runs[0]
    answer = svc.CompareExecutionsResponse(
        executions=[_compared(run, baseline, run is baseline) for run in runs]
    )
    for node, occurrence in _rows(runs):
        key = (node, occurrence)
        base_step = baseline.steps.get(key)
        row = answer.nodes.add(node=node, occurrence=occurrence)
        for run in runs:
            step = run.steps.get(key)
            version = row.versions.add(execution_id=run.record.id, present=step is not None)
            if step is not None:
                version.step.CopyFrom(step)
                # What a node was given is the previous node's output (or
                # the prompt), shown in its own row: left out here, as the
                # BASIC view does, to keep the comparison small.
                version.step.input_truncated = bool(step.input)
                version.step.ClearField("input")
            if run is baseline:
                continue
            version.output_diff.extend(
                _diff(
                    base_step.output if base_step is not None else "",
                    step.output if step is not None else "",
                )
            )
            if step is not None and base_step is not None:
                version.delta.CopyFrom(_step_delta(step, base_step))
    return answer


def _run(record: ExecutionRecord) -> _Run:
    result = pb.ExecuteResponse()
    if record.result is not None:
        result.ParseFromString(record.result)
    steps: dict[_Key, pb.FlowStep] = {}
    order: list[_Key] = []
    seen: dict[str, int] = {}
    for step in result.flow:
        seen[step.node] = seen.get(step.node, 0) + 1
        key = (step.node, seen[step.node])
        steps[key] = step
        order.append(key)
    return _Run(record, result, steps, order)


def _rows(runs: list[_Run]) -> list[_Key]:
    """The baseline's nodes in its order, then each other execution's extra
    ones in the order it ran them."""
    rows: list[_Key] = []
    known: set[_Key] = set()
    for run in runs:
        for key in run.order:
            if key not in known:
                known.add(key)
                rows.append(key)
    return rows


def _compared(run: _Run, baseline: _Run, is_baseline: bool) -> svc.ComparedExecution:
    record = run.record
    compared = svc.ComparedExecution(
        execution_id=record.id,
        model=record.model,
        state=_STATES[record.state],
        replay_of=record.replay_of,
        metrics=_totals(run),
        output=run.result.output,
    )
    if not is_baseline:
        compared.output_diff.extend(_diff(baseline.result.output, run.result.output))
        mine, base = _totals(run), _totals(baseline)
        compared.delta.CopyFrom(_delta(mine, base, duration_ms=mine.latency_ms - base.latency_ms))
    return compared


def _totals(run: _Run) -> pb.Metrics:
    """The execution's own totals; for one that ended without them (failed
    or cancelled: only its flow so far is kept), what its steps add up to:
    tokens and durations summed, the first token as the steps before the
    first that streamed one took plus its own wait (the steps run one after
    the other), tokens/s as all tokens over all steps' generation time."""
    if run.result.HasField("metrics"):
        return run.result.metrics
    flow = run.result.flow
    first_token_ms, before_ms = 0.0, 0.0
    for step in flow:
        if step.metrics.time_to_first_token_ms > 0:
            first_token_ms = before_ms + step.metrics.time_to_first_token_ms
            break
        before_ms += step.duration_ms
    generating = [step.metrics for step in flow if step.metrics.tokens_per_second > 0]
    generation_s = sum(m.completion_tokens / m.tokens_per_second for m in generating)
    return pb.Metrics(
        latency_ms=sum(step.duration_ms for step in flow),
        time_to_first_token_ms=first_token_ms,
        prompt_tokens=sum(step.metrics.prompt_tokens for step in flow),
        completion_tokens=sum(step.metrics.completion_tokens for step in flow),
        tokens_per_second=(
            sum(m.completion_tokens for m in generating) / generation_s if generation_s else 0.0
        ),
        requested_model=run.record.model,
    )


def _step_delta(step: pb.FlowStep, base: pb.FlowStep) -> svc.MetricsDelta:
    return _delta(step.metrics, base.metrics, duration_ms=step.duration_ms - base.duration_ms)


def _delta(mine: pb.Metrics, base: pb.Metrics, *, duration_ms: float) -> svc.MetricsDelta:
    return svc.MetricsDelta(
        completion_tokens=mine.completion_tokens - base.completion_tokens,
        prompt_tokens=mine.prompt_tokens - base.prompt_tokens,
        time_to_first_token_ms=mine.time_to_first_token_ms - base.time_to_first_token_ms,
        tokens_per_second=mine.tokens_per_second - base.tokens_per_second,
        duration_ms=duration_ms,
    )


def _diff(before: str, after: str) -> list[svc.DiffOp]:
    return [svc.DiffOp(op=_KINDS[kind], text=text) for kind, text in word_diff(before, after)]
