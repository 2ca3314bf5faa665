"""The write path: an execution's events stored, then published.

Stored before published, so a watcher that sees a gap on the bus always
finds the missing events in the store; batched, so a token costs no
transaction of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from datetime import datetime

from agentlab.executions import codec
from agentlab.executions.model import Ending, EventBus, ExecutionStore, StoredEvent
from agentlab.metrics import record as metrics
from agentlab.v1 import execution_pb2 as pb

__all__ = ["EventWriter", "record_end"]

logger = logging.getLogger(__name__)

_APPEND_EVENTS = metrics.store_write("append_events")


class EventWriter:
    """Stores one execution's events, then publishes them, in small batches:
    the first event after a quiet spell at once, the rest coalesced for up
    to ``interval_s``, the last at once on close. One transaction per batch
    instead of one per token; and stored before published, so a watcher that
    sees a gap on the bus always finds the missing events in the store.

    A task writes only while there is something to write, and ends after a
    quiet ``interval_s``: an execution waiting for its model (most of its
    life, and 10,000 of them may be open at once) holds no task and no
    asyncio.Event here, ~3 KiB less each (issue 11)."""

    __slots__ = (
        "_bus",
        "_closed",
        "_closing",
        "_ending",
        "_execution_id",
        "_interval_s",
        "_pending",
        "_started_at",
        "_store",
        "_task",
        "storing",
    )

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
        self._closed = False
        # The task writing, while there is something to write; kept once it
        # has failed, so that add() and close() raise what stopped it.
        self._task: asyncio.Task[None] | None = None
        # Set while the task coalesces: close() ends the wait early.
        self._closing: asyncio.Future[None] | None = None
        self.storing = False
        """Whether a batch of events has gone to the store: until then none
        can have been published (stored before published)."""

    def add(self, message: pb.ExecutionEvent, *, started_at: datetime | None = None) -> None:
        """Queue an event; ``started_at`` marks the execution RUNNING with it.
        Raises what stopped the writer, if a write failed."""
        if self._task is not None and self._task.done():
            self._task.result()  # raises what stopped the writer
        self._pending.append(codec.stored(message))
        if started_at is not None:
            self._started_at = started_at
        self._write()

    async def close(self, ending: Ending | None = None) -> None:
        """Write what is pending, with ``ending`` recording the end in
        the same transaction, and stop; raises if a write failed."""
        self._ending = ending
        self._closed = True
        self._write()
        assert self._task is not None
        await self._task
        if ending is not None:
            metrics.execution_ended(ending.state.value)

    async def abandon(self) -> None:
        """Stop after writing what is pending, without an ending; never raises."""
        self._closed = True
        if self._task is not None and not self._task.done():
            self._write()
            with contextlib.suppress(Exception):
                await self._task

    def _write(self) -> None:
        """Start the task if none is writing, else cut its wait short if closed."""
        if self._task is None:
            self._task = asyncio.create_task(self._loop(), name=f"events-{self._execution_id}")
        elif self._closed and self._closing is not None and not self._closing.done():
            self._closing.set_result(None)

    async def _loop(self) -> None:
        while True:
            await self._flush()
            if self._closed:
                if not self._pending and self._ending is None:
                    self._task = None
                    return
                continue  # added before close(): written at once
            # Coalesce what arrives for interval_s, unless closed meanwhile.
            self._closing = asyncio.get_running_loop().create_future()
            try:
                async with asyncio.timeout(self._interval_s):
                    await self._closing
            except TimeoutError:
                pass
            finally:
                self._closing = None
            if not self._pending and not self._closed:
                self._task = None  # a quiet spell: the next add() starts anew
                return

    async def _flush(self) -> None:
        batch, self._pending = self._pending, []
        started_at, self._started_at = self._started_at, None
        # The ending goes with the last batch, written once closed.
        ending = self._ending if self._closed else None
        if ending is not None:
            self._ending = None
        if not batch and ending is None:
            return
        if batch:
            self.storing = True
        began = time.perf_counter()
        await self._store.append_events(
            self._execution_id, batch, started_at=started_at, ending=ending
        )
        _APPEND_EVENTS.observe(time.perf_counter() - began)
        if not batch:
            return
        try:
            await self._bus.publish(self._execution_id, *batch)
        except Exception as error:  # watchers fall back to the store
            logger.warning(
                "publishing %s #%d-%d failed: %s",
                self._execution_id,
                batch[0].sequence,
                batch[-1].sequence,
                error,
            )


async def record_end(
    store: ExecutionStore, bus: EventBus, execution_id: str, final: pb.ExecutionEvent
) -> None:
    """Store and publish a final event written outside a run, with the end
    it means."""
    writer = EventWriter(store, bus, execution_id)
    writer.add(final)
    await writer.close(codec.ending(execution_id, final))
