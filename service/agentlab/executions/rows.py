"""What both stores do with rows alike: options as JSON text, a row turned
into a record, a page cut from one record too many. Only how a time is kept
differs (microseconds in SQLite, timestamptz in PostgreSQL): ``time``
converts it."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import datetime
from typing import Any, Protocol

from agentlab.executions.model import Cursor, ExecutionRecord, ExecutionState, NewExecution

__all__ = [
    "Row",
    "decode_options",
    "encode_options",
    "page_of",
    "queued_record",
    "record_from_row",
]


def encode_options(options: dict[str, float | int]) -> str:
    return json.dumps(options, sort_keys=True, separators=(",", ":"))


def decode_options(text: str) -> dict[str, float | int]:
    # json keeps int and float apart (1 and 1.0), as the dataclass does.
    decoded: Any = json.loads(text)
    return dict(decoded)


class Row(Protocol):
    """A database row by column name: sqlite3.Row and asyncpg.Record both."""

    def __getitem__(self, column: str) -> Any: ...


def record_from_row(row: Row, time: Callable[[Any], datetime]) -> ExecutionRecord:
    def maybe(value: Any) -> datetime | None:
        return None if value is None else time(value)

    return ExecutionRecord(
        id=row["id"],
        request_id=row["request_id"],
        caller=row["caller"],
        model=row["model"],
        mode=row["mode"],
        prompt=row["prompt"],
        options=decode_options(row["options"]),
        background=bool(row["background"]),
        state=ExecutionState(row["state"]),
        created_at=time(row["created_at"]),
        started_at=maybe(row["started_at"]),
        ended_at=maybe(row["ended_at"]),
        owner=row["owner"],
        heartbeat_at=time(row["heartbeat_at"]),
        last_sequence=row["last_sequence"],
        result=row["result"],
        error=row["error"],
        fingerprint=row["fingerprint"],
        replay_of=row["replay_of"],
    )


def page_of(
    records: list[ExecutionRecord], page_size: int
) -> tuple[list[ExecutionRecord], Cursor | None]:
    """A page from up to ``page_size + 1`` records, newest first: the extra
    one only tells that a next page exists."""
    if len(records) <= page_size:
        return records, None
    page = records[:page_size]
    last = page[-1]
    return page, Cursor(created_at=last.created_at, id=last.id)


def queued_record(new: NewExecution, created_at: datetime) -> ExecutionRecord:
    """The record ``new`` was inserted as, without reading it back:
    ``created_at`` as the store keeps it (to the microsecond)."""
    return ExecutionRecord(
        id=new.id,
        request_id=new.request_id,
        caller=new.caller,
        model=new.model,
        mode=new.mode,
        prompt=new.prompt,
        options=dict(new.options),
        background=new.background,
        state=ExecutionState.QUEUED,
        created_at=created_at,
        started_at=None,
        ended_at=None,
        owner=new.owner,
        heartbeat_at=created_at,
        last_sequence=0,
        result=None,
        error=None,
        fingerprint=new.fingerprint,
        replay_of=new.replay_of,
    )
