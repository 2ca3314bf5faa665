"""The EventBus across processes, over Redis pub/sub.

Channels: ``<prefix>:events:<execution id>`` carries events, each message an
8-byte big-endian sequence followed by the serialized event; ``<prefix>:cancel``
carries the ids of executions whose cancellation is requested.

Pub/sub is fire-and-forget: what is published while nobody (or no working
connection) listens is gone. That is acceptable only because the store is the
source of truth: every failure here surfaces as BusUnavailable or
SubscriberLagged, never as silence, so a watcher knows to go back to the store.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from redis.asyncio import Redis
from redis.asyncio.connection import AbstractConnection, Connection, parse_url
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from agentlab.executions.errors import BusUnavailable
from agentlab.executions.local_bus import DEFAULT_MAX_PENDING, Inbox
from agentlab.executions.model import StoredEvent

__all__ = ["RedisBus"]

logger = logging.getLogger(__name__)

_SEQUENCE = struct.Struct(">q")


def _encode_event(event: StoredEvent) -> bytes:
    return _SEQUENCE.pack(event.sequence) + event.payload


def _decode_event(data: bytes) -> StoredEvent:
    (sequence,) = _SEQUENCE.unpack_from(data)
    return StoredEvent(sequence=sequence, payload=data[_SEQUENCE.size :])


def _decode_id(data: bytes) -> str:
    return data.decode()


def _where(url: str) -> str:
    """The URL without credentials, which errors and logs must not carry."""
    parts = urlsplit(url)
    netloc = parts.hostname or ""
    if parts.port is not None:
        netloc += f":{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


class RedisBus:
    """``timeout`` bounds every wait on Redis: connecting, publishing, a
    SUBSCRIBE's confirmation, and the silence after which a subscription's
    connection is declared dead (it is pinged when idle)."""

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "agentlab",
        max_pending: int = DEFAULT_MAX_PENDING,
        timeout: float = 5.0,
    ) -> None:
        self._url = url
        self._prefix = prefix
        self._max_pending = max_pending
        self._timeout = timeout
        self._client: Redis | None = None
        self._listener: _Listener | None = None
        self._listener_lock = asyncio.Lock()
        self._closed = False

    async def open(self) -> None:
        """Connect and check that Redis answers. On BusUnavailable the bus
        stays usable: every later call tries Redis again."""
        self._closed = False
        if self._client is None:
            self._client = Redis.from_url(
                self._url,
                socket_timeout=self._timeout,
                socket_connect_timeout=self._timeout,
                # One immediate retry, on a fresh connection, covers a pooled
                # connection that went stale when Redis restarted. More (the
                # client's default is ten, with backoff) would stall the
                # runner that publishes, for events nobody may receive.
                retry=Retry(NoBackoff(), 1, (RedisConnectionError,)),
            )
        try:
            await self._client.ping()
        except (RedisError, OSError) as exc:
            raise BusUnavailable(f"Redis at {_where(self._url)} does not answer: {exc}") from exc

    async def close(self) -> None:
        self._closed = True
        async with self._listener_lock:
            listener, self._listener = self._listener, None
            if listener is not None:
                await listener.aclose()
        if self._client is not None:
            client, self._client = self._client, None
            await client.aclose()

    async def publish(self, execution_id: str, event: StoredEvent) -> None:
        await self._publish(self._events_channel(execution_id), _encode_event(event))

    def subscribe(
        self, execution_id: str
    ) -> contextlib.AbstractAsyncContextManager[AsyncIterator[StoredEvent]]:
        return self._subscription(self._events_channel(execution_id), _decode_event)

    async def request_cancel(self, execution_id: str) -> None:
        await self._publish(self._cancel_channel(), execution_id.encode())

    def cancel_requests(self) -> contextlib.AbstractAsyncContextManager[AsyncIterator[str]]:
        return self._subscription(self._cancel_channel(), _decode_id)

    def _events_channel(self, execution_id: str) -> str:
        return f"{self._prefix}:events:{execution_id}"

    def _cancel_channel(self) -> str:
        return f"{self._prefix}:cancel"

    def _require_open(self) -> Redis:
        if self._closed:
            raise BusUnavailable("the bus is closed")
        if self._client is None:
            raise RuntimeError("RedisBus.open() was not called")
        return self._client

    async def _publish(self, channel: str, data: bytes) -> None:
        client = self._require_open()
        try:
            await client.publish(channel, data)
        except (RedisError, OSError) as exc:
            raise BusUnavailable(f"could not publish to {channel}: {exc}") from exc

    @asynccontextmanager
    async def _subscription(
        self, channel: str, decode: Callable[[bytes], Any]
    ) -> AsyncIterator[Inbox[Any]]:
        listener = await self._live_listener()
        key = channel.encode()
        inbox: Inbox[Any] = Inbox(channel, self._max_pending)
        await listener.attach(key, decode, inbox)
        try:
            yield inbox
        finally:
            unsubscribed = listener.detach(key, inbox)
            if unsubscribed is not None:
                # So that once the context is left Redis no longer counts
                # (nor sends to) this subscriber. A failure is not this exit's
                # to report: the listener has already failed its subscribers.
                with contextlib.suppress(BusUnavailable):
                    await listener.confirmed(unsubscribed, "UNSUBSCRIBE")

    async def _live_listener(self) -> _Listener:
        self._require_open()
        async with self._listener_lock:
            if self._listener is not None and self._listener.alive:
                return self._listener
            # A dead listener is replaced, not repaired: resubscribing its
            # channels would hide the messages lost in between.
            dead, self._listener = self._listener, None
            if dead is not None:
                await dead.aclose()
            listener = _Listener(self._listener_connection(), self._timeout)
            await listener.start()
            self._listener = listener
            return listener

    def _listener_connection(self) -> AbstractConnection:
        # Built from the URL alone, not through a pool: a pool adds options
        # of its own (maintenance notifications) that need RESP3.
        options: dict[str, Any] = dict[str, Any](parse_url(self._url))
        connection_class: type[AbstractConnection] = options.pop("connection_class", Connection)
        options.setdefault("client_name", f"{self._prefix}-bus")
        options.update(
            # The reader parses RESP2 pub/sub replies and binary payloads.
            protocol=2,
            decode_responses=False,
            # The reader waits for messages indefinitely; liveness is the
            # watchdog's job.
            socket_timeout=None,
            socket_connect_timeout=self._timeout,
            health_check_interval=0,
            # No reconnecting behind the reader's back (see _live_listener).
            retry=Retry(NoBackoff(), 0),
        )
        return connection_class(**options)


@dataclass(eq=False)
class _Channel:
    decode: Callable[[bytes], Any]
    # Resolved when Redis confirms the SUBSCRIBE.
    ready: asyncio.Future[None]
    inboxes: set[Inbox[Any]] = field(default_factory=set)


class _Listener:
    """One SUBSCRIBE connection shared by all of a bus's subscriptions.

    State changes (which channels are wanted) happen synchronously here and
    queue the matching SUBSCRIBE/UNSUBSCRIBE; a single writer task sends them
    in that order, and Redis answers in order, so confirmations are matched by
    position and a cancelled subscriber can never leave the two out of step.
    A reader task dispatches messages; a watchdog pings when idle so that a
    connection that silently stopped working is noticed.
    """

    def __init__(self, connection: AbstractConnection, timeout: float) -> None:
        self._connection = connection
        self._timeout = timeout
        self._channels: dict[bytes, _Channel] = {}
        self._pending: dict[bytes, deque[tuple[bytes, asyncio.Future[None]]]] = {}
        self._outbox: asyncio.Queue[tuple[bytes, ...]] = asyncio.Queue()
        self._error: BusUnavailable | None = None
        self._last_heard = 0.0
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def alive(self) -> bool:
        return self._error is None

    async def start(self) -> None:
        try:
            # redis-py leaves connect() unannotated.
            await self._connection.connect()  # type: ignore[no-untyped-call]
        except BaseException as exc:
            # Cancelled halfway, the socket may be open: this listener will
            # never be used, so nothing else would close it.
            with contextlib.suppress(Exception):
                await self._connection.disconnect(nowait=True)
            if isinstance(exc, RedisError | OSError):
                raise BusUnavailable(f"cannot connect to Redis: {exc}") from exc
            raise
        self._last_heard = asyncio.get_running_loop().time()
        self._tasks = [
            asyncio.create_task(self._read(), name="redis-bus-reader"),
            asyncio.create_task(self._write(), name="redis-bus-writer"),
            asyncio.create_task(self._watch(), name="redis-bus-watchdog"),
        ]

    async def aclose(self) -> None:
        self._fail(BusUnavailable("the bus is closed"), expected=True)
        await asyncio.gather(*self._tasks, return_exceptions=True)
        with contextlib.suppress(RedisError, OSError):
            await self._connection.disconnect(nowait=True)

    async def attach(
        self, channel: bytes, decode: Callable[[bytes], Any], inbox: Inbox[Any]
    ) -> None:
        """Add a subscriber; returns once Redis has confirmed the channel's
        subscription, so every message published from then on reaches it."""
        if self._error is not None:
            raise self._error
        entry = self._channels.get(channel)
        if entry is None:
            entry = _Channel(decode, self._send(b"subscribe", channel))
            self._channels[channel] = entry
        entry.inboxes.add(inbox)
        try:
            await self.confirmed(entry.ready, "SUBSCRIBE")
        except BaseException:
            self.detach(channel, inbox)
            raise

    def detach(self, channel: bytes, inbox: Inbox[Any]) -> asyncio.Future[None] | None:
        """Remove a subscriber; the UNSUBSCRIBE's confirmation if it was the
        channel's last."""
        inbox.close()
        entry = self._channels.get(channel)
        if entry is None or inbox not in entry.inboxes:
            return None
        entry.inboxes.discard(inbox)
        return self._drop_if_unused(channel, entry)

    async def confirmed(self, reply: asyncio.Future[None], command: str) -> None:
        try:
            async with asyncio.timeout(self._timeout):
                # Shielded: the reply is shared by every subscriber of the
                # channel, and one giving up must not cancel it for the rest.
                await asyncio.shield(reply)
        except TimeoutError:
            # The late reply may still come, and would be matched with the
            # next command's: the connection can no longer be trusted.
            raise self._fail(
                BusUnavailable(f"Redis did not confirm {command} within {self._timeout}s")
            ) from None

    def _drop_if_unused(self, channel: bytes, entry: _Channel) -> asyncio.Future[None] | None:
        if entry.inboxes or self._error is not None:
            return None
        del self._channels[channel]
        return self._send(b"unsubscribe", channel)

    def _send(self, verb: bytes, channel: bytes) -> asyncio.Future[None]:
        reply: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.setdefault(channel, deque()).append((verb, reply))
        self._outbox.put_nowait((verb, channel))
        return reply

    async def _write(self) -> None:
        try:
            while True:
                command = await self._outbox.get()
                await self._connection.send_command(*command, check_health=False)
        except Exception as exc:
            self._fail(BusUnavailable(f"lost the connection to Redis: {exc}"), exc)

    async def _read(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                reply = await self._connection.read_response(disable_decoding=True)
                self._last_heard = loop.time()
                self._handle(reply)
        except Exception as exc:
            self._fail(BusUnavailable(f"lost the connection to Redis: {exc}"), exc)

    async def _watch(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self._timeout)
            silent = loop.time() - self._last_heard
            if silent >= 2 * self._timeout:
                self._fail(BusUnavailable(f"Redis has not answered for {silent:.1f}s"))
                return
            if silent >= self._timeout:
                self._outbox.put_nowait((b"ping",))

    def _handle(self, reply: object) -> None:
        # Anything else is a PING's answer (b"PONG" when no channel is
        # subscribed); hearing it was the point.
        if not isinstance(reply, list) or len(reply) != 3:
            return
        kind, channel, data = reply
        if kind == b"message":
            self._dispatch(channel, data)
        elif kind in (b"subscribe", b"unsubscribe"):
            waiting = self._pending.get(channel)
            if not waiting:
                raise RuntimeError(f"unexpected {kind!r} of {channel!r}")
            verb, confirmation = waiting.popleft()
            if not waiting:
                del self._pending[channel]
            if verb != kind:
                raise RuntimeError(f"{kind!r} of {channel!r} answers {verb!r}")
            if not confirmation.done():
                confirmation.set_result(None)

    def _dispatch(self, channel: bytes, data: bytes) -> None:
        entry = self._channels.get(channel)
        # Unconfirmed: the message was sent to an earlier subscription to the
        # channel, whose UNSUBSCRIBE Redis had not processed yet.
        if entry is None or not entry.ready.done():
            return
        try:
            item = entry.decode(data)
        except (ValueError, struct.error):
            logger.warning("dropped a malformed message on %s", channel.decode(errors="replace"))
            return
        for inbox in list(entry.inboxes):
            if not inbox.put(item):
                entry.inboxes.discard(inbox)
        self._drop_if_unused(channel, entry)

    def _fail(
        self,
        error: BusUnavailable,
        cause: BaseException | None = None,
        *,
        expected: bool = False,
    ) -> BusUnavailable:
        """Fail everything waiting on this connection, once, and stop."""
        if self._error is not None:
            return self._error
        error.__cause__ = cause
        self._error = error
        if not expected:
            logger.warning("Redis event bus: %s", error)
        for waiting in self._pending.values():
            for _, reply in waiting:
                if not reply.done():
                    reply.set_exception(error)
                    # Nobody may be awaiting it: not an unretrieved error.
                    reply.exception()
        self._pending.clear()
        for entry in self._channels.values():
            for inbox in entry.inboxes:
                inbox.fail(error)
        self._channels.clear()
        current = asyncio.current_task()
        for task in self._tasks:
            if task is not current:
                task.cancel()
        return error
