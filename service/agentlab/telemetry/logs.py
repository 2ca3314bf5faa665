"""Log lines that say which request caused them.

``AGENTLAB_LOG_FORMAT=json`` writes one JSON object per line: ``time``
(UTC, ISO 8601 with milliseconds), ``level``, ``logger``, ``message``, and on
every line a request causes ``request_id`` (Envoy's ``x-request-id``),
``execution_id`` and ``trace_id`` (32 hex digits: the caller's
``traceparent`` trace, or the one tracing started); ``exception`` holds a
traceback when there is one. The human format (the default) is unchanged.

The three ids live in context variables, set where a call comes in (the
API's ObserveCalls interceptor, the lab service's handler) and where an
execution starts; asyncio copies them into the tasks a call starts, so the
execution's own lines carry its call's ids too.

Prompts and outputs are never logged at INFO or above; keep it so.
"""

from __future__ import annotations

import json
import logging
from contextvars import ContextVar
from datetime import UTC, datetime

from opentelemetry.trace import get_current_span
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from agentlab.telemetry import tracing

__all__ = [
    "FORMATS",
    "HUMAN_FORMAT",
    "JsonFormatter",
    "configure",
    "execution_id",
    "request_id",
    "trace_id",
    "trace_id_of",
]

FORMATS = ("human", "json")
HUMAN_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

request_id: ContextVar[str] = ContextVar("agentlab_request_id", default="")
execution_id: ContextVar[str] = ContextVar("agentlab_execution_id", default="")
# The caller's trace id when tracing is off (from its traceparent); with
# tracing on, the current span's wins.
trace_id: ContextVar[str] = ContextVar("agentlab_trace_id", default="")
_TRACE_CONTEXT = TraceContextTextMapPropagator()


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line (newlines in a message or a
    traceback are escaped by JSON)."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, str] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": request_id.get(),
            "execution_id": execution_id.get(),
            "trace_id": tracing.current_trace_id() or trace_id.get(),
        }
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            line["exception"] = record.exc_text
        return json.dumps(line, ensure_ascii=False)


def configure(level: str, log_format: str) -> None:
    """The root logger at ``level``, writing to stderr in ``log_format``
    (one of FORMATS)."""
    handler = logging.StreamHandler()
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter(HUMAN_FORMAT))
    logging.basicConfig(level=level, handlers=[handler], force=True)


def trace_id_of(traceparent: str) -> str:
    """The trace id of a W3C ``traceparent`` value ("" if it is not a valid
    one): what the log lines carry while tracing is off. Parsed by
    OpenTelemetry's own propagator, so that a header tracing would ignore
    (upper-case hex, a zero parent id, version ff) names no trace here
    either, and the logs agree with the spans whether tracing is on or off."""
    context = _TRACE_CONTEXT.extract({"traceparent": traceparent})
    span_context = get_current_span(context).get_span_context()
    return format(span_context.trace_id, "032x") if span_context.is_valid else ""
