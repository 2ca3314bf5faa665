"""``ObserveCalls``: each RPC under its caller's ids, for traces and logs.

The outermost interceptor, installed only while tracing is on or the logs
are JSON (so neither costs a call anything while off). It reads Envoy's
``x-request-id`` and the caller's W3C ``traceparent`` from the metadata,
puts them in the log context (agentlab.telemetry.logs), and with tracing on
runs the call in a SERVER span named ``{service}/{method}`` (OpenTelemetry's
RPC conventions), child of the caller's span. What the call starts (its
execution's task) inherits both.

Envoy passes ``traceparent`` through unchanged (gateway/envoy.yaml has no
tracer): the caller's trace id is the one every span and log line carries;
without one, this span is the trace's root.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from agentlab.api.interceptors import Unary, UnaryStream, Wrapped, wrap_handler
from agentlab.telemetry import logs, tracing

__all__ = ["ObserveCalls"]

_UNTRACED = ("/grpc.health.v1.Health/", "/agentlab.v1.LabService/GetHealth", "/grpc.reflection.")


class ObserveCalls(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    def __init__(self) -> None:
        self._wrapped = Wrapped(self._wrap)

    async def intercept_service(
        self, continuation: Callable[[Any], Awaitable[Any]], handler_call_details: Any
    ) -> Any:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        return self._wrapped(handler, str(handler_call_details.method))

    def _wrap(self, handler: Any, method: str) -> Any:
        service, _, name = method.lstrip("/").rpartition("/")
        attributes = {"rpc.system": "grpc", "rpc.service": service, "rpc.method": name}
        span_name = method.lstrip("/")
        # Probes and reflection are not requests anyone follows: a probe
        # every few seconds would bury the traces that matter.
        traced = not method.startswith(_UNTRACED)

        def begin(context: Any) -> tracing.Span | None:
            """Set the call's log context (in the call's own task) and start
            its span, None while tracing is off."""
            metadata = {key: value for key, value in context.invocation_metadata() or ()}
            request = metadata.get("x-request-id", "")
            logs.request_id.set(request if isinstance(request, str) else "")
            traceparent = metadata.get("traceparent", "")
            if isinstance(traceparent, str):
                logs.trace_id.set(logs.trace_id_of(traceparent))
            if not traced:
                return None
            span = tracing.start_span(
                span_name,
                kind=tracing.SpanKind.SERVER,
                attributes={**attributes, "agentlab.request_id": logs.request_id.get()},
                parent=tracing.extract_context(metadata),
            )
            if span is not None:
                logs.trace_id.set(format(span.get_span_context().trace_id, "032x"))
            return span

        def unary(behaviour: Unary) -> Unary:
            async def observed(request: Any, context: Any) -> Any:
                span = begin(context)
                if span is None:
                    return await behaviour(request, context)
                with tracing.use_span(span):
                    try:
                        return await behaviour(request, context)
                    finally:
                        _status(span, context)

            return observed

        def streaming(behaviour: UnaryStream) -> UnaryStream:
            async def observed(request: Any, context: Any) -> AsyncIterator[Any]:
                span = begin(context)
                responses = behaviour(request, context)
                if span is None:
                    async for response in responses:
                        yield response
                    return
                try:
                    async for response in tracing.steps(span, responses):
                        yield response
                except BaseException as error:
                    _status(span, context)
                    tracing.end(span, error)
                    raise
                _status(span, context)
                tracing.end(span)

            return observed

        return wrap_handler(handler, unary, streaming)


def _status(span: tracing.Span, context: Any) -> None:
    """The call's gRPC status on its span (``rpc.grpc.status_code``); a
    status other than OK marks it failed, named by the code (NOT_FOUND):
    MapErrors has turned every error into a status by now."""
    code = context.code()
    if code is None:
        code = grpc.StatusCode.OK
    elif isinstance(code, int):
        code = next((c for c in grpc.StatusCode if c.value[0] == code), grpc.StatusCode.UNKNOWN)
    span.set_attribute("rpc.grpc.status_code", code.value[0])
    if code is not grpc.StatusCode.OK:
        tracing.mark_failed(span, code.name)
