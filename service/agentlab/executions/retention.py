"""Retention: finished executions are deleted, with their events, once they
are older than the policy keeps them, by a sweeper that runs beside the
service rather than on the path of any call.

A sweep deletes in small batches (one transaction each: at most the batch
size of executions, fewer when they hold many events, see
EVENTS_PER_DELETE) and pauses between them for as long as the batch took
(up to 20 ms), so the store's writer (SQLite has one) spends at most about
half its time on it while a backlog drains, and calls' writes wait for one
batch at most.
Then it hands the freed pages back to the file system (SQLite; PostgreSQL
reuses them itself), in steps as well.

Never deleted: an execution still QUEUED or RUNNING (whatever its owner's
lease says: recovery ends those first, and they wait their turn like any
other), nor one that ended less than ``grace_s`` ago, which a watcher may
still be replaying or a caller reading.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from agentlab.executions.model import Cursor, ExecutionStore, Expiry

__all__ = ["RetentionPolicy", "Sweep", "Sweeper", "expiry_for"]

logger = logging.getLogger(__name__)

# The longest pause between two batches, seconds: about what a batch costs
# the writer on a quiet machine (EVENTS_PER_DELETE). On a busy one a batch's
# wall time is mostly its wait for the writer's turn and for the event loop,
# which spaces the batches out already; pausing that long again would let
# a steady load outrun the sweeper.
_MAX_PAUSE_S = 0.02

# Pages (4 KiB each by default) one release_space call frees at most: it
# moves pages inside the file under the write lock (about 0.15 ms a page
# here), so it is cut in steps like the deletes.
_PAGES_PER_STEP = 256


@dataclass(frozen=True)
class RetentionPolicy:
    """What is kept. ``max_age_s``: finished executions created longer ago
    than this many seconds are deleted; ``max_count``: only the newest this
    many finished executions are kept. None turns a limit off; with both
    off nothing is ever deleted. ``grace_s``: an execution that ended less
    than this many seconds ago is kept whatever the limits say."""

    max_age_s: float | None = 30 * 24 * 3600.0
    max_count: int | None = None
    grace_s: float = 15.0

    @property
    def keeps_everything(self) -> bool:
        return self.max_age_s is None and self.max_count is None

    async def expiry(self, store: ExecutionStore, now: datetime) -> Expiry | None:
        """What expires at ``now`` (an aware datetime) in ``store``; None
        when nothing can (no limit, or fewer finished executions than the
        count and no age limit)."""
        return await expiry_for(
            store,
            ended_before=now - timedelta(seconds=self.grace_s),
            created_before=(
                None if self.max_age_s is None else now - timedelta(seconds=self.max_age_s)
            ),
            keep_newest=self.max_count,
        )


async def expiry_for(
    store: ExecutionStore,
    *,
    ended_before: datetime,
    created_before: datetime | None = None,
    keep_newest: int | None = None,
) -> Expiry | None:
    """The one bound both limits make: each cuts the list from its old end,
    so what they expire together is the longer of two prefixes. The age
    limit is the position (created_before, ""), "" being below every id;
    the count limit, the keep_newest-th newest finished execution's, read
    once per sweep (a walk of keep_newest index entries, on the store's
    reading side: the batches then delete a range below a fixed bound)."""
    bounds: list[Cursor] = []
    if created_before is not None:
        bounds.append(Cursor(created_before, ""))
    if keep_newest is not None:
        nth = await store.nth_newest_finished(keep_newest)
        if nth is not None:
            bounds.append(nth)
    if not bounds:
        return None
    before = max(bounds, key=lambda cursor: (cursor.created_at, cursor.id))
    return Expiry(ended_before=ended_before, before=before)


@dataclass(frozen=True)
class Sweep:
    """What one sweep did: executions deleted, in how many batches (those
    that deleted something), bytes
    handed back to the file system, and its wall time in seconds."""

    deleted: int
    batches: int
    released_bytes: int
    duration_s: float


class Sweeper:
    """Applies ``policy`` to ``store`` every ``interval_s`` seconds, at most
    ``batch_size`` executions per transaction."""

    def __init__(
        self,
        store: ExecutionStore,
        policy: RetentionPolicy,
        *,
        interval_s: float = 60.0,
        batch_size: int = 100,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, not {batch_size}")
        if interval_s <= 0:
            raise ValueError(f"interval_s must be above 0, not {interval_s}")
        self._store = store
        self._policy = policy
        self._interval_s = interval_s
        self._batch_size = batch_size

    async def sweep(self, now: datetime | None = None) -> Sweep:
        """Delete every execution the policy expires at ``now`` (default: the
        current time), a batch at a time, then release the space freed."""
        started = time.monotonic()
        deleted = batches = released = 0
        if self._policy.keeps_everything:
            return Sweep(0, 0, 0, 0.0)
        expiry = await self._policy.expiry(self._store, now or datetime.now(UTC))
        while expiry is not None:
            batch_started = time.monotonic()
            count = await self._store.delete_expired(expiry, self._batch_size)
            if count == 0:
                break
            deleted += count
            batches += 1
            await self._pause(batch_started)
        if deleted:
            while True:
                step_started = time.monotonic()
                freed = await self._store.release_space(_PAGES_PER_STEP)
                released += freed
                if freed == 0:
                    break
                await self._pause(step_started)
        return Sweep(deleted, batches, released, time.monotonic() - started)

    async def run(self) -> None:
        """Sweep at once, then every ``interval_s``, until cancelled; a sweep
        that fails is logged and the next one tries again."""
        if self._policy.keeps_everything:
            return
        while True:
            try:
                done = await self.sweep()
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("the retention sweep failed; retrying in %.0f s", self._interval_s)
            else:
                if done.deleted:
                    logger.info(
                        "retention: deleted %d executions in %d batches, released %.1f MB (%.2f s)",
                        done.deleted,
                        done.batches,
                        done.released_bytes / 1e6,
                        done.duration_s,
                    )
            await asyncio.sleep(self._interval_s)

    @staticmethod
    async def _pause(since: float) -> None:
        """As long as the step since ``since`` took, up to _MAX_PAUSE_S: on
        a quiet machine the store's writer is the sweep's at most half the
        time."""
        await asyncio.sleep(min(time.monotonic() - since, _MAX_PAUSE_S))
