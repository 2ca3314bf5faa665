"""agentlab.v1.LabService: decode the request, call the use case, encode.

Errors leave through ``errors.abort`` only. In a stream, an error that happens
after the first event travels as a final ExecutionFailed event first, because
a REST client behind Envoy cannot see a status that follows a response body.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, Callable
from contextlib import aclosing
from dataclasses import replace
from typing import Any

from agentlab.api import convert
from agentlab.api.errors import abort
from agentlab.core.errors import AgentLabError, InternalError, NotFound, NotServing
from agentlab.core.events import ExecutionFailed
from agentlab.core.runner import Runner, new_error_id
from agentlab.core.types import ExecutionMode, ModelInfo, Task
from agentlab.health import Health
from agentlab.v1 import execution_pb2 as pb
from agentlab.v1 import lab_service_pb2 as svc
from agentlab.v1 import lab_service_pb2_grpc as svc_grpc

__all__ = ["LabServicer"]

logger = logging.getLogger(__name__)

Context = Any  # grpc.aio.ServicerContext, untyped in grpcio


class LabServicer(svc_grpc.LabServiceServicer):
    def __init__(
        self, runner: Runner, health: Health, models: Callable[[], list[ModelInfo]]
    ) -> None:
        self._runner = runner
        self._health = health
        self._models = models

    async def Execute(self, request: svc.ExecuteRequest, context: Context) -> pb.ExecuteResponse:
        try:
            task = _with_deadline(convert.task(request, ExecutionMode.INFERENCE), context)
            return convert.result(await self._runner.execute(task))
        except AgentLabError as error:
            failure = error
        except Exception:
            failure = _internal("Execute")
        await abort(context, failure)
        raise AssertionError("abort returned")

    async def Orchestrate(
        self, request: svc.OrchestrateRequest, context: Context
    ) -> AsyncGenerator[svc.OrchestrateResponse, None]:
        task = _with_deadline(convert.task(request, ExecutionMode.ORCHESTRATION), context)
        failure: AgentLabError | None = None
        try:
            async with aclosing(self._runner.stream(task)) as events:
                async for event in events:
                    yield svc.OrchestrateResponse(event=convert.event(event))
                    if isinstance(event.kind, ExecutionFailed):
                        failure = event.kind.error
        except AgentLabError as error:  # raised before the first event
            failure = error
        except Exception:
            failure = _internal("Orchestrate")
        if failure is not None:
            await abort(context, failure)

    async def ListModels(
        self, request: svc.ListModelsRequest, context: Context
    ) -> svc.ListModelsResponse:
        return convert.models(self._models())

    async def GetHealth(
        self, request: svc.GetHealthRequest, context: Context
    ) -> svc.GetHealthResponse:
        serving = self._health.serving(request.service)
        if serving is None:
            await abort(context, NotFound("health service", request.service))
        if not serving:
            await abort(context, NotServing(request.service))
        return svc.GetHealthResponse(service=request.service, status=svc.SERVING_STATUS_SERVING)


def _with_deadline(task: Task, context: Context) -> Task:
    """Carry the caller's deadline into the lab, a little early: the execution
    then fails with its partial flow and a detailed status before gRPC cuts
    the call off with a bare DEADLINE_EXCEEDED."""
    remaining = context.time_remaining()
    if remaining is None:
        return task
    return replace(task, timeout_s=max(remaining - min(0.25, remaining * 0.1), 0.001))


def _internal(method: str) -> InternalError:
    """Log an unexpected exception with an id; the caller sees only the id."""
    error_id = new_error_id()
    logger.exception("%s failed unexpectedly: error id %s", method, error_id)
    return InternalError(error_id)
