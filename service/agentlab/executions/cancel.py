"""Cancel: stop an execution wherever it runs.

Run here, it is stopped directly; run by another process, the request goes
over the bus, where every process listens (``listen_for_cancels``) and
stops the executions it runs. Either way the caller waits, up to a limit,
for the execution's end to be recorded.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from agentlab.executions.model import ACTIVE_STATES, EventBus, ExecutionState
from agentlab.executions.runs import Runs

__all__ = ["cancel", "listen_for_cancels"]

logger = logging.getLogger(__name__)


async def cancel(
    runs: Runs,
    bus: EventBus,
    state_of: Callable[[str], Awaitable[ExecutionState]],
    execution_id: str,
    wait_s: float,
) -> None:
    """Stop an active execution; return once its end is recorded, or after
    ``wait_s`` seconds."""
    task = runs.stop(execution_id)
    if task is not None:
        await asyncio.wait({task}, timeout=wait_s)
        return
    # Another process runs it: it hears this on the bus.
    await bus.request_cancel(execution_id)
    deadline = asyncio.get_running_loop().time() + wait_s
    while await state_of(execution_id) in ACTIVE_STATES:
        if asyncio.get_running_loop().time() > deadline:
            break
        await asyncio.sleep(0.05)


async def listen_for_cancels(bus: EventBus, runs: Runs, listening: asyncio.Event) -> None:
    """Stop the executions run here that any process is asked to cancel;
    ``listening`` is set once the bus listens (or failed to). Runs until
    cancelled, reconnecting after a failure."""
    while True:
        try:
            async with bus.cancel_requests() as requests:
                listening.set()
                async for execution_id in requests:
                    runs.stop(execution_id)
        except asyncio.CancelledError:
            raise
        except Exception as error:
            listening.set()
            logger.warning("listening for cancel requests failed (%s); retrying", error)
            await asyncio.sleep(1.0)
