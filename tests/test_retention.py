"""Retention's policy at its edges, on both stores (each test runs against
SQLite and PostgreSQL; PostgreSQL is skipped where it is not reachable, and
fails the test in CI): what expires and what is kept, batches, events going
with their execution; and SQLite's file giving the space back."""

from __future__ import annotations

import asyncio
import os
import secrets
import sqlite3
from collections.abc import AsyncIterator, Iterator
from contextlib import closing
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from agentlab.config import ConfigError, MaxAge, Settings
from agentlab.core.errors import NotFound
from agentlab.core.ports import Route
from agentlab.core.runner import Runner
from agentlab.core.types import ExecutionMode, Task
from agentlab.executions import codec
from agentlab.executions.local_bus import LocalBus
from agentlab.executions.migrations import SQLITE
from agentlab.executions.model import (
    EVENTS_PER_DELETE,
    Cursor,
    Ending,
    ExecutionState,
    ExecutionStore,
    Expiry,
    NewExecution,
    StoredEvent,
    within_event_budget,
)
from agentlab.executions.postgres_store import PostgresStore
from agentlab.executions.retention import RetentionPolicy, Sweeper, expiry_for
from agentlab.executions.service import Executions
from agentlab.executions.sqlite_store import SqliteStore
from agentlab.executions.watch import REPLAY_PAGE, watch
from agentlab.v1 import execution_pb2 as pb
from tests.helpers.labs import InstantLab
from tests.helpers.services import postgres_schema, postgres_url

NOW = datetime(2026, 6, 1, 12, 0, 0, tzinfo=UTC)
DAY = timedelta(days=1)


@pytest.fixture(params=["sqlite", "postgres"])
def make_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[type[object] | object]:
    """A factory of unopened stores on one database of this test's own."""
    if request.param == "sqlite":
        yield lambda: SqliteStore(tmp_path / "agentlab.db")
        return
    url = postgres_url()
    with postgres_schema("test_retention") as schema:
        yield lambda: PostgresStore(url, schema=schema)


@pytest.fixture
async def store(make_store: object) -> AsyncIterator[ExecutionStore]:
    opened: ExecutionStore = make_store()  # type: ignore[operator]
    await opened.open()
    yield opened
    await opened.close()


async def add(
    store: ExecutionStore,
    *,
    created: datetime,
    state: ExecutionState = ExecutionState.SUCCEEDED,
    ended: datetime | None = None,
    events: int = 3,
    heartbeat: datetime | None = None,
) -> str:
    """One execution created at ``created`` with ``events`` events, left in
    ``state`` (ended at ``ended``, by default a second after it was created)."""
    execution_id = f"ex-{created.strftime('%Y%m%d%H%M%S')}-{secrets.token_hex(3)}"
    await store.create(
        NewExecution(
            id=execution_id,
            request_id="",
            caller="alice",
            model="m",
            mode="inference",
            prompt="p",
            options={},
            background=False,
            created_at=created,
            owner="proc-1",
        )
    )
    stored = [StoredEvent(n, f"event {n}".encode()) for n in range(1, events + 1)]
    if state is ExecutionState.QUEUED:
        assert not events
    elif state is ExecutionState.RUNNING:
        await store.append_events(execution_id, stored, started_at=created)
    else:
        ending = Ending(state, ended or created + timedelta(seconds=1), b"result", None)
        await store.append_events(execution_id, stored, started_at=created, ending=ending)
    if heartbeat is not None:
        await store.heartbeat("proc-1", heartbeat)
    return execution_id


async def kept(store: ExecutionStore, *ids: str) -> list[str]:
    return [execution_id for execution_id in ids if await store.get(execution_id) is not None]


async def test_the_age_limit_deletes_what_was_created_before_it(store: ExecutionStore) -> None:
    old = [await add(store, created=NOW - 40 * DAY + i * timedelta(minutes=1)) for i in range(3)]
    young = [await add(store, created=NOW - 10 * DAY), await add(store, created=NOW - 30 * DAY)]
    deleted = await expire(store, 100, created_before=NOW - 30 * DAY)
    assert deleted == 3
    assert await kept(store, *old) == []
    # The bound is strict: created exactly 30 days ago is kept.
    assert await kept(store, *young) == young


async def test_running_and_queued_executions_are_never_deleted(store: ExecutionStore) -> None:
    """Whatever the limits, and even when their owner's lease ran out long
    ago (recovery ends those; retention never touches them)."""
    ancient = NOW - 400 * DAY
    queued = await add(store, created=ancient, state=ExecutionState.QUEUED, events=0)
    running = await add(store, created=ancient, state=ExecutionState.RUNNING, heartbeat=ancient)
    finished = [
        await add(store, created=ancient, state=state)
        for state in (ExecutionState.SUCCEEDED, ExecutionState.FAILED, ExecutionState.CANCELLED)
    ]
    newest = await add(store, created=NOW - DAY)
    assert await expire(store, 100, created_before=NOW - DAY / 2, keep_newest=1) == 4
    assert await kept(store, queued, running, *finished, newest) == [queued, running]
    assert [e.sequence for e in await store.events_after(running, 0)] == [1, 2, 3]


async def test_the_count_limit_keeps_the_newest_finished_ones(store: ExecutionStore) -> None:
    """Active executions neither count nor go: the newest three finished
    ones are kept around a running one younger than all of them."""
    ids = [await add(store, created=NOW - DAY + i * timedelta(minutes=1)) for i in range(8)]
    running = await add(store, created=NOW - timedelta(minutes=1), state=ExecutionState.RUNNING)
    deleted = await expire(store, 100, keep_newest=3)
    assert deleted == 5
    assert await kept(store, *ids, running) == [*ids[-3:], running]
    # Idempotent: a second sweep finds nothing.
    assert await expire(store, 100, keep_newest=3) == 0
    page, _ = await store.page(page_size=10)
    assert [record.id for record in page] == [running, *reversed(ids[-3:])]


async def test_ties_in_creation_time_are_broken_by_id_as_the_list_does(
    store: ExecutionStore,
) -> None:
    same = NOW - DAY
    ids = sorted([await add(store, created=same) for _ in range(4)])
    assert await expire(store, 100, keep_newest=2) == 2
    assert await kept(store, *ids) == ids[2:]


async def test_both_limits_together_keep_what_both_allow(store: ExecutionStore) -> None:
    old = [await add(store, created=NOW - 50 * DAY + i * DAY) for i in range(3)]
    recent = [await add(store, created=NOW - 5 * DAY + i * DAY) for i in range(4)]
    assert await expire(store, 100, created_before=NOW - 30 * DAY, keep_newest=2) == 5
    assert await kept(store, *old, *recent) == recent[-2:]
    # The count limit alone would keep more than the age limit lets stay.
    young = [await add(store, created=NOW - timedelta(hours=h)) for h in (3, 2, 1)]
    assert await expire(store, 100, created_before=NOW - 2.5 * DAY, keep_newest=10) == 1
    assert await kept(store, *recent, *young) == [recent[-1], *young]


async def test_what_ended_within_the_grace_is_kept(store: ExecutionStore) -> None:
    """An execution created long ago that has only just ended (a long one, or
    one recovery just failed) stays until ``ended_before`` passes its end."""
    long_one = await add(store, created=NOW - 40 * DAY, ended=NOW - timedelta(seconds=5))
    done = await add(store, created=NOW - 40 * DAY, ended=NOW - 40 * DAY)
    assert (
        await expire(
            store, 100, ended_before=NOW - timedelta(seconds=15), created_before=NOW - 30 * DAY
        )
        == 1
    )
    assert await kept(store, long_one, done) == [long_one]
    assert await expire(store, 100, created_before=NOW - 30 * DAY) == 1
    assert await kept(store, long_one) == []


async def test_no_limit_deletes_nothing(store: ExecutionStore) -> None:
    first = await add(store, created=NOW - 400 * DAY)
    assert await expire(store, 100, ended_before=NOW) == 0
    assert await kept(store, first) == [first]
    sweep = await Sweeper(store, RetentionPolicy(max_age_s=None, max_count=None)).sweep(NOW)
    assert sweep.deleted == 0


async def test_events_go_with_their_execution(store: ExecutionStore) -> None:
    gone = await add(store, created=NOW - 40 * DAY, events=50)
    stays = await add(store, created=NOW - DAY, events=7)
    assert await expire(store, 100, created_before=NOW - 30 * DAY) == 1
    assert await store.events_after(gone, 0) == []
    assert [e.sequence for e in await store.events_after(stays, 0)] == list(range(1, 8))
    assert await events_without_an_execution(store) == 0


async def events_without_an_execution(store: ExecutionStore) -> int:
    sql = (
        "SELECT count(*) FROM execution_events"
        " WHERE execution_id NOT IN (SELECT id FROM executions)"
    )
    if isinstance(store, SqliteStore):
        with closing(sqlite3.connect(store.path)) as db:
            return int(db.execute(sql).fetchone()[0])
    assert isinstance(store, PostgresStore)
    import asyncpg

    from agentlab.executions.migrations import quote_ident

    assert store.schema is not None
    conn = await asyncpg.connect(
        store.url, server_settings={"search_path": quote_ident(store.schema)}
    )
    try:
        return int(await conn.fetchval(sql))
    finally:
        await conn.close()


async def expire(
    store: ExecutionStore,
    limit: int,
    *,
    ended_before: datetime = NOW,
    created_before: datetime | None = None,
    keep_newest: int | None = None,
) -> int:
    """One delete_expired with the bound these limits make (as a sweep
    computes it); 0 when they make none."""
    expiry = await expiry_for(
        store, ended_before=ended_before, created_before=created_before, keep_newest=keep_newest
    )
    return 0 if expiry is None else await store.delete_expired(expiry, limit)


class CountingStore:
    """A store whose delete_expired calls are recorded: (limit, deleted)."""

    def __init__(self, inner: ExecutionStore) -> None:
        self.inner = inner
        self.deletes: list[tuple[int, int]] = []

    async def delete_expired(self, expiry: Expiry, limit: int) -> int:
        deleted = await self.inner.delete_expired(expiry, limit)
        self.deletes.append((limit, deleted))
        return deleted

    async def nth_newest_finished(self, n: int) -> Cursor | None:
        return await self.inner.nth_newest_finished(n)

    async def release_space(self, max_pages: int) -> int:
        return await self.inner.release_space(max_pages)


async def test_a_sweep_deletes_in_batches_of_the_size_given(store: ExecutionStore) -> None:
    """25 expired executions in batches of 10: three transactions, the last
    one short, and a fourth that finds nothing left; the oldest go first."""
    ids = [await add(store, created=NOW - 40 * DAY + i * timedelta(minutes=1)) for i in range(25)]
    newer = await add(store, created=NOW - DAY)
    counting = CountingStore(store)
    sweeper = Sweeper(counting, RetentionPolicy(max_age_s=30 * 86400.0), batch_size=10)  # type: ignore[arg-type]
    sweep = await sweeper.sweep(NOW)
    assert (sweep.deleted, sweep.batches) == (25, 3)
    assert counting.deletes == [(10, 10), (10, 10), (10, 5), (10, 0)]
    assert await kept(store, *ids, newer) == [newer]
    # One batch is the oldest ones.
    more = [await add(store, created=NOW - 40 * DAY + i * timedelta(minutes=1)) for i in range(4)]
    assert await expire(store, 3, created_before=NOW - 30 * DAY) == 3
    assert await kept(store, *more) == more[3:]


async def test_a_batch_holds_few_events_whatever_its_size(store: ExecutionStore) -> None:
    """The batch size counts executions, but a batch also stops at
    EVENTS_PER_DELETE events: long executions go a few at a time, and one
    longer than that alone."""
    huge = await add(store, created=NOW - 50 * DAY, events=EVENTS_PER_DELETE + 500)
    long_ones = [
        await add(store, created=NOW - 40 * DAY + i * timedelta(minutes=1), events=600)
        for i in range(5)
    ]
    assert await expire(store, 10, created_before=NOW - 30 * DAY) == 1
    assert await kept(store, huge) == []
    assert await expire(store, 10, created_before=NOW - 30 * DAY) == EVENTS_PER_DELETE // 600
    assert await kept(store, *long_ones) == long_ones[EVENTS_PER_DELETE // 600 :]


def test_the_event_budget_takes_a_prefix_and_always_one() -> None:
    assert within_event_budget([]) == []
    assert within_event_budget([("a", EVENTS_PER_DELETE * 3), ("b", 1)]) == ["a"]
    assert within_event_budget([("a", 1000), ("b", 1000), ("c", 1)]) == ["a", "b"]
    assert within_event_budget([("a", 5), ("b", 5), ("c", 5)]) == ["a", "b", "c"]


async def test_the_policy_makes_one_bound_of_both_limits(store: ExecutionStore) -> None:
    policy = RetentionPolicy(max_age_s=3600.0, max_count=5, grace_s=15.0)
    grace = NOW - timedelta(seconds=15)
    # Fewer than five finished: the age alone bounds.
    assert await policy.expiry(store, NOW) == Expiry(grace, Cursor(NOW - timedelta(hours=1), ""))
    count_only = RetentionPolicy(max_age_s=None, max_count=5)
    assert await count_only.expiry(store, NOW) is None
    ids = [await add(store, created=NOW - timedelta(minutes=50 - i)) for i in range(7)]
    await add(store, created=NOW, state=ExecutionState.RUNNING)  # not counted
    fifth_newest = await store.get(ids[2])
    assert fifth_newest is not None
    # The count's bound is younger than the age's: it wins.
    assert await policy.expiry(store, NOW) == Expiry(
        grace, Cursor(fifth_newest.created_at, fifth_newest.id)
    )
    assert await store.nth_newest_finished(8) is None
    assert RetentionPolicy(max_age_s=None, max_count=None).keeps_everything
    assert not RetentionPolicy().keeps_everything  # 30 days by default
    with pytest.raises(ValueError, match="batch_size"):
        Sweeper(store, policy, batch_size=0)


# --- SQLite's file -------------------------------------------------------------


def file_bytes(path: Path) -> int:
    """The store on disk: the database and its write-ahead log."""
    return sum(
        os.path.getsize(candidate)
        for candidate in (path, Path(f"{path}-wal"))
        if candidate.exists()
    )


async def test_sqlite_gives_deleted_space_back_to_the_file_system(tmp_path: Path) -> None:
    path = tmp_path / "agentlab.db"
    store = SqliteStore(path)
    await store.open()
    try:
        big = os.urandom(2000)
        for day in range(60):
            execution_id = await add(store, created=NOW - (60 - day) * DAY, events=0)
            await store.append_events(execution_id, [StoredEvent(n, big) for n in range(1, 101)])
        with closing(sqlite3.connect(path)) as db:
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            full_pages = db.execute("PRAGMA page_count").fetchone()[0]
        full = file_bytes(path)
        assert full > 10_000_000  # 60 executions of 200 KB
        sweep = await Sweeper(store, RetentionPolicy(max_age_s=6 * 86400.0)).sweep(NOW)
        assert sweep.deleted == 54
        assert sweep.released_bytes > 0.8 * full
        with closing(sqlite3.connect(path)) as db:
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            pages = db.execute("PRAGMA page_count").fetchone()[0]
            assert db.execute("PRAGMA freelist_count").fetchone()[0] == 0
        # What is left: 6 of 60 executions, and the file shrank to match.
        assert pages < full_pages * 0.15
        assert file_bytes(path) < full * 0.15
        page, _ = await store.page(page_size=100)
        assert len(page) == 6
        assert len(await store.events_after(page[0].id, 0)) == 100
    finally:
        await store.close()


async def test_a_file_made_without_incremental_vacuum_is_switched_once(tmp_path: Path) -> None:
    """A store file from before retention (auto_vacuum NONE) is converted
    with one VACUUM when opened, its rows intact; later opens leave it be."""
    path = tmp_path / "agentlab.db"
    with closing(sqlite3.connect(path, isolation_level=None)) as db:
        db.execute("PRAGMA journal_mode = WAL")
        for migration in SQLITE:
            for statement in migration.statements:
                db.execute(statement)
        db.execute("CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, applied_at TEXT)")
        db.executemany(
            "INSERT INTO schema_migrations VALUES (?, 'then')", [(m.version,) for m in SQLITE]
        )
        assert db.execute("PRAGMA auto_vacuum").fetchone()[0] == 0
    store = SqliteStore(path)
    await store.open()
    try:
        old = await add(store, created=NOW - 40 * DAY)
        await store.close()
        await store.open()
        with closing(sqlite3.connect(path)) as db:
            assert db.execute("PRAGMA auto_vacuum").fetchone()[0] == 2  # INCREMENTAL
        assert await kept(store, old) == [old]
        assert await expire(store, 10, created_before=NOW - DAY) == 1
    finally:
        await store.close()


@pytest.fixture
def postgres_only() -> Iterator[PostgresStore]:
    url = postgres_url()
    with postgres_schema("test_retention") as schema:
        yield PostgresStore(url, schema=schema)


async def test_postgres_leaves_the_space_to_its_autovacuum(postgres_only: PostgresStore) -> None:
    await postgres_only.open()
    try:
        await add(postgres_only, created=NOW - 40 * DAY, events=100)
        assert await expire(postgres_only, 10, created_before=NOW) == 1
        assert await postgres_only.release_space(100) == 0
    finally:
        await postgres_only.close()


# --- settings ------------------------------------------------------------------


def test_retention_settings_default_to_thirty_days_and_no_count() -> None:
    settings = Settings.from_env({})
    assert (settings.retention_max_age.seconds, settings.retention_max_count) == (30 * 86400, None)
    assert str(settings.retention_max_age) == "30d"
    assert (settings.retention_interval_s, settings.retention_batch_size) == (60.0, 100)


@pytest.mark.parametrize(
    ("text", "seconds", "shown"),
    [
        ("30d", 2_592_000, "30d"),
        ("12h", 43_200, "12h"),
        ("90m", 5400, "90m"),
        ("1.5h", 5400, "90m"),
        ("45s", 45, "45s"),
        ("0.5s", 0.5, "0.5s"),
        (" OFF ", None, "off"),
    ],
)
def test_the_age_is_a_number_with_a_unit_or_off(
    text: str, seconds: float | None, shown: str
) -> None:
    age = Settings.from_env({"AGENTLAB_RETENTION_MAX_AGE": text}).retention_max_age
    assert age == MaxAge(seconds)
    assert str(age) == shown
    assert MaxAge.parse(str(age)) == age


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("AGENTLAB_RETENTION_MAX_AGE", "30", "a number with a unit"),
        ("AGENTLAB_RETENTION_MAX_AGE", "0d", "above 0"),
        ("AGENTLAB_RETENTION_MAX_AGE", "-1h", "above 0"),
        ("AGENTLAB_RETENTION_MAX_AGE", "5w", "s, m, h or d"),
        ("AGENTLAB_RETENTION_MAX_AGE", "1000000d", "at most 36500d"),
        ("AGENTLAB_RETENTION_MAX_AGE", "1e300d", "at most 36500d"),
        ("AGENTLAB_RETENTION_MAX_AGE", "876001h", "at most 36500d"),
        ("AGENTLAB_RETENTION_INTERVAL_S", "inf", "at most"),
        ("AGENTLAB_RETENTION_INTERVAL_S", "nan", "must be a number"),
        ("AGENTLAB_RETENTION_MAX_COUNT", "0", "at least 1"),
        ("AGENTLAB_RETENTION_MAX_COUNT", "many", "an integer"),
        ("AGENTLAB_RETENTION_INTERVAL_S", "0", "above 0"),
        ("AGENTLAB_RETENTION_INTERVAL_S", "-5", "must not be negative"),
        ("AGENTLAB_RETENTION_BATCH_SIZE", "0", "at least 1"),
        ("AGENTLAB_RETENTION_BATCH_SIZE", "100000", "at most 10000"),
    ],
)
def test_retention_settings_out_of_range_stop_start_up(
    variable: str, value: str, message: str
) -> None:
    with pytest.raises(ConfigError, match=variable) as raised:
        Settings.from_env({variable: value})
    assert message in str(raised.value)


def test_the_count_limit_is_off_unless_set() -> None:
    assert Settings.from_env({"AGENTLAB_RETENTION_MAX_COUNT": "off"}).retention_max_count is None
    assert Settings.from_env({"AGENTLAB_RETENTION_MAX_COUNT": "500"}).retention_max_count == 500


async def test_the_sweeper_runs_until_cancelled_and_survives_a_failed_sweep() -> None:
    """run(): a sweep that raises is logged and the next one still comes."""

    third_sweep = asyncio.Event()

    class Flaky:
        calls = 0

        async def delete_expired(self, expiry: Expiry, limit: int) -> int:
            Flaky.calls += 1
            if Flaky.calls == 1:
                raise RuntimeError("the database went away")
            if Flaky.calls == 3:
                third_sweep.set()
            return 0

        async def nth_newest_finished(self, n: int) -> Cursor | None:
            return None

        async def release_space(self, max_pages: int) -> int:
            return 0

    sweeper = Sweeper(Flaky(), RetentionPolicy(), interval_s=0.01)  # type: ignore[arg-type]
    task = asyncio.create_task(sweeper.run())
    await asyncio.wait_for(third_sweep.wait(), timeout=10)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


# --- under load, through the executions facade -----------------------------------


async def test_under_load_the_store_stays_bounded_and_kept_ones_serve(
    store: ExecutionStore,
) -> None:
    """480 executions go through the facade (record, run, store every
    event) from eight callers at once while the sweeper runs every 50 ms: the rows
    stay near the count limit, Get, List and Watch of the kept ones work
    meanwhile, and after the load exactly the newest KEEP are left."""
    keep = 20
    runner = Runner(lambda model: Route(InstantLab(tokens=40)), default_max_tokens=16)
    executions = Executions(runner, store, LocalBus(), owner="t", max_running=8, max_queued=64)
    executions.retain(
        Sweeper(
            store,
            RetentionPolicy(max_age_s=None, max_count=keep, grace_s=0.1),
            interval_s=0.05,
            batch_size=10,
        )
    )
    await executions.start()
    task = Task(prompt="go", model="m", mode=ExecutionMode.INFERENCE)
    finished: list[tuple[str, float]] = []  # id, when it ended (loop time)
    clock = asyncio.get_running_loop().time
    samples: list[tuple[int, int]] = []  # rows in the store, what may be there
    try:

        async def caller() -> None:
            for _ in range(60):
                submitted = await executions.submit(task)
                await executions.wait_for_final(submitted.record.id)
                finished.append((submitted.record.id, clock()))
                # Sustained rather than a burst: the load outlasts the
                # window below several times over.
                await asyncio.sleep(0.02)

        callers = [asyncio.create_task(caller()) for _ in range(8)]
        while not all(c.done() for c in callers):
            await asyncio.sleep(0.05)
            if finished:
                newest, _ = finished[-1]
                record = await executions.get(newest)  # kept: it has just ended
                assert record.state is ExecutionState.SUCCEEDED
                events = [event async for event in executions.watch(newest)]
                assert events[-1].HasField("execution_completed")
                assert [e.sequence for e in events] == list(range(1, len(events) + 1))
            # What may be there: the limit, what ended within the grace and
            # the sweeps' interval (with slack for a busy machine: 2 s in
            # all, of a load that lasts several times that), and the eight
            # in flight; not the hundreds that went through.
            rows = await count_executions(executions)
            recent = sum(1 for _, ended in finished if ended > clock() - 2.0)
            samples.append((rows, keep + recent + 8))
        await asyncio.gather(*callers)
        assert len(finished) == 480
        deadline = clock() + 15
        while await count_executions(executions) > keep:
            assert clock() < deadline
            await asyncio.sleep(0.1)
        page, _ = await executions.page(page_size=100, after=None)
        assert len(page) == keep
        for record in page:
            assert record.state is ExecutionState.SUCCEEDED
            assert len(await store.events_after(record.id, 0)) == record.last_sequence
        assert await events_without_an_execution(store) == 0
    finally:
        await executions.stop(5.0)
    print(f"(rows, bound) while loaded: {samples}")
    assert samples
    assert all(rows <= bound for rows, bound in samples), samples


async def count_executions(executions: Executions) -> int:
    total, after = 0, None
    while True:
        page, after = await executions.page(page_size=100, after=after)
        total += len(page)
        if after is None:
            return total


async def test_a_watch_whose_execution_is_deleted_under_it_ends_with_not_found(
    store: ExecutionStore,
) -> None:
    """A watcher far behind (in its first page of the replay) when retention
    deletes the execution: not a stream that waits for events for good."""
    execution_id = await add(store, created=NOW - 40 * DAY, events=0)
    events = [
        codec.stored(pb.ExecutionEvent(execution_id=execution_id, sequence=n))
        for n in range(1, 601)
    ]
    await store.append_events(execution_id, events)
    stream = watch(store, LocalBus(), execution_id, 0, poll_s=0.05)
    seen = [await anext(stream)]
    assert await expire(store, 10, created_before=NOW) == 1

    async def read_on() -> None:
        async for event in stream:
            seen.append(event)

    with pytest.raises(NotFound):
        await read_on()
    assert len(seen) == REPLAY_PAGE


async def test_a_sweep_works_at_the_longest_age_and_lease_the_settings_accept() -> None:
    """An age of 1000000d was accepted once and failed every sweep (a date
    before year 1): the longest the settings take must still make one."""
    settings = Settings.from_env(
        {"AGENTLAB_RETENTION_MAX_AGE": "36500d", "AGENTLAB_EXECUTION_LEASE_S": "3153600000"}
    )
    assert settings.retention_max_age.seconds is not None

    class NoneFinished:
        async def nth_newest_finished(self, n: int) -> Cursor | None:
            return None

    policy = RetentionPolicy(
        max_age_s=settings.retention_max_age.seconds,
        max_count=3,
        grace_s=settings.execution_lease_s,
    )
    now = datetime(2026, 12, 1, tzinfo=UTC)
    expiry = await policy.expiry(NoneFinished(), now)  # type: ignore[arg-type]
    assert expiry is not None
    assert expiry.before.created_at == now - timedelta(days=36500)
    assert expiry.ended_before == now - timedelta(seconds=3153600000)
