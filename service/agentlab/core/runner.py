"""The execute and orchestrate use cases.

The runner routes a task to the lab that serves its model (with the model's
defaults; the request was held to the contract's rules in the API layer),
and turns what the lab reports into numbered, timed events with the flow and the
metrics computed in one place, the same way for every backend.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncGenerator, Callable
from contextlib import aclosing
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Protocol, TypeVar

from agentlab.core.errors import (
    AgentLabError,
    Cancelled,
    DeadlineExceeded,
    InternalError,
)
from agentlab.core.events import (
    Event,
    EventKind,
    ExecutionCompleted,
    ExecutionFailed,
    ExecutionStarted,
    NodeFinished,
    NodeStarted,
    TokenDelta,
)
from agentlab.core.ports import (
    Lab,
    LabEvent,
    LabNodeEnded,
    LabNodeStarted,
    LabOutput,
    LabToken,
    Route,
)
from agentlab.core.types import (
    FlowStep,
    GenerationOptions,
    Metrics,
    Result,
    StepStatus,
    Task,
)

__all__ = ["LabRouter", "Prepared", "Runner", "Stop", "new_execution_id"]

logger = logging.getLogger(__name__)

_T = TypeVar("_T")

LabRouter = Callable[[str], Route]
"""Returns the route of a model name, or raises ModelNotFound."""


class Runner:
    def __init__(self, route: LabRouter, *, default_max_tokens: int) -> None:
        self._route = route
        self._default_max_tokens = default_max_tokens

    def prepare(self, task: Task) -> Prepared:
        """Find a task's lab and apply the model's defaults; raises before any
        event exists, so an unknown model fails as a plain error, not as a
        failed stream. The task's fields were held to the contract's rules
        where the request came in (agentlab.api.validation)."""
        options = task.options
        route = self._route(task.model)
        defaults = route.defaults
        options = GenerationOptions(
            temperature=_first(options.temperature, defaults.temperature),
            max_tokens=_first(options.max_tokens, defaults.max_tokens, self._default_max_tokens),
            seed=_first(options.seed, defaults.seed),
        )
        limits = [t for t in (task.timeout_s, route.timeout_s) if t is not None]
        return Prepared(
            replace(task, options=options, timeout_s=min(limits, default=None)), route.lab
        )

    async def stream(
        self, prepared: Prepared, *, execution_id: str | None = None, stop: Stop | None = None
    ) -> AsyncGenerator[Event, None]:
        """The execution's events, the last one ExecutionCompleted or
        ExecutionFailed: whatever goes wrong after ``prepare`` is reported
        as the final event, never raised."""
        task, lab = prepared.task, prepared.lab
        run = _Run(task, lab, execution_id or new_execution_id())
        yield run.event(ExecutionStarted(task.mode, task.model))
        deadline = None if task.timeout_s is None else time.monotonic() + task.timeout_s
        cutoff = None if deadline is None and stop is None else _Cutoff(deadline, task, stop)
        try:
            async with aclosing(lab.run(task)) as lab_events:
                while (
                    lab_event := await (
                        anext(lab_events, None) if cutoff is None else cutoff.next(lab_events)
                    )
                ) is not None:
                    for piece in _pieces(lab_event):
                        if (event := run.observe(piece)) is not None:
                            yield event
        except AgentLabError as error:
            logger.info("execution %s failed: %s", run.execution_id, error)
            cut = StepStatus.CANCELLED if isinstance(error, Cancelled) else StepStatus.FAILED
            yield run.event(ExecutionFailed(error, run.flow_so_far(cut)))
            return
        except Exception:
            internal = InternalError.logged(logger, f"execution {run.execution_id}")
            yield run.event(ExecutionFailed(internal, run.flow_so_far(StepStatus.FAILED)))
            return
        finally:
            if cutoff is not None:
                cutoff.close()
        result = run.result()
        # DEBUG: a line per request is Envoy's access log's job; formatting
        # one here cost ~3 % of the service's time per REST Execute.
        logger.debug(
            "execution %s finished in %.0f ms", run.execution_id, result.metrics.latency_ms
        )
        yield run.event(ExecutionCompleted(result))


@dataclass(frozen=True)
class Prepared:
    """A task bound to the lab that serves its model, with the model's
    defaults and time limit applied: what ``Runner.stream`` runs."""

    task: Task
    lab: Lab


MAX_DELTA_CHARS = 16_384
"""The most text one TokenDelta carries: a model's chunk (an echoed word, a
long token) can be any length, and an event must stay small (api.sizing)."""


def _pieces(lab_event: LabEvent) -> list[LabEvent]:
    """A long LabToken as several, each at most MAX_DELTA_CHARS."""
    if not isinstance(lab_event, LabToken) or len(lab_event.text) <= MAX_DELTA_CHARS:
        return [lab_event]
    text = lab_event.text
    return [
        replace(lab_event, text=text[start : start + MAX_DELTA_CHARS])
        for start in range(0, len(text), MAX_DELTA_CHARS)
    ]


def _first(*values: _T | None) -> _T | None:
    return next((value for value in values if value is not None), None)


class Waiting(Protocol):
    """A wait a Stop can cut short: an ``asyncio.Timeout``, or a
    ``_Cutoff``."""

    def expired(self) -> bool: ...

    def reschedule(self, when: float | None) -> None: ...


class Stop:
    """A request to stop one execution from outside it (a cancel): honoured
    while the execution waits for its turn or for its lab's next event,
    which is where it spends its time."""

    __slots__ = ("_waiting", "requested")

    def __init__(self) -> None:
        self.requested = False
        self._waiting: Waiting | None = None

    def request(self) -> None:
        self.requested = True
        if self._waiting is not None and not self._waiting.expired():
            self._waiting.reschedule(asyncio.get_running_loop().time())

    def attach(self, waiting: Waiting) -> None:
        self._waiting = waiting
        if self.requested:
            waiting.reschedule(asyncio.get_running_loop().time())

    def detach(self) -> None:
        self._waiting = None


class _Cutoff:
    """One execution's waits for its lab's next event, cut short at its
    deadline (the event loop's clock: time.monotonic) or on a stop request:
    the lab's work is cancelled where it stands (closing its upstream
    requests) and the execution fails with what it had done so far.

    One timer per execution, where an ``asyncio.Timeout`` per event armed
    and cancelled a timer for each token (~8 % of the service's time per
    REST Execute). It cancels its task as asyncio.Timeout does, and only
    while the task waits here: between waits, the next wait fails at once.
    """

    __slots__ = (
        "_cancelled",
        "_fired",
        "_handle",
        "_loop",
        "_stop",
        "_task_timeout_s",
        "_waiter",
    )

    def __init__(self, deadline: float | None, task: Task, stop: Stop | None) -> None:
        self._loop = asyncio.get_running_loop()
        self._task_timeout_s = task.timeout_s
        self._stop = stop
        self._handle: asyncio.TimerHandle | None = None
        self._fired = False
        self._waiter: asyncio.Task[object] | None = None  # the task waiting here
        self._cancelled: asyncio.Task[object] | None = None  # cancelled by this
        self.reschedule(deadline)
        if stop is not None:
            stop.attach(self)

    def expired(self) -> bool:
        return self._fired

    def reschedule(self, when: float | None) -> None:
        if self._fired:
            return
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        if when is not None:
            self._handle = self._loop.call_at(when, self._fire)

    def close(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        if self._stop is not None:
            self._stop.detach()

    def _fire(self) -> None:
        self._fired = True
        self._handle = None
        if self._waiter is not None and self._cancelled is None:
            self._cancelled = self._waiter
            self._waiter.cancel()

    async def next(self, events: AsyncGenerator[LabEvent, None]) -> LabEvent | None:
        """The lab's next event, or None at its end; raises Cancelled or
        DeadlineExceeded once cut short."""
        if self._fired:
            raise self._error()
        self._waiter = asyncio.current_task()
        try:
            return await anext(events, None)
        except asyncio.CancelledError:
            if self._took_back():
                raise self._error() from None
            raise
        finally:
            self._waiter = None
            # A cancel the lab swallowed is taken back too: the next wait fails.
            self._took_back()

    def _took_back(self) -> bool:
        """Whether this cancelled the waiting task and nobody else did; the
        cancel is taken back from the task (once)."""
        task, self._cancelled = self._cancelled, None
        return task is not None and task.uncancel() == 0

    def _error(self) -> AgentLabError:
        if self._stop is not None and self._stop.requested:
            return Cancelled()
        return DeadlineExceeded(self._task_timeout_s or 0.0)


def new_execution_id() -> str:
    return uuid.uuid4().hex


def _now() -> datetime:
    return datetime.now(UTC)


@dataclass
class _Node:
    """A node that started and has not finished yet."""

    name: str
    input: str
    start_time: datetime
    started: float
    first_token: float | None = None
    text: list[str] = field(default_factory=list)


@dataclass
class _Run:
    """The bookkeeping of one execution: numbering, timing, flow, metrics."""

    task: Task
    lab: Lab
    execution_id: str
    started: float = field(default_factory=time.perf_counter)
    sequence: int = 0
    flow: list[FlowStep] = field(default_factory=list)
    open_nodes: dict[str, _Node] = field(default_factory=dict)
    first_token: float | None = None
    generation_seconds: float = 0.0
    output: str = ""

    def event(self, kind: EventKind) -> Event:
        self.sequence += 1
        return Event(self.sequence, _now(), self.execution_id, kind)

    def observe(self, lab_event: object) -> Event | None:
        now = time.perf_counter()
        match lab_event:
            case LabNodeStarted(node, node_input):
                self.open_nodes[node] = _Node(node, node_input, _now(), now)
                return self.event(NodeStarted(node, node_input))
            case LabToken(node, text):
                if self.first_token is None:
                    self.first_token = now
                open_node = self.open_nodes.get(node)
                if open_node is not None:
                    open_node.text.append(text)
                    if open_node.first_token is None:
                        open_node.first_token = now
                return self.event(TokenDelta(node, text))
            case LabNodeEnded():
                step = self._finish(lab_event, now)
                self.flow.append(step)
                return self.event(NodeFinished(step))
            case LabOutput(output):
                self.output = output
                return None
        raise TypeError(f"unknown lab event {lab_event!r}")

    def _finish(self, ended: LabNodeEnded, now: float) -> FlowStep:
        node = self.open_nodes.pop(ended.node, None) or _Node(ended.node, "", _now(), now)
        if ended.generation_s is not None:
            generation = ended.generation_s
        else:
            generation = now - node.first_token if node.first_token is not None else 0.0
        self.generation_seconds += generation
        return FlowStep(
            node=node.name,
            status=StepStatus.SUCCEEDED,
            input=node.input,
            output=ended.output,
            start_time=node.start_time,
            duration_ms=(now - node.started) * 1000,
            metrics=self._metrics(
                started=node.started,
                ended=now,
                first_token=node.first_token,
                prompt_tokens=ended.prompt_tokens,
                completion_tokens=ended.completion_tokens,
                generation_seconds=generation,
            ),
        )

    def _metrics(
        self,
        *,
        started: float,
        ended: float,
        first_token: float | None,
        prompt_tokens: int,
        completion_tokens: int,
        generation_seconds: float,
    ) -> Metrics:
        return Metrics(
            latency_ms=(ended - started) * 1000,
            time_to_first_token_ms=(first_token - started) * 1000 if first_token else 0.0,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            tokens_per_second=(
                completion_tokens / generation_seconds if generation_seconds > 0 else 0.0
            ),
            backend=self.lab.backend,
            model=self.lab.model_name,
            requested_model=self.task.model,
        )

    def flow_so_far(self, open_status: StepStatus) -> tuple[FlowStep, ...]:
        """The finished steps plus the ones cut short, marked with open_status."""
        now = time.perf_counter()
        cut = [
            FlowStep(
                node=node.name,
                status=open_status,
                input=node.input,
                output="".join(node.text),
                start_time=node.start_time,
                duration_ms=(now - node.started) * 1000,
                # The backend's own counts arrive with a node's end: a cut
                # node counts the deltas it streamed instead (every backend
                # streams a token per delta; longer text, split at the
                # delta bound, counts a little more), and its prompt as 0.
                metrics=self._metrics(
                    started=node.started,
                    ended=now,
                    first_token=node.first_token,
                    prompt_tokens=0,
                    completion_tokens=len(node.text),
                    generation_seconds=now - node.first_token if node.first_token else 0.0,
                ),
            )
            for node in self.open_nodes.values()
        ]
        return (*self.flow, *cut)

    def result(self) -> Result:
        return Result(
            execution_id=self.execution_id,
            output=self.output,
            flow=tuple(self.flow),
            metrics=self._metrics(
                started=self.started,
                ended=time.perf_counter(),
                first_token=self.first_token,
                prompt_tokens=sum(step.metrics.prompt_tokens for step in self.flow),
                completion_tokens=sum(step.metrics.completion_tokens for step in self.flow),
                generation_seconds=self.generation_seconds,
            ),
        )
