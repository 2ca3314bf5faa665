"""Executions as durable resources, and the facade the API calls.

Every call is recorded before its work starts, every event is stored before
it is published, and a watcher replays the store and then follows the bus,
so it sees each event exactly once. The jobs live in their own modules:
admission and limits (``admission``), running an execution and writing its
events (``runs``, ``writer``), watching (``watch``), cancelling (``cancel``),
heartbeats and the takeover of dead owners' executions (``recovery``), and a
call's hold on its execution, cancel-on-disconnect (``call``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence

from agentlab.core.errors import NotFinished, NotFound
from agentlab.core.runner import Runner
from agentlab.core.types import Task
from agentlab.executions import cancel, watch
from agentlab.executions.admission import Admission
from agentlab.executions.call import Call, Held, with_deadline
from agentlab.executions.compare import compare
from agentlab.executions.model import (
    ACTIVE_STATES,
    Cursor,
    EventBus,
    ExecutionRecord,
    ExecutionState,
    ExecutionStore,
)
from agentlab.executions.recovery import Recovery
from agentlab.executions.retention import Sweeper
from agentlab.executions.runs import Runs
from agentlab.executions.submission import Submitted, submit
from agentlab.metrics import record as metrics
from agentlab.telemetry import logs, tracing
from agentlab.v1 import execution_pb2 as pb
from agentlab.v1 import lab_service_pb2 as svc

__all__ = ["Executions", "Submitted"]

logger = logging.getLogger(__name__)


class Executions:
    """``poll_s``: how soon a watcher reads the store once the bus is
    quiet (then less often while it stays quiet: executions/watch.py);
    ``heartbeat_s`` and ``lease_s``: how often this process says it is
    alive, and how long an owner may be silent before its executions are
    taken over (seconds)."""

    def __init__(
        self,
        runner: Runner,
        store: ExecutionStore,
        bus: EventBus,
        *,
        owner: str,
        heartbeat_s: float = 5.0,
        lease_s: float = 15.0,
        poll_s: float = 1.0,
        max_running: int = 16,
        max_queued: int = 64,
        retry_after_s: float = 1.0,
    ) -> None:
        self._runner = runner
        self._store = store
        self._bus = bus
        self._owner = owner
        self._poll_s = poll_s
        self._admission = Admission(
            max_running=max_running, max_queued=max_queued, retry_after_s=retry_after_s
        )
        metrics.report_load(self._admission)
        self._runs = Runs(runner, store, bus, self._admission)
        self._recovery = Recovery(
            runner, store, bus, self._runs, owner=owner, heartbeat_s=heartbeat_s, lease_s=lease_s
        )
        self._sweeper: Sweeper | None = None
        self._background: list[asyncio.Task[None]] = []
        self._opened = False

    def retain(self, sweeper: Sweeper) -> None:
        """Run ``sweeper`` (the store's retention) from start() to close();
        without one, every execution is kept."""
        self._sweeper = sweeper

    async def open(self) -> None:
        """Open the store and the bus (once): what cannot be reached raises
        here, before any call is served."""
        if not self._opened:
            await self._store.open()
            await self._bus.open()
            self._opened = True

    async def start(self) -> None:
        await self.open()
        listening = asyncio.Event()
        self._background = [
            asyncio.create_task(
                cancel.listen_for_cancels(self._bus, self._runs, listening),
                name="cancel-listener",
            ),
            asyncio.create_task(self._recovery.keep_alive(), name="executions-heartbeat"),
        ]
        if self._sweeper is not None:
            # Stopped with the heartbeat in close(): a batch cut short there
            # still commits or not as a whole (the stores finish a write
            # whose caller left).
            self._background.append(
                asyncio.create_task(self._sweeper.run(), name="executions-retention")
            )
        await listening.wait()
        await self.recover()

    async def stop(self, grace_s: float) -> None:
        await self.drain(grace_s)
        await self.close()

    async def drain(self, grace_s: float) -> None:
        """Let running executions finish within ``grace_s`` (see Runs.drain);
        watchers can still read the store and the bus."""
        await self._runs.drain(grace_s)

    async def close(self) -> None:
        """Stop the heartbeat and close the bus and the store (after drain)."""
        for task in self._background:
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        await self._bus.close()
        await self._store.close()

    async def recover(self) -> None:
        """Take over the executions of owners that fell silent."""
        await self._recovery.recover()

    async def submit(
        self,
        task: Task,
        *,
        caller: str = "",
        request_id: str = "",
        background: bool = False,
        replay_of: str = "",
    ) -> Submitted:
        """Record the execution and start its work (see submission.submit)."""
        return await submit(
            self._runner,
            self._store,
            self._admission,
            self._runs,
            task,
            owner=self._owner,
            caller=caller,
            request_id=request_id,
            background=background,
            replay_of=replay_of,
        )

    def call(
        self,
        task: Task,
        *,
        caller: str = "",
        request_id: str = "",
        background: bool = False,
        leaving_cancels: bool,
        time_remaining_s: float | None = None,
        replay_of: str = "",
    ) -> Held:
        """``async with``: submit ``task`` for one call and yield the
        execution; on leaving before its final event, cancel it when
        ``leaving_cancels`` and this call created it (executions/call.py).
        Only then does the caller's deadline (``time_remaining_s``, seconds)
        limit the execution. ``replay_of``: the execution this one replays
        (see replay_task)."""
        if leaving_cancels:
            task = with_deadline(task, time_remaining_s)
        submitted = self._submit_call(task, caller, request_id, background, replay_of)
        return Held(self, submitted, leaving_cancels=leaving_cancels)

    async def _submit_call(
        self, task: Task, caller: str, request_id: str, background: bool, replay_of: str
    ) -> Call:
        submitted = await self.submit(
            task, caller=caller, request_id=request_id, background=background, replay_of=replay_of
        )
        # The rest of the call's log lines (and its span) name the execution.
        logs.execution_id.set(submitted.record.id)
        tracing.annotate("agentlab.execution.id", submitted.record.id)
        return Call(submitted.record, submitted.created, self, caller)

    def watch_call(self, call: Call, after_sequence: int) -> AsyncIterator[pb.ExecutionEvent]:
        """The events of ``call``'s execution (Call.events)."""
        execution_id = call.record.id
        if call.created and after_sequence == 0:
            # Its own execution: no ownership check; and while it has
            # published nothing (run here, nothing stored yet, checked
            # once subscribed), the bus before the store.
            return self._watch(
                execution_id, 0, replay_first=lambda: not self._runs.unpublished(execution_id)
            )
        return self.watch(execution_id, after_sequence, call.caller)

    async def cancel_left(self, call: Call) -> None:
        """Cancel the execution ``call`` created, which its caller left."""
        # Run here: stopped before anything is awaited, so its place is free
        # as soon as the caller has left.
        task = self._runs.stop(call.record.id)
        if task is not None:
            await asyncio.wait({task}, timeout=10.0)
        else:
            await self.cancel(call.record.id, call.caller)

    async def get(self, execution_id: str, caller: str | None = None) -> ExecutionRecord:
        """The record; NOT_FOUND too when it is another caller's, so ids of
        others' executions reveal nothing."""
        record = await self._store.get(execution_id)
        if record is None or (caller is not None and record.caller != caller):
            raise NotFound("execution", execution_id)
        return record

    async def find(self, caller: str, request_id: str) -> ExecutionRecord | None:
        """The caller's execution recorded with ``request_id``, if any."""
        return await self._store.find(caller, request_id)

    async def compare(
        self, execution_ids: Sequence[str], caller: str | None = None
    ) -> svc.CompareExecutionsResponse:
        """The executions lined up against the first (executions/compare.py);
        NOT_FOUND, as get, for any that is not the caller's."""
        records = [await self.get(execution_id, caller) for execution_id in execution_ids]
        # A running one has no flow yet: its nodes would all read "not run".
        for record in records:
            if record.state in ACTIVE_STATES:
                raise NotFinished(record.id, record.state.value)
        # Word diffs of long outputs take a while: not on the event loop.
        return await asyncio.to_thread(compare, records)

    async def page(
        self,
        *,
        page_size: int,
        after: Cursor | None,
        model: str | None = None,
        state: ExecutionState | None = None,
        caller: str | None = None,
    ) -> tuple[list[ExecutionRecord], Cursor | None]:
        return await self._store.page(
            page_size=page_size, after=after, caller=caller, model=model, state=state
        )

    async def cancel(
        self, execution_id: str, caller: str | None = None, wait_s: float = 10.0
    ) -> ExecutionRecord:
        """Cancel an active execution and return its record, ended unless it
        took longer than ``wait_s`` seconds; an ended one is returned as is."""
        record = await self.get(execution_id, caller)
        if record.state not in ACTIVE_STATES:
            return record
        await cancel.cancel(self._runs, self._bus, self._state_of, execution_id, wait_s)
        return await self.get(execution_id)

    async def _state_of(self, execution_id: str) -> ExecutionState:
        return (await self.get(execution_id)).state

    async def watch(
        self, execution_id: str, after_sequence: int = 0, caller: str | None = None
    ) -> AsyncGenerator[pb.ExecutionEvent, None]:
        """Events after ``after_sequence`` until the final one, each once."""
        await self.get(execution_id, caller)
        async with contextlib.aclosing(self._watch(execution_id, after_sequence)) as events:
            async for event in events:
                yield event

    def _watch(
        self,
        execution_id: str,
        after_sequence: int,
        *,
        replay_first: bool | Callable[[], bool] = True,
    ) -> AsyncGenerator[pb.ExecutionEvent, None]:
        return watch.watch(
            self._store,
            self._bus,
            execution_id,
            after_sequence,
            poll_s=self._poll_s,
            replay_first=replay_first,
        )

    async def wait_for_final(self, execution_id: str) -> pb.ExecutionEvent:
        """The execution's final event, once there is one."""
        local = self._runs.final(execution_id)
        if local is not None:
            return await asyncio.shield(local)
        final: pb.ExecutionEvent | None = None
        async for event in self.watch(execution_id):
            final = event
        assert final is not None  # watch ends with the final event only
        return final
