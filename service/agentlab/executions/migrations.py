"""The stores' schema, as numbered migrations per SQL dialect.

A migration is never edited once released: a change is a new migration with
the next version, for both dialects. Each is applied in its own transaction
together with its row in ``schema_migrations``, so a crash leaves the schema
at one version or the next, never in between. Processes starting together
against the same database take turns (SQLite: the write lock of BEGIN
IMMEDIATE; PostgreSQL: an advisory lock), and the one that comes second finds
the work done.

SQLite keeps times as integer microseconds since the Unix epoch (UTC): they
round-trip to the microsecond, and they order as the instants they stand for,
which text would only do with one fixed format.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import sqlite3

    import asyncpg

__all__ = [
    "POSTGRES",
    "SQLITE",
    "Migration",
    "migrate_postgres",
    "migrate_sqlite",
    "prepare_incremental_vacuum",
    "switch_to_incremental_vacuum",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Migration:
    version: int
    description: str
    # One statement each: sqlite3 runs one per call (its executescript
    # would commit the open transaction first).
    statements: tuple[str, ...]


# The states are spelled out rather than taken from ExecutionState: a released
# migration must mean the same thing after the enum changes.
SQLITE: tuple[Migration, ...] = (
    Migration(
        1,
        "executions and their events",
        (
            """
            CREATE TABLE executions (
                id TEXT NOT NULL PRIMARY KEY,
                request_id TEXT NOT NULL,
                caller TEXT NOT NULL,
                model TEXT NOT NULL,
                mode TEXT NOT NULL,
                prompt TEXT NOT NULL,
                options TEXT NOT NULL,
                background INTEGER NOT NULL CHECK (background IN (0, 1)),
                state TEXT NOT NULL
                    CHECK (state IN ('QUEUED', 'RUNNING', 'SUCCEEDED', 'FAILED', 'CANCELLED')),
                created_at INTEGER NOT NULL,
                started_at INTEGER,
                ended_at INTEGER,
                owner TEXT NOT NULL,
                heartbeat_at INTEGER NOT NULL,
                last_sequence INTEGER NOT NULL DEFAULT 0,
                result BLOB,
                error BLOB
            )
            """,
            # Partial: an empty request_id means "no idempotency key".
            """
            CREATE UNIQUE INDEX executions_caller_request_id
                ON executions (caller, request_id) WHERE request_id <> ''
            """,
            "CREATE INDEX executions_newest ON executions (created_at DESC, id DESC)",
            # The filters lead and the listing order follows, so a filtered
            # page is read in order from the index instead of sorted.
            "CREATE INDEX executions_state ON executions (state, created_at DESC, id DESC)",
            "CREATE INDEX executions_model ON executions (model, created_at DESC, id DESC)",
            """
            CREATE TABLE execution_events (
                execution_id TEXT NOT NULL REFERENCES executions (id) ON DELETE CASCADE,
                sequence INTEGER NOT NULL,
                payload BLOB NOT NULL,
                PRIMARY KEY (execution_id, sequence)
            )
            """,
        ),
    ),
    Migration(
        2,
        "the request fingerprint a request_id is bound to",
        # Empty in rows made before: their fingerprint is computed from the
        # request fields they keep (agentlab.executions.fingerprint).
        ("ALTER TABLE executions ADD COLUMN fingerprint TEXT NOT NULL DEFAULT ''",),
    ),
    Migration(
        3,
        "the execution a replay replays",
        # Empty in rows made before: none of them is a replay.
        ("ALTER TABLE executions ADD COLUMN replay_of TEXT NOT NULL DEFAULT ''",),
    ),
)

POSTGRES: tuple[Migration, ...] = (
    Migration(
        1,
        "executions and their events",
        (
            # COLLATE "C": ids break ties in the listing order, which must be
            # the same bytewise order SQLite uses, whatever the database's
            # locale (en_US would ignore case and punctuation).
            """
            CREATE TABLE executions (
                id text COLLATE "C" NOT NULL PRIMARY KEY,
                request_id text NOT NULL,
                caller text NOT NULL,
                model text NOT NULL,
                mode text NOT NULL,
                prompt text NOT NULL,
                options text NOT NULL,
                background boolean NOT NULL,
                state text NOT NULL
                    CHECK (state IN ('QUEUED', 'RUNNING', 'SUCCEEDED', 'FAILED', 'CANCELLED')),
                created_at timestamptz NOT NULL,
                started_at timestamptz,
                ended_at timestamptz,
                owner text NOT NULL,
                heartbeat_at timestamptz NOT NULL,
                last_sequence bigint NOT NULL DEFAULT 0,
                result bytea,
                error bytea
            )
            """,
            """
            CREATE UNIQUE INDEX executions_caller_request_id
                ON executions (caller, request_id) WHERE request_id <> ''
            """,
            "CREATE INDEX executions_newest ON executions (created_at DESC, id DESC)",
            "CREATE INDEX executions_state ON executions (state, created_at DESC, id DESC)",
            "CREATE INDEX executions_model ON executions (model, created_at DESC, id DESC)",
            """
            CREATE TABLE execution_events (
                execution_id text COLLATE "C" NOT NULL
                    REFERENCES executions (id) ON DELETE CASCADE,
                sequence bigint NOT NULL,
                payload bytea NOT NULL,
                PRIMARY KEY (execution_id, sequence)
            )
            """,
        ),
    ),
    Migration(
        2,
        "the request fingerprint a request_id is bound to",
        # A constant default: PostgreSQL 11+ adds the column without
        # rewriting the table.
        ("ALTER TABLE executions ADD COLUMN fingerprint text NOT NULL DEFAULT ''",),
    ),
    Migration(
        3,
        "the execution a replay replays",
        ("ALTER TABLE executions ADD COLUMN replay_of text NOT NULL DEFAULT ''",),
    ),
)

_SQLITE_LEDGER = """
    CREATE TABLE IF NOT EXISTS schema_migrations (
        version INTEGER NOT NULL PRIMARY KEY,
        applied_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
    )
"""

_POSTGRES_LEDGER = """
    CREATE TABLE IF NOT EXISTS schema_migrations (
        version integer NOT NULL PRIMARY KEY,
        applied_at timestamptz NOT NULL DEFAULT now()
    )
"""

# Any fixed number, the same in every process: it names the lock, per database.
_POSTGRES_LOCK_KEY = 0x6167_656E_746C_6162  # "agentlab"


def migrate_sqlite(db: sqlite3.Connection) -> list[int]:
    """Apply what is missing of SQLITE; the versions applied now.

    ``db`` must be in autocommit mode (isolation_level=None): the
    transactions here are explicit."""
    applied: list[int] = []
    for migration in SQLITE:
        # IMMEDIATE takes the write lock before the version is read, so a
        # second process waits here and then sees the version recorded.
        db.execute("BEGIN IMMEDIATE")
        try:
            db.execute(_SQLITE_LEDGER)
            done = (
                db.execute(
                    "SELECT 1 FROM schema_migrations WHERE version = ?", (migration.version,)
                ).fetchone()
                is not None
            )
            if not done:
                for statement in migration.statements:
                    db.execute(statement)
                db.execute(
                    "INSERT INTO schema_migrations (version) VALUES (?)", (migration.version,)
                )
                applied.append(migration.version)
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")
    return applied


# PRAGMA auto_vacuum's value for INCREMENTAL.
_INCREMENTAL = 2


def prepare_incremental_vacuum(db: sqlite3.Connection) -> None:
    """Ask for incremental auto-vacuum before anything else touches the file.

    On a new, empty file this takes effect with the first table (the
    schema's), for free. On an existing file the setting is only recorded:
    switch_to_incremental_vacuum, after the migrations, finishes the job."""
    db.execute(f"PRAGMA auto_vacuum = {_INCREMENTAL}")


def switch_to_incremental_vacuum(db: sqlite3.Connection) -> bool:
    """Make sure the file keeps the page bookkeeping that lets retention
    give deleted pages back to the file system (PRAGMA incremental_vacuum);
    True if it had to be switched now.

    A file created before this existed (auto_vacuum NONE: every page it
    ever used stays in it) is switched once with a VACUUM, which rewrites
    it whole: it takes about a second per 30 MB here, needs that much free
    disk beside it, and holds the write lock meanwhile, so it runs while
    the process starts, before it serves. Later opens find it done. Not a
    numbered migration: VACUUM cannot run inside a transaction, and the
    file's header, not the ledger, records the mode.

    ``db`` must be in autocommit mode, outside a transaction."""
    (mode,) = db.execute("PRAGMA auto_vacuum").fetchone()
    if mode == _INCREMENTAL:
        return False
    db.execute(f"PRAGMA auto_vacuum = {_INCREMENTAL}")
    size = _file_bytes(db)
    logger.info(
        "the SQLite execution store (%.1f MB) is switched to incremental auto-vacuum once, "
        "with a VACUUM, so that retention can shrink it",
        size / 1e6,
    )
    started = time.monotonic()
    db.execute("VACUUM")
    logger.info("VACUUM done in %.1f s: %.1f MB", time.monotonic() - started, _file_bytes(db) / 1e6)
    return True


def _file_bytes(db: sqlite3.Connection) -> int:
    (pages,) = db.execute("PRAGMA page_count").fetchone()
    (page_size,) = db.execute("PRAGMA page_size").fetchone()
    return int(pages) * int(page_size)


async def migrate_postgres(conn: asyncpg.Connection, schema: str | None = None) -> list[int]:
    """Apply what is missing of POSTGRES; the versions applied now.

    With ``schema``, it is created if missing (the connection's search_path
    must already name it)."""
    applied: list[int] = []
    for migration in POSTGRES:
        async with conn.transaction():
            # Without it, two processes could both see a version missing, or
            # both run CREATE ... IF NOT EXISTS and one fail on the catalog's
            # unique index. Released at commit.
            await conn.execute("SELECT pg_advisory_xact_lock($1)", _POSTGRES_LOCK_KEY)
            if schema is not None:
                await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {quote_ident(schema)}")
            await conn.execute(_POSTGRES_LEDGER)
            done = await conn.fetchval(
                "SELECT EXISTS (SELECT 1 FROM schema_migrations WHERE version = $1)",
                migration.version,
            )
            if not done:
                for statement in migration.statements:
                    await conn.execute(statement)
                await conn.execute(
                    "INSERT INTO schema_migrations (version) VALUES ($1)", migration.version
                )
                applied.append(migration.version)
    return applied


def quote_ident(name: str) -> str:
    """A PostgreSQL identifier, quoted: any name is then taken literally."""
    return '"' + name.replace('"', '""') + '"'
