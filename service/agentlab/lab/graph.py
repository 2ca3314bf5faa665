"""The orchestration: a LangGraph graph of three nodes, each a real model call.

plan -> answer -> review. Nodes report what they do through LangGraph's
custom stream (``get_stream_writer``), so tokens leave the graph as the model
generates them instead of when a node returns.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from contextlib import aclosing
from typing import Any, TypedDict

from langchain_core.runnables import RunnableConfig
from langgraph.config import get_stream_writer
from langgraph.graph import END, START, StateGraph

from agentlab.core.ports import LabEvent, LabNodeEnded, LabNodeStarted, LabOutput, LabToken
from agentlab.core.types import GenerationOptions
from agentlab.lab.base import ChatMessage, ChatModel, TextChunk, Usage
from agentlab.lab.spans import ModelCallSpans

__all__ = ["NODES", "build_graph", "model_node"]

NODES = ("plan", "answer", "review")

_PLAN = (
    "You plan how to answer a request. Write at most three short numbered steps. "
    "Do not answer the request yourself."
)
_ANSWER = "Answer the request. Follow the plan if it helps. Be brief and correct."
_REVIEW = (
    "You review an answer to a request. Reply with the final, corrected answer only, "
    "without commentary."
)


class GraphState(TypedDict, total=False):
    prompt: str
    plan: str
    answer: str
    output: str


async def model_node(
    model: ChatModel,
    node: str,
    messages: list[ChatMessage],
    options: GenerationOptions,
    *,
    as_output: bool = False,
) -> AsyncGenerator[LabEvent, None]:
    """Run one model call as one node: its start, its tokens, its end; with
    tracing on, a span for the node and one for the model call in it.
    ``as_output``: the node's output is the lab's too (a LabOutput last):
    inference, which is this node alone, needs no generator relaying it."""
    yield LabNodeStarted(node=node, input=messages[-1].content)
    parts: list[str] = []
    usage = Usage(prompt_tokens=0, completion_tokens=0)
    spans = ModelCallSpans.start(model, node, options)
    try:
        chunks = model.stream(messages, options)
        async with aclosing(chunks if spans is None else spans.around(chunks)) as steps:
            async for chunk in steps:
                if isinstance(chunk, TextChunk):
                    parts.append(chunk.text)
                    yield LabToken(node=node, text=chunk.text)
                else:
                    usage = chunk
    except BaseException as error:
        if spans is not None:
            spans.end(usage, error)
        raise
    if spans is not None:
        spans.end(usage)
    output = "".join(parts)
    yield LabNodeEnded(
        node, output, usage.prompt_tokens, usage.completion_tokens, usage.generation_s
    )
    if as_output:
        yield LabOutput(output)


async def _run_node(
    model: ChatModel, node: str, messages: list[ChatMessage], config: RunnableConfig
) -> str:
    """A graph node's body: the model call's events go out on the custom stream."""
    write = get_stream_writer()
    output = ""
    async with aclosing(model_node(model, node, messages, _options(config))) as events:
        async for event in events:
            write(event)
            if isinstance(event, LabNodeEnded):
                output = event.output
    return output


def _options(config: RunnableConfig) -> GenerationOptions:
    options = (config.get("configurable") or {}).get("options")
    return options if isinstance(options, GenerationOptions) else GenerationOptions()


def build_graph(model: ChatModel) -> Any:
    async def plan(state: GraphState, config: RunnableConfig) -> GraphState:
        messages = [ChatMessage("system", _PLAN), ChatMessage("user", state["prompt"])]
        return {"plan": await _run_node(model, "plan", messages, config)}

    async def answer(state: GraphState, config: RunnableConfig) -> GraphState:
        request = f"Request: {state['prompt']}\n\nPlan:\n{state['plan']}"
        messages = [ChatMessage("system", _ANSWER), ChatMessage("user", request)]
        return {"answer": await _run_node(model, "answer", messages, config)}

    async def review(state: GraphState, config: RunnableConfig) -> GraphState:
        request = f"Request: {state['prompt']}\n\nAnswer:\n{state['answer']}"
        messages = [ChatMessage("system", _REVIEW), ChatMessage("user", request)]
        return {"output": await _run_node(model, "review", messages, config)}

    graph = StateGraph(GraphState)
    graph.add_node("plan", plan)
    graph.add_node("answer", answer)
    graph.add_node("review", review)
    graph.add_edge(START, "plan")
    graph.add_edge("plan", "answer")
    graph.add_edge("answer", "review")
    graph.add_edge("review", END)
    return graph.compile()
