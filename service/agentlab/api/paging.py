"""Page tokens for ListExecutions: opaque to clients, a cursor inside."""

from __future__ import annotations

import base64
import binascii
import json
from datetime import datetime

from agentlab.core.errors import InvalidArgument
from agentlab.executions.model import Cursor, ExecutionRecord

__all__ = ["DEFAULT_PAGE_SIZE", "after", "decode", "encode", "page_size"]

DEFAULT_PAGE_SIZE = 20


def page_size(requested: int) -> int:
    """The contract bounds ``page_size`` to 0..100 (buf.validate); 0 means
    the default."""
    return requested or DEFAULT_PAGE_SIZE


def after(record: ExecutionRecord) -> Cursor:
    """The cursor of a page that ends with ``record``."""
    return Cursor(created_at=record.created_at, id=record.id)


def encode(cursor: Cursor | None) -> str:
    if cursor is None:
        return ""
    raw = json.dumps({"t": cursor.created_at.isoformat(), "i": cursor.id}).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode(token: str) -> Cursor | None:
    if not token:
        return None
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        fields = json.loads(raw)
        created_at = datetime.fromisoformat(fields["t"])
        if created_at.tzinfo is None:
            raise ValueError("naive time")
        return Cursor(created_at=created_at, id=str(fields["i"]))
    except (binascii.Error, ValueError, KeyError, TypeError):
        raise InvalidArgument("page_token", "is not a token this service issued") from None
