"""OpenTelemetry tracing: off unless the standard OTEL_* variables ask for an
OTLP exporter, and then one span per RPC, execution, graph node and model
call, with W3C ``traceparent`` read from callers and sent to HTTP backends.

While off, every helper here returns before touching OpenTelemetry: a
disabled check per span site, no span objects, no context switches (the
issue 11 budget: tracing off must cost nothing per request).

Spans of async generators are never made "current" across a ``yield`` (the
context would leak into the caller's frame); ``steps`` makes a span current
for each step of the generator it wraps instead.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncGenerator, AsyncIterator, Iterator, Mapping, MutableMapping
from typing import TypeVar

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.propagate import extract, inject
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

__all__ = [
    "Span",
    "SpanKind",
    "TracingError",
    "annotate",
    "configure_from_env",
    "current_trace_id",
    "enable",
    "enabled",
    "end",
    "extract_context",
    "inject_into",
    "mark_failed",
    "shutdown",
    "start_span",
    "steps",
    "use_span",
]

_T = TypeVar("_T")

_INSTRUMENTATION = "agentlab"
_TRUE = ("true", "1", "yes", "on")

# The provider while tracing is on; None while it is off (the default).
_provider: TracerProvider | None = None
_tracer: trace.Tracer | None = None


class TracingError(ValueError):
    """An OTEL_* variable this service cannot honour."""


def enabled() -> bool:
    return _tracer is not None


def configure_from_env(default_service_name: str, env: Mapping[str, str] | None = None) -> bool:
    """Turn tracing on when the environment asks for it; returns whether it
    did. On when OTEL_EXPORTER_OTLP_ENDPOINT or
    OTEL_EXPORTER_OTLP_TRACES_ENDPOINT is set, unless OTEL_SDK_DISABLED is
    true or OTEL_TRACES_EXPORTER is ``none``. The exporter is OTLP over gRPC
    and reads its own variables (endpoint, headers, timeout, insecure); the
    batch processor reads OTEL_BSP_*; OTEL_SERVICE_NAME and
    OTEL_RESOURCE_ATTRIBUTES name the process (``default_service_name``
    otherwise). Raises TracingError naming a variable it cannot honour."""
    env = os.environ if env is None else env
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() in _TRUE:
        return False
    exporter = env.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower() or "otlp"
    if exporter == "none":
        return False
    if exporter != "otlp":
        raise TracingError(f"OTEL_TRACES_EXPORTER must be otlp or none, not {exporter!r}")
    endpoint = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get(
        "OTEL_EXPORTER_OTLP_ENDPOINT"
    )
    if not (endpoint or "").strip():
        return False  # off by default: nowhere to send spans
    protocol = (
        env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        or env.get("OTEL_EXPORTER_OTLP_PROTOCOL")
        or "grpc"
    ).strip()
    if protocol != "grpc":
        raise TracingError(
            f"OTEL_EXPORTER_OTLP_PROTOCOL must be grpc (the OTLP exporter installed), "
            f"not {protocol!r}"
        )
    # Imported only when on: the exporter pulls in its generated protos.
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

    attributes = {} if env.get("OTEL_SERVICE_NAME") else {"service.name": default_service_name}
    enable(BatchSpanProcessor(OTLPSpanExporter()), Resource.create(attributes))
    return True


def enable(processor: SpanProcessor, resource: Resource | None = None) -> None:
    """Trace into ``processor`` from now on (tests pass an in-memory one)."""
    global _provider, _tracer
    provider = TracerProvider(resource=resource or Resource.create({}))
    provider.add_span_processor(processor)
    _provider, _tracer = provider, provider.get_tracer(_INSTRUMENTATION)


def shutdown() -> None:
    """Send the spans still buffered and turn tracing off."""
    global _provider, _tracer
    provider, _provider, _tracer = _provider, None, None
    if provider is not None:
        provider.shutdown()


def start_span(
    name: str,
    *,
    kind: SpanKind = SpanKind.INTERNAL,
    attributes: Mapping[str, str | int | float | bool] | None = None,
    parent: otel_context.Context | None = None,
) -> Span | None:
    """A started span, child of ``parent`` (default: the current context);
    None while tracing is off. End it with ``end``."""
    if _tracer is None:
        return None
    return _tracer.start_span(name, context=parent, kind=kind, attributes=attributes)


def end(span: Span | None, error: BaseException | None = None) -> None:
    """End ``span`` (None: nothing to do), marked failed with ``error``'s
    type when there is one."""
    if span is None:
        return
    if error is not None and not _failed(span):
        mark_failed(span, type(error).__name__)
    span.end()


def _failed(span: Span) -> bool:
    status = getattr(span, "status", None)
    return status is not None and status.status_code is StatusCode.ERROR


def mark_failed(span: Span | None, error_type: str) -> None:
    """Mark ``span`` failed, with ``error.type`` as OpenTelemetry's
    conventions name it (an exception's class, a status code's name)."""
    if span is not None:
        span.set_status(Status(StatusCode.ERROR, error_type))
        span.set_attribute("error.type", error_type)


@contextlib.contextmanager
def use_span(span: Span | None) -> Iterator[None]:
    """``span`` current within the block, which must not yield out of a
    generator; ended on the way out (failed if the block raised)."""
    if span is None:
        yield
        return
    token = otel_context.attach(trace.set_span_in_context(span))
    try:
        yield
    except BaseException as error:
        if span.is_recording() and not _failed(span):
            mark_failed(span, type(error).__name__)
        span.end()
        raise
    else:
        end(span)
    finally:
        otel_context.detach(token)


async def steps(span: Span, items: AsyncIterator[_T]) -> AsyncGenerator[_T, None]:
    """``items`` with ``span`` current while each of its steps runs (and
    while it closes), never while the consumer runs: what the generator
    starts (an HTTP request) is the span's child and carries its context."""
    within = trace.set_span_in_context(span)
    try:
        while True:
            token = otel_context.attach(within)
            try:
                item = await anext(items)
            except StopAsyncIteration:
                return
            finally:
                otel_context.detach(token)
            yield item
    finally:
        token = otel_context.attach(within)
        try:
            if isinstance(items, AsyncGenerator):
                await items.aclose()
        finally:
            otel_context.detach(token)


def annotate(key: str, value: str) -> None:
    """Set an attribute on the current span (nothing while tracing is off)."""
    if _tracer is not None:
        trace.get_current_span().set_attribute(key, value)


def extract_context(carrier: Mapping[str, str]) -> otel_context.Context | None:
    """The caller's context from W3C ``traceparent``/``tracestate`` headers
    (lower-case keys); None while tracing is off."""
    if _tracer is None:
        return None
    return extract(carrier)


def inject_into(headers: MutableMapping[str, str]) -> None:
    """Add the current span's ``traceparent`` to outgoing ``headers``; nothing
    while tracing is off or no span is current."""
    if _tracer is not None:
        inject(headers)


def current_trace_id() -> str:
    """The current span's trace id as 32 hex digits, "" if there is none."""
    if _tracer is None:
        return ""
    span_context = trace.get_current_span().get_span_context()
    return format(span_context.trace_id, "032x") if span_context.is_valid else ""
