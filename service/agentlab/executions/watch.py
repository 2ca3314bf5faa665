"""Watch: an execution's events, each exactly once, by replaying the store
and then following the bus.

The subscription starts before the store is read, so an event stored after
the read arrives live. A live event out of order (a gap: the bus dropped
it) sends the watcher back to the store, the source of truth; so does a
quiet bus, after ``poll_s`` seconds and then ever less often (up to 30
times ``poll_s``), which covers a publish that failed. A watcher cut loose
because its client lagged so far that the subscription's buffer overflowed
(SubscriberLagged) subscribes again and catches up from the store, as at
the start. A bus that fails leaves the store alone, read every ``poll_s``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, Callable

from agentlab.core.errors import NotFound
from agentlab.executions import codec
from agentlab.executions.errors import SubscriberLagged
from agentlab.executions.model import ACTIVE_STATES, EventBus, ExecutionStore
from agentlab.metrics import record as metrics
from agentlab.v1 import execution_pb2 as pb

__all__ = ["watch"]

logger = logging.getLogger(__name__)

# A quiet bus is read past after poll_s, then after twice as long each time
# it stays quiet, up to this many poll_s: what the poll covers (a publish
# lost while the subscription stayed up) is rare, and 10,000 open streams
# polling every second would be 20,000 store reads a second. A failed bus
# is polled at poll_s, and any live event resets the wait.
_QUIET_BACKOFF_MAX = 30

# The store is replayed a page at a time: a watcher that lagged behind a
# long execution (tens of thousands of events) would otherwise hold all of
# them in memory at once, for as long as its client takes to read them.
REPLAY_PAGE = 256


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
    # One generator, not one per subscription relaying another: every open
    # stream holds it (10,000 may be open: issue 11).
    while True:  # a subscription each time round: again after a lag
        async with bus.subscribe(execution_id) as live:
            skip_replay = not (replay_first() if callable(replay_first) else replay_first)
            quiet_s = poll_s
            # Whether the bus failed (it raises the error again on every
            # read): the store alone serves then, polled at poll_s.
            bus_failed = False
            # Whether the bus cut the subscription loose (SubscriberLagged).
            lagged = False
            while not lagged:
                if skip_replay:
                    stored_events = []
                else:
                    stored_events = await store.events_after(execution_id, last, REPLAY_PAGE)
                for stored in stored_events:
                    event = codec.parsed(stored)
                    last = stored.sequence
                    yield event
                    if codec.is_final(event):
                        return
                if len(stored_events) == REPLAY_PAGE:
                    continue  # more in the store
                if (
                    not stored_events
                    and not skip_replay  # the store was not read: live events first
                    and await _past_the_end(store, execution_id, last)
                ):
                    return  # resumed after the final event: nothing more will come
                skip_replay = False
                if bus_failed:
                    await asyncio.sleep(poll_s)
                    continue
                # Live events, until one is missing: the store has it.
                while True:
                    try:
                        # Read straight from the subscription (no task or
                        # queue of our own per stream): its reads are safe
                        # to cut short, as the buses' Inbox's are. A timeout
                        # scope, not wait_for: no task per wait.
                        async with asyncio.timeout(quiet_s):
                            item = await anext(live)
                    except TimeoutError:
                        quiet_s = min(quiet_s * 2, poll_s * _QUIET_BACKOFF_MAX)
                        break
                    except StopAsyncIteration:
                        # Only a closed subscription ends: never while we hold it.
                        bus_failed = True
                        break
                    except SubscriberLagged:
                        lagged = True
                        break
                    except Exception as error:
                        # The bus failed: the store has it all.
                        logger.warning("watching %s: the bus failed (%s)", execution_id, error)
                        bus_failed = True
                        break
                    quiet_s = poll_s
                    if item.sequence <= last:
                        continue  # seen already, in the store
                    if item.sequence != last + 1:
                        break  # a gap
                    event = codec.parsed(item)
                    metrics.bus_delivered(event.time.seconds + event.time.nanos / 1e9)
                    last = item.sequence
                    yield event
                    if codec.is_final(event):
                        return
        # Cut loose: subscribed again first, then the store: nothing missed.
        replay_first = True


async def _past_the_end(store: ExecutionStore, execution_id: str, last: int) -> bool:
    record = await store.get(execution_id)
    if record is None:
        # Deleted by retention while watched (it keeps what ended recently,
        # so only a watcher far behind gets here): nothing more will come,
        # and waiting would poll a missing record for good.
        raise NotFound("execution", execution_id)
    return record.state not in ACTIVE_STATES and last >= record.last_sequence
