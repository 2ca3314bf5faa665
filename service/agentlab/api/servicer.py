"""agentlab.v1.LabService: decode the request, call the use case, encode.

Errors are raised to interceptors.MapErrors, the one place they become
statuses: an AgentLabError its own, a stored execution's failure
(executions.call.StoredFailure) the status it stored, anything else
INTERNAL. In a stream, an error that happens after the first event travels as
a final ExecutionFailed event first, because a REST client behind Envoy
cannot see a status that follows a response body. What an execution tied to
its call does when the call leaves is the executions' job
(``Executions.call``).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator, Callable
from contextlib import aclosing
from typing import Any

from agentlab.api import convert, paging, resume, sizing
from agentlab.api.auth import current_caller
from agentlab.core.errors import InvalidArgument, NotFound, NotServing
from agentlab.core.types import ExecutionMode, ModelInfo
from agentlab.executions.call import StoredFailure
from agentlab.executions.model import ExecutionRecord
from agentlab.executions.service import Executions
from agentlab.health import Health
from agentlab.v1 import execution_pb2 as pb
from agentlab.v1 import lab_service_pb2 as svc
from agentlab.v1 import lab_service_pb2_grpc as svc_grpc

__all__ = ["LabServicer"]


Context = Any  # grpc.aio.ServicerContext, untyped in grpcio


class LabServicer(svc_grpc.LabServiceServicer):
    def __init__(
        self, executions: Executions, health: Health, models: Callable[[], list[ModelInfo]]
    ) -> None:
        self._executions = executions
        self._health = health
        self._models = models

    async def Execute(self, request: svc.ExecuteRequest, context: Context) -> pb.ExecuteResponse:
        task = convert.task(request, ExecutionMode.INFERENCE)
        async with self._executions.call(
            task,
            caller=current_caller(),
            request_id=request.request_id,
            background=request.background,
            # With a request_id the client means to retry: like a background
            # one, the execution outlives the call, its deadline and its end.
            leaving_cancels=not request.background and not request.request_id,
            time_remaining_s=context.time_remaining(),
        ) as call:
            if request.background:
                return convert.accepted(call.record)
            final = await call.final()
        return sizing.fit(convert.completed(final))

    async def Orchestrate(
        self, request: svc.OrchestrateRequest, context: Context
    ) -> AsyncGenerator[svc.OrchestrateResponse, None]:
        task = convert.task(request, ExecutionMode.ORCHESTRATION)
        resume_after = resume.last_event_id(context)
        resume.require_request_id(resume_after, request.request_id)
        async with self._executions.call(
            task,
            caller=current_caller(),
            request_id=request.request_id,
            leaving_cancels=_leaving_cancels(request),
            time_remaining_s=context.time_remaining(),
        ) as call:
            # A reconnect (Last-Event-ID) resumes the execution its key names.
            after = 0 if call.created else (resume_after or 0)
            events = call.events(after)
            try:
                async for event in events:
                    yield svc.OrchestrateResponse(event=sizing.fit(event))
            finally:
                await events.aclose()

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
        after = max(request.after_sequence, resume.last_event_id(context) or 0)
        async with aclosing(
            self._executions.watch(request.execution_id, after, current_caller())
        ) as events:
            async for event in events:
                yield svc.WatchExecutionResponse(event=sizing.fit(event))

    async def ReplayExecution(
        self, request: svc.ReplayExecutionRequest, context: Context
    ) -> svc.ReplayExecutionResponse:
        caller = current_caller()
        source = await self._replay_source(request, caller)
        async with self._executions.call(
            convert.replay_task(source, request),
            caller=caller,
            request_id=request.request_id,
            background=request.background,
            # As Execute: a background or keyed replay outlives its call.
            leaving_cancels=not request.background and not request.request_id,
            time_remaining_s=context.time_remaining(),
            replay_of=request.execution_id,
        ) as call:
            if request.background:
                return svc.ReplayExecutionResponse(execution=convert.execution(call.record))
            # A replay that failed is an answer (its record says how), not
            # a failure of this call.
            with contextlib.suppress(StoredFailure):
                await call.final()
            replay = await self._executions.get(call.record.id)
        return svc.ReplayExecutionResponse(execution=convert.execution(replay))

    async def _replay_source(
        self, request: svc.ReplayExecutionRequest, caller: str
    ) -> ExecutionRecord:
        """The execution a replay runs again. A retry of a keyed replay whose
        source has gone since (retention) gets its replay as before: the
        replay recorded the source's prompt, mode and options, so it stands
        in for the source, and the key's binding still checks the request
        against it. NOT_FOUND otherwise, as GetExecution."""
        try:
            return await self._executions.get(request.execution_id, caller)
        except NotFound:
            if request.request_id:
                known = await self._executions.find(caller, request.request_id)
                if known is not None and known.replay_of == request.execution_id:
                    return known
            raise

    async def CompareExecutions(
        self, request: svc.CompareExecutionsRequest, context: Context
    ) -> svc.CompareExecutionsResponse:
        compared = await self._executions.compare(request.execution_ids, current_caller())
        if not sizing.fits(compared):
            raise InvalidArgument(
                "execution_ids",
                "the comparison of these executions is larger than a response may be "
                f"({sizing.BUDGET_BYTES // (1024 * 1024)} MiB); compare fewer at a time",
                reason="COMPARISON_TOO_LARGE",
            )
        return compared

    async def ListModels(
        self, request: svc.ListModelsRequest, context: Context
    ) -> svc.ListModelsResponse:
        return convert.models(self._models())

    async def GetHealth(
        self, request: svc.GetHealthRequest, context: Context
    ) -> svc.GetHealthResponse:
        serving = self._health.serving(request.service)
        if serving is None:
            raise NotFound("health service", request.service)
        if not serving:
            raise NotServing(request.service)
        return svc.GetHealthResponse(service=request.service, status=svc.SERVING_STATUS_SERVING)


def _leaving_cancels(request: svc.OrchestrateRequest) -> bool:
    """Whether the stream ending before its final event cancels the
    execution: as ``on_disconnect`` says, and when it says nothing, unless
    the call has a request_id (a call the client means to retry)."""
    if request.on_disconnect == svc.DISCONNECT_POLICY_UNSPECIFIED:
        return not request.request_id
    return bool(request.on_disconnect == svc.DISCONNECT_POLICY_CANCEL)
