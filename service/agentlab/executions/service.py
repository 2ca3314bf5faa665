"""Executions as durable resources: every call is recorded before its work
starts, every event is stored before it is published, and a watcher replays
the store and then follows the bus, so it sees each event exactly once.

A process owns the executions it runs and says so on a heartbeat; when an
owner falls silent for longer than the lease (it was killed), any process
takes over its executions: queued background ones are run, running ones are
failed with a reason, their flow kept.

A process runs at most ``max_running`` executions' lab work at once; up to
``max_queued`` more wait for a turn (their records QUEUED). Beyond both,
``submit`` refuses with ResourceExhausted before recording anything.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from agentlab.core.errors import (
    Cancelled,
    IdempotencyKeyReused,
    InternalError,
    NotFound,
    ResourceExhausted,
    new_error_id,
)
from agentlab.core.events import Event, ExecutionFailed, ExecutionStarted
from agentlab.core.runner import Prepared, Runner, Stop, new_execution_id
from agentlab.core.types import ExecutionMode, GenerationOptions, Task
from agentlab.executions import codec
from agentlab.executions.call import Call, held, with_deadline
from agentlab.executions.codec import is_final
from agentlab.executions.fingerprint import fingerprint, fingerprint_of
from agentlab.executions.model import (
    ACTIVE_STATES,
    Cursor,
    Ending,
    EventBus,
    ExecutionRecord,
    ExecutionState,
    ExecutionStore,
    NewExecution,
    StoredEvent,
)
from agentlab.v1 import execution_pb2 as pb

__all__ = ["Executions", "Submitted", "is_final"]

logger = logging.getLogger(__name__)

# Live events a watcher holds for a client that does not read: beyond them
# it drops live events and later reads the missing ones from the store, so a
# slow reader costs a bounded amount of memory.
_WATCH_BUFFER = 256


@dataclass(frozen=True)
class Submitted:
    record: ExecutionRecord
    # False when the request_id had been seen: the record is the earlier one.
    created: bool


class Executions:
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
        self._heartbeat_s = heartbeat_s
        self._lease_s = lease_s
        # How often a watcher looks at the store when the bus is quiet: it
        # covers a publish that failed.
        self._poll_s = poll_s
        self._running: dict[str, tuple[asyncio.Task[None], Stop]] = {}
        # The final event of each execution run here, for callers in this
        # process: waiting on it costs no store reads.
        self._finals: dict[str, asyncio.Future[pb.ExecutionEvent]] = {}
        self._background: list[asyncio.Task[None]] = []
        self._max_running = max_running
        self._max_queued = max_queued
        self._retry_after_s = retry_after_s
        # Turns at the lab; an execution waits for one while QUEUED.
        self._turns = asyncio.Semaphore(max_running)
        # Executions admitted here and not finished: running, waiting for a
        # turn, or being recorded (counted before the store is awaited, so
        # concurrent submits cannot overshoot).
        self._admitted = 0
        # Executions waiting for a turn, and whether stop() has begun.
        self._waiting: set[str] = set()
        self._stopping = False
        self._opened = False

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
            asyncio.create_task(self._listen_for_cancels(listening), name="cancel-listener"),
            asyncio.create_task(self._keep_alive(), name="executions-heartbeat"),
        ]
        await listening.wait()
        await self.recover()

    async def stop(self, grace_s: float) -> None:
        await self.drain(grace_s)
        await self.close()

    async def drain(self, grace_s: float) -> None:
        """Let running executions finish within ``grace_s``, then cancel the
        rest; each ends with its final event stored. Those still waiting for
        a turn do not start: background ones stay QUEUED, for the process
        that takes over (or this one, restarted) to run, the others end
        CANCELLED. Watchers can still read the store and the bus."""
        self._stopping = True
        for execution_id in list(self._waiting):
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

    async def close(self) -> None:
        """Stop the heartbeat and close the bus and the store (after drain)."""
        for task in self._background:
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        await self._bus.close()
        await self._store.close()

    async def submit(
        self, task: Task, *, caller: str = "", request_id: str = "", background: bool = False
    ) -> Submitted:
        """Record the execution and start its work; a bad request, or one
        beyond the limits of executions, raises before anything is recorded.

        With a ``request_id`` the caller already used, the result is that
        execution (``created`` False), looked up before the model is routed:
        a retry finds it even after the routing file dropped the model, and
        a recorded key is never refused for the limits. The key is bound to
        the request it came with: a different request raises
        IdempotencyKeyReused."""
        # Only a key is bound to its request: a call without one is never
        # looked up again, so its fingerprint is not worth computing.
        work = (
            fingerprint(
                mode=task.mode.value,
                model=task.model,
                prompt=task.prompt,
                options=_options(task.options),
            )
            if request_id
            else ""
        )
        if request_id and (known := await self._store.find(caller, request_id)) is not None:
            return _attach(known, work)
        prepared = self._runner.prepare(task)
        if self._admitted >= self._max_running + self._max_queued:
            raise ResourceExhausted(self._max_running, self._max_queued, self._retry_after_s)
        self._admitted += 1
        launched = False
        try:
            now = datetime.now(UTC)
            record, created = await self._store.create(
                NewExecution(
                    id=new_execution_id(),
                    request_id=request_id,
                    caller=caller,
                    model=task.model,
                    mode=task.mode.value,
                    prompt=task.prompt,
                    options=_options(task.options),
                    background=background,
                    created_at=now,
                    owner=self._owner,
                    fingerprint=work,
                )
            )
            if not created:
                # A call with the same key got there first, after the lookup.
                return _attach(record, work)
            self._launch(record.id, prepared, background=background, admitted=True)
            launched = True
        finally:
            if not launched:
                self._admitted -= 1
        return Submitted(record, created)

    @contextlib.asynccontextmanager
    async def call(
        self,
        task: Task,
        *,
        caller: str = "",
        request_id: str = "",
        background: bool = False,
        leaving_cancels: bool,
        time_remaining_s: float | None = None,
    ) -> AsyncIterator[Call]:
        """Submit ``task`` for one call and yield the execution; on leaving
        before its final event, cancel it when ``leaving_cancels`` and this
        call created it (executions/call.py). Only then does the caller's
        deadline (``time_remaining_s``, seconds) limit the execution."""
        if leaving_cancels:
            task = with_deadline(task, time_remaining_s)
        submitted = await self.submit(
            task, caller=caller, request_id=request_id, background=background
        )

        def watch(execution_id: str, after: int) -> AsyncGenerator[pb.ExecutionEvent, None]:
            return self.watch(execution_id, after, caller)

        async def cancel(execution_id: str) -> None:
            await self.cancel(execution_id, caller)

        call = Call(submitted.record, submitted.created, self.wait_for_final, watch)
        async with held(call, leaving_cancels=leaving_cancels, cancel=cancel):
            yield call

    async def get(self, execution_id: str, caller: str | None = None) -> ExecutionRecord:
        """The record; NOT_FOUND too when it is another caller's, so ids of
        others' executions reveal nothing."""
        record = await self._store.get(execution_id)
        if record is None or (caller is not None and record.caller != caller):
            raise NotFound("execution", execution_id)
        return record

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
        record = await self.get(execution_id, caller)
        if record.state not in ACTIVE_STATES:
            return record
        local = self._running.get(execution_id)
        if local is not None:
            task, stop = local
            stop.request()
            await asyncio.wait({task}, timeout=wait_s)
        else:
            # Another process runs it: it hears this on the bus.
            await self._bus.request_cancel(execution_id)
            deadline = asyncio.get_running_loop().time() + wait_s
            while (await self.get(execution_id)).state in ACTIVE_STATES:
                if asyncio.get_running_loop().time() > deadline:
                    break
                await asyncio.sleep(0.05)
        return await self.get(execution_id)

    async def watch(
        self, execution_id: str, after_sequence: int = 0, caller: str | None = None
    ) -> AsyncGenerator[pb.ExecutionEvent, None]:
        """Events after ``after_sequence`` until the final one, each once."""
        await self.get(execution_id, caller)
        last = after_sequence
        inbox: asyncio.Queue[StoredEvent | Exception] = asyncio.Queue(_WATCH_BUFFER)
        dropped = asyncio.Event()
        async with self._bus.subscribe(execution_id) as live:
            # Subscribed before the store is read: an event stored after the
            # read was published after the subscription, so it arrives live.
            pump = asyncio.create_task(_pump(live, inbox, dropped))
            try:
                while True:
                    stored_events = await self._store.events_after(execution_id, last)
                    for stored in stored_events:
                        event = codec.parsed(stored)
                        last = stored.sequence
                        yield event
                        if is_final(event):
                            return
                    if not stored_events and await self._past_the_end(execution_id, last):
                        return  # resumed after the final event: nothing more will come
                    # Live events, until one is missing: the store has it.
                    while True:
                        if dropped.is_set() and inbox.empty():
                            dropped.clear()
                            break  # the newest were dropped while the client lagged
                        try:
                            item = await asyncio.wait_for(inbox.get(), timeout=self._poll_s)
                        except TimeoutError:
                            break
                        if isinstance(item, Exception):
                            logger.warning("watching %s: the bus failed (%s)", execution_id, item)
                            break  # the store alone still serves, at the poll rate
                        if item.sequence <= last:
                            continue  # seen already, in the store
                        if item.sequence != last + 1:
                            break  # a gap
                        event = codec.parsed(item)
                        last = item.sequence
                        yield event
                        if is_final(event):
                            return
            finally:
                pump.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await pump

    async def _past_the_end(self, execution_id: str, last: int) -> bool:
        record = await self._store.get(execution_id)
        return (
            record is not None
            and record.state not in ACTIVE_STATES
            and last >= record.last_sequence
        )

    async def wait_for_final(self, execution_id: str) -> pb.ExecutionEvent:
        """The execution's final event, once there is one."""
        local = self._finals.get(execution_id)
        if local is not None:
            return await asyncio.shield(local)
        final: pb.ExecutionEvent | None = None
        async for event in self.watch(execution_id):
            final = event
        assert final is not None  # watch ends with the final event only
        return final

    async def recover(self) -> None:
        """Take over the executions of owners that fell silent."""
        now = datetime.now(UTC)
        stale_before = now - timedelta(seconds=self._lease_s)
        for record in await self._store.stale(stale_before):
            if not await self._store.claim(record.id, self._owner, stale_before, now):
                continue  # another process took it
            if record.state is ExecutionState.QUEUED and record.background:
                logger.info("running queued execution %s left by %s", record.id, record.owner)
                try:
                    prepared = self._runner.prepare(_task(record))
                except Exception:
                    # The routing file dropped its model since: it stays
                    # QUEUED, as it would have before a turn.
                    logger.exception("execution %s cannot be run here", record.id)
                    continue
                self._launch(record.id, prepared, background=True)
            else:
                logger.warning("execution %s was cut: %s stopped", record.id, record.owner)
                await self._fail_orphan(record)

    def _launch(
        self, execution_id: str, prepared: Prepared, *, background: bool, admitted: bool = False
    ) -> None:
        """Run an execution; ``admitted`` when submit has counted it already.
        Executions taken over from a dead process are counted too, never
        refused: they are recorded already."""
        if not admitted:
            self._admitted += 1
        stop = Stop()
        final: asyncio.Future[pb.ExecutionEvent] = asyncio.get_running_loop().create_future()
        run = asyncio.create_task(
            self._run(execution_id, prepared, stop, final, background), name=execution_id
        )
        self._running[execution_id] = (run, stop)
        self._finals[execution_id] = final

        def forget(_: object) -> None:
            self._admitted -= 1
            self._running.pop(execution_id, None)
            self._finals.pop(execution_id, None)
            if not final.done():  # the run could not record its end
                final.set_exception(InternalError(new_error_id()))

        run.add_done_callback(forget)

    async def _run(
        self,
        execution_id: str,
        prepared: Prepared,
        stop: Stop,
        final: asyncio.Future[pb.ExecutionEvent],
        background: bool,
    ) -> None:
        writer = _EventWriter(self._store, self._bus, execution_id)
        try:
            self._waiting.add(execution_id)
            async with self._turn(stop) as turn:
                self._waiting.discard(execution_id)
                if not turn and self._stopping and background:
                    logger.info("execution %s stays queued for the next process", execution_id)
                    final.cancel()
                    return
                if not turn:
                    await self._cancel_queued(execution_id, prepared.task, final, writer)
                    return
                started = False
                events = self._runner.stream(prepared, execution_id=execution_id, stop=stop)
                async for event in events:
                    message = codec.event(event)
                    # RUNNING is recorded with the first event, the end with
                    # the last: one transaction each, not two.
                    writer.add(message, started_at=None if started else datetime.now(UTC))
                    started = True
                    if is_final(message):
                        await writer.close(codec.ending(execution_id, message))
                        final.set_result(message)
        except Exception:
            # The store itself failed: nothing more can be recorded.
            logger.exception("execution %s could not be recorded", execution_id)
        finally:
            self._waiting.discard(execution_id)
            await writer.abandon()

    @contextlib.asynccontextmanager
    async def _turn(self, stop: Stop) -> AsyncIterator[bool]:
        """Wait (QUEUED) for a turn at the lab, and hold it while running;
        False when a stop (a cancel, the shutdown) came first."""
        waiting = asyncio.timeout(None)
        acquired = False
        try:
            async with waiting:
                stop.attach(waiting)
                await self._turns.acquire()
                acquired = True
        except TimeoutError:
            if not stop.requested:
                raise
        finally:
            stop.detach()
        try:
            yield acquired
        finally:
            if acquired:
                self._turns.release()

    async def _cancel_queued(
        self,
        execution_id: str,
        task: Task,
        final: asyncio.Future[pb.ExecutionEvent],
        writer: _EventWriter,
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

    async def _record_end(self, execution_id: str, final: pb.ExecutionEvent) -> None:
        """Store and publish a final event written here, with the end it means."""
        writer = _EventWriter(self._store, self._bus, execution_id)
        writer.add(final)
        await writer.close(codec.ending(execution_id, final))

    async def _fail_orphan(self, record: ExecutionRecord) -> None:
        steps = codec.finished_steps(await self._store.events_after(record.id, 0))
        final = codec.cut_short(record.id, record.last_sequence + 1, record.owner, steps)
        await self._record_end(record.id, final)

    async def _listen_for_cancels(self, listening: asyncio.Event) -> None:
        while True:
            try:
                async with self._bus.cancel_requests() as requests:
                    listening.set()
                    async for execution_id in requests:
                        if (local := self._running.get(execution_id)) is not None:
                            local[1].request()
            except asyncio.CancelledError:
                raise
            except Exception as error:
                listening.set()
                logger.warning("listening for cancel requests failed (%s); retrying", error)
                await asyncio.sleep(1.0)

    async def _keep_alive(self) -> None:
        while True:
            await asyncio.sleep(self._heartbeat_s)
            try:
                await self._store.heartbeat(self._owner, datetime.now(UTC))
                await self.recover()
            except Exception:
                logger.exception("the executions heartbeat failed")


class _EventWriter:
    """Stores one execution's events, then publishes them, in small batches:
    the first event after a quiet spell at once, the rest coalesced for up
    to ``interval_s``, the last at once on close. One transaction per batch
    instead of one per token; and stored before published, so a watcher that
    sees a gap on the bus always finds the missing events in the store."""

    def __init__(
        self, store: ExecutionStore, bus: EventBus, execution_id: str, interval_s: float = 0.05
    ) -> None:
        self._store = store
        self._bus = bus
        self._execution_id = execution_id
        self._interval_s = interval_s
        self._pending: list[StoredEvent] = []
        self._started_at: datetime | None = None
        self._ending: Ending | None = None
        self._wake = asyncio.Event()
        self._closed = asyncio.Event()
        self._task = asyncio.create_task(self._loop(), name=f"events-{execution_id}")

    def add(self, message: pb.ExecutionEvent, *, started_at: datetime | None = None) -> None:
        """Queue an event; ``started_at`` marks the execution RUNNING with it."""
        if self._task.done():
            self._task.result()  # raises what stopped the writer
        self._pending.append(codec.stored(message))
        if started_at is not None:
            self._started_at = started_at
        self._wake.set()

    async def close(self, ending: Ending | None = None) -> None:
        """Write what is pending, with ``ending`` recording the end in
        the same transaction, and stop; raises if a write failed."""
        self._ending = ending
        self._closed.set()
        self._wake.set()
        await self._task

    async def abandon(self) -> None:
        if not self._task.done():
            self._closed.set()
            self._wake.set()
            with contextlib.suppress(Exception):
                await self._task

    async def _loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            await self._flush()
            if self._closed.is_set() and not self._pending and self._ending is None:
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closed.wait(), self._interval_s)

    async def _flush(self) -> None:
        batch, self._pending = self._pending, []
        started_at, self._started_at = self._started_at, None
        # The ending goes with the last batch, written once closed.
        ending = self._ending if self._closed.is_set() else None
        if ending is not None:
            self._ending = None
        if not batch and ending is None:
            return
        await self._store.append_events(
            self._execution_id, batch, started_at=started_at, ending=ending
        )
        for stored in batch:
            try:
                await self._bus.publish(self._execution_id, stored)
            except Exception as error:  # watchers fall back to the store
                logger.warning(
                    "publishing %s #%d failed: %s", self._execution_id, stored.sequence, error
                )
                return


async def _pump(
    live: AsyncIterator[StoredEvent],
    inbox: asyncio.Queue[StoredEvent | Exception],
    dropped: asyncio.Event,
) -> None:
    """Move live events to the watcher. A full inbox means the watcher's
    client is not reading: the event is dropped (and ``dropped`` set), and
    the watcher reads it from the store when it gets there."""
    try:
        async for event in live:
            try:
                inbox.put_nowait(event)
            except asyncio.QueueFull:
                dropped.set()
    except Exception as error:
        # The bus failed: make room so the watcher hears of it.
        while inbox.full():
            inbox.get_nowait()
        inbox.put_nowait(error)


def _attach(known: ExecutionRecord, work: str) -> Submitted:
    """The caller's earlier execution for a key, if it was for the same work."""
    if fingerprint_of(known) != work:
        raise IdempotencyKeyReused(known.request_id, known.id)
    return Submitted(known, created=False)


def _options(options: GenerationOptions) -> dict[str, float | int]:
    given = {
        "temperature": options.temperature,
        "max_tokens": options.max_tokens,
        "seed": options.seed,
    }
    return {key: value for key, value in given.items() if value is not None}


def _task(record: ExecutionRecord) -> Task:
    options = record.options
    temperature = options.get("temperature")
    max_tokens = options.get("max_tokens")
    seed = options.get("seed")
    return Task(
        prompt=record.prompt,
        model=record.model,
        mode=ExecutionMode(record.mode),
        options=GenerationOptions(
            temperature=None if temperature is None else float(temperature),
            max_tokens=None if max_tokens is None else int(max_tokens),
            seed=None if seed is None else int(seed),
        ),
    )
