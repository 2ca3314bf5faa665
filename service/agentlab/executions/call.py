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
from collections.abc import AsyncIterator, Coroutine
from dataclasses import replace
from types import TracebackType
from typing import Any, Protocol

from google.rpc import status_pb2

from agentlab.core.types import Task
from agentlab.executions.codec import is_final
from agentlab.executions.model import ExecutionRecord
from agentlab.v1 import execution_pb2 as pb

__all__ = ["Call", "Events", "Held", "Side", "StoredFailure", "with_deadline"]

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


class Side(Protocol):
    """What a Call needs of the executions (executions/service.py)."""

    async def wait_for_final(self, execution_id: str) -> pb.ExecutionEvent: ...

    def watch_call(self, call: Call, after_sequence: int) -> AsyncIterator[pb.ExecutionEvent]: ...

    async def cancel_left(self, call: Call) -> None:
        """Cancel the execution ``call`` created, which its caller left."""


class Call:
    """The execution one call submitted (``created``) or attached to.

    Plain objects with slots rather than closures and generators: every open
    stream holds one for its whole life (10,000 may be open: issue 11)."""

    __slots__ = ("_side", "caller", "created", "record", "saw_final")

    def __init__(self, record: ExecutionRecord, created: bool, side: Side, caller: str) -> None:
        self.record = record
        self.created = created
        self.caller = caller
        self.saw_final = False
        self._side = side

    async def final(self) -> pb.ExecutionEvent:
        """The completed final event; raises StoredFailure if it failed."""
        final = await self._side.wait_for_final(self.record.id)
        return self.checked(final)

    def events(self, after_sequence: int = 0) -> Events:
        """Events after ``after_sequence`` through the final one; then raises
        StoredFailure if that one failed."""
        return Events(self, self._side.watch_call(self, after_sequence))

    def checked(self, final: pb.ExecutionEvent) -> pb.ExecutionEvent:
        self.saw_final = True
        if final.HasField("execution_failed"):
            raise StoredFailure(final.execution_failed.error)
        return final


class Events:
    """A call's events (``Call.events``): an iterator of its own rather than
    an async generator relaying the watch, which would cost every open
    stream a generator frame, an asend object and asyncio's weak reference
    and finalizer."""

    __slots__ = ("_call", "_events", "_final")

    def __init__(self, call: Call, events: AsyncIterator[pb.ExecutionEvent]) -> None:
        self._call = call
        self._events = events
        self._final: pb.ExecutionEvent | None = None

    def __aiter__(self) -> Events:
        return self

    async def __anext__(self) -> pb.ExecutionEvent:
        if self._final is not None:
            # After the final event: its failure, if it failed, else the end.
            self._call.checked(self._final)
        event = await anext(self._events)
        if is_final(event):
            self._call.saw_final = True
            self._final = event
        return event

    async def aclose(self) -> None:
        close = getattr(self._events, "aclose", None)
        if close is not None:
            await close()


class Held:
    """A call's hold on its execution, as ``async with`` (what
    ``Executions.call`` returns): submits on entering and yields the Call;
    on leaving before its final event, cancels the execution if this call
    created it and ``leaving_cancels``. A class, not an asynccontextmanager:
    every open stream holds it (see Call)."""

    __slots__ = ("_call", "_leaving_cancels", "_side", "_submit")

    def __init__(
        self, side: Side, submit: Coroutine[Any, Any, Call], *, leaving_cancels: bool
    ) -> None:
        self._side = side
        self._submit: Coroutine[Any, Any, Call] | None = submit
        self._leaving_cancels = leaving_cancels
        self._call: Call | None = None

    async def __aenter__(self) -> Call:
        submit, self._submit = self._submit, None
        assert submit is not None, "entered twice"
        self._call = await submit
        return self._call

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        call = self._call
        assert call is not None
        if call.created and self._leaving_cancels and not call.saw_final:
            try:
                await self._side.cancel_left(call)
            except Exception:
                logger.exception("cancelling %s after its caller left failed", call.record.id)
