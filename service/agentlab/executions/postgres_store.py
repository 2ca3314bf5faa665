"""ExecutionStore in PostgreSQL: for several gateway processes sharing their
executions (and taking over each other's when one dies).

Statements run at READ COMMITTED through a pool. The races that matter are
settled by the database rather than by reading first and writing after:
creates conflict on the unique index, claims are a conditional UPDATE (a
second claimer waits on the row lock, then re-checks the heartbeat the first
one just moved), and appends lock the execution's row before inserting.
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
    Cursor,
    Ending,
    ExecutionRecord,
    ExecutionState,
    NewExecution,
    StoredEvent,
)
from agentlab.executions.rows import encode_options, page_of, record_from_row

__all__ = ["PostgresStore"]

T = TypeVar("T")

_COLUMNS = (
    "id, request_id, caller, model, mode, prompt, options, background, state, created_at,"
    " started_at, ended_at, owner, heartbeat_at, last_sequence, result, error, fingerprint"
)
_ACTIVE = [state.value for state in ACTIVE_STATES]


class PostgresStore:
    def __init__(self, url: str, *, schema: str | None = None) -> None:
        """``schema``: keep the tables there instead of on the default
        search_path (created if missing), e.g. to isolate tests."""
        self.url = url
        self.schema = schema
        self._pool: asyncpg.Pool | None = None
        # Calls outlive cancelled callers (see _run): held here until done.
        self._running: set[asyncio.Task[Any]] = set()

    async def open(self) -> None:
        if self._pool is not None:
            return
        server_settings = {} if self.schema is None else {"search_path": quote_ident(self.schema)}
        pool = await asyncpg.create_pool(
            self.url, min_size=1, max_size=10, server_settings=server_settings
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
        # cancelled and are not waiting for them.
        if self._running:
            await asyncio.wait(self._running)
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()

    async def create(self, new: NewExecution) -> tuple[ExecutionRecord, bool]:
        created_at = _utc(new.created_at)

        async def insert(conn: Any) -> tuple[ExecutionRecord, bool]:
            # Each statement on its own (autocommit): at READ COMMITTED an
            # INSERT that conflicts with an uncommitted row waits for it, and
            # the SELECT after it, a new snapshot, sees it committed. The loop
            # is for the conflicting row vanishing in between (a rollback
            # after all, or a delete): the insert is then tried again.
            for _ in range(3):
                row = await conn.fetchrow(
                    f"""
                    INSERT INTO executions ({_COLUMNS})
                    VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, NULL, NULL, $11, $10, 0,
                            NULL, NULL, $12)
                    ON CONFLICT (caller, request_id) WHERE request_id <> '' DO NOTHING
                    RETURNING {_COLUMNS}
                    """,
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
                )
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

        return await self._run(insert)

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

        sql, args = _append(execution_id, events, started_at, ending)

        async def append(conn: Any) -> None:
            try:
                updated = await conn.fetchval(sql, *args)
            except asyncpg.UniqueViolationError as error:
                # One statement: the record's update is undone with it.
                raise DuplicateEvent(execution_id, events[0].sequence) from error
            if events and not updated:
                raise UnknownExecution(execution_id)

        await self._run(append)

    async def events_after(self, execution_id: str, after_sequence: int) -> list[StoredEvent]:
        rows = await self._fetch(
            "SELECT sequence, payload FROM execution_events"
            " WHERE execution_id = $1 AND sequence > $2 ORDER BY sequence",
            execution_id,
            after_sequence,
        )
        return [StoredEvent(sequence=row["sequence"], payload=row["payload"]) for row in rows]

    async def heartbeat(self, owner: str, at: datetime) -> None:
        await self._update(
            "UPDATE executions SET heartbeat_at = $1 WHERE owner = $2 AND state = ANY($3::text[])",
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


def _append(
    execution_id: str,
    events: Sequence[StoredEvent],
    started_at: datetime | None,
    ending: Ending | None,
) -> tuple[str, list[object]]:
    """append_events as one statement, so one round trip and atomic by
    itself: the record's update (last_sequence, the start, the end, as the
    arguments say), then the events' insert, only where the update found the
    record. The update comes first: it locks the execution's row, so appends
    to one execution take turns. The statement's value is whether the
    record was found."""
    args: list[object] = [execution_id]

    def arg(value: object) -> str:
        args.append(value)
        return f"${len(args)}"

    active = f"state = ANY({arg(_ACTIVE)}::text[])" if started_at is not None else ""
    columns = []
    if events:
        columns.append(
            f"last_sequence = GREATEST(last_sequence, {arg(max(e.sequence for e in events))})"
        )
    if started_at is not None:
        # The right-hand sides read the row as it was: the start applies to
        # an active record only (a cancel that finished it first sticks),
        # and an end given with it wins.
        columns.append(
            f"started_at = CASE WHEN {active} THEN {arg(_utc(started_at))} ELSE started_at END"
        )
        if ending is None:
            running = arg(ExecutionState.RUNNING.value)
            columns.append(f"state = CASE WHEN {active} THEN {running} ELSE state END")
    if ending is not None:
        columns += [
            f"state = {arg(ending.state.value)}",
            f"ended_at = {arg(_utc(ending.at))}",
            f"result = {arg(ending.result)}",
            f"error = {arg(ending.error)}",
        ]
    update = f"UPDATE executions SET {', '.join(columns)} WHERE id = $1 RETURNING id"
    if not events:
        return f"WITH updated AS ({update}) SELECT EXISTS (SELECT 1 FROM updated)", args
    sequences = arg([event.sequence for event in events])
    payloads = arg([event.payload for event in events])
    return (
        f"WITH updated AS ({update}),"
        " inserted AS ("
        "INSERT INTO execution_events (execution_id, sequence, payload)"
        f" SELECT $1, sequence, payload FROM unnest({sequences}::bigint[], {payloads}::bytea[])"
        " AS event(sequence, payload) WHERE EXISTS (SELECT 1 FROM updated))"
        " SELECT EXISTS (SELECT 1 FROM updated)",
        args,
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
