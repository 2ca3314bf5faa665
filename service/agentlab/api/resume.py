"""Where a reconnecting stream resumes: the Last-Event-ID rule.

A browser's EventSource that lost its stream reconnects with the same URL and
a ``Last-Event-ID`` header holding the ``id:`` of the last event it received,
which Envoy sets to the event's sequence (gateway/lua/sse_ids.lua). Envoy's
transcoder passes HTTP headers on as gRPC metadata, so the service reads it as
``last-event-id``; gRPC clients may send the same metadata.

- WatchExecution resumes after max(after_sequence, last-event-id).
- Orchestrate resumes the execution its ``request_id`` names after
  last-event-id; a new key starts a new execution, streamed from its first
  event. Without a request_id there is nothing a reconnect can name, so
  last-event-id is refused rather than silently starting a second execution
  whose events would restart from 1.
"""

from __future__ import annotations

from typing import Any

from agentlab.core.errors import InvalidArgument

__all__ = ["LAST_EVENT_ID", "last_event_id", "require_request_id"]

LAST_EVENT_ID = "last-event-id"

_MAX_SEQUENCE = 2**32 - 1  # ExecutionEvent.sequence is a uint32


def last_event_id(context: Any) -> int | None:
    """The sequence in the call's last-event-id metadata; None when absent or
    empty (an EventSource sends an empty one only after an event with an
    empty id). Raises InvalidArgument naming last-event-id unless it is a
    decimal integer from 0 to 2^32 - 1."""
    values = [value for key, value in context.invocation_metadata() or () if key == LAST_EVENT_ID]
    if not values or not (raw := str(values[-1]).strip()):
        return None
    if not (raw.isascii() and raw.isdigit()) or int(raw) > _MAX_SEQUENCE:
        raise InvalidArgument(
            LAST_EVENT_ID,
            f"must be the sequence number of an event (0 to {_MAX_SEQUENCE}), not {raw[:40]!r}",
            reason="LAST_EVENT_ID_INVALID",
        )
    return int(raw)


def require_request_id(resume_after: int | None, request_id: str) -> None:
    """Orchestrate resumes only an execution named by its request_id."""
    if resume_after is not None and not request_id:
        raise InvalidArgument(
            LAST_EVENT_ID,
            "resumes an Orchestrate stream only together with the request_id that "
            "started it; without one a reconnect would start a second execution",
            reason="REQUEST_ID_REQUIRED",
        )
