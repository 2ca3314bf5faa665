"""ExecutionStore in a SQLite file: the default, for one process (or a few on
one machine).

Two connections, each owned by a thread of its own. The writer commits in
groups: it takes every write handed to it since its last commit (from all
executions) and runs them in one transaction with one COMMIT (should one
write fail, the group is done again with a savepoint per write, so that it
fails alone), then settles the whole group's futures with one wake-up of the
event loop. Under load a write then costs a fraction of a transaction and
of a thread round trip rather than one of each; alone, it costs what it
did. The reader runs queries (queued ones likewise together) on a second
connection, which WAL lets read while the writer writes. Writes begin
IMMEDIATE (taking SQLite's write lock up front) so that other processes on
the same file wait on the busy timeout instead of failing to upgrade a read
lock mid-transaction.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

from agentlab.executions.errors import DuplicateEvent, UnknownExecution
from agentlab.executions.migrations import (
    migrate_sqlite,
    prepare_incremental_vacuum,
    switch_to_incremental_vacuum,
)
from agentlab.executions.model import (
    ACTIVE_STATES,
    FINISHED_STATES,
    Cursor,
    Ending,
    ExecutionRecord,
    ExecutionState,
    Expiry,
    NewExecution,
    StoredEvent,
    within_event_budget,
)
from agentlab.executions.rows import encode_options, page_of, queued_record, record_from_row

__all__ = ["SqliteStore"]

T = TypeVar("T")

# Upsert (ON CONFLICT ... DO NOTHING) arrived in 3.24.
_MIN_SQLITE = (3, 24, 0)

# Seconds a statement waits for another process's write lock.
_BUSY_TIMEOUT_S = 10.0

# Jobs one transaction (or one wake-up of the reader) takes at most: bounds
# how long the write lock is held, and how long the loop spends settling.
_MAX_BATCH = 512

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)

_COLUMNS = (
    "id, request_id, caller, model, mode, prompt, options, background, state, created_at,"
    " started_at, ended_at, owner, heartbeat_at, last_sequence, result, error, fingerprint,"
    " replay_of"
)
_ACTIVE = tuple(state.value for state in ACTIVE_STATES)
_ACTIVE_SQL = "(" + ", ".join("?" for _ in _ACTIVE) + ")"
_FINISHED = tuple(state.value for state in FINISHED_STATES)
_FINISHED_SQL = "(" + ", ".join("?" for _ in _FINISHED) + ")"

# The WAL file is cut back to this size after a checkpoint empties it:
# without a limit it keeps the size of its busiest moment (a retention
# sweep's deletes included) for good.
_WAL_SIZE_LIMIT = 16 * 1024 * 1024


class SqliteStore:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._writer: _Worker | None = None
        self._reader: _Worker | None = None
        self._closing = False

    async def open(self) -> None:
        if self._writer is not None:
            return
        if sqlite3.sqlite_version_info < _MIN_SQLITE:
            raise RuntimeError(
                f"SQLite {sqlite3.sqlite_version} is too old: the execution store needs "
                f"{'.'.join(map(str, _MIN_SQLITE))} or newer"
            )
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # The writer first: it migrates the schema the reader then reads.
        writer = _Worker("sqlite-writer", lambda: _connect(self.path), _write_batch)
        await writer.start()
        reader = _Worker("sqlite-reader", lambda: _connect_reader(self.path), _read_batch)
        try:
            await reader.start()
        except BaseException:
            await writer.stop()
            raise
        self._writer, self._reader, self._closing = writer, reader, False

    async def close(self) -> None:
        writer, reader = self._writer, self._reader
        if writer is None or reader is None:
            return
        self._closing = True
        try:
            # Each runs what it was handed first: writes whose callers were
            # cancelled and are not waiting for them end too.
            await reader.stop()
            await writer.stop()
        finally:
            self._writer = self._reader = None

    async def create(self, new: NewExecution) -> tuple[ExecutionRecord, bool]:
        created_at = _to_us(new.created_at)

        def insert(db: sqlite3.Connection) -> tuple[sqlite3.Row | None, bool]:
            # None for the row when it is the new one: built from ``new``.
            created = (
                db.execute(
                    f"""
                    INSERT INTO executions ({_COLUMNS})
                    VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, NULL, NULL, ?, ?, 0, NULL, NULL, ?, ?)
                    ON CONFLICT (caller, request_id) WHERE request_id <> '' DO NOTHING
                    """,
                    (
                        new.id,
                        new.request_id,
                        new.caller,
                        new.model,
                        new.mode,
                        new.prompt,
                        encode_options(new.options),
                        int(new.background),
                        ExecutionState.QUEUED.value,
                        created_at,
                        new.owner,
                        created_at,
                        new.fingerprint,
                        new.replay_of,
                    ),
                ).rowcount
                == 1
            )
            if created:
                return None, True
            # The write lock is held, so the conflicting row is committed (or
            # inserted earlier in this group) and stays put until the end.
            row = db.execute(
                f"SELECT {_COLUMNS} FROM executions WHERE caller = ? AND request_id = ?",
                (new.caller, new.request_id),
            ).fetchone()
            assert row is not None
            return row, False

        row, created = await self._write(insert)
        if row is not None:
            return _record(row), created
        # What a read of the new row gives back: times to the microsecond.
        return queued_record(new, _from_us(created_at)), True

    async def get(self, execution_id: str) -> ExecutionRecord | None:
        row = await self._read(
            lambda db: db.execute(
                f"SELECT {_COLUMNS} FROM executions WHERE id = ?", (execution_id,)
            ).fetchone()
        )
        return None if row is None else _record(row)

    async def find(self, caller: str, request_id: str) -> ExecutionRecord | None:
        if not request_id:
            return None
        row = await self._read(
            lambda db: db.execute(
                f"SELECT {_COLUMNS} FROM executions WHERE caller = ? AND request_id = ?",
                (caller, request_id),
            ).fetchone()
        )
        return None if row is None else _record(row)

    async def page(
        self,
        *,
        page_size: int,
        after: Cursor | None = None,
        caller: str | None = None,
        model: str | None = None,
        state: ExecutionState | None = None,
    ) -> tuple[list[ExecutionRecord], Cursor | None]:
        if page_size < 1:
            raise ValueError(f"page_size must be at least 1, not {page_size}")
        where: list[str] = []
        args: list[object] = []
        if after is not None:
            where.append("(created_at, id) < (?, ?)")
            args += [_to_us(after.created_at), after.id]
        for column, value in (
            ("caller", caller),
            ("model", model),
            ("state", None if state is None else state.value),
        ):
            if value is not None:
                where.append(f"{column} = ?")
                args.append(value)
        # One more than asked: whether it comes back tells if a next page exists.
        args.append(page_size + 1)
        sql = (
            f"SELECT {_COLUMNS} FROM executions"
            f" {'WHERE ' + ' AND '.join(where) if where else ''}"
            " ORDER BY created_at DESC, id DESC LIMIT ?"
        )
        rows = await self._read(lambda db: db.execute(sql, args).fetchall())
        return page_of([_record(row) for row in rows], page_size)

    async def append_events(
        self,
        execution_id: str,
        events: Sequence[StoredEvent],
        *,
        started_at: datetime | None = None,
        ending: Ending | None = None,
    ) -> None:
        if not events and started_at is None and ending is None:
            return

        await self._write(partial(_append, execution_id, events, started_at, ending))

    async def events_after(
        self, execution_id: str, after_sequence: int, limit: int | None = None
    ) -> list[StoredEvent]:
        rows = await self._read(
            lambda db: db.execute(
                "SELECT sequence, payload FROM execution_events"
                " WHERE execution_id = ? AND sequence > ? ORDER BY sequence LIMIT ?",
                (execution_id, after_sequence, -1 if limit is None else limit),
            ).fetchall()
        )
        return [StoredEvent(sequence=row["sequence"], payload=row["payload"]) for row in rows]

    async def heartbeat(self, owner: str, at: datetime) -> None:
        await self._update(
            f"UPDATE executions SET heartbeat_at = ? WHERE owner = ? AND state IN {_ACTIVE_SQL}",
            _to_us(at),
            owner,
            *_ACTIVE,
        )

    async def stale(self, before: datetime) -> list[ExecutionRecord]:
        rows = await self._read(
            lambda db: db.execute(
                f"SELECT {_COLUMNS} FROM executions"
                f" WHERE state IN {_ACTIVE_SQL} AND heartbeat_at < ?"
                " ORDER BY heartbeat_at, id",
                (*_ACTIVE, _to_us(before)),
            ).fetchall()
        )
        return [_record(row) for row in rows]

    async def claim(
        self, execution_id: str, owner: str, stale_before: datetime, at: datetime
    ) -> bool:
        taken = await self._update(
            "UPDATE executions SET owner = ?, heartbeat_at = ?"
            f" WHERE id = ? AND state IN {_ACTIVE_SQL} AND heartbeat_at < ?",
            owner,
            _to_us(at),
            execution_id,
            *_ACTIVE,
            _to_us(stale_before),
        )
        return taken == 1

    async def delete_expired(self, expiry: Expiry, limit: int) -> int:
        if limit < 1:
            raise ValueError(f"limit must be at least 1, not {limit}")
        return await self._write(partial(_delete_expired, expiry, limit))

    async def nth_newest_finished(self, n: int) -> Cursor | None:
        if n < 1:
            raise ValueError(f"n must be at least 1, not {n}")
        # +state: see _delete_expired; the walk down executions_newest
        # passes n finished records (and the few active ones).
        row = await self._read(
            lambda db: db.execute(
                f"SELECT created_at, id FROM executions WHERE +state IN {_FINISHED_SQL}"
                " ORDER BY created_at DESC, id DESC LIMIT 1 OFFSET ?",
                (*_FINISHED, n - 1),
            ).fetchone()
        )
        return None if row is None else Cursor(_from_us(row[0]), row[1])

    async def release_space(self, max_pages: int) -> int:
        released, drained = await self._write(partial(_release_space, max_pages))
        if released and drained:
            # The file is cut when the WAL is next checkpointed, which
            # otherwise waits for the WAL to fill up again: done now, on the
            # reading connection, off the writer's path (PASSIVE: it waits
            # for nobody, and copies what no reader still needs).
            await self._read(lambda db: db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall())
        return released

    def _submit(
        self, worker: _Worker | None, work: Callable[[sqlite3.Connection], T]
    ) -> asyncio.Future[T]:
        if worker is None or self._closing:
            raise RuntimeError("the SQLite store is not open")
        return worker.submit(work)

    async def _read(self, query: Callable[[sqlite3.Connection], T]) -> T:
        """``query`` on the reading connection; outside a transaction, each
        statement reads a consistent snapshot of the file (what was
        committed when it began: every write whose call has returned)."""
        return await self._submit(self._reader, query)

    async def _update(self, sql: str, *args: object) -> int:
        """One statement in a transaction; the number of rows it changed."""
        return await self._write(lambda db: db.execute(sql, args).rowcount)

    async def _write(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """``work`` in the writer's next transaction, as a savepoint of its
        own: committed with the jobs grouped with it, unless it raises (then
        it alone is undone, and raises here).

        A cancelled caller stops waiting, but the write still happens (a
        cancelled execution's last events and state must be kept): the
        writer runs every job handed to it, and close() lets it finish them.
        """
        return await self._submit(self._writer, work)


class _Job:
    __slots__ = ("future", "work")

    def __init__(self, work: Callable[[sqlite3.Connection], Any], future: asyncio.Future[Any]):
        self.work = work
        self.future = future


# A job's outcome: (True, its value) or (False, what it raised).
_Outcome = tuple[bool, Any]


class _Worker:
    """A thread that owns one connection and runs the jobs handed to it in
    batches: on waking it takes every job waiting (up to _MAX_BATCH), runs
    them all with ``run_batch``, then settles their futures with one call
    into the event loop. The loop hands jobs over once per turn, all those
    submitted in it together. Under load the loop and the thread then trade
    one wake-up per batch each way, not one per job (as run_in_executor
    would)."""

    def __init__(
        self,
        name: str,
        connect: Callable[[], sqlite3.Connection],
        run_batch: Callable[
            [sqlite3.Connection, list[Callable[[sqlite3.Connection], Any]]], list[_Outcome]
        ],
    ) -> None:
        self._connect = connect
        self._run_batch = run_batch
        self._queue: queue.SimpleQueue[list[_Job] | None] = queue.SimpleQueue()
        # Jobs submitted in this turn of the loop, handed over at its end.
        self._outbox: list[_Job] = []
        self._ready: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._stopped: concurrent.futures.Future[None] = concurrent.futures.Future()
        # A daemon: a process that exits without close() is not held up by
        # it, and SQLite undoes a transaction cut short.
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)

    async def start(self) -> None:
        """Start the thread; raises what opening the connection raised."""
        self._thread.start()
        await asyncio.wrap_future(self._ready)

    def submit(self, work: Callable[[sqlite3.Connection], T]) -> asyncio.Future[T]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        if not self._outbox:
            loop.call_soon(self._hand_over)
        self._outbox.append(_Job(work, future))
        return future

    def _hand_over(self) -> None:
        if self._outbox:
            jobs, self._outbox = self._outbox, []
            self._queue.put(jobs)

    async def stop(self) -> None:
        """Run what was submitted, close the connection, end the thread."""
        self._hand_over()
        self._queue.put(None)
        await asyncio.wrap_future(self._stopped)

    def _main(self) -> None:
        try:
            db = self._connect()
        except BaseException as error:
            self._ready.set_exception(error)
            self._stopped.set_result(None)
            return
        self._ready.set_result(None)
        try:
            waiting: list[_Job] = []
            stopping = False
            while waiting or not stopping:
                if not waiting:
                    jobs = self._queue.get()
                    if jobs is None:
                        break
                    waiting = jobs
                # Everything handed over since, too.
                while len(waiting) < _MAX_BATCH:
                    try:
                        jobs = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if jobs is None:
                        stopping = True
                        break
                    waiting += jobs
                batch, waiting = waiting[:_MAX_BATCH], waiting[_MAX_BATCH:]
                try:
                    outcomes = self._run_batch(db, [job.work for job in batch])
                except BaseException as error:  # never leave a caller waiting
                    outcomes = [(False, error)] * len(batch)
                _settle(batch, outcomes)
        finally:
            db.close()
            # Nothing is queued after the stop (the store refuses new jobs
            # first), but a caller must never wait forever.
            late: list[_Job] = []
            while True:
                try:
                    jobs = self._queue.get_nowait()
                except queue.Empty:
                    break
                late += jobs or []
            _settle(late, [(False, RuntimeError("the SQLite store is closed"))] * len(late))
            self._stopped.set_result(None)


def _settle(batch: list[_Job], outcomes: list[_Outcome]) -> None:
    """Hand the outcomes to the futures' loops, one call per loop."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[Any], _Outcome]]] = {}
    for job, outcome in zip(batch, outcomes, strict=True):
        by_loop.setdefault(job.future.get_loop(), []).append((job.future, outcome))
    for loop, settled in by_loop.items():
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
            loop.call_soon_threadsafe(_resolve, settled)


def _resolve(settled: list[tuple[asyncio.Future[Any], _Outcome]]) -> None:
    for future, (ok, value) in settled:
        if future.done():  # a read whose caller was cancelled
            continue
        if ok:
            future.set_result(value)
        else:
            future.set_exception(value)


def _write_batch(
    db: sqlite3.Connection, works: list[Callable[[sqlite3.Connection], Any]]
) -> list[_Outcome]:
    """Group commit: every job in one transaction, one BEGIN IMMEDIATE and
    one COMMIT for them all. A job's error (a DuplicateEvent, an
    UnknownExecution) must fail that job alone: the group is then undone and
    done again with a savepoint per job (errors are rare, savepoints cost two
    statements a job, so only then)."""
    if len(works) == 1:
        try:
            return [(True, _transaction(db, works[0]))]
        except Exception as error:
            return [(False, error)]
    try:
        db.execute("BEGIN IMMEDIATE")
    except Exception as error:  # the lock stayed taken past the busy timeout
        return [(False, error)] * len(works)
    try:
        outcomes: list[_Outcome] = [(True, work(db)) for work in works]
        db.execute("COMMIT")
    except Exception:
        if db.in_transaction:
            db.execute("ROLLBACK")
        return _write_each_alone(db, works)
    return outcomes


def _write_each_alone(
    db: sqlite3.Connection, works: list[Callable[[sqlite3.Connection], Any]]
) -> list[_Outcome]:
    """The group in one transaction, each job in a savepoint: one job's error
    undoes and fails that job alone. An error that ends the whole
    transaction (SQLite does so itself on a full disk, say), or a failed
    COMMIT, fails every job of the group: none of them happened."""
    outcomes: list[_Outcome] = []
    try:
        db.execute("BEGIN IMMEDIATE")
        for work in works:
            db.execute("SAVEPOINT job")
            try:
                value = work(db)
            except Exception as error:
                if not db.in_transaction:
                    raise
                db.execute("ROLLBACK TO job")
                db.execute("RELEASE job")
                outcomes.append((False, error))
            else:
                db.execute("RELEASE job")
                outcomes.append((True, value))
        db.execute("COMMIT")
    except Exception as error:
        if db.in_transaction:
            db.execute("ROLLBACK")
        return [(False, error)] * len(works)
    return outcomes


def _read_batch(
    db: sqlite3.Connection, works: list[Callable[[sqlite3.Connection], Any]]
) -> list[_Outcome]:
    outcomes: list[_Outcome] = []
    for work in works:
        try:
            outcomes.append((True, work(db)))
        except Exception as error:
            outcomes.append((False, error))
    return outcomes


def _append(
    execution_id: str,
    events: Sequence[StoredEvent],
    started_at: datetime | None,
    ending: Ending | None,
    db: sqlite3.Connection,
) -> None:
    """append_events' work: one UPDATE of the record (last_sequence, the
    start, the end, as the arguments say), then the events' INSERT."""
    sql = _append_sql(bool(events), started_at is not None, ending is not None)
    args: list[object] = []
    if events:
        args.append(max(event.sequence for event in events))
    if started_at is not None:
        args.append(_to_us(started_at))
    if ending is not None:
        args += [ending.state.value, _to_us(ending.at), ending.result, ending.error]
    args.append(execution_id)
    changed = db.execute(sql, args).rowcount
    if not events:
        return
    if changed == 0:
        raise UnknownExecution(execution_id)
    try:
        if len(events) == 1:
            db.execute(_INSERT_EVENT, (execution_id, events[0].sequence, events[0].payload))
        else:
            db.executemany(
                _INSERT_EVENT, [(execution_id, event.sequence, event.payload) for event in events]
            )
    except sqlite3.IntegrityError as error:
        if error.sqlite_errorname == "SQLITE_CONSTRAINT_PRIMARYKEY":
            raise DuplicateEvent(execution_id, events[0].sequence) from error
        raise


_INSERT_EVENT = "INSERT INTO execution_events (execution_id, sequence, payload) VALUES (?, ?, ?)"


@functools.cache
def _append_sql(events: bool, start: bool, end: bool) -> str:
    """The record's UPDATE for an append. The right-hand sides read the row
    as it was, so the start applies only to an active record (a cancel that
    finished it first sticks), and an end given with it wins, as if the two
    had been written one after the other."""
    active = "state IN (" + ", ".join(f"'{state}'" for state in _ACTIVE) + ")"
    columns = []
    if events:
        columns.append("last_sequence = MAX(last_sequence, ?)")
    if start:
        columns.append(f"started_at = CASE WHEN {active} THEN ? ELSE started_at END")
        if not end:
            running = ExecutionState.RUNNING.value
            columns.append(f"state = CASE WHEN {active} THEN '{running}' ELSE state END")
    if end:
        columns += ["state = ?", "ended_at = ?", "result = ?", "error = ?"]
    return f"UPDATE executions SET {', '.join(columns)} WHERE id = ?"


def _delete_expired(expiry: Expiry, limit: int, db: sqlite3.Connection) -> int:
    """delete_expired's work, under the write lock: the oldest finished
    executions below the bound, their events first. They are read as a
    range of the executions_newest index from its old end (``+state``, the
    unary plus, keeps SQLite from reading them through executions_state
    instead and sorting every finished record for each batch)."""
    candidates = db.execute(
        "SELECT id, last_sequence FROM executions"
        f" WHERE (created_at, id) < (?, ?) AND +state IN {_FINISHED_SQL}"
        " AND COALESCE(ended_at, created_at) < ?"
        " ORDER BY created_at, id LIMIT ?",
        (
            _to_us(expiry.before.created_at),
            expiry.before.id,
            *_FINISHED,
            _to_us(expiry.ended_before),
            limit,
        ),
    ).fetchall()
    ids = [(chosen,) for chosen in within_event_budget([(row[0], row[1]) for row in candidates])]
    # The events explicitly, rather than by the foreign key's cascade: it
    # acts only where PRAGMA foreign_keys is on, per connection.
    db.executemany("DELETE FROM execution_events WHERE execution_id = ?", ids)
    db.executemany("DELETE FROM executions WHERE id = ?", ids)
    return len(ids)


def _release_space(max_pages: int, db: sqlite3.Connection) -> tuple[int, bool]:
    """release_space's work: free pages moved to the end of the file and cut
    off (the file shrinks at the next checkpoint of the WAL). The bytes
    released, and whether no free page is left."""
    (free,) = db.execute("PRAGMA freelist_count").fetchone()
    pages = min(int(free), max_pages)
    # Python's sqlite3 steps a PRAGMA once, and incremental_vacuum frees one
    # page per step: one call per page (each a few microseconds).
    for _ in range(pages):
        db.execute("PRAGMA incremental_vacuum")
    (left,) = db.execute("PRAGMA freelist_count").fetchone()
    (page_size,) = db.execute("PRAGMA page_size").fetchone()
    return (int(free) - int(left)) * int(page_size), int(left) == 0


def _connect(path: Path) -> sqlite3.Connection:
    """The writing connection, opened on the thread that will use it; it
    migrates the schema."""
    db = sqlite3.connect(path, timeout=_BUSY_TIMEOUT_S, isolation_level=None)
    try:
        # First: on a new file it must come before the first table.
        prepare_incremental_vacuum(db)
        # WAL: readers (other processes) do not block the writer, nor it them.
        _enable_wal(db)
        db.execute(f"PRAGMA journal_size_limit = {_WAL_SIZE_LIMIT}")
        # NORMAL is durable across application crashes in WAL mode; only
        # a power loss may drop the last commits.
        db.execute("PRAGMA synchronous = NORMAL")
        # Off by default in SQLite, per connection.
        db.execute("PRAGMA foreign_keys = ON")
        db.row_factory = sqlite3.Row
        migrate_sqlite(db)
        switch_to_incremental_vacuum(db)
    except BaseException:
        db.close()
        raise
    return db


def _connect_reader(path: Path) -> sqlite3.Connection:
    """The reading connection (the file is in WAL mode and migrated)."""
    db = sqlite3.connect(path, timeout=_BUSY_TIMEOUT_S, isolation_level=None)
    try:
        db.execute("PRAGMA query_only = ON")
        db.row_factory = sqlite3.Row
    except BaseException:
        db.close()
        raise
    return db


def _transaction(db: sqlite3.Connection, work: Callable[[sqlite3.Connection], T]) -> T:
    db.execute("BEGIN IMMEDIATE")
    try:
        result = work(db)
    except BaseException:
        # SQLite ends the transaction itself on some errors (a full disk,
        # say); a ROLLBACK then would hide the error.
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")
    return result


def _enable_wal(db: sqlite3.Connection) -> None:
    """Switch the file to WAL (it stays so: later opens find it done).

    The switch needs the file to itself, and SQLite reports another
    connection's lock on it at once as SQLITE_BUSY, without waiting out the
    busy timeout: so it is retried here, for when processes start together
    on a new file."""
    deadline = time.monotonic() + _BUSY_TIMEOUT_S
    while True:
        try:
            row = db.execute("PRAGMA journal_mode = WAL").fetchone()
        except sqlite3.OperationalError as error:
            if error.sqlite_errorname != "SQLITE_BUSY":
                raise
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)
            continue
        # A file system without the shared memory WAL needs answers with the
        # mode it kept instead of failing.
        mode = None if row is None else str(row[0]).lower()
        if mode != "wal":
            raise RuntimeError(f"SQLite could not switch to WAL mode (the mode is {mode})")
        return


def _record(row: sqlite3.Row) -> ExecutionRecord:
    return record_from_row(row, _from_us)


def _to_us(at: datetime) -> int:
    """Microseconds since the epoch; exact, unlike going through a float."""
    if at.utcoffset() is None:
        raise ValueError(f"a naive datetime cannot be stored, it must carry a timezone: {at!r}")
    return (at - _EPOCH) // _MICROSECOND


def _from_us(us: int) -> datetime:
    return _EPOCH + timedelta(microseconds=us)
