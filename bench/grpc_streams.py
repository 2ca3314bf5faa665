"""Orchestrate over gRPC at scale (issue 11, goal 4, as services call it):
many streams open at once through Envoy, every one receiving every event,
and the memory the service and Envoy hold for them.

bench/streams.py measures the goal as browsers reach it, Server-Sent Events
with one HTTP/1.1 connection per stream. A service calling the gateway over
gRPC shares a few HTTP/2 connections among its calls instead; what Envoy
holds per stream then differs (no connection, no HTTP/1 codec and no
transcoder of its own: see gateway/envoy.yaml's notes), so this row reports
that case beside the SSE one, with the same stack, plan and checks.

The streams share ``CONNECTIONS`` HTTP/2 connections (one grpc.aio channel
each, with a subchannel of its own: channels to one target otherwise share
one), opened from this process; each is checked for every event: sequences
1..n in order, then ``execution_completed``.

Run alone: ``.venv/bin/python bench/grpc_streams.py [--streams N] [--quick]``;
``make bench`` adds its row to the table (``measure``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import sys
import time
from collections.abc import Sequence
from typing import Any

import grpc
import streams
from table import Row

from agentlab.devstack import Stack
from agentlab.v1 import execution_pb2 as pb
from agentlab.v1 import lab_service_pb2 as svc
from agentlab.v1 import lab_service_pb2_grpc as svc_grpc

PATH = "gRPC Orchestrate streams open at once via Envoy (echo)"
# The HTTP/2 connections the streams share: a handful of calling services.
CONNECTIONS = 10


async def _stream(
    stub: svc_grpc.LabServiceStub,
    request: svc.OrchestrateRequest,
    expected: int,
    tally: streams.Tally,
    connecting: asyncio.Semaphore,
) -> None:
    """One stream: call (holding ``connecting`` until its first event),
    then read its events to the end and check them. Never raises: what went
    wrong is counted in ``tally``."""
    counted_open = False
    sequence = 0
    in_order = True
    final: pb.ExecutionEvent | None = None
    call: Any = None
    try:
        async with connecting:
            start = time.perf_counter()
            call = stub.Orchestrate(request)
            first = await call.read()
        if first is grpc.aio.EOF:
            tally.fail("no event")
            return
        tally.first_event_s.append(time.perf_counter() - start)
        tally.opened += 1
        counted_open = True
        tally.peak_open = max(tally.peak_open, tally.opened)
        response = first
        while response is not grpc.aio.EOF:
            event = response.event
            in_order = in_order and event.sequence == sequence + 1
            sequence = event.sequence
            final = event
            tally.events += 1
            response = await call.read()
        if in_order and sequence == expected and final and final.HasField("execution_completed"):
            tally.complete += 1
        else:
            tally.incomplete += 1
    except grpc.aio.AioRpcError as error:
        tally.fail(error.code().name)
    finally:
        if counted_open:
            tally.opened -= 1
        if call is not None:
            call.cancel()


async def _open_all(stack: Stack, plan: streams.Plan, tally: streams.Tally) -> None:
    request = svc.OrchestrateRequest(
        prompt=" ".join(f"w{i}" for i in range(plan.words)),
        model="echo",
        mode=pb.EXECUTION_MODE_INFERENCE,
    )
    # started, node_started, a token per word, node_finished, completed
    expected = plan.words + 4
    channels = [
        grpc.aio.insecure_channel(
            stack.gateway_grpc, options=[("grpc.use_local_subchannel_pool", 1)]
        )
        for _ in range(CONNECTIONS)
    ]
    try:
        stubs = [svc_grpc.LabServiceStub(channel) for channel in channels]  # type: ignore[no-untyped-call]
        # As for SSE: at most ``ramp`` calls between their start and their
        # first event.
        connecting = asyncio.Semaphore(plan.ramp)
        calls = (
            _stream(stubs[n % CONNECTIONS], request, expected, tally, connecting)
            for n in range(plan.streams)
        )
        await asyncio.wait_for(asyncio.gather(*calls), plan.timeout_s)
    finally:
        for channel in channels:
            await channel.close()


def run(plan: streams.Plan) -> streams.Result:
    """Open ``plan.streams`` gRPC streams through a fresh stack and measure."""
    return streams.run(plan, _open_all)


def row(result: streams.Result) -> Row:
    measured = streams.row(result)
    note = f"{measured.note}; {CONNECTIONS} HTTP/2 connections shared by the streams"
    return dataclasses.replace(measured, path=PATH, note=note)


def measure(quick: bool) -> list[Row]:
    """The row bench/bench.py adds to its table: ``quick`` opens a few
    hundred streams (the parts work), otherwise the goal's 10,000."""
    return [row(run(streams.QUICK if quick else streams.FULL))]


def main(argv: Sequence[str] | None = None) -> int:
    return streams.main(argv, description=__doc__ or "", open_all=_open_all, row=row)


if __name__ == "__main__":
    sys.exit(main())
