"""Admission and limits: how many executions this process takes on, and
their turns at the lab.

A process runs at most ``max_running`` executions' lab work at once; up to
``max_queued`` more wait for a turn (their records QUEUED). Beyond both,
``admit`` refuses with ResourceExhausted before anything is recorded.
Executions taken over from a dead process are recorded already: they are
counted, never refused.
"""

from __future__ import annotations

import asyncio

from agentlab.core.errors import ResourceExhausted
from agentlab.core.runner import Stop
from agentlab.metrics import record as metrics

__all__ = ["Admission"]


class Admission:
    def __init__(self, *, max_running: int, max_queued: int, retry_after_s: float) -> None:
        self._max_running = max_running
        self._max_queued = max_queued
        self._retry_after_s = retry_after_s
        # Turns at the lab; an execution waits for one while QUEUED.
        self._turns = asyncio.Semaphore(max_running)
        # Executions admitted here and not finished: running, waiting for a
        # turn, or being recorded (counted before the store is awaited, so
        # concurrent submits cannot overshoot).
        self._admitted = 0
        self.waiting: set[str] = set()
        """The executions waiting for a turn."""
        self.running = 0
        """The executions holding a turn."""

    def admit(self) -> None:
        """Count one more execution, or raise ResourceExhausted when the
        running and the queued are at their limits."""
        if self._admitted >= self._max_running + self._max_queued:
            metrics.rejected(ResourceExhausted.reason)
            raise ResourceExhausted(self._max_running, self._max_queued, self._retry_after_s)
        self._admitted += 1

    def count(self) -> None:
        """Count an execution that may not be refused (one taken over)."""
        self._admitted += 1

    def release(self) -> None:
        """An admitted execution finished, or was never recorded."""
        self._admitted -= 1

    def turn(self, execution_id: str, stop: Stop) -> _Turn:
        """``async with``: wait (QUEUED) for a turn at the lab, and hold it
        while running; yields False when a stop (a cancel, the shutdown) came
        first."""
        return _Turn(self, execution_id, stop)


class _Turn:
    """Admission.turn's context: a class rather than an asynccontextmanager,
    whose generator every running execution would hold (issue 11)."""

    __slots__ = ("_acquired", "_admission", "_execution_id", "_stop")

    def __init__(self, admission: Admission, execution_id: str, stop: Stop) -> None:
        self._admission = admission
        self._execution_id = execution_id
        self._stop = stop
        self._acquired = False

    async def __aenter__(self) -> bool:
        admission, stop = self._admission, self._stop
        waiting = asyncio.timeout(None)
        admission.waiting.add(self._execution_id)
        try:
            async with waiting:
                stop.attach(waiting)
                await admission._turns.acquire()
                self._acquired = True
        except TimeoutError:
            if not stop.requested:
                raise
        finally:
            stop.detach()
            admission.waiting.discard(self._execution_id)
        if self._acquired:
            admission.running += 1
        return self._acquired

    async def __aexit__(self, *_: object) -> None:
        if self._acquired:
            self._acquired = False
            self._admission.running -= 1
            self._admission._turns.release()
