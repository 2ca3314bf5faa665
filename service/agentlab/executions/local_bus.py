"""The in-process EventBus: enough when one process both runs executions and
serves their watchers."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
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


# Items read that an inbox may keep before it lets them go (in one cut, so
# that a read never shifts the items behind it).
_COMPACT_AFTER = 64


class Inbox(Generic[T]):
    """One subscriber's buffer, filled without ever blocking the publisher.

    Iteration ends with StopAsyncIteration once closed, or raises the error it
    failed with. A failure drops what is buffered: the subscriber resumes from
    the store at the last item it saw, which covers those items too.

    Every open stream holds one, mostly empty and waited on (10,000 may be
    open: issue 11): a list and one future while a read waits, not a deque
    and an asyncio.Event (each of those two holds a 624-byte deque block,
    ~1.9 KiB an inbox with the Event's wait coroutine). A read cut short (a
    timeout, a cancel) loses nothing: items wait in the list.
    """

    __slots__ = ("_closed", "_error", "_head", "_items", "_max_pending", "_waiter", "name")

    def __init__(self, name: str, max_pending: int) -> None:
        self.name = name
        self._max_pending = max_pending
        # Read from ``_head`` on: the list is emptied once read to its end,
        # so a read never shifts the items behind it.
        self._items: list[T] = []
        self._head = 0
        self._error: BaseException | None = None
        self._closed = False
        # The future a read waits on, while one waits: one reader at a time.
        self._waiter: asyncio.Future[None] | None = None

    @property
    def active(self) -> bool:
        return self._error is None and not self._closed

    def put(self, item: T) -> bool:
        """Buffer an item; False when the inbox takes no more (it is closed,
        has failed, or just overflowed and failed with SubscriberLagged)."""
        if not self.active:
            return False
        if len(self._items) - self._head >= self._max_pending:
            self.fail(SubscriberLagged(self.name, self._max_pending))
            return False
        self._items.append(item)
        self._wake()
        return True

    def fail(self, error: BaseException) -> None:
        if not self.active:
            return
        self._error = error
        self._drop()
        self._wake()

    def close(self) -> None:
        self._closed = True
        self._drop()
        self._wake()

    def _drop(self) -> None:
        self._items.clear()
        self._head = 0

    def _wake(self) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def __aiter__(self) -> Inbox[T]:
        return self

    async def __anext__(self) -> T:
        while True:
            if self._error is not None:
                # One error is shared by every inbox of a failed connection:
                # without the reset each raise would grow its traceback.
                raise self._error.with_traceback(None)
            if self._head < len(self._items):
                item = self._items[self._head]
                self._head += 1
                if self._head == len(self._items):
                    self._drop()
                elif self._head >= _COMPACT_AFTER and self._head * 2 >= len(self._items):
                    # A reader that keeps up but never quite catches up (a
                    # client a little slower than its model) would otherwise
                    # hold every item it read until the execution ends.
                    del self._items[: self._head]
                    self._head = 0
                return item
            if self._closed:
                raise StopAsyncIteration
            # A read cut short cancels the future it waited on: the next
            # read waits on a new one.
            if self._waiter is None or self._waiter.done():
                self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter


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

    def subscribe(
        self, execution_id: str
    ) -> AbstractAsyncContextManager[AsyncIterator[StoredEvent]]:
        return _Subscription(self, execution_id)

    def _unsubscribe(self, execution_id: str, inbox: Inbox[StoredEvent]) -> None:
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


class _Subscription:
    """LocalBus.subscribe's context: a class rather than an
    asynccontextmanager, whose generator every open stream would hold for
    its whole life (issue 11)."""

    __slots__ = ("_bus", "_execution_id", "_inbox")

    def __init__(self, bus: LocalBus, execution_id: str) -> None:
        self._bus = bus
        self._execution_id = execution_id
        self._inbox: Inbox[StoredEvent] | None = None

    async def __aenter__(self) -> Inbox[StoredEvent]:
        bus = self._bus
        bus._check_open()
        inbox: Inbox[StoredEvent] = Inbox(
            f"events of {self._execution_id}", min(bus._max_pending, EVENTS_MAX_PENDING)
        )
        bus._subscribers.setdefault(self._execution_id, set()).add(inbox)
        self._inbox = inbox
        return inbox

    async def __aexit__(self, *_: object) -> None:
        if self._inbox is not None:
            self._bus._unsubscribe(self._execution_id, self._inbox)
            self._inbox = None
