"""Heartbeats and recovery: a process says on a heartbeat that it still runs
its executions; when an owner falls silent for longer than the lease (it
was killed), any process takes over its executions. Queued background ones
are run; running ones are failed with a reason, their flow kept.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime, timedelta

from agentlab.core.runner import Runner
from agentlab.core.types import ExecutionMode, GenerationOptions, Task
from agentlab.executions import codec
from agentlab.executions.model import EventBus, ExecutionRecord, ExecutionState, ExecutionStore
from agentlab.executions.runs import Runs
from agentlab.executions.writer import record_end

__all__ = ["Recovery", "task_of"]

logger = logging.getLogger(__name__)


class Recovery:
    def __init__(
        self,
        runner: Runner,
        store: ExecutionStore,
        bus: EventBus,
        runs: Runs,
        *,
        owner: str,
        heartbeat_s: float,
        lease_s: float,
    ) -> None:
        self._runner = runner
        self._store = store
        self._bus = bus
        self._runs = runs
        self._owner = owner
        self._heartbeat_s = heartbeat_s
        self._lease_s = lease_s

    async def keep_alive(self) -> None:
        """Every ``heartbeat_s``: say this owner is alive, and take over
        what silent owners left. Runs until cancelled."""
        while True:
            await asyncio.sleep(self._heartbeat_s)
            try:
                await self._store.heartbeat(self._owner, datetime.now(UTC))
                await self.recover()
            except Exception:
                logger.exception("the executions heartbeat failed")

    async def recover(self) -> None:
        """Take over the executions of owners that fell silent."""
        now = datetime.now(UTC)
        stale_before = now - timedelta(seconds=self._lease_s)
        for record in await self._store.stale(stale_before):
            if not await self._store.claim(record.id, self._owner, stale_before, now):
                continue  # another process took it
            if record.state is ExecutionState.QUEUED and record.background:
                logger.info("running queued execution %s left by %s", record.id, record.owner)
                try:
                    prepared = self._runner.prepare(task_of(record))
                except Exception:
                    # The routing file dropped its model since: it stays
                    # QUEUED, as it would have before a turn.
                    logger.exception("execution %s cannot be run here", record.id)
                    continue
                self._runs.launch(record.id, prepared, background=True)
            else:
                logger.warning("execution %s was cut: %s stopped", record.id, record.owner)
                await self._fail_orphan(record)

    async def _fail_orphan(self, record: ExecutionRecord) -> None:
        steps = codec.finished_steps(await self._store.events_after(record.id, 0))
        final = codec.cut_short(record.id, record.last_sequence + 1, record.owner, steps)
        await record_end(self._store, self._bus, record.id, final)


def task_of(record: ExecutionRecord) -> Task:
    """The task a record was made for, as it was submitted."""
    options = record.options
    temperature = options.get("temperature")
    max_tokens = options.get("max_tokens")
    seed = options.get("seed")
    return Task(
        prompt=record.prompt,
        model=record.model,
        mode=ExecutionMode(record.mode),
        options=GenerationOptions(
            temperature=None if temperature is None else float(temperature),
            max_tokens=None if max_tokens is None else int(max_tokens),
            seed=None if seed is None else int(seed),
        ),
    )
