"""Which backend serves which model name, and whether it is reachable now."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from dataclasses import dataclass

from agentlab.core.errors import AgentLabError, LabUnavailable, ModelNotFound
from agentlab.core.ports import Lab, Route
from agentlab.core.types import ModelInfo
from agentlab.lab.base import Backend
from agentlab.routing import RESERVED, ModelRoute

__all__ = ["ANY_MODEL", "BackendState", "LabRegistry"]

logger = logging.getLogger(__name__)

ANY_MODEL = "*"
"""The route name that catches every model name not configured."""


@dataclass(frozen=True)
class BackendState:
    reachable: bool
    detail: str = ""


class LabRegistry:
    """Routes model names to labs. With a catch-all route every name is served
    (the embedded default); without one, an unknown name is NOT_FOUND."""

    def __init__(self, backends: Mapping[str, Backend], routes: Mapping[str, ModelRoute]) -> None:
        for route in routes.values():
            if route.backend not in backends:
                raise ValueError(f"model {route.name!r} routes to unknown backend {route.backend}")
        self._backends = dict(backends)
        self._routes = dict(routes)
        # One lab per (backend, model): routes that share both share the lab.
        self._labs: dict[tuple[str, str], Lab] = {}
        for route in self._routes.values():
            key = (route.backend, route.backend_model)
            if key not in self._labs:
                self._labs[key] = self._backends[route.backend].lab(route.backend_model)
        self._states = {name: BackendState(False, "not checked yet") for name in self._backends}

    @classmethod
    def serving_everything(cls, backend: Backend, **named: Backend) -> LabRegistry:
        """``backend`` for every model name; each of ``named`` for its own name."""
        backends = {backend.name: backend, **{b.name: b for b in named.values()}}
        routes = {
            ANY_MODEL: ModelRoute(
                ANY_MODEL, backend.name, ANY_MODEL, description="every other model name"
            ),
            **{
                name: ModelRoute(name, b.name, name, description=f"served by {b.name}")
                for name, b in named.items()
            },
        }
        return cls(backends, routes)

    @property
    def backends(self) -> list[Backend]:
        return list(self._backends.values())

    def route(self, model: str) -> Route:
        config = self._routes.get(model) or self._routes.get(ANY_MODEL)
        if config is None:
            raise ModelNotFound(model, sorted(self._routes))
        lab = self._labs[(config.backend, config.backend_model)]
        if not lab.ready:
            raise LabUnavailable(config.backend, "the lab is starting or stopping; retry shortly")
        return Route(lab, config.defaults, config.timeout_s)

    def state(self, backend: str) -> BackendState:
        return self._states[backend]

    def serving(self) -> bool:
        """Whether the gateway as a whole serves: while any backend of a model
        other than the reserved echo is reachable. Echo, always reachable,
        would otherwise keep a gateway whose every real backend is down
        serving; where it is all there is, it counts."""
        real = {r.backend for name, r in self._routes.items() if name != RESERVED}
        return any(self._states[name].reachable for name in real or self._backends)

    def models(self) -> list[ModelInfo]:
        """Configured names first, the catch-all last."""
        ordered = sorted(self._routes.values(), key=lambda r: (r.name == ANY_MODEL, r.name))
        return [
            ModelInfo(
                name=route.name,
                backend=route.backend,
                backend_model=self._labs[(route.backend, route.backend_model)].model_name,
                ready=self._states[route.backend].reachable,
                description=route.description,
            )
            for route in ordered
        ]

    async def check(self, timeout_s: float = 5.0) -> dict[str, BackendState]:
        """Ask every backend whether it is reachable, all at once; remember
        and return the answers."""

        async def one(backend: Backend) -> BackendState:
            try:
                async with asyncio.timeout(timeout_s):
                    await backend.check()
            except TimeoutError:
                return BackendState(False, f"no answer within {timeout_s:g} s")
            except AgentLabError as error:
                return BackendState(False, error.message)
            except Exception as error:  # a probe must never kill the monitor
                logger.exception("checking backend %s failed", backend.name)
                return BackendState(False, repr(error))
            return BackendState(True)

        answers = await asyncio.gather(*(one(b) for b in self._backends.values()))
        for backend, state in zip(self._backends.values(), answers, strict=True):
            before = self._states[backend.name]
            if before.reachable != state.reachable:
                log = logger.info if state.reachable else logger.warning
                log(
                    "backend %s (%s%s) is %s",
                    backend.name,
                    backend.kind,
                    f" at {backend.address}" if backend.address else "",
                    "reachable" if state.reachable else f"unreachable: {state.detail}",
                )
            self._states[backend.name] = state
        return dict(self._states)

    async def start(self) -> None:
        """Backends first (their connection pools), then the labs routed to
        (loading a local model), then a first health check."""
        await asyncio.gather(*(backend.start() for backend in self._backends.values()))
        await asyncio.gather(*(lab.start() for lab in self._distinct_labs()))
        await self.check()

    async def close(self) -> None:
        await asyncio.gather(
            *(lab.close() for lab in self._distinct_labs()), return_exceptions=True
        )
        await asyncio.gather(
            *(backend.close() for backend in self._backends.values()), return_exceptions=True
        )

    def _distinct_labs(self) -> list[Lab]:
        # A local backend hands every model name the same lab: load it once.
        return list({id(lab): lab for lab in self._labs.values()}.values())
