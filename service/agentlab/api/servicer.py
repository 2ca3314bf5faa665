"""agentlab.v1.LabService: decode the request, call the use case, encode.

Errors are raised to interceptors.MapErrors, the one place they become
statuses (an AgentLabError its own, anything else INTERNAL); a stored
execution's error leaves through ``errors.abort_with_status``. In a stream, an error that happens
after the first event travels as a final ExecutionFailed event first, because
a REST client behind Envoy cannot see a status that follows a response body.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, Callable
from contextlib import aclosing
from dataclasses import replace
from typing import Any

from agentlab.api import convert, paging, resume, sizing
from agentlab.api.auth import current_caller
from agentlab.api.errors import abort, abort_with_status
from agentlab.core.errors import AgentLabError, NotFound, NotServing
from agentlab.core.types import ExecutionMode, ModelInfo, Task
from agentlab.executions.service import Executions, Submitted, is_final
from agentlab.health import Health
from agentlab.v1 import execution_pb2 as pb
from agentlab.v1 import lab_service_pb2 as svc
from agentlab.v1 import lab_service_pb2_grpc as svc_grpc

__all__ = ["LabServicer"]

logger = logging.getLogger(__name__)

Context = Any  # grpc.aio.ServicerContext, untyped in grpcio


class LabServicer(svc_grpc.LabServiceServicer):
    def __init__(
        self, executions: Executions, health: Health, models: Callable[[], list[ModelInfo]]
    ) -> None:
        self._executions = executions
        self._health = health
        self._models = models

    async def Execute(self, request: svc.ExecuteRequest, context: Context) -> pb.ExecuteResponse:
        final: pb.ExecutionEvent | None = None
        submitted: Submitted | None = None
        # With a request_id the client means to retry: like a background one,
        # the execution outlives the call, its deadline and its end.
        tied_to_call = not request.background and not request.request_id
        try:
            task = convert.task(request, ExecutionMode.INFERENCE)
            if tied_to_call:
                task = _with_deadline(task, context)
            submitted = await self._executions.submit(
                task,
                caller=current_caller(),
                request_id=request.request_id,
                background=request.background,
            )
            if request.background:
                record = submitted.record
                return pb.ExecuteResponse(execution_id=record.id, state=convert.state(record.state))
            final = await self._executions.wait_for_final(submitted.record.id)
        finally:
            if submitted is not None and tied_to_call and final is None:
                await self._cancel_quietly(submitted.record.id)
        if final.HasField("execution_failed"):
            await abort_with_status(context, final.execution_failed.error)
        result = pb.ExecuteResponse()
        result.CopyFrom(final.execution_completed.result)
        result.state = pb.EXECUTION_STATE_SUCCEEDED
        return sizing.fit(result)

    async def Orchestrate(
        self, request: svc.OrchestrateRequest, context: Context
    ) -> AsyncGenerator[svc.OrchestrateResponse, None]:
        task = convert.task(request, ExecutionMode.ORCHESTRATION)
        tied_to_call = _leaving_cancels(request)
        if tied_to_call:
            task = _with_deadline(task, context)
        final: pb.ExecutionEvent | None = None
        submitted: Submitted | None = None
        try:
            resume_after = resume.last_event_id(context)
            resume.require_request_id(resume_after, request.request_id)
            submitted = await self._executions.submit(
                task, caller=current_caller(), request_id=request.request_id
            )
            # A reconnect (Last-Event-ID) resumes the execution its key names.
            after = 0 if submitted.created else (resume_after or 0)
            async with aclosing(
                self._executions.watch(submitted.record.id, after, current_caller())
            ) as events:
                async for event in events:
                    if is_final(event):
                        final = event
                    yield svc.OrchestrateResponse(event=sizing.fit(event))
        except AgentLabError as error:  # raised before the first event
            await abort(context, error)
        finally:
            # Only the call that created the execution: one attached through
            # its request_id never cancels it for the others.
            if submitted is not None and submitted.created and tied_to_call and final is None:
                await self._cancel_quietly(submitted.record.id)
        if final is not None and final.HasField("execution_failed"):
            await abort_with_status(context, final.execution_failed.error)

    async def GetExecution(
        self, request: svc.GetExecutionRequest, context: Context
    ) -> svc.GetExecutionResponse:
        record = await self._executions.get(request.execution_id, current_caller())
        return svc.GetExecutionResponse(
            execution=convert.execution(record, request.view or pb.EXECUTION_VIEW_FULL)
        )

    async def ListExecutions(
        self, request: svc.ListExecutionsRequest, context: Context
    ) -> svc.ListExecutionsResponse:
        records, cursor = await self._executions.page(
            page_size=paging.page_size(request.page_size),
            after=paging.decode(request.page_token),
            model=request.model or None,
            state=convert.STATES.get(request.state) if request.state else None,
            caller=current_caller(),
        )
        view = request.view or pb.EXECUTION_VIEW_BASIC
        page = sizing.page(convert.execution(record, view) for record in records)
        if len(page) < len(records):  # cut by size: the next page starts after it
            cursor = paging.after(records[len(page) - 1])
        return svc.ListExecutionsResponse(executions=page, next_page_token=paging.encode(cursor))

    async def CancelExecution(
        self, request: svc.CancelExecutionRequest, context: Context
    ) -> svc.CancelExecutionResponse:
        record = await self._executions.cancel(request.execution_id, current_caller())
        return svc.CancelExecutionResponse(execution=convert.execution(record))

    async def WatchExecution(
        self, request: svc.WatchExecutionRequest, context: Context
    ) -> AsyncGenerator[svc.WatchExecutionResponse, None]:
        try:
            after = max(request.after_sequence, resume.last_event_id(context) or 0)
            async with aclosing(
                self._executions.watch(request.execution_id, after, current_caller())
            ) as events:
                async for event in events:
                    yield svc.WatchExecutionResponse(event=sizing.fit(event))
        except AgentLabError as error:
            await abort(context, error)

    async def _cancel_quietly(self, execution_id: str) -> None:
        """The caller went away from an execution tied to its call: stop it."""
        try:
            await self._executions.cancel(execution_id, current_caller())
        except Exception:
            logger.exception("cancelling %s after its caller left failed", execution_id)

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


def _leaving_cancels(request: svc.OrchestrateRequest) -> bool:
    """Whether the stream ending before its final event cancels the
    execution: as ``on_disconnect`` says, and when it says nothing, unless
    the call has a request_id (a call the client means to retry)."""
    if request.on_disconnect == svc.DISCONNECT_POLICY_UNSPECIFIED:
        return not request.request_id
    return bool(request.on_disconnect == svc.DISCONNECT_POLICY_CANCEL)


def _with_deadline(task: Task, context: Context) -> Task:
    """Carry the caller's deadline into the lab, a little early: the execution
    then fails with its partial flow and a detailed status before gRPC cuts
    the call off with a bare DEADLINE_EXCEEDED."""
    remaining = context.time_remaining()
    if remaining is None:
        return task
    return replace(task, timeout_s=max(remaining - min(0.25, remaining * 0.1), 0.001))
