"""The floor of the REST Execute path: what Envoy's transcoder and a Python
grpc.aio server cost when the server does nothing else.

A LabService whose Execute answers at once with the shape the echo backend
gives (the prompt as output, one "inference" step, metrics), with no store,
no admission, no lab and no interceptors, behind the same Envoy config as the
service. The peer table's floor row loads it with wrk like the real service:
the gap between this row and the peer is what the stack alone costs (Envoy's
hop, HTTP/2, grpc.aio's per-call work), which no change inside the service can
win back; the gap between this row and ours is the service's own work.

Run as ``python bench/floor.py PORT`` (FloorServer does).
"""

from __future__ import annotations

import asyncio
import sys
import time
import uuid
from pathlib import Path

import grpc
from server_process import ServerProcess

from agentlab.v1 import execution_pb2, lab_service_pb2, lab_service_pb2_grpc

__all__ = ["FloorServer"]


class _Floor(lab_service_pb2_grpc.LabServiceServicer):
    async def Execute(
        self, request: lab_service_pb2.ExecuteRequest, context: grpc.aio.ServicerContext
    ) -> execution_pb2.ExecuteResponse:
        start = time.perf_counter()
        words = len(request.prompt.split())
        metrics = execution_pb2.Metrics(
            latency_ms=(time.perf_counter() - start) * 1000,
            completion_tokens=words,
            backend="echo",
            model="echo",
            requested_model=request.model,
        )
        step = execution_pb2.FlowStep(
            node="inference",
            status=execution_pb2.STEP_STATUS_SUCCEEDED,
            input=request.prompt,
            output=request.prompt,
            metrics=metrics,
        )
        return execution_pb2.ExecuteResponse(
            execution_id=uuid.uuid4().hex,
            output=request.prompt,
            flow=[step],
            metrics=metrics,
            state=execution_pb2.EXECUTION_STATE_SUCCEEDED,
        )


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
