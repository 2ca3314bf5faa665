"""The gRPC transport of a status: how a call ends with one.

A domain error becomes a google.rpc.Status in one place, the executions'
codec (``executions.codec.rpc_status``): exactly one google.rpc.ErrorInfo
(reason, domain "agentlab.v1", metadata) plus BadRequest or RetryInfo where
they apply. Here it is sent in the `grpc-status-details-bin` trailer that
grpcio-status and Envoy's transcoder read. A status with RetryInfo also
carries a `retry-after` trailer (whole seconds): on a call that fails before
its first message gRPC sends one trailers-only response, and Envoy's
transcoder passes it on to REST clients as the HTTP `Retry-After` header.
"""

from __future__ import annotations

import math
from typing import NoReturn

import grpc
from google.rpc import status_pb2

from agentlab.core.errors import AgentLabError
from agentlab.executions.codec import DOMAIN, retry_after_s, rpc_status

__all__ = ["DOMAIN", "abort", "abort_with_status"]


async def abort(
    context: grpc.aio.ServicerContext[object, object], error: AgentLabError
) -> NoReturn:
    """End the call with the error's status (raises grpc.aio.AbortError)."""
    delay_s = retry_after_s(error)
    extra = () if delay_s is None else (("retry-after", str(math.ceil(delay_s))),)
    await abort_with_status(context, rpc_status(error), extra)


async def abort_with_status(
    context: grpc.aio.ServicerContext[object, object],
    status: status_pb2.Status,
    metadata: tuple[tuple[str, str], ...] = (),
) -> NoReturn:
    """End the call with a status already built (a stored execution's error);
    raises grpc.aio.AbortError."""
    code = _BY_NUMBER.get(status.code, grpc.StatusCode.UNKNOWN)
    await context.abort(
        code,
        status.message,
        trailing_metadata=(
            ("grpc-status-details-bin", status.SerializeToString()),
            *metadata,
        ),
    )
    # grpcio is untyped: its abort raises, but mypy cannot know.
    raise AssertionError("context.abort returned")


_BY_NUMBER = {code.value[0]: code for code in grpc.StatusCode}
