"""An execution's durable record, and the two seams it is kept behind: the
store (SQLite or PostgreSQL) and the bus (in-process or Redis).

Events, results and errors are kept as opaque bytes (serialized protobuf
messages): storage keeps them exactly, and only the codec (codec.py) writes
and reads them.
"""

from __future__ import annotations

import enum
from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

__all__ = [
    "ACTIVE_STATES",
    "EVENTS_PER_DELETE",
    "FINISHED_STATES",
    "Cursor",
    "Ending",
    "EventBus",
    "ExecutionRecord",
    "ExecutionState",
    "ExecutionStore",
    "Expiry",
    "NewExecution",
    "StoredEvent",
    "within_event_budget",
]


class ExecutionState(enum.Enum):
    QUEUED = "QUEUED"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"


ACTIVE_STATES = (ExecutionState.QUEUED, ExecutionState.RUNNING)
FINISHED_STATES = (ExecutionState.SUCCEEDED, ExecutionState.FAILED, ExecutionState.CANCELLED)

# Events one delete_expired takes at most (beyond a single execution's):
# what bounds the time a retention batch holds SQLite's write lock, which
# every call's writes wait for. Measured here: about 7 µs per event, so a
# batch stays near 15 ms whether its executions are short calls or long
# orchestrations (a thousand events each).
EVENTS_PER_DELETE = 2000


def within_event_budget(candidates: list[tuple[str, int]]) -> list[str]:
    """The ids of the leading ``candidates`` (id, its event count) that
    hold at most EVENTS_PER_DELETE events together; the first one always."""
    chosen: list[str] = []
    events = 0
    for execution_id, count in candidates:
        events += count
        if chosen and events > EVENTS_PER_DELETE:
            break
        chosen.append(execution_id)
    return chosen


@dataclass(frozen=True)
class NewExecution:
    id: str
    # The client's idempotency key ("" for none): unique per caller.
    request_id: str
    caller: str
    model: str
    mode: str  # "inference" or "orchestration"
    prompt: str
    options: dict[str, float | int]  # temperature, max_tokens, seed when set
    background: bool
    created_at: datetime
    # The process that runs it, and when that process last said so.
    owner: str
    # The request's fingerprint (executions.fingerprint): what request_id
    # is bound to; "" without a request_id.
    fingerprint: str = ""
    # The execution this one replays (ReplayExecution); "" for none.
    replay_of: str = ""


@dataclass(frozen=True)
class ExecutionRecord:
    id: str
    request_id: str
    caller: str
    model: str
    mode: str
    prompt: str
    options: dict[str, float | int]
    background: bool
    state: ExecutionState
    created_at: datetime
    started_at: datetime | None
    ended_at: datetime | None
    owner: str
    heartbeat_at: datetime
    last_sequence: int
    # A serialized agentlab.v1.ExecuteResponse when it succeeded (or, when it
    # failed, the flow so far in one), and a serialized google.rpc.Status
    # when it failed or was cancelled.
    result: bytes | None
    error: bytes | None
    # "" without a request_id, and for records made before the store kept
    # it: executions.fingerprint then computes it from the fields above.
    fingerprint: str = ""
    # The execution this one replays; "" for none (and for records made
    # before the store kept it).
    replay_of: str = ""


@dataclass(frozen=True)
class StoredEvent:
    sequence: int
    payload: bytes  # a serialized agentlab.v1.ExecutionEvent


@dataclass(frozen=True)
class Ending:
    """The store's record of how an execution ended: its state, when (UTC),
    and the result and error as bytes (see ExecutionRecord)."""

    state: ExecutionState
    at: datetime
    result: bytes | None
    error: bytes | None


@dataclass(frozen=True)
class Cursor:
    """Where a page ended: the last record's creation time and id (newest
    first, ties broken by id)."""

    created_at: datetime
    id: str


@dataclass(frozen=True)
class Expiry:
    """Which executions a retention sweep may delete: finished ones (never
    QUEUED or RUNNING) that ended before ``ended_before`` and come before
    ``before`` in the listing order, oldest first: created earlier, or at
    the same time with a smaller id (executions/retention.py turns the age
    and count limits into that one bound). Times are aware datetimes."""

    ended_before: datetime
    before: Cursor


class ExecutionStore(Protocol):
    async def open(self) -> None:
        """Connect and bring the schema up to date (migrations)."""
        ...

    async def close(self) -> None: ...

    async def create(self, new: NewExecution) -> tuple[ExecutionRecord, bool]:
        """Insert a QUEUED record; if the caller already has one with the same
        non-empty request_id, return that one and False instead."""
        ...

    async def get(self, execution_id: str) -> ExecutionRecord | None: ...

    async def find(self, caller: str, request_id: str) -> ExecutionRecord | None:
        """The caller's record with this non-empty request_id, if any."""
        ...

    async def page(
        self,
        *,
        page_size: int,
        after: Cursor | None = None,
        caller: str | None = None,
        model: str | None = None,
        state: ExecutionState | None = None,
    ) -> tuple[list[ExecutionRecord], Cursor | None]:
        """Newest first; the cursor is None on the last page."""
        ...

    async def append_events(
        self,
        execution_id: str,
        events: Sequence[StoredEvent],
        *,
        started_at: datetime | None = None,
        ending: Ending | None = None,
    ) -> None:
        """Store events in one transaction, all or none; sequences are unique
        per execution (a duplicate raises DuplicateEvent, an unknown
        execution UnknownExecution) and last_sequence follows them. In the
        same transaction, ``started_at`` marks an active record RUNNING (a
        finished one stays finished: a cancel that ended it first sticks)
        and ``ending`` records the end: an execution's first events and its
        RUNNING state, or its last events and its end, are seen together.
        No events and neither of the two: nothing happens."""
        ...

    async def events_after(
        self, execution_id: str, after_sequence: int, limit: int | None = None
    ) -> list[StoredEvent]:
        """Stored events with sequence > after_sequence, in order; at most
        ``limit`` of them (None: all)."""
        ...

    async def heartbeat(self, owner: str, at: datetime) -> None:
        """Touch heartbeat_at of every active record ``owner`` runs."""
        ...

    async def stale(self, before: datetime) -> list[ExecutionRecord]:
        """Active records whose owner has not been heard from since ``before``."""
        ...

    async def claim(
        self, execution_id: str, owner: str, stale_before: datetime, at: datetime
    ) -> bool:
        """Take over a stale active record: atomically set owner and heartbeat
        if its heartbeat is still older than ``stale_before``. True if taken."""
        ...

    async def delete_expired(self, expiry: Expiry, limit: int) -> int:
        """Delete the oldest executions ``expiry`` covers, with their
        events, in one transaction: at most ``limit`` of them, and fewer
        when they hold more than EVENTS_PER_DELETE events together (one at
        least); how many it deleted (0: none is left)."""
        ...

    async def nth_newest_finished(self, n: int) -> Cursor | None:
        """Where the ``n``-th newest finished execution (n >= 1) stands in
        the listing order; None when there are fewer. A read."""
        ...

    async def release_space(self, max_pages: int) -> int:
        """Give storage that deletes freed back to the file system, at most
        ``max_pages`` database pages at a time; the bytes released (0 where
        the database does that by itself, or when nothing is free)."""
        ...


class EventBus(Protocol):
    """Live events and cancel requests across processes."""

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def publish(self, execution_id: str, *events: StoredEvent) -> None:
        """Send ``events`` (stored already) to the execution's subscribers,
        in order; several at once cost one round trip to a remote bus."""
        ...

    def subscribe(
        self, execution_id: str
    ) -> AbstractAsyncContextManager[AsyncIterator[StoredEvent]]:
        """Events published for the execution from the moment the context is
        entered (the subscription is live on entry: a Watch subscribes first,
        then replays the store, so no event falls between the two)."""
        ...

    async def request_cancel(self, execution_id: str) -> None: ...

    def cancel_requests(self) -> AbstractAsyncContextManager[AsyncIterator[str]]:
        """Ids whose cancellation is requested from now on, by any process."""
        ...
