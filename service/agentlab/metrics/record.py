"""What the executions, the server and the health checks report, one call
each, and how it becomes samples of the instruments.

Cost per request matters (issue 11): an execution is recorded once, at its
final event, from the numbers the runner computed for the API's own
``metrics`` (no timing of its own per token), and each label set's child is
looked up once and then kept in a dict, as prometheus-client's ``labels()``
takes a lock and validates on every call.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Collection
from typing import Protocol

from prometheus_client import Counter, Histogram

from agentlab.core.errors import ResourceExhausted
from agentlab.core.events import EventKind, ExecutionCompleted, ExecutionFailed
from agentlab.core.ports import Lab
from agentlab.core.types import ExecutionMode, FlowStep, StepStatus, Task
from agentlab.metrics import instruments as m

__all__ = [
    "ENDED_STATES",
    "OTHER_MODEL",
    "backend_checked",
    "bus_delivered",
    "execution_ended",
    "execution_finished",
    "rejected",
    "report_load",
    "store_write",
]

OPERATION = {ExecutionMode.INFERENCE: "chat", ExecutionMode.ORCHESTRATION: "invoke_agent"}
"""gen_ai.operation.name by mode: one model call, or the graph of several."""

MAX_MODELS = 100
OTHER_MODEL = "other"

# Every end state and refusal reason there is, at 0 from start-up: a series
# born at its first increment loses that increment to rate() and increase()
# (they need a sample before it), and reads "no data" on a dashboard or to an
# alert until then, rather than 0.
ENDED_STATES = ("SUCCEEDED", "FAILED", "CANCELLED")
for _state in ENDED_STATES:
    m.EXECUTIONS.labels(_state)
m.REJECTED.labels(ResourceExhausted.reason)
"""The model label of requested names past the first MAX_MODELS: without a
routing file any name is served, and a label value per name a client
invents would grow every series without bound."""

_models: set[str] = set()
_histograms: dict[tuple[Histogram, tuple[str, ...]], Histogram] = {}
_counters: dict[tuple[Counter, tuple[str, ...]], Counter] = {}


def _model(name: str) -> str:
    if name in _models:
        return name
    if len(_models) >= MAX_MODELS:
        return OTHER_MODEL
    _models.add(name)
    return name


def _histogram(metric: Histogram, *labels: str) -> Histogram:
    key = (metric, labels)
    child = _histograms.get(key)
    if child is None:
        child = _histograms[key] = metric.labels(*labels)
    return child


def _counter(metric: Counter, *labels: str) -> Counter:
    key = (metric, labels)
    child = _counters.get(key)
    if child is None:
        child = _counters[key] = metric.labels(*labels)
    return child


def execution_finished(task: Task, lab: Lab, final: EventKind, duration_s: float) -> None:
    """An execution's lab work ended with ``final`` (ExecutionCompleted or
    ExecutionFailed; any other kind is ignored), ``duration_s`` seconds after
    it began (a success's own latency, as its answer reports it, wins).

    Durations, first-token times and tokens per GenAI conventions, with
    gen_ai.provider.name the backend's configured name (the gateway's
    providers are its backends: embedded, echo, an Ollama server...) and
    error.type the failure's ErrorInfo reason (DEADLINE_EXCEEDED...); and
    each finished graph node's duration, first token and tokens."""
    model = _model(task.model)
    labels = (OPERATION[task.mode], model, lab.model_name, lab.backend)
    if isinstance(final, ExecutionFailed):
        _histogram(m.REQUEST_DURATION, *labels, final.error.reason).observe(duration_s)
        _nodes(model, final.flow)
        return
    if not isinstance(final, ExecutionCompleted):
        return
    metrics = final.result.metrics
    _histogram(m.REQUEST_DURATION, *labels, "").observe(metrics.latency_ms / 1000)
    if metrics.time_to_first_token_ms > 0:
        _histogram(m.TIME_TO_FIRST_TOKEN, *labels).observe(metrics.time_to_first_token_ms / 1000)
    if metrics.tokens_per_second > 0:
        _histogram(m.TIME_PER_OUTPUT_TOKEN, *labels).observe(1 / metrics.tokens_per_second)
    _histogram(m.TOKEN_USAGE, *labels, "input").observe(metrics.prompt_tokens)
    _histogram(m.TOKEN_USAGE, *labels, "output").observe(metrics.completion_tokens)
    _nodes(model, final.result.flow)


def _nodes(model: str, flow: Collection[FlowStep]) -> None:
    for step in flow:
        if step.status is not StepStatus.SUCCEEDED:
            continue  # cut short: its numbers are partial
        _histogram(m.NODE_DURATION, step.node, model).observe(step.duration_ms / 1000)
        if step.metrics.time_to_first_token_ms > 0:
            _histogram(m.NODE_TIME_TO_FIRST_TOKEN, step.node, model).observe(
                step.metrics.time_to_first_token_ms / 1000
            )
        _counter(m.NODE_OUTPUT_TOKENS, step.node, model).inc(step.metrics.completion_tokens)


def execution_ended(state: str) -> None:
    """An execution's end (SUCCEEDED, FAILED, CANCELLED) was stored."""
    _counter(m.EXECUTIONS, state).inc()


def rejected(reason: str) -> None:
    """A call was refused with RESOURCE_EXHAUSTED, ``reason`` its ErrorInfo reason."""
    _counter(m.REJECTED, reason).inc()


def store_write(operation: str) -> Histogram:
    """The histogram to ``observe`` one store write's seconds in."""
    return _histogram(m.STORE_WRITE, operation)


def bus_delivered(event_time_s: float) -> None:
    """An event made at ``event_time_s`` (Unix seconds) came off the bus."""
    m.BUS_LAG.observe(max(0.0, time.time() - event_time_s))


def backend_checked(backend: str, reachable: bool) -> None:
    m.BACKEND_UP.labels(backend).set(1 if reachable else 0)


class Load(Protocol):
    """What admission knows of this process's executions."""

    running: int

    @property
    def waiting(self) -> Collection[str]: ...


def report_load(load: Load) -> None:
    """Report ``load``'s running and queued executions, read at each scrape
    (nothing per request). Weakly held: a later one (tests build many)
    takes over, and this one is not kept alive for the gauges."""
    ref = weakref.ref(load)

    def running() -> float:
        current = ref()
        return 0 if current is None else current.running

    def queued() -> float:
        current = ref()
        return 0 if current is None else len(current.waiting)

    m.EXECUTIONS_RUNNING.set_function(running)
    m.EXECUTIONS_QUEUED.set_function(queued)
