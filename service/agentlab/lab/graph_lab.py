"""The lab as a graph run in this process, on any ChatModel.

Inference is one model call; orchestration is the LangGraph graph of
``agentlab.lab.graph``. Both run on one ``ChatModel``, wherever the model
itself runs: llama.cpp in this process, echo, Ollama or an OpenAI-compatible
server.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from contextlib import aclosing
from typing import Any

from agentlab.core.ports import LabEvent, LabOutput
from agentlab.core.types import ExecutionMode, Task
from agentlab.lab.base import ChatMessage, ChatModel
from agentlab.lab.graph import build_graph, model_node

__all__ = ["GraphLab"]

_INFERENCE_NODE = "inference"


class GraphLab:
    """Runs a task as the lab's graph on one ChatModel: the embedded model,
    echo, or a remote model of Ollama or an OpenAI-compatible server."""

    def __init__(self, model: ChatModel) -> None:
        self._model = model
        self._graph = build_graph(model)
        self._ready = False

    @property
    def backend(self) -> str:
        return self._model.backend

    @property
    def model_name(self) -> str:
        return self._model.name

    @property
    def ready(self) -> bool:
        return self._ready

    async def start(self) -> None:
        await self._model.start()
        self._ready = True

    async def close(self) -> None:
        self._ready = False
        await self._model.close()

    def run(self, task: Task) -> AsyncGenerator[LabEvent, None]:
        # The mode's own generator, not one relaying it: a level less for
        # every token to pass through. Closing it stops the work all the same.
        if task.mode is ExecutionMode.INFERENCE:
            messages = [ChatMessage("user", task.prompt)]
            return model_node(self._model, _INFERENCE_NODE, messages, task.options, as_output=True)
        return self._orchestrate(task)

    async def _orchestrate(self, task: Task) -> AsyncGenerator[LabEvent, None]:
        config: Any = {"configurable": {"options": task.options}}
        final: dict[str, Any] = {}
        stream = self._graph.astream(
            {"prompt": task.prompt}, config, stream_mode=["custom", "values"]
        )
        async with aclosing(stream):
            async for mode, payload in stream:
                if mode == "custom":
                    yield payload
                else:
                    final = payload
        yield LabOutput(str(final.get("output", "")))
