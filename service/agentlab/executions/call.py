"""A call's hold on its execution: cancel-on-disconnect, in one place.

An execution tied to its call (``leaving_cancels``) is cancelled when the
call leaves before the final event: the client went away, or its deadline
passed. Only the call that created it cancels it: one that attached through
an existing request_id never cancels it for the others; with a request_id or
``background`` the execution outlives the call. Only a tied execution
carries the caller's deadline into the lab, a little early, so it fails
with its partial flow and a detailed status before the transport cuts the
call off with a bare DEADLINE_EXCEEDED.

A final event that failed leaves as ``StoredFailure``, carrying the stored
google.rpc.Status, for the API layer to send as the call's status.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from contextlib import aclosing, asynccontextmanager
from dataclasses import replace

from google.rpc import status_pb2

from agentlab.core.types import Task
from agentlab.executions.codec import is_final
from agentlab.executions.model import ExecutionRecord
from agentlab.v1 import execution_pb2 as pb

__all__ = ["Call", "StoredFailure", "held", "with_deadline"]

logger = logging.getLogger(__name__)


class StoredFailure(Exception):
    """An execution ended failed or cancelled; ``status`` is the error it
    stored (its code, message and details), which the call ends with."""

    def __init__(self, status: status_pb2.Status) -> None:
        super().__init__(status.message)
        self.status = status


def with_deadline(task: Task, time_remaining_s: float | None) -> Task:
    """``task`` limited to the caller's remaining time, less a margin (a
    tenth of it, at most 0.25 s); unchanged without a deadline."""
    if time_remaining_s is None:
        return task
    margin = min(0.25, time_remaining_s * 0.1)
    return replace(task, timeout_s=max(time_remaining_s - margin, 0.001))


class Call:
    """The execution one call submitted (``created``) or attached to."""

    def __init__(
        self,
        record: ExecutionRecord,
        created: bool,
        wait_for_final: Callable[[str], Awaitable[pb.ExecutionEvent]],
        watch: Callable[[str, int], AsyncGenerator[pb.ExecutionEvent, None]],
    ) -> None:
        self.record = record
        self.created = created
        self.saw_final = False
        self._wait_for_final = wait_for_final
        self._watch = watch

    async def final(self) -> pb.ExecutionEvent:
        """The completed final event; raises StoredFailure if it failed."""
        final = await self._wait_for_final(self.record.id)
        return self._checked(final)

    async def events(self, after_sequence: int = 0) -> AsyncGenerator[pb.ExecutionEvent, None]:
        """Events after ``after_sequence`` through the final one; then raises
        StoredFailure if that one failed."""
        async with aclosing(self._watch(self.record.id, after_sequence)) as events:
            async for event in events:
                if is_final(event):
                    self.saw_final = True
                yield event
                if is_final(event):
                    self._checked(event)

    def _checked(self, final: pb.ExecutionEvent) -> pb.ExecutionEvent:
        self.saw_final = True
        if final.HasField("execution_failed"):
            raise StoredFailure(final.execution_failed.error)
        return final


@asynccontextmanager
async def held(
    call: Call, *, leaving_cancels: bool, cancel: Callable[[str], Awaitable[object]]
) -> AsyncIterator[Call]:
    """Yield ``call``; on leaving before its final event, cancel the
    execution if this call created it and ``leaving_cancels``."""
    try:
        yield call
    finally:
        if call.created and leaving_cancels and not call.saw_final:
            try:
                await cancel(call.record.id)
            except Exception:
                logger.exception("cancelling %s after its caller left failed", call.record.id)
