"""Watch: an execution's events, each exactly once, by replaying the store
and then following the bus.

The subscription starts before the store is read, so an event stored after
the read arrives live. A live event out of order (a gap: the bus dropped
it, or this watcher's client lagged and its inbox overflowed) sends the
watcher back to the store, the source of truth; so does a quiet bus, after
``poll_s`` seconds and then ever less often (up to 30 times ``poll_s``),
which covers a publish that failed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Callable

from agentlab.executions import codec
from agentlab.executions.model import ACTIVE_STATES, EventBus, ExecutionStore, StoredEvent
from agentlab.v1 import execution_pb2 as pb

__all__ = ["watch"]

logger = logging.getLogger(__name__)

# Live events a watcher holds for a client that does not read: beyond them
# it drops live events and later reads the missing ones from the store, so a
# slow reader costs a bounded amount of memory.
_WATCH_BUFFER = 256

# A quiet bus is read past after poll_s, then after twice as long each time
# it stays quiet, up to this many poll_s: what the poll covers (a publish
# lost while the subscription stayed up) is rare, and 10,000 open streams
# polling every second would be 20,000 store reads a second. A failed bus
# is polled at poll_s, and any live event resets the wait.
_QUIET_BACKOFF_MAX = 30


async def watch(
    store: ExecutionStore,
    bus: EventBus,
    execution_id: str,
    after_sequence: int,
    *,
    poll_s: float,
    replay_first: bool | Callable[[], bool] = True,
) -> AsyncGenerator[pb.ExecutionEvent, None]:
    """Events after ``after_sequence`` until the final one, each once.

    ``replay_first`` False (or a check, called once the subscription is
    live, that returns False) starts with the bus rather than the store: for
    an execution none of whose events can have been published yet, which
    saves a store read before the first event. A check is what makes it
    exact on a bus whose subscription takes a round trip (Redis), during
    which a fast execution may publish everything. Still a hint, never a
    risk: had events been published before, the first live one shows a gap
    (or the bus stays quiet for ``poll_s``), and the store is read as usual."""
    last = after_sequence
    inbox: asyncio.Queue[StoredEvent | Exception] = asyncio.Queue(_WATCH_BUFFER)
    dropped = asyncio.Event()
    async with bus.subscribe(execution_id) as live:
        pump = asyncio.create_task(_pump(live, inbox, dropped))
        skip_replay = not (replay_first() if callable(replay_first) else replay_first)
        quiet_s = poll_s
        try:
            while True:
                if skip_replay:
                    stored_events = []
                else:
                    stored_events = await store.events_after(execution_id, last)
                for stored in stored_events:
                    event = codec.parsed(stored)
                    last = stored.sequence
                    yield event
                    if codec.is_final(event):
                        return
                if (
                    not stored_events
                    and not skip_replay  # the store was not read: live events first
                    and await _past_the_end(store, execution_id, last)
                ):
                    return  # resumed after the final event: nothing more will come
                skip_replay = False
                # Live events, until one is missing: the store has it.
                while True:
                    if dropped.is_set() and inbox.empty():
                        dropped.clear()
                        break  # the newest were dropped while the client lagged
                    try:
                        # What has arrived is taken without a timer: a
                        # stream's events often come several at a time.
                        item = inbox.get_nowait()
                    except asyncio.QueueEmpty:
                        try:
                            # A timeout scope, not wait_for: no task per wait.
                            async with asyncio.timeout(quiet_s):
                                item = await inbox.get()
                        except TimeoutError:
                            if not pump.done():  # else the bus failed: keep poll_s
                                quiet_s = min(quiet_s * 2, poll_s * _QUIET_BACKOFF_MAX)
                            break
                    quiet_s = poll_s
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
                    if codec.is_final(event):
                        return
        finally:
            pump.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pump


async def _past_the_end(store: ExecutionStore, execution_id: str, last: int) -> bool:
    record = await store.get(execution_id)
    return record is not None and record.state not in ACTIVE_STATES and last >= record.last_sequence


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
