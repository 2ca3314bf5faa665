"""Server interceptors, and the one way they wrap a method's behaviour.

``CheckRequests`` is where every request is parsed and held to its rules
before a method sees it. grpc.aio itself would answer UNKNOWN, naming a
Python exception class, when a request does not parse; this answers
INVALID_ARGUMENT instead. Unknown keys of a REST call's JSON body are
refused here too (``json_fields``), in the same answer as broken rules.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from agentlab.api.errors import abort
from agentlab.api.json_fields import unknown_fields
from agentlab.api.validation import RequestRules
from agentlab.core.errors import AgentLabError, InternalError, InvalidArgument

__all__ = ["CheckRequests", "Unary", "UnaryStream", "wrap_handler"]

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
        return grpc.unary_stream_rpc_method_handler(
            streaming(handler.unary_stream),
            request_deserializer=deserializer,
            response_serializer=handler.response_serializer,
        )
    return handler


class CheckRequests(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    def __init__(self, rules: RequestRules) -> None:
        self._rules = rules

    async def intercept_service(
        self, continuation: Callable[[Any], Awaitable[Any]], handler_call_details: Any
    ) -> Any:
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return handler
        parse = handler.request_deserializer
        unknown = unknown_fields(
            handler_call_details.method, handler_call_details.invocation_metadata or ()
        )

        async def decoded(raw: bytes, context: Any) -> Any:
            try:
                request = parse(raw)
            except (DecodeError, ValueError) as error:
                await abort(
                    context,
                    InvalidArgument("request", f"is not a valid message of this method: {error}"),
                )
                raise
            try:
                if found := [*unknown, *self._rules.violations(request)]:
                    raise InvalidArgument.of(found)
            except AgentLabError as error:
                await abort(context, error)
                raise
            except Exception:
                # A rule of the contract that does not compile or evaluate:
                # our bug, not the caller's.
                await abort(context, InternalError.logged(logger, "checking a request"))
                raise
            return request

        def unary(behaviour: Unary) -> Unary:
            async def checked(raw: bytes, context: Any) -> Any:
                return await behaviour(await decoded(raw, context), context)

            return checked

        def streaming(behaviour: UnaryStream) -> UnaryStream:
            async def checked(raw: bytes, context: Any) -> AsyncIterator[Any]:
                async for response in behaviour(await decoded(raw, context), context):
                    yield response

            return checked

        # Bytes in: the parsing happens in ``decoded``, where it can fail well.
        return wrap_handler(handler, unary, streaming, request_deserializer=_raw)


def _raw(data: bytes) -> bytes:
    return data
