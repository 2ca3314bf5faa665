"""Which lab serves which model name."""

from __future__ import annotations

import asyncio

from agentlab.core.errors import LabUnavailable
from agentlab.core.types import ModelInfo
from agentlab.lab.base import Lab

__all__ = ["ANY_MODEL", "LabRegistry"]

ANY_MODEL = "*"


class LabRegistry:
    """Routes model names to labs: a few reserved names (such as "echo") to
    their own lab, every other name to the default lab."""

    def __init__(self, default: Lab, named: dict[str, Lab] | None = None) -> None:
        self._default = default
        self._named = dict(named or {})

    @property
    def labs(self) -> list[Lab]:
        return [self._default, *self._named.values()]

    def route(self, model: str) -> Lab:
        lab = self._named.get(model, self._default)
        if not lab.ready:
            raise LabUnavailable(lab.backend, "the lab is starting or stopping; retry shortly")
        return lab

    def models(self) -> list[ModelInfo]:
        default = ModelInfo(
            name=ANY_MODEL,
            backend=self._default.backend,
            backend_model=self._default.model_name,
            ready=self._default.ready,
            description="every model name not listed here",
        )
        named = [
            ModelInfo(
                name=name,
                backend=lab.backend,
                backend_model=lab.model_name,
                ready=lab.ready,
                description=f"served by the {lab.backend} backend",
            )
            for name, lab in self._named.items()
        ]
        return [*named, default]

    async def start(self) -> None:
        await asyncio.gather(*(lab.start() for lab in self.labs))

    async def close(self) -> None:
        await asyncio.gather(*(lab.close() for lab in self.labs), return_exceptions=True)
