"""Serving status, kept once and answered twice: by the standard
grpc.health.v1 service and by the REST health route."""

from __future__ import annotations

from grpc_health.v1 import health, health_pb2

__all__ = ["OVERALL", "Health"]

OVERALL = ""
"""grpc.health.v1's name for the whole server."""

_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class Health:
    def __init__(self, services: list[str]) -> None:
        self.servicer = health.aio.HealthServicer()
        self._services = [OVERALL, *services]
        self._serving: dict[str, bool] = dict.fromkeys(self._services, False)

    async def set_serving(self, serving: bool) -> None:
        for service in self._services:
            await self.set(service, serving)

    async def set(self, service: str, serving: bool) -> None:
        self._serving[service] = serving
        await self.servicer.set(service, _SERVING if serving else _NOT_SERVING)

    def serving(self, service: str = OVERALL) -> bool | None:
        """Whether the service is serving; None for a name not known."""
        return self._serving.get(service)
