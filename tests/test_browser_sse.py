"""A browser's EventSource resumes a cut stream with every event once.

Headless Chromium runs an EventSource from a page on another origin; a TCP
proxy between it and Envoy cuts the first connection right after the event
with id CUT_AFTER. The browser reconnects by itself, sending Last-Event-ID,
and the page must end with events 1..final, each once, from one execution.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlencode

import httpx
import pytest

from agentlab.devstack import Stack, free_port
from tests.helpers.browser import chromium_page
from tests.helpers.stacks import StackFactory

CUT_AFTER = 4
# Forty words at 50 ms each: a stream of ~2 s, long enough to cut mid-way.
PROMPT = " ".join(f"word{i}" for i in range(40))


@pytest.fixture
def slow_echo_stack(start_stack: StackFactory) -> Stack:
    return start_stack({"AGENTLAB_DEFAULT_BACKEND": "echo", "AGENTLAB_ECHO_TOKEN_DELAY_S": "0.05"})


class CuttingProxy:
    """Forwards TCP to the gateway. The first connection forwards nothing
    past the complete event with id ``cut_after``, and is ended once
    ``release`` is set (the test sets it when the page has dispatched that
    event: Chromium can drop what arrives together with the end of a
    connection). Keeps what each connection sent upstream (its requests)."""

    def __init__(self, upstream_port: int, cut_after: int) -> None:
        self.upstream_port = upstream_port
        self.port = free_port()
        self.requests: list[bytearray] = []
        self.cut = False
        self.release = asyncio.Event()
        self._cut_pattern = re.compile(rb"(?:^|\n)id: %d\n.*?\n\n" % cut_after, re.S)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _pipe_up(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, sent: bytearray
    ) -> None:
        while data := await reader.read(65536):
            sent += data
            writer.write(data)
            await writer.drain()
        writer.close()

    async def _pipe_down(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, cut_here: bool
    ) -> None:
        seen, forwarded = bytearray(), 0
        while data := await reader.read(65536):
            seen += data
            if cut_here and (match := self._cut_pattern.search(seen)):
                writer.write(bytes(seen[forwarded : match.end()]))
                await writer.drain()
                self.cut = True
                return  # the caller closes both sides
            writer.write(bytes(seen[forwarded:]))
            forwarded = len(seen)
            await writer.drain()

    async def _serve(
        self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter
    ) -> None:
        cut_here = not self.requests
        sent = bytearray()
        self.requests.append(sent)
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        up = asyncio.create_task(self._pipe_up(client_reader, up_writer, sent))
        try:
            await self._pipe_down(up_reader, client_writer, cut_here)
            if self.cut and cut_here:
                await self.release.wait()
        except ConnectionError:
            pass
        finally:
            up.cancel()
            with contextlib.suppress(asyncio.CancelledError, ConnectionError):
                await up
            for writer in (client_writer, up_writer):
                writer.close()

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[CuttingProxy]:
        server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        async with server:
            yield self


# Collects every event the EventSource dispatches; closes it on the final
# one (else it would reconnect once the stream ends).
_EVENT_SOURCE = """
url => new Promise(resolve => {
  window.received = [];
  window.opens = 0;
  const source = new EventSource(url);
  source.onopen = () => { window.opens += 1; };
  source.onmessage = message => {
    const event = JSON.parse(message.data).event;
    window.received.push({id: message.lastEventId, sequence: event.sequence,
                          connection: window.opens,
                          execution_id: event.execution_id,
                          final: Boolean(event.execution_completed || event.execution_failed),
                          completed: Boolean(event.execution_completed)});
    if (event.execution_completed || event.execution_failed) {
      source.close();
      resolve();
    }
  };
})
"""


async def _run_event_source(url: str, proxy: CuttingProxy) -> tuple[list[dict[str, Any]], int]:
    async with chromium_page() as page:
        finished = asyncio.ensure_future(page.evaluate(_EVENT_SOURCE, url))
        await page.wait_for_function(
            f"window.received && window.received.length >= {CUT_AFTER}", timeout=60_000
        )
        proxy.release.set()
        await asyncio.wait_for(finished, timeout=90)
        received: list[dict[str, Any]] = await page.evaluate("window.received")
        opens: int = await page.evaluate("window.opens")
    return received, opens


def _assert_every_event_once(received: list[dict[str, Any]], proxy: CuttingProxy) -> None:
    sequences = [event["sequence"] for event in received]
    assert sequences == list(range(1, len(received) + 1)), sequences
    assert len(received) > CUT_AFTER + 10, "the stream was not cut mid-way"
    assert received[-1]["completed"]
    assert [event["id"] for event in received] == [str(s) for s in sequences]
    assert len({event["execution_id"] for event in received}) == 1
    assert proxy.cut, "the proxy never cut the first connection"
    # The browser reconnected by itself, saying where it stopped, and the rest
    # came on the new connection.
    later = b"".join(bytes(r) for r in proxy.requests[1:]).lower()
    found = [int(n) for n in re.findall(rb"\r\nlast-event-id: *(\d+)\r\n", later)]
    assert len(found) == 1, [bytes(r) for r in proxy.requests]
    [resumed_after] = found
    assert resumed_after == CUT_AFTER
    before = [e["sequence"] for e in received if e["connection"] == 1]
    after = [e["sequence"] for e in received if e["connection"] == 2]
    assert before == list(range(1, resumed_after + 1))
    assert after[0] == resumed_after + 1


async def test_an_orchestrate_stream_with_a_request_id_resumes_in_the_browser(
    slow_echo_stack: Stack,
) -> None:
    proxy = CuttingProxy(slow_echo_stack.envoy.ports.gateway, CUT_AFTER)
    query = urlencode(
        {
            "prompt": PROMPT,
            "model": "echo",
            "mode": "EXECUTION_MODE_INFERENCE",
            "request_id": "browser-resume-1",
        }
    )
    async with proxy.running():
        received, opens = await _run_event_source(f"{proxy.url}/api/v1/orchestrate?{query}", proxy)

    _assert_every_event_once(received, proxy)
    assert opens == 2
    async with httpx.AsyncClient(base_url=slow_echo_stack.url, timeout=30) as client:
        listed = (await client.get("/api/v1/executions", params={"page_size": 100})).json()
    keyed = [e for e in listed["executions"] if e["request_id"] == "browser-resume-1"]
    assert len(keyed) == 1, "the reconnect started a second execution"
    assert keyed[0]["execution_id"] == received[0]["execution_id"]
    assert keyed[0]["state"] == "EXECUTION_STATE_SUCCEEDED"


async def test_a_watch_stream_resumes_in_the_browser(slow_echo_stack: Stack) -> None:
    async with httpx.AsyncClient(base_url=slow_echo_stack.url, timeout=30) as client:
        started = await client.post(
            "/api/v1/execute",
            json={"prompt": PROMPT, "model": "echo", "background": True},
        )
    assert started.status_code == 200, started.text
    execution_id = started.json()["execution_id"]

    proxy = CuttingProxy(slow_echo_stack.envoy.ports.gateway, CUT_AFTER)
    async with proxy.running():
        received, opens = await _run_event_source(
            f"{proxy.url}/api/v1/executions/{execution_id}:watch", proxy
        )

    _assert_every_event_once(received, proxy)
    assert opens == 2
    assert received[0]["execution_id"] == execution_id
