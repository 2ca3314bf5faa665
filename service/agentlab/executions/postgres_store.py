"""ExecutionStore in PostgreSQL: for several gateway processes sharing their
executions (and taking over each other's when one dies).

Statements run at READ COMMITTED through a pool. The races that matter are
settled by the database rather than by reading first and writing after:
creates conflict on the unique index, claims are a conditional UPDATE (a
second claimer waits on the row lock, then re-checks the heartbeat the first
one just moved), and appends lock the execution's row before inserting.

Writes commit in groups, as in SqliteStore: creates and appends queued in
one turn of the event loop (or while earlier groups were in flight) go to
PostgreSQL together, each kind as one pipelined round trip (asyncpg's
fetchmany: one statement per write, one implicit transaction, one commit).
Under load a write then costs a fraction of a round trip, of a commit and
of a pooled connection's acquire rather than one of each; alone, it costs
what it did. A write that fails (a DuplicateEvent, say) undoes its batch,
which is then done again one write at a time, so that it fails alone.

Transactions that lock several rows lock them in one order (a group's
writes sorted by execution id, or by idempotency key for creates; a
heartbeat's rows by id), so that they cannot deadlock one another, in this
process or across processes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import Any, TypeVar

import asyncpg

from agentlab.executions.errors import DuplicateEvent, UnknownExecution
from agentlab.executions.migrations import migrate_postgres, quote_ident
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

__all__ = ["PostgresStore"]

T = TypeVar("T")

_COLUMNS = (
    "id, request_id, caller, model, mode, prompt, options, background, state, created_at,"
    " started_at, ended_at, owner, heartbeat_at, last_sequence, result, error, fingerprint,"
    " replay_of"
)
_ACTIVE = [state.value for state in ACTIVE_STATES]
_FINISHED = [state.value for state in FINISHED_STATES]

# Writes one group takes at most: bounds how long its row locks are held and
# how long the loop spends settling it.
_MAX_GROUP = 512
# Groups in flight at once, each on a pooled connection: more than one, so
# that writes queued while a group is in flight wait for their own round
# trip only, not for that group's as well (on a busy loop a round trip takes
# several of its turns); more would take connections from reads for little.
_MAX_GROUPS_IN_FLIGHT = 2


class PostgresStore:
    def __init__(self, url: str, *, schema: str | None = None) -> None:
        """``schema``: keep the tables there instead of on the default
        search_path (created if missing), e.g. to isolate tests."""
        self.url = url
        self.schema = schema
        self._pool: asyncpg.Pool | None = None
        # Calls outlive cancelled callers (see _run): held here until done.
        self._running: set[asyncio.Task[Any]] = set()
        # Writes waiting for the next group; the tasks writing groups, and
        # whether one of them has yet to take its group (it will take those
        # queued meanwhile).
        self._queued: list[_Write] = []
        self._writers: set[asyncio.Task[None]] = set()
        self._writer_starting = False

    async def open(self) -> None:
        if self._pool is not None:
            return
        server_settings = {} if self.schema is None else {"search_path": quote_ident(self.schema)}
        pool = await asyncpg.create_pool(
            self.url,
            min_size=1,
            max_size=10,
            server_settings=server_settings,
            # Instead of asyncpg's reset query on every release, a round trip
            # per call: this store leaves nothing in a session to reset (no
            # SET, LISTEN, cursors or session advisory locks). An open
            # transaction is still rolled back by asyncpg itself.
            reset=_keep_session,
        )
        try:
            async with pool.acquire() as conn:
                await migrate_postgres(conn, self.schema)
        except BaseException:
            await pool.close()
            raise
        self._pool = pool

    async def close(self) -> None:
        # Calls already started end first, even those whose callers were
        # cancelled and are not waiting for them, and queued writes too.
        while pending := {*self._running, *self._writers}:
            await asyncio.wait(pending)
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()

    async def create(self, new: NewExecution) -> tuple[ExecutionRecord, bool]:
        created_at = _utc(new.created_at)
        args = (
            new.id,
            new.request_id,
            new.caller,
            new.model,
            new.mode,
            new.prompt,
            encode_options(new.options),
            new.background,
            ExecutionState.QUEUED.value,
            created_at,
            new.owner,
            new.fingerprint,
            new.replay_of,
        )

        async def insert(conn: Any) -> tuple[ExecutionRecord, bool]:
            # Each statement on its own (autocommit): at READ COMMITTED an
            # INSERT that conflicts with an uncommitted row waits for it, and
            # the SELECT after it, a new snapshot, sees it committed. The loop
            # is for the conflicting row vanishing in between (a rollback
            # after all, or a delete): the insert is then tried again.
            for _ in range(3):
                row = await conn.fetchrow(_INSERT_RETURNING, *args)
                if row is not None:
                    return _record(row), True
                row = await conn.fetchrow(
                    f"SELECT {_COLUMNS} FROM executions WHERE caller = $1 AND request_id = $2",
                    new.caller,
                    new.request_id,
                )
                if row is not None:
                    return _record(row), False
            raise RuntimeError(
                f"could not create execution {new.id!r}: request_id {new.request_id!r} kept "
                "conflicting with a record that was gone when read"
            )

        async def settle(row: Any, conn: Any) -> tuple[ExecutionRecord, bool]:
            # In a group: whether the row was inserted. If not, the
            # conflicting record is read once the group has committed, as
            # insert() does.
            if not row[0]:
                return await insert(conn)
            return queued_record(new, _from_db(created_at)), True

        # Sorted by the key, in a group: groups creating records with the
        # same keys then wait on each other's in one order.
        key = f"{new.caller}\0{new.request_id}" if new.request_id else ""
        result: tuple[ExecutionRecord, bool] = await self._write(
            _Write(_INSERT_GROUPED, args, insert, settle, key=key)
        )
        return result

    async def get(self, execution_id: str) -> ExecutionRecord | None:
        row = await self._fetchrow(f"SELECT {_COLUMNS} FROM executions WHERE id = $1", execution_id)
        return None if row is None else _record(row)

    async def find(self, caller: str, request_id: str) -> ExecutionRecord | None:
        if not request_id:
            return None
        row = await self._fetchrow(
            f"SELECT {_COLUMNS} FROM executions WHERE caller = $1 AND request_id = $2",
            caller,
            request_id,
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

        def arg(value: object) -> str:
            args.append(value)
            return f"${len(args)}"

        if after is not None:
            # A row comparison, which the (created_at DESC, id DESC) index
            # serves as one range.
            where.append(f"(created_at, id) < ({arg(_utc(after.created_at))}, {arg(after.id)})")
        if caller is not None:
            where.append(f"caller = {arg(caller)}")
        if model is not None:
            where.append(f"model = {arg(model)}")
        if state is not None:
            where.append(f"state = {arg(state.value)}")
        # One more than asked: whether it comes back tells if a next page exists.
        limit = arg(page_size + 1)
        rows = await self._fetch(
            f"SELECT {_COLUMNS} FROM executions"
            f" {'WHERE ' + ' AND '.join(where) if where else ''}"
            f" ORDER BY created_at DESC, id DESC LIMIT {limit}",
            *args,
        )
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

        args = _append_args(execution_id, events, started_at, ending)

        def check(row: Any) -> None:
            # The statement's value: whether the record was found.
            if events and not row[0]:
                raise UnknownExecution(execution_id)

        async def append(conn: Any) -> None:
            try:
                row = await conn.fetchrow(_APPEND, *args)
            except asyncpg.UniqueViolationError as error:
                # One statement: the record's update is undone with it.
                raise DuplicateEvent(execution_id, events[0].sequence) from error
            check(row)

        async def settle(row: Any, conn: Any) -> None:
            check(row)

        await self._write(_Write(_APPEND, args, append, settle, key=execution_id))

    async def events_after(
        self, execution_id: str, after_sequence: int, limit: int | None = None
    ) -> list[StoredEvent]:
        # LIMIT NULL is no limit.
        rows = await self._fetch(
            "SELECT sequence, payload FROM execution_events"
            " WHERE execution_id = $1 AND sequence > $2 ORDER BY sequence LIMIT $3",
            execution_id,
            after_sequence,
            limit,
        )
        return [StoredEvent(sequence=row["sequence"], payload=row["payload"]) for row in rows]

    async def heartbeat(self, owner: str, at: datetime) -> None:
        # The rows locked in id order, as a group's appends lock them: in
        # the UPDATE's own order (the table's), it could deadlock with a
        # group in flight that holds some of them and waits for another.
        await self._update(
            "UPDATE executions SET heartbeat_at = $1 WHERE id IN ("
            " SELECT id FROM executions WHERE owner = $2 AND state = ANY($3::text[])"
            " ORDER BY id FOR UPDATE)",
            _utc(at),
            owner,
            _ACTIVE,
        )

    async def stale(self, before: datetime) -> list[ExecutionRecord]:
        rows = await self._fetch(
            f"SELECT {_COLUMNS} FROM executions"
            " WHERE state = ANY($1::text[]) AND heartbeat_at < $2"
            " ORDER BY heartbeat_at, id",
            _ACTIVE,
            _utc(before),
        )
        return [_record(row) for row in rows]

    async def claim(
        self, execution_id: str, owner: str, stale_before: datetime, at: datetime
    ) -> bool:
        taken = await self._update(
            "UPDATE executions SET owner = $1, heartbeat_at = $2"
            " WHERE id = $3 AND state = ANY($4::text[]) AND heartbeat_at < $5",
            owner,
            _utc(at),
            execution_id,
            _ACTIVE,
            _utc(stale_before),
        )
        return taken == 1

    async def delete_expired(self, expiry: Expiry, limit: int) -> int:
        """The rows are locked SKIP LOCKED: a sweep never waits on (or
        deadlocks with) the writes of the hot path, and sweepers of several
        replicas share the work instead of queueing on the same rows."""
        if limit < 1:
            raise ValueError(f"limit must be at least 1, not {limit}")

        async def delete(conn: Any) -> int:
            async with conn.transaction():
                candidates = [
                    (row["id"], row["last_sequence"])
                    for row in await conn.fetch(
                        "SELECT id, last_sequence FROM executions"
                        " WHERE (created_at, id) < ($1, $2) AND state = ANY($3::text[])"
                        " AND COALESCE(ended_at, created_at) < $4"
                        " ORDER BY created_at, id LIMIT $5 FOR UPDATE SKIP LOCKED",
                        _utc(expiry.before.created_at),
                        expiry.before.id,
                        _FINISHED,
                        _utc(expiry.ended_before),
                        limit,
                    )
                ]
                # Locked beyond the budget too, until the commit: harmless,
                # they are finished and the next batch takes them.
                ids = within_event_budget(candidates)
                if not ids:
                    return 0
                await conn.execute(
                    "DELETE FROM execution_events WHERE execution_id = ANY($1::text[])", ids
                )
                await conn.execute("DELETE FROM executions WHERE id = ANY($1::text[])", ids)
                return len(ids)

        return await self._run(delete)

    async def nth_newest_finished(self, n: int) -> Cursor | None:
        if n < 1:
            raise ValueError(f"n must be at least 1, not {n}")
        row = await self._fetchrow(
            "SELECT created_at, id FROM executions WHERE state = ANY($1::text[])"
            " ORDER BY created_at DESC, id DESC LIMIT 1 OFFSET $2",
            _FINISHED,
            n - 1,
        )
        return None if row is None else Cursor(_from_db(row["created_at"]), row["id"])

    async def release_space(self, max_pages: int) -> int:
        """Nothing to do: PostgreSQL's autovacuum makes deleted rows' space
        reusable by the table, which then stops growing; only VACUUM FULL
        (an exclusive lock on the table while it rewrites it) would hand it
        to the file system."""
        return 0

    async def _write(self, write: _Write) -> Any:
        """``write`` in the next group, its outcome once the group is done.

        A cancelled caller stops waiting, but the write still happens (a
        cancelled execution's last events and state must be kept): every
        queued write is written, and close() waits for them."""
        if self._pool is None:
            raise RuntimeError("the PostgreSQL store is not open")
        self._queued.append(write)
        if not self._writer_starting and len(self._writers) < _MAX_GROUPS_IN_FLIGHT:
            # It starts at the loop's next turn: every write queued in this
            # one goes in its first group.
            self._writer_starting = True
            writer = asyncio.create_task(self._write_groups(), name="postgres-writer")
            self._writers.add(writer)
            writer.add_done_callback(self._writers.discard)
        return await asyncio.shield(write.future)

    async def _write_groups(self) -> None:
        """Write the queued writes, a group at a time, until none is left:
        those queued while groups are in flight make the next one."""
        self._writer_starting = False
        group: list[_Write] = []
        try:
            while self._queued:
                group, self._queued = self._queued[:_MAX_GROUP], self._queued[_MAX_GROUP:]
                try:
                    async with self._connection() as conn:
                        await _write_group(conn, group)
                except Exception as error:  # never leave a caller waiting
                    for write in group:
                        write.fail(error)
                group = []
        finally:
            # Out of the set now, not at the done callback a turn later: a
            # write queued in between must find the writer gone and start
            # one, or wait with nobody to write it.
            self._writers.discard(asyncio.current_task())
            # Cancelled (the loop shuts down): nobody must wait forever.
            stopped = RuntimeError("the PostgreSQL store's writer stopped")
            for write in group:
                write.fail(stopped)
            if not self._writers:
                for write in self._queued:
                    write.fail(stopped)
                self._queued = []

    async def _fetch(self, sql: str, *args: object) -> list[Any]:
        async def run(conn: Any) -> list[Any]:
            return list(await conn.fetch(sql, *args))

        return await self._run(run)

    async def _fetchrow(self, sql: str, *args: object) -> Any:
        async def run(conn: Any) -> Any:
            return await conn.fetchrow(sql, *args)

        return await self._run(run)

    async def _update(self, sql: str, *args: object) -> int:
        """One statement; the number of rows it changed."""

        async def run(conn: Any) -> int:
            return _rowcount(await conn.execute(sql, *args))

        return await self._run(run)

    async def _run(self, work: Callable[[Any], Awaitable[T]]) -> T:
        """``work`` on a pooled connection, shielded from cancellation.

        A cancelled caller stops waiting, but the work runs to its end:
        asyncpg cancelled mid-connect or mid-query leaves orphaned futures
        ("unexpected connection_lost() call") and pays for a cancel request
        over a new connection. And a write then behaves as in SqliteStore:
        it happens or not as a whole, and finishes even if nobody waits.
        """
        task = asyncio.ensure_future(self._on_connection(work))
        self._running.add(task)
        task.add_done_callback(self._running.discard)
        return await asyncio.shield(task)

    async def _on_connection(self, work: Callable[[Any], Awaitable[T]]) -> T:
        async with self._connection() as conn:
            return await work(conn)

    def _connection(self) -> Any:
        """A pooled connection, as an async context manager."""
        if self._pool is None:
            raise RuntimeError("the PostgreSQL store is not open")
        return self._pool.acquire()


class _Write:
    """A write waiting for its group. ``sql`` is its statement in a group,
    with ``args``, one row back per write, which ``settle`` (given the row
    and the connection, after the batch's commit) turns into the write's
    value or error. ``alone`` is the write on its own: for a group of one,
    and for a batch undone by an error. ``key``: a batch is sorted by it
    (see _write_group)."""

    __slots__ = ("alone", "args", "future", "key", "settle", "sql")

    def __init__(
        self,
        sql: str,
        args: Sequence[object],
        alone: Callable[[Any], Awaitable[Any]],
        settle: Callable[[Any, Any], Awaitable[Any]],
        *,
        key: str = "",
    ) -> None:
        self.sql = sql
        self.args = args
        self.alone = alone
        self.settle = settle
        self.key = key
        self.future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

    async def run_alone(self, conn: Any) -> None:
        try:
            value = await self.alone(conn)
        except Exception as error:
            self.fail(error)
        else:
            self.succeed(value)

    async def run_settle(self, row: Any, conn: Any) -> None:
        try:
            value = await self.settle(row, conn)
        except Exception as error:
            self.fail(error)
        else:
            self.succeed(value)

    def succeed(self, value: Any) -> None:
        if not self.future.done():
            self.future.set_result(value)

    def fail(self, error: BaseException) -> None:
        if not self.future.done():
            self.future.set_exception(error)
            # Retrieved here: a caller that stopped waiting must not make
            # asyncio log "exception was never retrieved".
            self.future.exception()


async def _write_group(conn: Any, group: list[_Write]) -> None:
    """The group's writes of each statement (creates, appends) as a batch:
    one pipelined round trip (fetchmany: atomic, one commit). If one write
    of a batch fails, PostgreSQL undoes the batch, which is then written
    again a write at a time, so that the error is that write's alone. An
    error that is not PostgreSQL's (the connection was lost) leaves the
    batch's fate unknown: its writes fail with it, rather than risk writing
    twice.

    A batch is sorted by its writes' keys (a stable sort: an execution's
    appends keep their order), so that transactions lock executions' rows,
    or wait on each other's idempotency keys, in one order: groups in
    flight together, or in several processes, cannot deadlock."""
    if len(group) == 1:
        await group[0].run_alone(conn)
        return
    batches: dict[str, list[_Write]] = {}
    for write in group:
        batches.setdefault(write.sql, []).append(write)
    for sql, writes in batches.items():
        writes.sort(key=lambda write: write.key)
        if len(writes) == 1:
            await writes[0].run_alone(conn)
            continue
        try:
            rows = await conn.fetchmany(sql, [write.args for write in writes])
        except asyncpg.PostgresError:
            for write in writes:
                await write.run_alone(conn)
            continue
        except Exception as error:
            for write in writes:
                write.fail(error)
            continue
        for write, row in zip(writes, rows, strict=True):
            await write.run_settle(row, conn)


async def _keep_session(conn: Any) -> None:
    """The pool's reset on release: nothing to do (see open())."""


_INSERT_VALUES = f"""
    INSERT INTO executions ({_COLUMNS})
    VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, NULL, NULL, $11, $10, 0, NULL, NULL, $12, $13)
    ON CONFLICT (caller, request_id) WHERE request_id <> '' DO NOTHING
"""
_INSERT_RETURNING = f"{_INSERT_VALUES} RETURNING {_COLUMNS}"
# In a group, one row per create: whether it inserted the record.
_INSERT_GROUPED = (
    f"WITH created AS ({_INSERT_VALUES} RETURNING 1) SELECT EXISTS (SELECT 1 FROM created)"
)

# append_events as one statement, so one round trip and atomic by itself,
# one shape for every append (a group of them is one batch): the record's
# update, then the events' insert, only where the update found the record.
# The update comes first: it locks the execution's row, so appends to one
# execution take turns. The right-hand sides read the row as it was: the
# start ($3, or NULL) applies to an active record only (a cancel that
# finished it first sticks), and an end given with it ($5 its state, or
# NULL) wins. last_sequence: GREATEST ignores a NULL $2 (no events). The
# statement's value is whether the record was found.
_APPEND = """
    WITH updated AS (
        UPDATE executions SET
            last_sequence = GREATEST(last_sequence, $2::bigint),
            started_at = CASE WHEN $3::timestamptz IS NOT NULL AND state = ANY($4::text[])
                THEN $3::timestamptz ELSE started_at END,
            state = CASE WHEN $5::text IS NOT NULL THEN $5::text
                WHEN $3::timestamptz IS NOT NULL AND state = ANY($4::text[]) THEN $6::text
                ELSE state END,
            ended_at = CASE WHEN $5::text IS NOT NULL THEN $7::timestamptz ELSE ended_at END,
            result = CASE WHEN $5::text IS NOT NULL THEN $8::bytea ELSE result END,
            error = CASE WHEN $5::text IS NOT NULL THEN $9::bytea ELSE error END
        WHERE id = $1
        RETURNING id
    ),
    inserted AS (
        INSERT INTO execution_events (execution_id, sequence, payload)
        SELECT $1, sequence, payload FROM unnest($10::bigint[], $11::bytea[])
            AS event(sequence, payload)
        WHERE EXISTS (SELECT 1 FROM updated)
    )
    SELECT EXISTS (SELECT 1 FROM updated)
"""


def _append_args(
    execution_id: str,
    events: Sequence[StoredEvent],
    started_at: datetime | None,
    ending: Ending | None,
) -> tuple[object, ...]:
    """_APPEND's arguments."""
    return (
        execution_id,
        max(event.sequence for event in events) if events else None,
        None if started_at is None else _utc(started_at),
        _ACTIVE,
        None if ending is None else ending.state.value,
        ExecutionState.RUNNING.value,
        None if ending is None else _utc(ending.at),
        None if ending is None else ending.result,
        None if ending is None else ending.error,
        [event.sequence for event in events],
        [event.payload for event in events],
    )


def _rowcount(status: str) -> int:
    # asyncpg gives the command tag, e.g. "UPDATE 1".
    return int(status.rsplit(" ", 1)[-1])


def _record(row: asyncpg.Record) -> ExecutionRecord:
    return record_from_row(row, _from_db)


def _utc(at: datetime) -> datetime:
    # asyncpg would take a naive datetime as UTC for a timestamptz; here it
    # is refused instead, as SqliteStore does, rather than guessed.
    if at.utcoffset() is None:
        raise ValueError(f"a naive datetime cannot be stored, it must carry a timezone: {at!r}")
    return at.astimezone(UTC)


def _from_db(at: datetime) -> datetime:
    return at.astimezone(UTC)
