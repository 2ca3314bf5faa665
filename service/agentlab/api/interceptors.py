"""Server interceptors, and the one way they wrap a method's behaviour.

``MapErrors`` is the one error path of every RPC: whatever a method (or an
interceptor inside it) raises becomes a status there. grpc.aio itself would
answer UNKNOWN with the exception's text, which Envoy hands to REST clients.

``CheckRequests`` is where every request is parsed and held to its rules
before a method sees it. grpc.aio itself would answer UNKNOWN, naming a
Python exception class, when a request does not parse; this answers
INVALID_ARGUMENT instead. Unknown keys of a REST call's JSON body are
refused here too (``json_fields``), in the same answer as broken rules.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from agentlab.api.errors import abort, abort_with_status
from agentlab.api.json_fields import unknown_fields
from agentlab.api.validation import RequestRules
from agentlab.core.errors import AgentLabError, InternalError, InvalidArgument
from agentlab.executions.call import StoredFailure
from agentlab.executions.codec import rpc_status
from agentlab.v1 import execution_pb2 as pb

__all__ = ["CheckRequests", "MapErrors", "Unary", "UnaryStream", "Wrapped", "wrap_handler"]

logger = logging.getLogger(__name__)

Unary = Callable[[Any, Any], Awaitable[Any]]
UnaryStream = Callable[[Any, Any], AsyncIterator[Any]]


def wrap_handler(
    handler: Any,
    unary: Callable[[Unary], Unary],
    streaming: Callable[[UnaryStream], UnaryStream],
    request_deserializer: Callable[[bytes], Any] | None = None,
) -> Any:
    """``handler`` with its behaviour wrapped; the contract has only unary
    and server-streaming methods."""
    deserializer = request_deserializer or handler.request_deserializer
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(
            unary(handler.unary_unary),
            request_deserializer=deserializer,
            response_serializer=handler.response_serializer,
        )
    if handler.unary_stream is not None:
        # A stream written with context.write (grpc_health's Watch) is a
        # coroutine, not an async generator: wrapped as one, it would fail
        # at its first step. grpc.aio tells the two apart by the function.
        # Any other returns the responses' iterator: an async generator, or
        # (CheckRequests) a plain function returning the one it wraps.
        behaviour = handler.unary_stream
        wrapped = (
            unary(behaviour) if inspect.iscoroutinefunction(behaviour) else streaming(behaviour)
        )
        return grpc.unary_stream_rpc_method_handler(
            wrapped,
            request_deserializer=deserializer,
            response_serializer=handler.response_serializer,
        )
    return handler


class Wrapped:
    """Each method's handler wrapped once, not on every call: grpc.aio asks
    the interceptors for the handler of every call, and the handler a method
    resolves to stays the same (a new one, as after a re-registration, is
    wrapped anew). ``wrap(handler, method)`` must keep nothing of one call."""

    def __init__(self, wrap: Callable[[Any, str], Any]) -> None:
        self._wrap = wrap
        # Only methods the server has: an unknown one has no handler.
        self._by_method: dict[str, tuple[Any, Any]] = {}

    def __call__(self, handler: Any, method: str) -> Any:
        cached = self._by_method.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = self._wrap(handler, method)
        self._by_method[method] = (handler, wrapped)
        return wrapped


class CheckRequests(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    def __init__(self, rules: RequestRules) -> None:
        self._rules = rules
        self._wrapped = Wrapped(self._wrap)

    async def intercept_service(
        self, continuation: Callable[[Any], Awaitable[Any]], handler_call_details: Any
    ) -> Any:
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return handler
        return self._wrapped(handler, str(handler_call_details.method))

    def _wrap(self, handler: Any, method: str) -> Any:
        parse = handler.request_deserializer

        def decoded(raw: bytes, context: Any) -> Any:
            # Errors are raised to MapErrors; a rule of the contract that does
            # not compile or evaluate is our bug, INTERNAL there.
            try:
                request = parse(raw)
            except (DecodeError, ValueError) as error:
                raise InvalidArgument(
                    "request", f"is not a valid message of this method: {error}"
                ) from None
            unknown = unknown_fields(method, context.invocation_metadata() or ())
            if found := [*unknown, *self._rules.violations(request)]:
                raise InvalidArgument.of(found)
            return request

        def unary(behaviour: Unary) -> Unary:
            async def checked(raw: bytes, context: Any) -> Any:
                return await behaviour(decoded(raw, context), context)

            return checked

        def streaming(behaviour: UnaryStream) -> UnaryStream:
            # The method's own responses, not a generator relaying them: a
            # level less for every open stream to hold (issue 11). What
            # decoding raises reaches MapErrors (always outside: grpc.aio
            # needs an async generator there) where it calls this.
            def checked(raw: bytes, context: Any) -> AsyncIterator[Any]:
                return behaviour(decoded(raw, context), context)

            return checked

        # Bytes in: the parsing happens in ``decoded``, where it can fail well.
        return wrap_handler(handler, unary, streaming, request_deserializer=_raw)


def _raw(data: bytes) -> bytes:
    return data


class MapErrors(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Every RPC's errors become statuses here, and only here; it is the
    outermost interceptor, so the others raise too.

    An ``AgentLabError`` ends the call with its own status (api/errors.py);
    a ``StoredFailure`` (an execution that failed) with the status it stored.
    Any other exception is INTERNAL with a new error id, in ErrorInfo
    metadata ``error_id`` and in the message; the exception and its stack go
    to the log under that id, never to the caller. A ``context.abort`` from
    inside passes through unchanged.

    A stream that sent an event already cannot change its HTTP status for a
    REST client behind Envoy, so it first sends a final ``execution_failed``
    event carrying the same status (sequence 0: not stored, not part of the
    execution's history; with the steps this stream reported finished), as the runner does for a
    failing lab; then the call ends with that status for gRPC clients. After
    a final event (completed or failed), only the status follows.
    """

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
        def unary(behaviour: Unary) -> Unary:
            async def mapped(request: Any, context: Any) -> Any:
                try:
                    return await behaviour(request, context)
                except grpc.aio.AbortError:
                    raise
                except StoredFailure as failure:
                    await abort_with_status(context, failure.status)
                except Exception as error:
                    await abort(context, _as_agentlab_error(error, method))

            return mapped

        def streaming(behaviour: UnaryStream) -> UnaryStream:
            async def mapped(request: Any, context: Any) -> AsyncIterator[Any]:
                stream = _Sent()
                try:
                    async for response in behaviour(request, context):
                        stream.saw(response)
                        yield response
                except grpc.aio.AbortError:
                    raise
                except StoredFailure as stored:
                    # Raised after its own final event: only the status follows.
                    await abort_with_status(context, stored.status)
                except Exception as error:
                    failure = _as_agentlab_error(error, method)
                    if (last := stream.failed(failure)) is not None:
                        yield last
                    await abort(context, failure)

            return mapped

        return wrap_handler(handler, unary, streaming)


def _as_agentlab_error(error: Exception, method: str) -> AgentLabError:
    if isinstance(error, AgentLabError):
        return error
    return InternalError.logged(logger, method)


class _Sent:
    """What a stream of ``*Response{event}`` messages has sent so far: enough
    to end it with an ``execution_failed`` event of its own. Not the last
    response itself, which every open stream would hold between its events
    (~0.8 KiB of message each: issue 11); only what the failure event needs."""

    __slots__ = ("_execution_id", "_kind", "_open", "_steps")

    def __init__(self) -> None:
        # The type of the responses, once one carried an event.
        self._kind: type[Any] | None = None
        self._execution_id = ""
        # Whether the last event sent was not a final one.
        self._open = False
        self._steps: list[pb.FlowStep] = []

    def saw(self, response: Any) -> None:
        event = getattr(response, "event", None)
        if not isinstance(event, pb.ExecutionEvent):
            self._kind = None
            return
        self._kind = type(response)
        self._execution_id = event.execution_id
        kind = event.WhichOneof("kind")
        self._open = kind not in ("execution_completed", "execution_failed")
        if kind == "node_finished":
            step = pb.FlowStep()
            step.CopyFrom(event.node_finished.step)
            self._steps.append(step)

    def failed(self, error: AgentLabError) -> Any:
        """The response that ends the stream with ``error``, or None when
        nothing was sent yet (the status alone says it) or the last event
        was final already."""
        if self._kind is None or not self._open:
            return None
        # Built here, not by the executions' codec: this event is never
        # stored. Sequence 0: it is the stream's, not the execution's (it is
        # not stored, and the execution may go on); a number would clash with
        # the stored event that later takes it, and mislead a resume.
        final = pb.ExecutionEvent(sequence=0, execution_id=self._execution_id)
        final.time.GetCurrentTime()
        final.execution_failed.error.CopyFrom(rpc_status(error))
        final.execution_failed.flow.extend(self._steps)
        return self._kind(event=final)
