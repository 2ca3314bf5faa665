"""Client: the AsyncClient's calls for code without an event loop.

It runs one AsyncClient on an event loop of its own, in a daemon thread, so
the retries and stream resumption are the same code as the async client's.

    with Client("localhost:8000") as lab:
        print(lab.execute("Name a fruit.", model="echo").output)
        for event in lab.orchestrate("Name a fruit.", model="echo"):
            ...
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Coroutine, Iterator, Sequence
from types import TracebackType
from typing import Any, TypeVar

from agentlab.client.aio import AsyncClient
from agentlab.client.retries import OnRetry, RetryPolicy
from agentlab.v1 import execution_pb2 as pb
from agentlab.v1 import lab_service_pb2 as svc

__all__ = ["Client"]

_T = TypeVar("_T")


class Client:
    """The same arguments, methods and errors as AsyncClient, blocking."""

    def __init__(
        self,
        target: str | None = None,
        *,
        api_key: str | None = None,
        timeout_s: float | None = 60.0,
        retry: RetryPolicy | None = None,
        on_retry: OnRetry | None = None,
    ) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="agentlab-client", daemon=True
        )
        self._thread.start()

        async def make() -> AsyncClient:
            # grpc.aio binds a channel to the loop that creates it.
            return AsyncClient(
                target, api_key=api_key, timeout_s=timeout_s, retry=retry, on_retry=on_retry
            )

        self._client = self._run(make())
        self.target = self._client.target

    def _run(self, work: Coroutine[Any, Any, _T]) -> _T:
        return asyncio.run_coroutine_threadsafe(work, self._loop).result()

    def _iterate(self, events: AsyncIterator[_T]) -> Iterator[_T]:
        try:
            while True:
                try:
                    yield self._run(_next(events))
                except StopAsyncIteration:
                    return
        finally:
            aclose = getattr(events, "aclose", None)
            if aclose is not None:
                self._run(aclose())

    def close(self) -> None:
        if self._loop.is_closed():
            return
        self._run(self._client.close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def execute(self, prompt: str, **options: Any) -> pb.ExecuteResponse:
        """AsyncClient.execute."""
        return self._run(self._client.execute(prompt, **options))

    def orchestrate(self, prompt: str, **options: Any) -> Iterator[pb.ExecutionEvent]:
        """AsyncClient.orchestrate: events through the final one, resumed after a drop."""
        return self._iterate(self._client.orchestrate(prompt, **options))

    def watch(self, execution_id: str, *, after_sequence: int = 0) -> Iterator[pb.ExecutionEvent]:
        """AsyncClient.watch."""
        return self._iterate(self._client.watch(execution_id, after_sequence=after_sequence))

    def list_models(self, **options: Any) -> list[svc.Model]:
        return self._run(self._client.list_models(**options))

    def health(self, service: str = "", **options: Any) -> svc.GetHealthResponse:
        return self._run(self._client.health(service, **options))

    def get_execution(self, execution_id: str, **options: Any) -> pb.Execution:
        return self._run(self._client.get_execution(execution_id, **options))

    def list_executions(self, **options: Any) -> svc.ListExecutionsResponse:
        return self._run(self._client.list_executions(**options))

    def iter_executions(self, **options: Any) -> Iterator[pb.Execution]:
        return self._iterate(self._client.iter_executions(**options))

    def cancel_execution(self, execution_id: str, **options: Any) -> pb.Execution:
        return self._run(self._client.cancel_execution(execution_id, **options))

    def replay_execution(self, execution_id: str, **options: Any) -> pb.Execution:
        """AsyncClient.replay_execution: the replay's record (a failed replay
        is a FAILED record, not an error); retried only with a request_id."""
        return self._run(self._client.replay_execution(execution_id, **options))

    def compare_executions(
        self, execution_ids: Sequence[str], **options: Any
    ) -> svc.CompareExecutionsResponse:
        """AsyncClient.compare_executions: each execution and node against
        the first id's (diffs, metric deltas in ms and tokens/s)."""
        return self._run(self._client.compare_executions(execution_ids, **options))


async def _next(events: AsyncIterator[_T]) -> _T:
    return await anext(events)
