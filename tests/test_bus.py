"""The EventBus contract, held by both buses (in-process and Redis), and how
the Redis bus behaves when Redis goes away."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import shutil
import uuid
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import pytest
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError

from agentlab.devstack import free_port
from agentlab.executions.errors import BusUnavailable, SubscriberLagged
from agentlab.executions.local_bus import Inbox, LocalBus
from agentlab.executions.model import EventBus, StoredEvent
from agentlab.executions.redis_bus import RedisBus
from tests.helpers.services import missing, redis_url

T = TypeVar("T")

# Long enough for any delivery on a loaded machine; tests only wait this long
# when something is wrong.
WAIT_S = 5.0
# How long "nothing arrives" is watched for.
QUIET_S = 0.2
# The Redis bus's timeout where Redis is made to fail: short, to be quick to
# notice.
SHORT_TIMEOUT_S = 0.3


def event(sequence: int) -> StoredEvent:
    return StoredEvent(sequence=sequence, payload=f"event {sequence}".encode())


async def take(items: AsyncIterator[T], count: int) -> list[T]:
    async def collect() -> list[T]:
        return [await anext(items) for _ in range(count)]

    return await asyncio.wait_for(collect(), WAIT_S)


async def assert_quiet(items: AsyncIterator[T]) -> None:
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(anext(items), QUIET_S)


@dataclass
class Kit:
    """A bus under test, plus what the contract needs around it."""

    kind: str
    make: Callable[..., Awaitable[EventBus]]
    # Another process's view of the same bus (for LocalBus, the bus itself:
    # it has no other processes).
    other: Callable[[EventBus], Awaitable[EventBus]]
    subscribers: Callable[[EventBus, str], Awaitable[int]]


@pytest.fixture(params=["local", "redis"])
async def kit(request: pytest.FixtureRequest) -> AsyncIterator[Kit]:
    opened: list[EventBus] = []

    async def opening(bus: EventBus) -> EventBus:
        await bus.open()
        opened.append(bus)
        return bus

    if request.param == "local":

        async def make_local(**options: int) -> EventBus:
            return await opening(LocalBus(**options))

        async def same(bus: EventBus) -> EventBus:
            return bus

        async def local_count(bus: EventBus, execution_id: str) -> int:
            assert isinstance(bus, LocalBus)
            return bus.subscriber_count(execution_id)

        yield Kit("local", make_local, same, local_count)
    else:
        url = redis_url()
        # Tests share the machine's Redis (and may run concurrently): their
        # own channels keep them from hearing one another.
        prefix = f"agentlab-test-{uuid.uuid4().hex}"
        admin = Redis.from_url(url)

        async def make_redis(**options: int) -> EventBus:
            return await opening(RedisBus(url, prefix=prefix, **options))

        async def second(bus: EventBus) -> EventBus:
            return await make_redis()

        async def numsub(bus: EventBus, execution_id: str) -> int:
            [(_, count)] = await admin.pubsub_numsub(f"{prefix}:events:{execution_id}")
            return int(count)

        yield Kit("redis", make_redis, second, numsub)
        await admin.aclose()
    for bus in opened:
        await bus.close()


async def test_events_published_after_subscribing_arrive_in_order(kit: Kit) -> None:
    bus = await kit.make()
    await bus.publish("e1", event(1))
    await bus.publish("e1", event(2))
    async with bus.subscribe("e1") as events:
        for sequence in range(3, 8):
            await bus.publish("e1", event(sequence))
        # Another execution's events are not this subscriber's.
        await bus.publish("e2", event(100))
        assert await take(events, 5) == [event(s) for s in range(3, 8)]
        await assert_quiet(events)


async def test_events_published_together_arrive_in_order(kit: Kit) -> None:
    bus = await kit.make()
    runner = await kit.other(bus)
    async with bus.subscribe("e1") as events:
        await runner.publish("e1", event(1), event(2), event(3))
        await runner.publish("e1", event(4))
        assert await take(events, 4) == [event(s) for s in range(1, 5)]
        await assert_quiet(events)


async def test_publishes_of_several_executions_at_once_each_arrive_in_order(kit: Kit) -> None:
    # Executions publish at the same time (the Redis bus sends what one turn
    # of the loop published as one pipeline): each subscriber gets its
    # execution's events, in order, even those of a publisher that stopped
    # waiting.
    bus = await kit.make()
    runner = await kit.other(bus)
    async with (
        bus.subscribe("e1") as first,
        bus.subscribe("e2") as second,
        bus.subscribe("e3") as third,
    ):
        gone = asyncio.ensure_future(runner.publish("e3", event(7)))
        await asyncio.sleep(0)  # under way: then its caller stops waiting
        gone.cancel()
        await asyncio.gather(
            runner.publish("e1", event(1), event(2)),
            runner.publish("e2", event(10), event(11), event(12)),
        )
        await runner.publish("e2", event(13))
        assert await take(first, 2) == [event(1), event(2)]
        assert await take(second, 4) == [event(s) for s in range(10, 14)]
        assert await take(third, 1) == [event(7)]
        await assert_quiet(first)


async def test_events_from_another_process_arrive(kit: Kit) -> None:
    bus = await kit.make()
    runner = await kit.other(bus)
    async with bus.subscribe("e1") as events:
        await runner.publish("e1", event(1))
        assert await take(events, 1) == [event(1)]


async def test_every_subscriber_gets_every_event(kit: Kit) -> None:
    bus = await kit.make()
    async with bus.subscribe("e1") as first, bus.subscribe("e1") as second:
        for sequence in range(1, 4):
            await bus.publish("e1", event(sequence))
        assert await take(first, 3) == [event(s) for s in range(1, 4)]
        assert await take(second, 3) == [event(s) for s in range(1, 4)]


async def test_leaving_the_context_unsubscribes(kit: Kit) -> None:
    bus = await kit.make()
    assert await kit.subscribers(bus, "e1") == 0
    async with bus.subscribe("e1") as first:
        async with bus.subscribe("e1"):
            assert await kit.subscribers(bus, "e1") > 0
        # The other subscriber is still served.
        assert await kit.subscribers(bus, "e1") > 0
        await bus.publish("e1", event(1))
        assert await take(first, 1) == [event(1)]
    assert await kit.subscribers(bus, "e1") == 0
    # A subscription left behind ends rather than waits forever.
    with pytest.raises(StopAsyncIteration):
        await anext(first)

    # Subscribing again starts afresh: nothing from in between.
    await bus.publish("e1", event(2))
    async with bus.subscribe("e1") as again:
        await bus.publish("e1", event(3))
        assert await take(again, 1) == [event(3)]
    assert await kit.subscribers(bus, "e1") == 0


async def test_a_subscriber_cancelled_on_its_way_in_leaves_nothing_behind(kit: Kit) -> None:
    bus = await kit.make()
    entered = asyncio.Event()

    async def subscriber() -> None:
        async with bus.subscribe("e1"):
            entered.set()
            await asyncio.Event().wait()

    # Cancelled at each step of subscribing in turn (connecting, waiting for
    # Redis to confirm), until one gets in.
    steps = 0
    while not entered.is_set():
        assert steps < 10_000, "never got in"
        task = asyncio.create_task(subscriber())
        for _ in range(steps):
            await asyncio.sleep(0)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        steps += 1

    async with bus.subscribe("e1") as events:
        await bus.publish("e1", event(1))
        assert await take(events, 1) == [event(1)]
        await assert_quiet(events)
    assert await kit.subscribers(bus, "e1") == 0


async def test_cancel_requests_reach_listeners(kit: Kit) -> None:
    bus = await kit.make()
    other = await kit.other(bus)
    await bus.request_cancel("before")
    async with bus.cancel_requests() as first, other.cancel_requests() as second:
        await bus.request_cancel("e1")
        await other.request_cancel("e2")
        assert await take(first, 2) == ["e1", "e2"]
        assert await take(second, 2) == ["e1", "e2"]
        await assert_quiet(first)


async def test_a_subscriber_that_falls_behind_is_cut_loose(kit: Kit) -> None:
    bus = await kit.make(max_pending=3)
    async with bus.subscribe("e1") as slow, bus.subscribe("e1") as fast:
        for sequence in range(1, 5):
            await bus.publish("e1", event(sequence))
            # Keeping up: one more than the slow one's buffer holds is fine.
            assert await take(fast, 1) == [event(sequence)]
        with pytest.raises(SubscriberLagged):
            await asyncio.wait_for(anext(slow), WAIT_S)
        # The others carry on.
        await bus.publish("e1", event(5))
        assert await take(fast, 1) == [event(5)]


async def test_a_read_cut_short_loses_nothing(kit: Kit) -> None:
    # Watchers read with a timeout (executions/watch.py): a read cut short
    # must leave the subscription whole, and the next read must wait anew.
    bus = await kit.make()
    async with bus.subscribe("e1") as events:
        await assert_quiet(events)
        await assert_quiet(events)
        await bus.publish("e1", event(1), event(2))
        assert await take(events, 2) == [event(1), event(2)]
        await assert_quiet(events)
        await bus.publish("e1", event(3))
        assert await take(events, 1) == [event(3)]


async def test_only_unread_events_count_towards_the_buffer(kit: Kit) -> None:
    bus = await kit.make(max_pending=3)
    async with bus.subscribe("e1") as events:
        await bus.publish("e1", event(1), event(2), event(3))
        assert await take(events, 2) == [event(1), event(2)]
        # Three unread (3, 4, 5): within the buffer.
        await bus.publish("e1", event(4), event(5))
        assert await take(events, 3) == [event(3), event(4), event(5)]


async def test_a_reader_always_one_event_behind_holds_only_a_few_it_has_read() -> None:
    # A client a little slower than its model never empties its inbox: the
    # events it has read must still be let go, not kept until the end.
    inbox: Inbox[StoredEvent] = Inbox("e1", max_pending=10)
    first = event(1)
    gone = weakref.ref(first)
    inbox.put(first)
    del first
    for sequence in range(2, 2_000):
        inbox.put(event(sequence))
        assert (await anext(inbox)).sequence == sequence - 1
    gc.collect()
    assert gone() is None
    assert (await anext(inbox)).sequence == 1_999


async def test_a_closed_bus_ends_its_subscriptions(kit: Kit) -> None:
    bus = await kit.make()
    async with bus.subscribe("e1") as events, bus.cancel_requests() as cancels:
        await bus.close()
        # An error, not a clean end: a watcher must not take the bus shutting
        # down for the end of the execution.
        with pytest.raises(BusUnavailable):
            await asyncio.wait_for(anext(events), WAIT_S)
        with pytest.raises(BusUnavailable):
            await asyncio.wait_for(anext(cancels), WAIT_S)
    with pytest.raises(BusUnavailable):
        await bus.publish("e1", event(1))


# -- Redis going away: a server of the test's own, to stop and pause.


@dataclass
class PrivateRedis:
    port: int
    directory: Path
    process: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> None:
        server = shutil.which("redis-server")
        assert server is not None
        self.process = await asyncio.create_subprocess_exec(
            *(server, "--port", str(self.port), "--bind", "127.0.0.1"),
            *("--save", "", "--appendonly", "no", "--dir", str(self.directory)),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        client = Redis.from_url(self.url)
        try:
            async with asyncio.timeout(WAIT_S):
                while True:
                    try:
                        await client.ping()
                        return
                    except RedisConnectionError:
                        await asyncio.sleep(0.02)
        finally:
            await client.aclose()

    async def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            await self.process.wait()
            self.process = None


@pytest.fixture
async def private_redis(tmp_path: Path) -> AsyncIterator[PrivateRedis]:
    if shutil.which("redis-server") is None:
        missing("redis-server is not installed (apt-get install redis-server): no Redis to stop")
    server = PrivateRedis(free_port(), tmp_path)
    await server.start()
    yield server
    await server.stop()


@pytest.mark.e2e
async def test_redis_going_away_fails_subscriptions_and_publishing(
    private_redis: PrivateRedis,
) -> None:
    bus = RedisBus(private_redis.url, timeout=SHORT_TIMEOUT_S)
    await bus.open()
    try:
        async with bus.subscribe("e1") as events, bus.cancel_requests() as cancels:
            await private_redis.stop()
            with pytest.raises(BusUnavailable):
                await asyncio.wait_for(anext(events), WAIT_S)
            with pytest.raises(BusUnavailable):
                await asyncio.wait_for(anext(cancels), WAIT_S)
        with pytest.raises(BusUnavailable):
            await bus.publish("e1", event(1))
        with pytest.raises(BusUnavailable):
            await bus.request_cancel("e1")
        with pytest.raises(BusUnavailable):
            async with bus.subscribe("e1"):
                pass

        # Back again: the same bus works, with fresh subscriptions.
        await private_redis.start()
        async with bus.subscribe("e1") as events:
            await bus.publish("e1", event(2))
            assert await take(events, 1) == [event(2)]
    finally:
        await bus.close()


@pytest.mark.e2e
async def test_a_redis_that_stops_answering_is_noticed(
    private_redis: PrivateRedis,
) -> None:
    bus = RedisBus(private_redis.url, timeout=SHORT_TIMEOUT_S)
    await bus.open()
    admin = Redis.from_url(private_redis.url)
    try:
        async with bus.subscribe("e1") as events:
            # Connected but silent, as behind a dead network link: only the
            # bus's pings can tell.
            await admin.execute_command("CLIENT", "PAUSE", "10000", "ALL")
            started = asyncio.get_running_loop().time()
            with pytest.raises(BusUnavailable):
                await asyncio.wait_for(anext(events), WAIT_S)
            assert asyncio.get_running_loop().time() - started < 4 * SHORT_TIMEOUT_S
    finally:
        await private_redis.stop()
        await admin.aclose()
        await bus.close()


async def test_an_idle_subscription_stays_up() -> None:
    # Several watchdog periods without a message: its pings, answered, must
    # not be taken for silence.
    bus = RedisBus(redis_url(), prefix=f"agentlab-test-{uuid.uuid4().hex}", timeout=SHORT_TIMEOUT_S)
    await bus.open()
    try:
        async with bus.subscribe("e1") as events:
            await asyncio.sleep(6 * SHORT_TIMEOUT_S)
            await bus.publish("e1", event(1))
            assert await take(events, 1) == [event(1)]
    finally:
        await bus.close()
