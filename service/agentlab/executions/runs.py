"""The executions this process runs: each one waits for its turn, streams
its events through the runner into the write path, and ends with its final
event stored, also when it is stopped (a cancel, the shutdown) before its
turn.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime

from agentlab.core.errors import Cancelled, InternalError, new_error_id
from agentlab.core.events import Event, ExecutionFailed, ExecutionStarted
from agentlab.core.runner import Prepared, Runner, Stop
from agentlab.core.types import Task
from agentlab.executions import codec
from agentlab.executions.admission import Admission
from agentlab.executions.model import EventBus, ExecutionStore
from agentlab.executions.writer import EventWriter
from agentlab.v1 import execution_pb2 as pb

__all__ = ["Runs"]

logger = logging.getLogger(__name__)


class Runs:
    def __init__(
        self, runner: Runner, store: ExecutionStore, bus: EventBus, admission: Admission
    ) -> None:
        self._runner = runner
        self._store = store
        self._bus = bus
        self._admission = admission
        self._running: dict[str, tuple[asyncio.Task[None], Stop]] = {}
        # The executions counted by admission: until their lab work is over
        # (their final event is produced) or a stop is asked for, whichever
        # comes first. Not until their run ends: a client that saw the final
        # event, or left, may start its next execution at once and must not
        # be refused because this one is still being written.
        self._counted: set[str] = set()
        # The final event of each execution run here, for callers in this
        # process: waiting on it costs no store reads.
        self._finals: dict[str, asyncio.Future[pb.ExecutionEvent]] = {}
        self._writers: dict[str, EventWriter] = {}
        # Whether drain() has begun.
        self._stopping = False

    def final(self, execution_id: str) -> asyncio.Future[pb.ExecutionEvent] | None:
        """The final event of an execution run here (None if it is not)."""
        return self._finals.get(execution_id)

    def unpublished(self, execution_id: str) -> bool:
        """Whether the execution runs here and none of its events can have
        been published yet (none has gone to the store)."""
        writer = self._writers.get(execution_id)
        return writer is not None and not writer.storing

    def stop(self, execution_id: str) -> asyncio.Task[None] | None:
        """Ask an execution run here to stop; its task, None if not here."""
        local = self._running.get(execution_id)
        if local is None:
            return None
        task, stop = local
        stop.request()
        self._uncount(execution_id)
        return task

    def _uncount(self, execution_id: str) -> None:
        """Free the execution's place within the limits (once)."""
        if execution_id in self._counted:
            self._counted.discard(execution_id)
            self._admission.release()

    def launch(
        self, execution_id: str, prepared: Prepared, *, background: bool, admitted: bool = False
    ) -> None:
        """Run an execution; ``admitted`` when submit has counted it already.
        Executions taken over from a dead process are counted too, never
        refused: they are recorded already."""
        if not admitted:
            self._admission.count()
        self._counted.add(execution_id)
        stop = Stop()
        final: asyncio.Future[pb.ExecutionEvent] = asyncio.get_running_loop().create_future()
        writer = EventWriter(self._store, self._bus, execution_id)
        run = asyncio.create_task(
            self._run(execution_id, prepared, stop, final, background, writer), name=execution_id
        )
        self._running[execution_id] = (run, stop)
        self._finals[execution_id] = final
        self._writers[execution_id] = writer

        def forget(_: object) -> None:
            self._uncount(execution_id)
            self._running.pop(execution_id, None)
            self._finals.pop(execution_id, None)
            self._writers.pop(execution_id, None)
            if not final.done():  # the run could not record its end
                final.set_exception(InternalError(new_error_id()))

        run.add_done_callback(forget)

    async def drain(self, grace_s: float) -> None:
        """Let running executions finish within ``grace_s``, then cancel the
        rest; each ends with its final event stored. Those still waiting for
        a turn do not start: background ones stay QUEUED, for the process
        that takes over (or this one, restarted) to run, the others end
        CANCELLED."""
        self._stopping = True
        for execution_id in list(self._admission.waiting):
            self._running[execution_id][1].request()
        running = [task for task, _ in self._running.values()]
        if running:
            _, pending = await asyncio.wait(running, timeout=grace_s)
            for execution_id, (task, stop) in list(self._running.items()):
                if task in pending:
                    logger.warning("execution %s cut by the shutdown", execution_id)
                    stop.request()
            if pending:
                await asyncio.wait(pending, timeout=5.0)

    async def _run(
        self,
        execution_id: str,
        prepared: Prepared,
        stop: Stop,
        final: asyncio.Future[pb.ExecutionEvent],
        background: bool,
        writer: EventWriter,
    ) -> None:
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
                last: pb.ExecutionEvent | None = None
                events = self._runner.stream(prepared, execution_id=execution_id, stop=stop)
                async for event in events:
                    message = codec.event(event)
                    # RUNNING is recorded with the first event, the end with
                    # the last: one transaction each, not two.
                    writer.add(message, started_at=None if started else datetime.now(UTC))
                    started = True
                    if codec.is_final(message):
                        last = message
            # The lab's work is over: the turn (above) and the place go to
            # the next execution before the final event is stored and seen.
            self._uncount(execution_id)
            if last is not None:
                await writer.close(codec.ending(execution_id, last))
                final.set_result(last)
        except Exception:
            # The store itself failed: nothing more can be recorded.
            logger.exception("execution %s could not be recorded", execution_id)
        finally:
            await writer.abandon()


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
