"""One Redis pub/sub connection shared by all of a RedisBus's subscriptions,
and why it is not redis-py's ``PubSub``.

The bus promises two things ``PubSub`` does not keep:

- A subscription is live on entry: ``attach`` returns only once Redis has
  confirmed the SUBSCRIBE, so a watcher can subscribe, then replay the store,
  and miss nothing in between. ``PubSub.subscribe`` returns once the command
  is sent; the confirmation arrives later, among the messages, to whichever
  task reads them. With many subscribers (one per watcher, plus the cancel
  listener) on one connection, one reader has to match each confirmation to
  its command, in order, also when a subscriber is cancelled halfway; that
  is what this module does.
- A lost message is never silent. ``PubSub`` reconnects on a connection
  error and resubscribes its channels (``PubSub.on_connect``), so what was
  published in between is gone without a word; and with no read timeout a
  connection that silently stopped working (a half-open TCP connection, a
  Redis that froze) blocks its reader for ever. Here a dead connection is
  never repaired: every subscriber gets BusUnavailable and goes back to the
  store, and the bus opens a new Listener. A watchdog pings an idle
  connection and declares it dead after ``2 * timeout`` seconds of silence.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from redis.asyncio.connection import AbstractConnection, Connection, parse_url
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from agentlab.executions.errors import BusUnavailable
from agentlab.executions.local_bus import Inbox

__all__ = ["Listener", "listener_connection"]

logger = logging.getLogger(__name__)


def listener_connection(url: str, client_name: str, timeout: float) -> AbstractConnection:
    """A connection for a Listener, not yet connected: RESP2, bytes as they
    come, no read timeout and no reconnecting (the Listener watches its
    liveness and is replaced when it dies)."""
    # Built from the URL alone, not through a pool: a pool adds options
    # of its own (maintenance notifications) that need RESP3.
    options: dict[str, Any] = dict[str, Any](parse_url(url))
    connection_class: type[AbstractConnection] = options.pop("connection_class", Connection)
    options.setdefault("client_name", client_name)
    options.update(
        # The reader parses RESP2 pub/sub replies and binary payloads.
        protocol=2,
        decode_responses=False,
        # The reader waits for messages indefinitely; liveness is the
        # watchdog's job.
        socket_timeout=None,
        socket_connect_timeout=timeout,
        health_check_interval=0,
        # No reconnecting behind the reader's back: a dead listener is
        # replaced, and its subscribers told (see Listener).
        retry=Retry(NoBackoff(), 0),
    )
    return connection_class(**options)


@dataclass(eq=False)
class _Channel:
    decode: Callable[[bytes], Any]
    # Resolved when Redis confirms the SUBSCRIBE.
    ready: asyncio.Future[None]
    inboxes: set[Inbox[Any]] = field(default_factory=set)


class Listener:
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
