"""A watcher whose client lags: the bus cuts it loose, the store serves the rest."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from agentlab.core.ports import Route
from agentlab.core.runner import Runner
from agentlab.core.types import ExecutionMode, Task
from agentlab.executions import watch
from agentlab.executions.local_bus import LocalBus
from agentlab.executions.model import StoredEvent
from agentlab.executions.service import Executions
from agentlab.executions.sqlite_store import SqliteStore
from agentlab.v1 import execution_pb2 as pb
from tests.helpers.labs import InstantLab

# Far more than the bus below holds for one subscriber.
TOKENS = 20


@pytest.mark.parametrize("replay_page", [watch.REPLAY_PAGE, 3])
async def test_a_lagging_stream_gets_every_event_once_from_the_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, replay_page: int
) -> None:
    # The client reads its first event, then nothing while the execution
    # publishes the rest: its subscription (2 events at most) overflows and
    # the bus cuts it loose (SubscriberLagged). The stream must go on from
    # the store, each event once, in order, to the final one.
    bus = LocalBus(max_pending=2)
    store = SqliteStore(tmp_path / "agentlab.db")
    runner = Runner(lambda model: Route(InstantLab(TOKENS)), default_max_tokens=64)
    executions = Executions(runner, store, bus, owner="t", poll_s=0.05)
    # The catch-up reads the store a page at a time, never all at once: a
    # page smaller than the execution takes several reads.
    monkeypatch.setattr(watch, "REPLAY_PAGE", replay_page)
    pages: list[int] = []
    events_after = store.events_after

    async def paged(execution_id: str, after: int, limit: int | None = None) -> list[StoredEvent]:
        page = await events_after(execution_id, after, limit)
        pages.append(len(page))
        return page

    monkeypatch.setattr(store, "events_after", paged)
    await executions.start()
    try:
        task = Task(prompt="go", model="m", mode=ExecutionMode.INFERENCE)

        async def follow() -> list[pb.ExecutionEvent]:
            events: list[pb.ExecutionEvent] = []
            async with executions.call(task, leaving_cancels=True) as call:
                async for event in call.events():
                    events.append(event)
                    if len(events) == 1:
                        await asyncio.wait_for(call.final(), timeout=10.0)
            return events

        events = await asyncio.wait_for(follow(), timeout=10.0)
        # started, node started, the tokens, node finished, completed
        assert [event.sequence for event in events] == list(range(1, TOKENS + 5))
        assert events[-1].HasField("execution_completed")
        assert pages
        assert max(pages) <= replay_page
        if replay_page < TOKENS:
            assert pages.count(replay_page) >= 2, pages
    finally:
        await executions.stop(5.0)
