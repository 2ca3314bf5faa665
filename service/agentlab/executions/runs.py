"""The executions this process runs: each one waits for its turn, streams
its events through the runner into the write path, and ends with its final
event stored, also when it is stopped (a cancel, the shutdown) before its
turn.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime

from google.rpc import code_pb2

from agentlab.core.errors import Cancelled, InternalError, new_error_id
from agentlab.core.events import Event, ExecutionFailed, ExecutionStarted
from agentlab.core.runner import Prepared, Runner, Stop
from agentlab.core.types import Task
from agentlab.executions import codec
from agentlab.executions.admission import Admission
from agentlab.executions.model import EventBus, ExecutionStore
from agentlab.executions.writer import EventWriter
from agentlab.metrics import record as metrics
from agentlab.telemetry import logs, tracing
from agentlab.v1 import execution_pb2 as pb

__all__ = ["Runs"]

logger = logging.getLogger(__name__)


@dataclass(eq=False, slots=True)
class _Local:
    """An execution run here: its task, how to stop it, its final event for
    callers in this process (waiting on it costs no store reads), its
    writer, and whether admission still counts it."""

    task: asyncio.Task[None]
    stop: Stop
    final: asyncio.Future[pb.ExecutionEvent]
    writer: EventWriter
    # Counted until its lab work is over (its final event is produced) or a
    # stop is asked for, whichever comes first. Not until its run ends: a
    # client that saw the final event, or left, may start its next
    # execution at once and must not be refused because this one is still
    # being written.
    counted: bool = True


class Runs:
    def __init__(
        self, runner: Runner, store: ExecutionStore, bus: EventBus, admission: Admission
    ) -> None:
        self._runner = runner
        self._store = store
        self._bus = bus
        self._admission = admission
        self._local: dict[str, _Local] = {}
        # Whether drain() has begun.
        self._stopping = False

    def final(self, execution_id: str) -> asyncio.Future[pb.ExecutionEvent] | None:
        """The final event of an execution run here (None if it is not)."""
        local = self._local.get(execution_id)
        return None if local is None else local.final

    def unpublished(self, execution_id: str) -> bool:
        """Whether the execution runs here and none of its events can have
        been published yet (none has gone to the store)."""
        local = self._local.get(execution_id)
        return local is not None and not local.writer.storing

    def stop(self, execution_id: str) -> asyncio.Task[None] | None:
        """Ask an execution run here to stop; its task, None if not here."""
        local = self._local.get(execution_id)
        if local is None:
            return None
        local.stop.request()
        self._uncount(local)
        return local.task

    def _uncount(self, local: _Local) -> None:
        """Free the execution's place within the limits (once)."""
        if local.counted:
            local.counted = False
            self._admission.release()

    def launch(
        self, execution_id: str, prepared: Prepared, *, background: bool, admitted: bool = False
    ) -> None:
        """Run an execution; ``admitted`` when submit has counted it already.
        Executions taken over from a dead process are counted too, never
        refused: they are recorded already."""
        if not admitted:
            self._admission.count()
        # The task starts at the loop's next turn, with its _Local in place;
        # under its id in the log context (its own copy of the launcher's).
        # Without tracing, _execute itself: a coroutine frame less for each
        # execution to hold while it runs (10,000 may: issue 11).
        context = contextvars.copy_context()
        context.run(logs.execution_id.set, execution_id)
        work = (
            self._traced(execution_id, prepared, background)
            if tracing.enabled()
            else self._execute(execution_id, prepared, background)
        )
        task = asyncio.create_task(work, name=execution_id, context=context)
        local = _Local(
            task=task,
            stop=Stop(),
            final=asyncio.get_running_loop().create_future(),
            writer=EventWriter(self._store, self._bus, execution_id),
        )
        self._local[execution_id] = local

        def forget(_: object) -> None:
            self._uncount(local)
            self._local.pop(execution_id, None)
            if not local.final.done():  # the run could not record its end
                local.final.set_exception(InternalError(new_error_id()))

        local.task.add_done_callback(forget)

    async def drain(self, grace_s: float) -> None:
        """Let running executions finish within ``grace_s``, then cancel the
        rest; each ends with its final event stored. Those still waiting for
        a turn do not start: background ones stay QUEUED, for the process
        that takes over (or this one, restarted) to run, the others end
        CANCELLED."""
        self._stopping = True
        for execution_id in list(self._admission.waiting):
            self._local[execution_id].stop.request()
        running = [local.task for local in self._local.values()]
        if running:
            _, pending = await asyncio.wait(running, timeout=grace_s)
            for execution_id, local in list(self._local.items()):
                if local.task in pending:
                    logger.warning("execution %s cut by the shutdown", execution_id)
                    local.stop.request()
            if pending:
                await asyncio.wait(pending, timeout=5.0)

    async def _traced(self, execution_id: str, prepared: Prepared, background: bool) -> None:
        """The execution in a span of its own while tracing is on: child of
        the call's span, parent of its graph's."""
        task = prepared.task
        span = tracing.start_span(
            f"execution {task.mode.value}",
            attributes={
                "agentlab.execution.id": execution_id,
                "agentlab.execution.mode": task.mode.value,
                "gen_ai.request.model": task.model,
                "agentlab.backend": prepared.lab.backend,
            },
        )
        final = self._local[execution_id].final
        with tracing.use_span(span):
            await self._execute(execution_id, prepared, background)
            if failed := _failure(final):
                tracing.mark_failed(span, code_pb2.Code.Name(failed.error.code))

    async def _execute(self, execution_id: str, prepared: Prepared, background: bool) -> None:
        local = self._local[execution_id]
        stop, final, writer = local.stop, local.final, local.writer
        try:
            async with self._admission.turn(execution_id, stop) as turn:
                if not turn and self._stopping and background:
                    logger.info("execution %s stays queued for the next process", execution_id)
                    final.cancel()
                    return
                if not turn:
                    await _cancel_queued(execution_id, prepared.task, final, writer)
                    return
                started = False
                began = time.perf_counter()
                last: pb.ExecutionEvent | None = None
                events = self._runner.stream(prepared, execution_id=execution_id, stop=stop)
                async for event in events:
                    # RUNNING is recorded with the first event, the end with
                    # the last: one transaction each, not two.
                    final_message = _add(writer, event, None if started else datetime.now(UTC))
                    started = True
                    if final_message is not None:
                        last = final_message
                        metrics.execution_finished(
                            prepared.task, prepared.lab, event.kind, time.perf_counter() - began
                        )
            # The lab's work is over: the turn (above) and the place go to
            # the next execution before the final event is stored and seen.
            self._uncount(local)
            if last is not None:
                await writer.close(codec.ending(execution_id, last))
                final.set_result(last)
        except Exception:
            # The store itself failed: nothing more can be recorded.
            logger.exception("execution %s could not be recorded", execution_id)
        finally:
            await writer.abandon()


def _add(
    writer: EventWriter, event: Event, started_at: datetime | None
) -> pb.ExecutionEvent | None:
    """Queue ``event`` for the store; its message if it is the final one.
    A function of its own so that the message of an event that is not final
    is freed at once, not kept by the run's frame while it waits for the
    next (~0.5 KiB each of 10,000 open executions: issue 11)."""
    message = codec.event(event)
    writer.add(message, started_at=started_at)
    return message if codec.is_final(message) else None


def _failure(
    final: asyncio.Future[pb.ExecutionEvent],
) -> pb.ExecutionFailed | None:
    """The execution's failure, if its final event says it failed."""
    if not final.done() or final.cancelled() or final.exception() is not None:
        return None
    event = final.result()
    return event.execution_failed if event.HasField("execution_failed") else None


async def _cancel_queued(
    execution_id: str,
    task: Task,
    final: asyncio.Future[pb.ExecutionEvent],
    writer: EventWriter,
) -> None:
    """End an execution stopped before its turn: started, then cancelled,
    with no lab work and an empty flow."""
    now = datetime.now(UTC)
    error = Cancelled("the execution was cancelled while it waited for a turn")
    started = codec.event(Event(1, now, execution_id, ExecutionStarted(task.mode, task.model)))
    failed = codec.event(Event(2, now, execution_id, ExecutionFailed(error, ())))
    writer.add(started)
    writer.add(failed)
    await writer.close(codec.ending(execution_id, failed))
    final.set_result(failed)
