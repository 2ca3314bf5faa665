"""The in-process EventBus: enough when one process both runs executions and
serves their watchers."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Generic, TypeVar

from agentlab.executions.errors import BusUnavailable, SubscriberLagged
from agentlab.executions.model import StoredEvent

__all__ = ["DEFAULT_MAX_PENDING", "EVENTS_MAX_PENDING", "Inbox", "LocalBus"]

T = TypeVar("T")

# Per subscriber. A watcher streaming tokens to a client keeps up easily; one
# that does not is cut loose (SubscriberLagged) and catches up from the store.
DEFAULT_MAX_PENDING = 10_000

# At most, for a subscription to an execution's events: what a stream whose
# client stopped reading holds in memory (a few hundred KiB at most). Past
# it the watcher subscribes again and catches up from the store.
EVENTS_MAX_PENDING = 256


class Inbox(Generic[T]):
    """One subscriber's buffer, filled without ever blocking the publisher.

    Iteration ends with StopAsyncIteration once closed, or raises the error it
    failed with. A failure drops what is buffered: the subscriber resumes from
    the store at the last item it saw, which covers those items too.
    """

    def __init__(self, name: str, max_pending: int) -> None:
        self.name = name
        self._max_pending = max_pending
        self._items: deque[T] = deque()
        self._error: BaseException | None = None
        self._closed = False
        self._wakeup = asyncio.Event()

    @property
    def active(self) -> bool:
        return self._error is None and not self._closed

    def put(self, item: T) -> bool:
        """Buffer an item; False when the inbox takes no more (it is closed,
        has failed, or just overflowed and failed with SubscriberLagged)."""
        if not self.active:
            return False
        if len(self._items) >= self._max_pending:
            self.fail(SubscriberLagged(self.name, self._max_pending))
            return False
        self._items.append(item)
        self._wakeup.set()
        return True

    def fail(self, error: BaseException) -> None:
        if not self.active:
            return
        self._error = error
        self._items.clear()
        self._wakeup.set()

    def close(self) -> None:
        self._closed = True
        self._items.clear()
        self._wakeup.set()

    def __aiter__(self) -> Inbox[T]:
        return self

    async def __anext__(self) -> T:
        while True:
            if self._error is not None:
                # One error is shared by every inbox of a failed connection:
                # without the reset each raise would grow its traceback.
                raise self._error.with_traceback(None)
            if self._items:
                return self._items.popleft()
            if self._closed:
                raise StopAsyncIteration
            self._wakeup.clear()
            await self._wakeup.wait()


class LocalBus:
    def __init__(self, *, max_pending: int = DEFAULT_MAX_PENDING) -> None:
        self._max_pending = max_pending
        self._subscribers: dict[str, set[Inbox[StoredEvent]]] = {}
        self._cancel_listeners: set[Inbox[str]] = set()
        self._closed = False

    async def open(self) -> None:
        self._closed = False

    async def close(self) -> None:
        self._closed = True
        # Ending them with an error rather than a clean stop: a watcher must
        # not mistake a shutdown for the end of the execution.
        closed = BusUnavailable("the bus is closed")
        for listener in self._cancel_listeners:
            listener.fail(closed)
        for inboxes in self._subscribers.values():
            for inbox in inboxes:
                inbox.fail(closed)
        self._subscribers.clear()
        self._cancel_listeners.clear()

    def subscriber_count(self, execution_id: str) -> int:
        return len(self._subscribers.get(execution_id, ()))

    async def publish(self, execution_id: str, *events: StoredEvent) -> None:
        self._check_open()
        inboxes = self._subscribers.get(execution_id)
        if not inboxes:
            return
        for inbox in list(inboxes):
            for event in events:
                if not inbox.put(event):
                    inboxes.discard(inbox)
                    break
        if not inboxes:
            del self._subscribers[execution_id]

    @asynccontextmanager
    async def subscribe(self, execution_id: str) -> AsyncIterator[AsyncIterator[StoredEvent]]:
        self._check_open()
        inbox: Inbox[StoredEvent] = Inbox(
            f"events of {execution_id}", min(self._max_pending, EVENTS_MAX_PENDING)
        )
        self._subscribers.setdefault(execution_id, set()).add(inbox)
        try:
            yield inbox
        finally:
            inbox.close()
            inboxes = self._subscribers.get(execution_id)
            if inboxes is not None:
                inboxes.discard(inbox)
                if not inboxes:
                    del self._subscribers[execution_id]

    async def request_cancel(self, execution_id: str) -> None:
        self._check_open()
        for inbox in list(self._cancel_listeners):
            if not inbox.put(execution_id):
                self._cancel_listeners.discard(inbox)

    @asynccontextmanager
    async def cancel_requests(self) -> AsyncIterator[AsyncIterator[str]]:
        self._check_open()
        inbox: Inbox[str] = Inbox("cancel requests", self._max_pending)
        self._cancel_listeners.add(inbox)
        try:
            yield inbox
        finally:
            inbox.close()
            self._cancel_listeners.discard(inbox)

    def _check_open(self) -> None:
        if self._closed:
            raise BusUnavailable("the bus is closed")
