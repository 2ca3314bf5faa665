"""The EventBus across processes, over Redis pub/sub.

Channels: ``<prefix>:events:<execution id>`` carries events, each message an
8-byte big-endian sequence followed by the serialized event; ``<prefix>:cancel``
carries the ids of executions whose cancellation is requested.

Pub/sub is fire-and-forget: what is published while nobody (or no working
connection) listens is gone. That is acceptable only because the store is the
source of truth: every failure here surfaces as BusUnavailable or
SubscriberLagged, never as silence, so a watcher knows to go back to the store.
Subscriptions share one connection, the Listener (redis_listener.py, which
says why it is not redis-py's PubSub).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from agentlab.executions.errors import BusUnavailable
from agentlab.executions.local_bus import DEFAULT_MAX_PENDING, EVENTS_MAX_PENDING, Inbox
from agentlab.executions.model import StoredEvent
from agentlab.executions.redis_listener import Listener, listener_connection

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
        self._listener: Listener | None = None
        self._listener_lock = asyncio.Lock()
        self._closed = False
        # Publishes of this turn of the loop, of every execution: one task
        # sends them at the next turn, as one pipeline (a round trip, and
        # redis-py's cost per call, for them all rather than for each).
        self._outgoing: list[tuple[str, list[bytes], asyncio.Future[None]]] = []
        self._sending: set[asyncio.Task[None]] = set()

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
        # Publishes already queued are sent first.
        if self._sending:
            await asyncio.wait(self._sending)
        async with self._listener_lock:
            listener, self._listener = self._listener, None
            if listener is not None:
                await listener.aclose()
        if self._client is not None:
            client, self._client = self._client, None
            await client.aclose()

    async def publish(self, execution_id: str, *events: StoredEvent) -> None:
        await self._publish(
            self._events_channel(execution_id), [_encode_event(event) for event in events]
        )

    def subscribe(
        self, execution_id: str
    ) -> contextlib.AbstractAsyncContextManager[AsyncIterator[StoredEvent]]:
        return self._subscription(
            self._events_channel(execution_id),
            _decode_event,
            min(self._max_pending, EVENTS_MAX_PENDING),
        )

    async def request_cancel(self, execution_id: str) -> None:
        await self._publish(self._cancel_channel(), [execution_id.encode()])

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

    async def _publish(self, channel: str, messages: list[bytes]) -> None:
        """Publish ``messages`` to ``channel``, in order, with the others
        published in this turn of the loop; raises BusUnavailable if Redis
        did not take them. A cancelled caller stops waiting; its messages
        are sent all the same."""
        self._require_open()
        if not messages:
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if not self._outgoing:
            sending = asyncio.create_task(self._send_queued(), name="redis-publish")
            self._sending.add(sending)
            sending.add_done_callback(self._sending.discard)
        self._outgoing.append((channel, messages, future))
        await future

    async def _send_queued(self) -> None:
        queued, self._outgoing = self._outgoing, []
        failure: BaseException | None = None
        try:
            client = self._require_open()
            if len(queued) == 1 and len(queued[0][1]) == 1:
                channel, [data], _ = queued[0]
                await client.publish(channel, data)
            else:
                # A pipeline, not a transaction: each PUBLISH stands alone,
                # and a subscriber gets a channel's messages in order.
                pipe = client.pipeline(transaction=False)
                for channel, messages, _ in queued:
                    for data in messages:
                        pipe.publish(channel, data)
                await pipe.execute()
        except (RedisError, OSError, BusUnavailable) as exc:
            failure = exc
        except BaseException as exc:  # never leave a caller waiting
            failure = exc
            raise
        finally:
            for channel, _, future in queued:
                if future.done():  # its caller stopped waiting
                    continue
                if failure is None:
                    future.set_result(None)
                elif isinstance(failure, BusUnavailable):
                    future.set_exception(failure)
                elif isinstance(failure, RedisError | OSError):
                    error = BusUnavailable(f"could not publish to {channel}: {failure}")
                    error.__cause__ = failure
                    future.set_exception(error)
                else:
                    future.set_exception(BusUnavailable(f"publishing failed: {failure!r}"))

    @asynccontextmanager
    async def _subscription(
        self, channel: str, decode: Callable[[bytes], Any], max_pending: int | None = None
    ) -> AsyncIterator[Inbox[Any]]:
        listener = await self._live_listener()
        key = channel.encode()
        inbox: Inbox[Any] = Inbox(channel, max_pending or self._max_pending)
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

    async def _live_listener(self) -> Listener:
        self._require_open()
        async with self._listener_lock:
            if self._listener is not None and self._listener.alive:
                return self._listener
            # A dead listener is replaced, not repaired: resubscribing its
            # channels would hide the messages lost in between.
            dead, self._listener = self._listener, None
            if dead is not None:
                await dead.aclose()
            listener = Listener(
                listener_connection(self._url, f"{self._prefix}-bus", self._timeout), self._timeout
            )
            await listener.start()
            self._listener = listener
            return listener
