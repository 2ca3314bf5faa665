"""The ExecutionStore contract, checked the same way against SQLite and
PostgreSQL: each test runs once per backend."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import random
import secrets
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import closing
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta, timezone
from functools import partial
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from agentlab.config import ConfigError
from agentlab.executions.errors import DuplicateEvent, UnknownExecution
from agentlab.executions.migrations import POSTGRES, SQLITE, quote_ident
from agentlab.executions.model import (
    Cursor,
    Ending,
    ExecutionRecord,
    ExecutionState,
    ExecutionStore,
    NewExecution,
    StoredEvent,
)
from agentlab.executions.postgres_store import PostgresStore
from agentlab.executions.sqlite_store import SqliteStore
from agentlab.executions.stores import open_store
from tests.helpers.services import postgres_url

# Microseconds on purpose: they must survive the round trip.
T0 = datetime(2025, 3, 4, 5, 6, 7, 123456, tzinfo=UTC)
PLUS_TWO = timezone(timedelta(hours=2))


@dataclass
class Backend:
    name: str
    # A new, unopened store on this test's database: several of them stand
    # for several processes.
    make: Callable[[], ExecutionStore]
    migration_versions: list[int]
    _sqlite_path: Path | None = None
    _postgres: tuple[str, str] | None = None  # url, schema

    async def applied_versions(self) -> list[int]:
        if self._sqlite_path is not None:
            with closing(sqlite3.connect(self._sqlite_path)) as db:
                rows = db.execute("SELECT version FROM schema_migrations ORDER BY version")
                return [row[0] for row in rows]
        assert self._postgres is not None
        url, schema = self._postgres
        conn = await asyncpg.connect(url, server_settings={"search_path": quote_ident(schema)})
        try:
            rows = await conn.fetch("SELECT version FROM schema_migrations ORDER BY version")
        finally:
            await conn.close()
        return [row["version"] for row in rows]


@pytest.fixture(params=["sqlite", "postgres"])
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    if request.param == "sqlite":
        # Directories that do not exist yet: open() makes them.
        path = tmp_path / "data" / "nested" / "agentlab.db"
        yield Backend(
            "sqlite",
            lambda: SqliteStore(path),
            [m.version for m in SQLITE],
            _sqlite_path=path,
        )
        return
    url = postgres_url()
    # A schema of its own per test: tests cannot see each other's rows, and
    # each starts from an unmigrated database.
    schema = f"test_store_{secrets.token_hex(6)}"
    yield Backend(
        "postgres",
        lambda: PostgresStore(url, schema=schema),
        [m.version for m in POSTGRES],
        _postgres=(url, schema),
    )
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(f"DROP SCHEMA IF EXISTS {quote_ident(schema)} CASCADE")
    finally:
        await conn.close()


@pytest.fixture
async def store(backend: Backend) -> AsyncIterator[ExecutionStore]:
    opened = backend.make()
    await opened.open()
    yield opened
    await opened.close()


@pytest.fixture
async def second_store(backend: Backend, store: ExecutionStore) -> AsyncIterator[ExecutionStore]:
    """Another process on the same database (opened after ``store``)."""
    opened = backend.make()
    await opened.open()
    yield opened
    await opened.close()


def new_execution(**changes: Any) -> NewExecution:
    fields: dict[str, Any] = {
        "id": f"ex-{secrets.token_hex(4)}",
        "request_id": "",
        "caller": "alice",
        "model": "smollm2",
        "mode": "inference",
        "prompt": "Why is the sky blue? ☀",
        "options": {"temperature": 0.5, "max_tokens": 64},
        "background": False,
        "created_at": T0,
        "owner": "proc-1",
    }
    fields.update(changes)
    return NewExecution(**fields)


async def start(store: ExecutionStore, execution_id: str, at: datetime) -> None:
    """Mark a record RUNNING, as the first batch of its events does."""
    await store.append_events(execution_id, [], started_at=at)


async def end(
    store: ExecutionStore,
    execution_id: str,
    state: ExecutionState,
    at: datetime,
    result: bytes | None,
    error: bytes | None,
) -> None:
    """Record a record's end, as the last batch of its events does."""
    await store.append_events(execution_id, [], ending=Ending(state, at, result, error))


def assert_utc(*times: datetime | None) -> None:
    for at in times:
        if at is not None:
            assert at.tzinfo is not None
            assert at.utcoffset() == timedelta(0)


# --- create / get -------------------------------------------------------------


async def test_create_and_get_round_trip_every_field(store: ExecutionStore) -> None:
    new = new_execution(
        request_id="req-1",
        mode="orchestration",
        # 1.0 must come back a float and 7 an int.
        options={"temperature": 1.0, "max_tokens": 128, "seed": 7},
        background=True,
        # Not UTC on the way in: the same instant comes back, in UTC.
        created_at=datetime(2025, 3, 4, 7, 6, 7, 999999, tzinfo=PLUS_TWO),
    )
    record, created = await store.create(new)

    assert created
    expected = ExecutionRecord(
        id=new.id,
        request_id="req-1",
        caller="alice",
        model="smollm2",
        mode="orchestration",
        prompt="Why is the sky blue? ☀",
        options={"temperature": 1.0, "max_tokens": 128, "seed": 7},
        background=True,
        state=ExecutionState.QUEUED,
        created_at=datetime(2025, 3, 4, 5, 6, 7, 999999, tzinfo=UTC),
        started_at=None,
        ended_at=None,
        owner="proc-1",
        heartbeat_at=datetime(2025, 3, 4, 5, 6, 7, 999999, tzinfo=UTC),
        last_sequence=0,
        result=None,
        error=None,
    )
    assert record == expected
    assert await store.get(new.id) == expected
    assert type(record.options["temperature"]) is float
    assert type(record.options["seed"]) is int
    assert_utc(record.created_at, record.heartbeat_at)

    started = T0 + timedelta(microseconds=1)
    ended = T0 + timedelta(seconds=3, microseconds=654321)
    await start(store, new.id, started)
    await store.append_events(new.id, [StoredEvent(1, b"\x00first")])
    await end(
        store, new.id, ExecutionState.SUCCEEDED, ended.astimezone(PLUS_TWO), b"\x00\xffresult", b""
    )

    final = await store.get(new.id)
    assert final == replace(
        expected,
        state=ExecutionState.SUCCEEDED,
        started_at=started,
        ended_at=ended,
        last_sequence=1,
        result=b"\x00\xffresult",
        error=b"",
    )
    assert final is not None
    assert_utc(final.created_at, final.started_at, final.ended_at, final.heartbeat_at)


async def test_get_unknown_is_none(store: ExecutionStore) -> None:
    assert await store.get("nope") is None


async def test_create_is_idempotent_per_caller_and_request_id(store: ExecutionStore) -> None:
    first, created = await store.create(new_execution(id="a1", request_id="req"))
    assert created

    again, created = await store.create(
        new_execution(id="a2", request_id="req", prompt="something else")
    )
    assert not created
    assert again == first
    assert await store.get("a2") is None

    other, created = await store.create(new_execution(id="b1", caller="bob", request_id="req"))
    assert created
    assert other.id == "b1"


async def test_empty_request_id_never_deduplicates(store: ExecutionStore) -> None:
    for execution_id in ("n1", "n2", "n3"):
        record, created = await store.create(new_execution(id=execution_id, request_id=""))
        assert created
        assert record.id == execution_id
    records, _ = await store.page(page_size=10)
    assert {r.id for r in records} == {"n1", "n2", "n3"}


async def test_concurrent_creates_with_one_request_id_create_one(
    store: ExecutionStore, second_store: ExecutionStore
) -> None:
    # Split over two stores: two processes racing, not just two coroutines.
    results = await asyncio.gather(
        *(
            (store if i % 2 else second_store).create(
                new_execution(id=f"race-{i}", request_id="same")
            )
            for i in range(10)
        )
    )
    assert sum(created for _, created in results) == 1
    winner = next(record for record, created in results if created)
    assert all(record == winner for record, _ in results)
    records, _ = await store.page(page_size=20)
    assert [r.id for r in records] == [winner.id]


async def test_naive_datetimes_are_refused(store: ExecutionStore) -> None:
    with pytest.raises(ValueError, match="naive"):
        await store.create(new_execution(created_at=datetime(2025, 1, 1)))


# --- page ---------------------------------------------------------------------


async def test_pages_are_newest_first_without_gaps_or_repeats(store: ExecutionStore) -> None:
    rng = random.Random(7)
    # Ids that a locale-aware collation would order differently from bytes
    # (case, punctuation), and created_at shared by three records at a time
    # so the id has to break ties.
    indices = list(range(120))
    rng.shuffle(indices)
    expected: list[ExecutionRecord] = []
    for n, i in enumerate(indices):
        prefix = rng.choice(["a", "B", "_", "z", "-", "Z"])
        record, _ = await store.create(
            new_execution(
                id=f"{prefix}{n:03d}",
                caller="alice" if i % 4 else "bob",
                model=("m-one", "m-two")[i % 2],
                created_at=T0 + timedelta(seconds=i // 3),
            )
        )
        if i % 5 == 0:
            await start(store, record.id, T0)
        elif i % 5 == 1:
            await end(store, record.id, ExecutionState.SUCCEEDED, T0, b"ok", None)
        expected.append((await store.get(record.id)) or record)
    expected.sort(key=lambda r: (r.created_at, r.id.encode()), reverse=True)

    async def collect(page_size: int, **filters: Any) -> list[ExecutionRecord]:
        seen: list[ExecutionRecord] = []
        cursor: Cursor | None = None
        while True:
            records, cursor = await store.page(page_size=page_size, after=cursor, **filters)
            assert len(records) <= page_size
            seen += records
            if cursor is None:
                return seen
            # A cursor promises more: never an empty page after it.
            assert len(records) == page_size
            assert cursor == Cursor(records[-1].created_at, records[-1].id)

    assert await collect(7) == expected
    for model in ("m-one", "m-two"):
        assert await collect(7, model=model) == [r for r in expected if r.model == model]
    for state in ExecutionState:
        assert await collect(7, state=state) == [r for r in expected if r.state == state]
    assert await collect(7, model="m-two", state=ExecutionState.QUEUED) == [
        r for r in expected if r.model == "m-two" and r.state == ExecutionState.QUEUED
    ]
    assert await collect(7, caller="bob", model="m-one") == [
        r for r in expected if r.caller == "bob" and r.model == "m-one"
    ]
    assert await collect(3, caller="nobody") == []

    # A last page that is exactly full has no cursor (no empty page after it).
    records, cursor = await store.page(page_size=120)
    assert records == expected
    assert cursor is None
    first, cursor = await store.page(page_size=60)
    assert cursor is not None
    second, cursor = await store.page(page_size=60, after=cursor)
    assert first + second == expected
    assert cursor is None


async def test_page_size_must_be_positive(store: ExecutionStore) -> None:
    with pytest.raises(ValueError, match="page_size"):
        await store.page(page_size=0)


# --- events -------------------------------------------------------------------


async def test_events_come_back_in_order_and_set_last_sequence(store: ExecutionStore) -> None:
    record, _ = await store.create(new_execution())
    other, _ = await store.create(new_execution())
    for sequence in (1, 2, 3, 5, 4):
        await store.append_events(record.id, [StoredEvent(sequence, f"e{sequence}".encode())])
    await store.append_events(other.id, [StoredEvent(1, b"other")])

    assert await store.events_after(record.id, 0) == [
        StoredEvent(n, f"e{n}".encode()) for n in (1, 2, 3, 4, 5)
    ]
    assert await store.events_after(record.id, 3) == [StoredEvent(4, b"e4"), StoredEvent(5, b"e5")]
    assert await store.events_after(record.id, 5) == []
    assert await store.events_after("nope", 0) == []
    # A page: the first ``limit`` after the sequence, in order.
    assert await store.events_after(record.id, 1, 2) == [
        StoredEvent(2, b"e2"),
        StoredEvent(3, b"e3"),
    ]
    assert await store.events_after(record.id, 4, 2) == [StoredEvent(5, b"e5")]
    # The maximum, not the last appended (4).
    stored = await store.get(record.id)
    assert stored is not None
    assert stored.last_sequence == 5


async def test_a_duplicate_event_raises_and_changes_nothing(store: ExecutionStore) -> None:
    record, _ = await store.create(new_execution())
    await store.append_events(record.id, [StoredEvent(1, b"one")])
    await store.append_events(record.id, [StoredEvent(2, b"two")])

    with pytest.raises(DuplicateEvent) as raised:
        await store.append_events(record.id, [StoredEvent(2, b"two again")])
    assert (raised.value.execution_id, raised.value.sequence) == (record.id, 2)

    assert await store.events_after(record.id, 0) == [
        StoredEvent(1, b"one"),
        StoredEvent(2, b"two"),
    ]
    stored = await store.get(record.id)
    assert stored is not None
    assert stored.last_sequence == 2
    # The store still works after the failed transaction.
    await store.append_events(record.id, [StoredEvent(3, b"three")])
    assert [e.sequence for e in await store.events_after(record.id, 0)] == [1, 2, 3]


async def test_an_event_for_an_unknown_execution_raises(store: ExecutionStore) -> None:
    with pytest.raises(UnknownExecution):
        await store.append_events("nope", [StoredEvent(1, b"x")])
    assert await store.events_after("nope", 0) == []


async def write_a_mix(
    store: ExecutionStore,
    before: Callable[[], Awaitable[None]],
    hold: Callable[[], Awaitable[None]],
) -> None:
    """Good and bad writes to several executions, queued together (after
    ``before``, then ``hold`` runs while they wait), then checked: each bad
    write fails alone."""
    a, _ = await store.create(new_execution())
    b, _ = await store.create(new_execution())
    await store.append_events(a.id, [StoredEvent(1, b"a1")])
    await store.append_events(b.id, [StoredEvent(1, b"b1")], started_at=T0)
    await before()
    ending = Ending(ExecutionState.SUCCEEDED, T0 + timedelta(seconds=2), b"result", None)
    writes = [
        asyncio.ensure_future(call)
        for call in (
            store.append_events(a.id, [StoredEvent(2, b"a2")]),
            store.append_events(a.id, [StoredEvent(1, b"a1 again"), StoredEvent(3, b"a3")]),
            store.append_events("nope", [StoredEvent(1, b"x")]),
            store.append_events(b.id, [StoredEvent(2, b"b2")], ending=ending),
            store.create(new_execution(id="c", request_id="key")),
            store.create(new_execution(id="c-again", request_id="key")),
        )
    ]
    await hold()
    outcomes = await asyncio.gather(*writes, return_exceptions=True)

    assert outcomes[0] is None
    assert isinstance(outcomes[1], DuplicateEvent)
    assert isinstance(outcomes[2], UnknownExecution)
    assert outcomes[3] is None
    # One of the two creates with a key made the record; the other got it.
    creates = [outcome for outcome in outcomes[4:] if isinstance(outcome, tuple)]
    assert sorted(created for _, created in creates) == [False, True]
    assert creates[0][0] == creates[1][0]
    # The failed write left nothing behind, not even its good event.
    assert await store.events_after(a.id, 0) == [StoredEvent(1, b"a1"), StoredEvent(2, b"a2")]
    stored_a = await store.get(a.id)
    assert stored_a is not None
    assert stored_a.last_sequence == 2
    assert [e.payload for e in await store.events_after(b.id, 0)] == [b"b1", b"b2"]
    stored_b = await store.get(b.id)
    assert stored_b is not None
    assert (stored_b.state, stored_b.started_at, stored_b.result) == (
        ExecutionState.SUCCEEDED,
        T0,
        b"result",
    )


async def test_writes_queued_together_fail_only_where_they_are_bad(
    store: ExecutionStore,
) -> None:
    await write_a_mix(store, lambda: asyncio.sleep(0), lambda: asyncio.sleep(0))


async def test_sqlite_commits_queued_writes_as_a_group_each_failing_alone(
    tmp_path: Path,
) -> None:
    # Another process holds the write lock while the writes queue: the
    # writer then takes them all in one transaction (one BEGIN IMMEDIATE
    # waiting on the lock, one COMMIT), and a bad one must still fail alone.
    path = tmp_path / "agentlab.db"
    store = SqliteStore(path)
    await store.open()
    other = sqlite3.connect(path, isolation_level=None)
    blocked: list[asyncio.Future[None]] = []

    async def lock() -> None:
        other.execute("BEGIN IMMEDIATE")
        # The writer takes this one alone and waits on the lock with it.
        blocked.append(asyncio.ensure_future(store.append_events(record.id, [], started_at=T0)))
        await asyncio.sleep(0.05)

    async def hold() -> None:
        # Long enough for the writer to be waiting on the lock with all
        # of them queued; a shorter wait only makes the groups smaller.
        await asyncio.sleep(0.2)
        other.execute("COMMIT")

    try:
        record, _ = await store.create(new_execution())
        await write_a_mix(store, lock, hold)
        await blocked[0]
    finally:
        other.close()
        await store.close()


@pytest.fixture
async def postgres_schema_url() -> AsyncIterator[tuple[str, str]]:
    """A PostgreSQL URL and a schema of this test's own, dropped after."""
    url = postgres_url()
    schema = f"test_store_{secrets.token_hex(6)}"
    yield url, schema
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(f"DROP SCHEMA IF EXISTS {quote_ident(schema)} CASCADE")
    finally:
        await conn.close()


async def test_postgres_commits_queued_writes_as_a_group_each_failing_alone(
    postgres_schema_url: tuple[str, str],
) -> None:
    # Another connection holds a record's row lock, so the group in flight
    # (one append to it) waits while the mix queues: the next group takes
    # the mix together, and a bad write must still fail alone.
    url, schema = postgres_schema_url
    store = PostgresStore(url, schema=schema)
    await store.open()
    other = await asyncpg.connect(url, server_settings={"search_path": quote_ident(schema)})
    blocked: list[asyncio.Future[None]] = []

    async def lock() -> None:
        await other.execute("BEGIN")
        await other.execute("SELECT 1 FROM executions WHERE id = $1 FOR UPDATE", record.id)
        blocked.append(asyncio.ensure_future(store.append_events(record.id, [], started_at=T0)))
        await asyncio.sleep(0.05)

    async def hold() -> None:
        await asyncio.sleep(0.2)
        await other.execute("COMMIT")

    try:
        record, _ = await store.create(new_execution())
        await write_a_mix(store, lock, hold)
        await blocked[0]
        stored = await store.get(record.id)
        assert stored is not None
        assert stored.state is ExecutionState.RUNNING
    finally:
        await other.close()
        await store.close()


async def test_postgres_writes_queued_together_commit_in_one_transaction(
    postgres_schema_url: tuple[str, str],
) -> None:
    # Group commit, seen in the rows: those written by one transaction carry
    # its id (xmin). Appends to three executions queued in one turn of the
    # loop are one transaction, and so are two creates.
    url, schema = postgres_schema_url
    store = PostgresStore(url, schema=schema)
    await store.open()
    try:
        records = [(await store.create(new_execution()))[0] for _ in range(3)]
        ending = Ending(ExecutionState.SUCCEEDED, T0 + timedelta(seconds=1), b"done", None)
        outcomes = await asyncio.gather(
            store.append_events(records[0].id, [StoredEvent(1, b"a")]),
            store.append_events(records[1].id, [StoredEvent(1, b"b")], started_at=T0),
            store.append_events(records[2].id, [StoredEvent(1, b"c")], ending=ending),
            store.create(new_execution(id="d", request_id="d")),
            store.create(new_execution(id="e", request_id="e")),
        )
        assert list(outcomes[:3]) == [None, None, None]
        assert [(record.id, created) for record, created in outcomes[3:]] == [
            ("d", True),
            ("e", True),
        ]
        # What create answered is what a read gives.
        assert [await store.get(id) for id in ("d", "e")] == [r for r, _ in outcomes[3:]]
        finished = await store.get(records[2].id)
        assert finished is not None
        assert (finished.state, finished.result, finished.last_sequence) == (
            ExecutionState.SUCCEEDED,
            b"done",
            1,
        )
        conn = await asyncpg.connect(url, server_settings={"search_path": quote_ident(schema)})
        try:
            appended = await conn.fetch(
                "SELECT DISTINCT xmin::text FROM execution_events WHERE execution_id = ANY($1)",
                [record.id for record in records],
            )
            created = await conn.fetch(
                "SELECT DISTINCT xmin::text FROM executions WHERE id IN ('d', 'e')"
            )
        finally:
            await conn.close()
        assert len(appended) == 1
        assert len(created) == 1
    finally:
        await store.close()


async def cancel_midway(call: Callable[[], Awaitable[object]], n: int) -> None:
    """Start ``call`` and cancel it somewhere between before it starts and
    well into its round trips to the database, depending on ``n``."""
    task = asyncio.ensure_future(call())
    for _ in range(n % 6):
        await asyncio.sleep(0)
    if n % 10:
        await asyncio.sleep(0.0003 * (n % 10))
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def test_cancelled_calls_leave_the_store_consistent_and_usable(backend: Backend) -> None:
    # Callers are cancelled all the time (a client goes away): wherever that
    # lands, a write must not half happen, nor the store be left wedged, nor
    # the driver leave failed futures behind.
    loop = asyncio.get_running_loop()
    loop_errors: list[str] = []
    loop.set_exception_handler(lambda _, context: loop_errors.append(context["message"]))
    store = backend.make()
    await store.open()
    try:
        record, _ = await store.create(new_execution())
        for n in range(1, 61):
            await cancel_midway(partial(store.append_events, record.id, [StoredEvent(n, b"x")]), n)
            await cancel_midway(partial(store.page, page_size=5), n)

        # Each event was stored together with its last_sequence, or neither.
        stored = await store.get(record.id)
        assert stored is not None
        sequences = [e.sequence for e in await store.events_after(record.id, 0)]
        assert stored.last_sequence == max(sequences, default=0)

        await store.append_events(record.id, [StoredEvent(1000, b"last")])
        assert await store.events_after(record.id, 999) == [StoredEvent(1000, b"last")]
    finally:
        await store.close()
        # Futures nobody retrieved are reported when collected.
        gc.collect()
        loop.set_exception_handler(None)
    assert loop_errors == []


# --- state --------------------------------------------------------------------


async def test_started_then_ended(store: ExecutionStore) -> None:
    record, _ = await store.create(new_execution())
    await start(store, record.id, T0 + timedelta(seconds=1))
    running = await store.get(record.id)
    assert running is not None
    assert running.state == ExecutionState.RUNNING
    assert running.started_at == T0 + timedelta(seconds=1)
    assert running.ended_at is None

    await end(
        store, record.id, ExecutionState.FAILED, T0 + timedelta(seconds=2), b"partial", b"status"
    )
    failed = await store.get(record.id)
    assert failed is not None
    assert (failed.state, failed.ended_at, failed.result, failed.error) == (
        ExecutionState.FAILED,
        T0 + timedelta(seconds=2),
        b"partial",
        b"status",
    )
    assert failed.started_at == T0 + timedelta(seconds=1)


async def test_events_go_with_the_start_and_the_end(store: ExecutionStore) -> None:
    """append_events can mark the execution RUNNING with its first events and
    finish it with its last, each in the same transaction."""
    record, _ = await store.create(new_execution())
    started = T0 + timedelta(seconds=1)
    await store.append_events(
        record.id, [StoredEvent(1, b"started"), StoredEvent(2, b"token")], started_at=started
    )
    running = await store.get(record.id)
    assert running is not None
    assert (running.state, running.started_at, running.last_sequence) == (
        ExecutionState.RUNNING,
        started,
        2,
    )

    ended = T0 + timedelta(seconds=2)
    ending = Ending(ExecutionState.SUCCEEDED, ended, b"result", None)
    # All or none: a duplicate fails the events and leaves the state alone.
    with pytest.raises(DuplicateEvent):
        await store.append_events(record.id, [StoredEvent(2, b"again")], ending=ending)
    unchanged = await store.get(record.id)
    assert unchanged == running

    await store.append_events(record.id, [StoredEvent(3, b"completed")], ending=ending)
    done = await store.get(record.id)
    assert done is not None
    assert (done.state, done.started_at, done.ended_at, done.result, done.last_sequence) == (
        ExecutionState.SUCCEEDED,
        started,
        ended,
        b"result",
        3,
    )
    assert [e.sequence for e in await store.events_after(record.id, 0)] == [1, 2, 3]


async def test_a_start_does_not_revive_a_finished_record(store: ExecutionStore) -> None:
    # A cancel can finish a queued execution before its runner starts it.
    record, _ = await store.create(new_execution())
    await end(store, record.id, ExecutionState.CANCELLED, T0, None, b"cancelled")
    await start(store, record.id, T0 + timedelta(seconds=1))
    stored = await store.get(record.id)
    assert stored is not None
    assert stored.state == ExecutionState.CANCELLED
    assert stored.started_at is None


# --- ownership ----------------------------------------------------------------


async def test_heartbeat_touches_the_owners_active_records_only(store: ExecutionStore) -> None:
    queued, _ = await store.create(new_execution(owner="me"))
    running, _ = await store.create(new_execution(owner="me"))
    await start(store, running.id, T0)
    done, _ = await store.create(new_execution(owner="me"))
    await end(store, done.id, ExecutionState.SUCCEEDED, T0, b"", None)
    theirs, _ = await store.create(new_execution(owner="them"))

    later = T0 + timedelta(seconds=30, microseconds=17)
    await store.heartbeat("me", later)

    async def heartbeat_at(execution_id: str) -> datetime:
        record = await store.get(execution_id)
        assert record is not None
        return record.heartbeat_at

    assert await heartbeat_at(queued.id) == later
    assert await heartbeat_at(running.id) == later
    assert await heartbeat_at(done.id) == T0
    assert await heartbeat_at(theirs.id) == T0


async def test_stale_lists_active_records_not_heard_from(store: ExecutionStore) -> None:
    old_queued, _ = await store.create(new_execution(owner="dead"))
    old_running, _ = await store.create(new_execution(owner="dead"))
    await start(store, old_running.id, T0)
    old_done, _ = await store.create(new_execution(owner="dead"))
    await end(store, old_done.id, ExecutionState.FAILED, T0, None, b"")
    fresh, _ = await store.create(new_execution(owner="alive", created_at=T0))
    await store.heartbeat("alive", T0 + timedelta(seconds=10))

    stale = await store.stale(T0 + timedelta(seconds=10))
    assert {r.id for r in stale} == {old_queued.id, old_running.id}
    # Strictly before: a heartbeat at the boundary is not stale.
    assert await store.stale(T0) == []
    assert fresh.id not in {r.id for r in await store.stale(T0 + timedelta(seconds=10))}


async def test_claim_takes_a_stale_record_once(store: ExecutionStore) -> None:
    record, _ = await store.create(new_execution(owner="dead"))
    await start(store, record.id, T0)
    cutoff = T0 + timedelta(seconds=10)
    now = T0 + timedelta(seconds=20)

    assert await store.claim(record.id, "rescuer", cutoff, now)
    claimed = await store.get(record.id)
    assert claimed is not None
    assert (claimed.owner, claimed.heartbeat_at, claimed.state) == (
        "rescuer",
        now,
        ExecutionState.RUNNING,
    )
    # Its heartbeat is fresh now: nobody else takes it.
    assert not await store.claim(record.id, "late", cutoff, now)
    assert await store.stale(cutoff) == []

    # Neither a fresh, a finished nor an unknown record.
    fresh, _ = await store.create(new_execution(created_at=now))
    assert not await store.claim(fresh.id, "greedy", cutoff, now)
    done, _ = await store.create(new_execution())
    await end(store, done.id, ExecutionState.SUCCEEDED, T0, b"", None)
    assert not await store.claim(done.id, "greedy", cutoff, now)
    assert not await store.claim("nope", "greedy", cutoff, now)


async def test_concurrent_claims_take_each_record_once(
    store: ExecutionStore, second_store: ExecutionStore
) -> None:
    ids = [(await store.create(new_execution(owner="dead")))[0].id for _ in range(10)]
    cutoff = T0 + timedelta(seconds=10)
    now = T0 + timedelta(seconds=20)

    claims = [
        (s, execution_id, name)
        for execution_id in ids
        for s, name in ((store, "a"), (second_store, "b"))
    ]
    results = await asyncio.gather(
        *(s.claim(execution_id, name, cutoff, now) for s, execution_id, name in claims)
    )

    for execution_id in ids:
        winners = [
            name
            for (_, claimed_id, name), won in zip(claims, results, strict=True)
            if won and claimed_id == execution_id
        ]
        assert len(winners) == 1
        record = await store.get(execution_id)
        assert record is not None
        assert record.owner == winners[0]


# --- migrations ---------------------------------------------------------------


async def test_migrations_apply_once_even_when_two_open_at_once(backend: Backend) -> None:
    first, second = backend.make(), backend.make()
    await asyncio.gather(first.open(), second.open())
    try:
        assert await backend.applied_versions() == backend.migration_versions
        record, _ = await first.create(new_execution())
        assert await second.get(record.id) == record
    finally:
        await asyncio.gather(first.close(), second.close())

    # Opening an up-to-date database changes nothing and keeps the data.
    again = backend.make()
    await again.open()
    try:
        assert await again.get(record.id) == record
        assert await backend.applied_versions() == backend.migration_versions
    finally:
        await again.close()


async def test_a_store_must_be_opened_first(backend: Backend) -> None:
    with pytest.raises(RuntimeError, match="not open"):
        await backend.make().get("x")


async def test_sqlite_makes_its_directory_and_uses_wal(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "agentlab.db"
    store = SqliteStore(path)
    await store.open()
    try:
        assert path.is_file()
        with closing(sqlite3.connect(path)) as db:
            row = db.execute("PRAGMA journal_mode").fetchone()
        assert row is not None
        assert row[0] == "wal"
    finally:
        await store.close()


# --- open_store ---------------------------------------------------------------


def test_open_store_defaults_to_sqlite_in_the_data_dir(tmp_path: Path) -> None:
    for url in (None, ""):
        store = open_store(url, tmp_path)
        assert isinstance(store, SqliteStore)
        assert store.path == tmp_path / "agentlab.db"


def test_open_store_takes_an_absolute_sqlite_url(tmp_path: Path) -> None:
    store = open_store("sqlite:///srv/agent%20lab/x.db", tmp_path)
    assert isinstance(store, SqliteStore)
    assert store.path == Path("/srv/agent lab/x.db")


@pytest.mark.parametrize(
    "url", ["postgresql://u:p@db:5432/agentlab", "postgres://db/agentlab?sslmode=require"]
)
def test_open_store_takes_postgres_urls(url: str, tmp_path: Path) -> None:
    store = open_store(url, tmp_path)
    assert isinstance(store, PostgresStore)
    assert store.url == url


@pytest.mark.parametrize(
    "url",
    [
        "mysql://root:hunter2@db/agentlab",
        "postgresql+asyncpg://root:hunter2@db/agentlab",
        "sqlite://relative.db",
        "sqlite:///",
        "/var/lib/agentlab.db",
    ],
)
def test_open_store_refuses_other_urls(url: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="AGENTLAB_DATABASE_URL") as raised:
        open_store(url, tmp_path)
    assert "hunter2" not in str(raised.value)


class _GatedConnection:
    """Answers every statement with one row, once ``gate`` is done."""

    def __init__(self, gate: asyncio.Future[None]) -> None:
        self.gate = gate

    async def fetchrow(self, sql: str, *args: object) -> tuple[bool]:
        await self.gate
        return (True,)

    async def fetchmany(self, sql: str, args: list[object]) -> list[tuple[bool]]:
        await self.gate
        return [(True,)] * len(args)


class _GatedPool:
    def __init__(self, gate: asyncio.Future[None]) -> None:
        self.gate = gate

    @contextlib.asynccontextmanager
    async def acquire(self) -> AsyncIterator[_GatedConnection]:
        yield _GatedConnection(self.gate)

    async def close(self) -> None:
        return None


async def test_postgres_a_write_queued_as_the_writers_finish_is_written() -> None:
    # Both group writers finish in one turn of the loop, and a write is
    # queued in that same turn: it must start a writer of its own, not wait
    # (for ever, on a quiet server) for one that is already gone.
    from agentlab.executions import postgres_store

    gate: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    store = PostgresStore("postgresql://127.0.0.1:1/unused")
    store._pool = _GatedPool(gate)

    def write(name: str) -> Awaitable[Any]:
        async def alone(conn: Any) -> str:
            await conn.fetchrow("SELECT")
            return name

        async def settle(row: Any, conn: Any) -> str:
            return name

        return store._write(postgres_store._Write("SELECT", (), alone, settle, key=name))

    first = asyncio.ensure_future(write("first"))
    for _ in range(2):
        await asyncio.sleep(0)
    second = asyncio.ensure_future(write("second"))
    for _ in range(2):
        await asyncio.sleep(0)
    assert len(store._writers) == 2

    async def late() -> Any:
        await gate  # woken in the writers' turn, after them
        return await write("late")

    latecomer = asyncio.ensure_future(late())
    await asyncio.sleep(0)
    gate.set_result(None)
    assert (await first, await second) == ("first", "second")
    assert await asyncio.wait_for(latecomer, 2.0) == "late"
    await store.close()


# --- replays ---------------------------------------------------------------


async def test_a_replays_source_round_trips(store: ExecutionStore) -> None:
    source, _ = await store.create(new_execution())
    replay_new = new_execution(request_id="replay-1", replay_of=source.id)
    replay, created = await store.create(replay_new)
    assert created
    assert (source.replay_of, replay.replay_of) == ("", source.id)
    # Read back every way a record is read: by id, by key, in a page.
    assert (await store.get(replay.id)) == replay
    assert (await store.find("alice", "replay-1")) == replay
    page, _ = await store.page(page_size=10)
    assert {record.id: record.replay_of for record in page} == {
        source.id: "",
        replay.id: source.id,
    }
