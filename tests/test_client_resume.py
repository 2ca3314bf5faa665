"""Streams that survive a drop, through the real stack: Envoy restarted in
the middle of an orchestration, and the connection to the service cut in
the middle of a watch. The client resumes with WatchExecution after the last
sequence it saw, and yields every event exactly once: the same events, in
the same order, as a replay of the stored execution."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from agentlab.client import AsyncClient, Retry, RetryPolicy
from agentlab.devstack import Stack, free_port
from agentlab.v1 import execution_pb2 as pb
from tests.helpers.stacks import StackFactory

# Long enough to cut: about 250 words at 20 ms each, over three nodes.
PROMPT = " ".join(f"word{n}" for n in range(60))
# Envoy takes a moment to come back on a busy machine: retry often, briefly.
PATIENT = RetryPolicy(max_attempts=40, initial_backoff_s=0.05, max_backoff_s=0.5)


@pytest.fixture(scope="module")
def stack(start_module_stack: StackFactory) -> Stack:
    return start_module_stack(
        {"AGENTLAB_DEFAULT_BACKEND": "echo", "AGENTLAB_ECHO_TOKEN_DELAY_S": "0.02"}
    )


class CuttableProxy:
    """A TCP proxy to ``upstream`` whose open connections ``cut()`` drops,
    as a network does: the listener stays, so the client can reconnect.
    Between ``hold()`` and ``release()``, what the upstream sends after its first chunk (the
    HTTP/2 preface, which a gRPC client awaits before it sends the request)
    is kept back, and lost if cut: the request arrives, no answer does."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.port = free_port()
        self._released = asyncio.Event()
        self._released.set()
        self._writers: list[asyncio.StreamWriter] = []
        self._handlers: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)

    async def stop(self) -> None:
        self.cut()
        self.release()
        if self._server is not None:
            self._server.close()
        for handler in self._handlers:
            handler.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    def hold(self) -> None:
        self._released.clear()

    def release(self) -> None:
        self._released.set()

    def cut(self) -> None:
        for writer in self._writers:
            writer.transport.abort()
        self._writers.clear()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        handler = asyncio.current_task()
        assert handler is not None
        self._handlers.add(handler)
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        self._writers += [writer, up_writer]
        await asyncio.gather(
            self._pipe(reader, up_writer, held=False),
            self._pipe(up_reader, writer, held=True),
            return_exceptions=True,
        )

    async def _pipe(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, held: bool
    ) -> None:
        chunks = 0
        try:
            while data := await reader.read(65536):
                chunks += 1
                if held and chunks > 1:
                    await self._released.wait()
                writer.write(data)
                await writer.drain()
        finally:
            writer.transport.abort()


@pytest.fixture
async def proxy(stack: Stack) -> AsyncIterator[CuttableProxy]:
    cuttable = CuttableProxy(stack.service.port)
    await cuttable.start()
    yield cuttable
    await cuttable.stop()


async def stored_events(stack: Stack, execution_id: str) -> list[pb.ExecutionEvent]:
    async with AsyncClient(stack.gateway_grpc) as lab:
        return [event async for event in lab.watch(execution_id)]


def assert_exactly_once(seen: list[pb.ExecutionEvent], stored: list[pb.ExecutionEvent]) -> None:
    assert [e.sequence for e in seen] == list(range(1, len(seen) + 1))
    assert seen[-1].WhichOneof("kind") == "execution_completed"
    assert seen == stored


@pytest.mark.timeout(120)
async def test_orchestrate_resumes_after_envoy_restarts(stack: Stack) -> None:
    retries: list[Retry] = []
    seen: list[pb.ExecutionEvent] = []
    async with AsyncClient(stack.gateway_grpc, retry=PATIENT, on_retry=retries.append) as lab:
        async for event in lab.orchestrate(PROMPT, model="echo"):
            seen.append(event)
            if len(seen) == 10:
                await asyncio.to_thread(stack.envoy.stop)
                await asyncio.to_thread(stack.envoy.start)

    assert retries, "the stream was never cut: the test proves nothing"
    assert {r.method for r in retries} == {"Orchestrate"}
    assert_exactly_once(seen, await stored_events(stack, seen[0].execution_id))


@pytest.mark.timeout(120)
async def test_watch_resumes_after_its_connection_is_cut(
    stack: Stack, proxy: CuttableProxy
) -> None:
    retries: list[Retry] = []
    seen: list[pb.ExecutionEvent] = []
    async with AsyncClient(
        f"127.0.0.1:{proxy.port}", retry=PATIENT, on_retry=retries.append
    ) as lab:
        accepted = await lab.execute(
            PROMPT, model="echo", mode=pb.EXECUTION_MODE_ORCHESTRATION, background=True
        )
        async for event in lab.watch(accepted.execution_id):
            seen.append(event)
            if len(seen) in (5, 40):  # twice
                proxy.cut()

    assert len(retries) >= 2, "the stream was not cut twice"
    assert_exactly_once(seen, await stored_events(stack, accepted.execution_id))


@pytest.mark.timeout(120)
async def test_orchestrate_cut_before_its_first_event_attaches_with_its_key(
    stack: Stack, proxy: CuttableProxy
) -> None:
    """A drop before any event names the execution: the call is made again
    with the same key, which attaches to the execution rather than starting
    another."""
    key = "resume-before-first-event"
    retries: list[Retry] = []
    seen: list[pb.ExecutionEvent] = []
    async with (
        AsyncClient(f"127.0.0.1:{proxy.port}", retry=PATIENT, on_retry=retries.append) as lab,
        AsyncClient(stack.gateway_grpc) as observer,
    ):
        proxy.hold()
        stream = lab.orchestrate(PROMPT, model="echo", request_id=key)
        first = asyncio.ensure_future(anext(stream))
        # The service has the call (its execution is recorded) and the
        # client no event of it: then the connection goes.
        for _ in range(200):
            listed = (await observer.list_executions(page_size=100)).executions
            if key in [e.request_id for e in listed]:
                break
            await asyncio.sleep(0.05)
        else:
            pytest.fail("the held call never reached the service")
        proxy.cut()
        proxy.release()
        seen.append(await first)
        seen += [event async for event in stream]

        executions = (await observer.list_executions(page_size=100)).executions
    assert retries, "the stream was never cut: the test proves nothing"
    assert [e.request_id for e in executions].count(key) == 1
    assert_exactly_once(seen, await stored_events(stack, seen[0].execution_id))
