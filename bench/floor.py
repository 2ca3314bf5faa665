"""The floor of the REST paths: what Envoy's transcoder and a Python grpc.aio
server cost when the server does nothing else.

A LabService whose Execute answers at once with the shape the echo backend
gives (the prompt as output, one "inference" step, metrics), and whose
Orchestrate streams the events the echo backend's inference gives (started,
node started, a token per word, node finished, completed), with no store, no
admission, no lab and no interceptors, behind the same Envoy config as the
service. The peer table's floor rows load it with wrk like the real service
(and time its first token the same way): the gap between a floor row and the
peer is what the stack alone costs (Envoy's hop, its transcoder, HTTP/2,
grpc.aio's per-call and per-message work), which no change inside the service
can win back; the gap between the floor and ours is the service's own work.

Run as ``python bench/floor.py PORT`` (FloorServer does).
"""

from __future__ import annotations

import asyncio
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
from server_process import ServerProcess

from agentlab.v1 import execution_pb2, lab_service_pb2, lab_service_pb2_grpc

__all__ = ["FloorServer"]


def _result(
    execution_id: str, prompt: str, output: str, model: str, words: int, start: float
) -> tuple[execution_pb2.FlowStep, execution_pb2.ExecuteResponse]:
    """The step and the response the echo backend's inference ends with."""
    metrics = execution_pb2.Metrics(
        latency_ms=(time.perf_counter() - start) * 1000,
        completion_tokens=words,
        backend="echo",
        model="echo",
        requested_model=model,
    )
    step = execution_pb2.FlowStep(
        node="inference",
        status=execution_pb2.STEP_STATUS_SUCCEEDED,
        input=prompt,
        output=output,
        metrics=metrics,
    )
    response = execution_pb2.ExecuteResponse(
        execution_id=execution_id,
        output=output,
        flow=[step],
        metrics=metrics,
        state=execution_pb2.EXECUTION_STATE_SUCCEEDED,
    )
    return step, response


class _Floor(lab_service_pb2_grpc.LabServiceServicer):
    async def Execute(
        self, request: lab_service_pb2.ExecuteRequest, context: grpc.aio.ServicerContext
    ) -> execution_pb2.ExecuteResponse:
        start = time.perf_counter()
        words = len(request.prompt.split())
        _, response = _result(
            uuid.uuid4().hex, request.prompt, request.prompt, request.model, words, start
        )
        return response

    async def Orchestrate(
        self, request: lab_service_pb2.OrchestrateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[lab_service_pb2.OrchestrateResponse]:
        start, execution_id = time.perf_counter(), uuid.uuid4().hex
        words = request.prompt.split()
        output = " ".join(words)
        step, response = _result(
            execution_id, request.prompt, output, request.model, len(words), start
        )
        Event = execution_pb2.ExecutionEvent
        events = [
            Event(
                execution_started=execution_pb2.ExecutionStarted(
                    mode=request.mode, requested_model=request.model
                )
            ),
            Event(node_started=execution_pb2.NodeStarted(node="inference", input=request.prompt)),
            *(
                Event(token_delta=execution_pb2.TokenDelta(node="inference", text=word + " "))
                for word in words
            ),
            Event(node_finished=execution_pb2.NodeFinished(step=step)),
            Event(execution_completed=execution_pb2.ExecutionCompleted(result=response)),
        ]
        for sequence, event in enumerate(events, 1):
            event.sequence, event.execution_id = sequence, execution_id
            event.time.GetCurrentTime()
            yield lab_service_pb2.OrchestrateResponse(event=event)


async def _serve(port: int) -> None:
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    lab_service_pb2_grpc.add_LabServiceServicer_to_server(_Floor(), server)  # type: ignore[no-untyped-call]
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


class FloorServer(ServerProcess):
    """``with FloorServer(log) as floor:`` serves the floor on ``floor.port``
    (127.0.0.1), one process (``floor.pid``)."""

    name = "the floor server"

    def command(self) -> list[str]:
        return [sys.executable, str(Path(__file__)), str(self.port)]

    def ready(self) -> bool:
        with grpc.insecure_channel(f"127.0.0.1:{self.port}") as channel:
            try:
                grpc.channel_ready_future(channel).result(timeout=0.5)
            except grpc.FutureTimeoutError:
                return False
        return True


if __name__ == "__main__":
    asyncio.run(_serve(int(sys.argv[1])))
