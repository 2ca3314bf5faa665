"""The spans of one graph node and the model call it makes, while tracing
is on: ``node {name}`` (INTERNAL), and inside it ``{operation} {model}``
(CLIENT), named and annotated as OpenTelemetry's GenAI conventions say
(``gen_ai.operation.name``, ``gen_ai.provider.name``,
``gen_ai.request.*``, ``gen_ai.usage.*``). The model call's span is current
while the model's stream runs, so a remote model's HTTP request carries it
as ``traceparent`` (agentlab.lab.upstream)."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from dataclasses import dataclass

from opentelemetry import trace

from agentlab.core.types import GenerationOptions
from agentlab.lab.base import ChatModel, ModelChunk, Usage
from agentlab.telemetry import tracing

__all__ = ["ModelCallSpans"]

_OPERATION = "chat"


@dataclass
class ModelCallSpans:
    node: tracing.Span
    call: tracing.Span
    model: str

    @classmethod
    def start(
        cls, model: ChatModel, node: str, options: GenerationOptions
    ) -> ModelCallSpans | None:
        """Both spans started (children of the current span); None while
        tracing is off."""
        if not tracing.enabled():  # first: nothing is built while off
            return None
        node_span = tracing.start_span(f"node {node}", attributes={"agentlab.node": node})
        assert node_span is not None
        attributes: dict[str, str | int | float | bool] = {
            "gen_ai.operation.name": _OPERATION,
            "gen_ai.provider.name": model.backend,
            "gen_ai.request.model": model.name,
            "agentlab.node": node,
        }
        if options.temperature is not None:
            attributes["gen_ai.request.temperature"] = options.temperature
        if options.max_tokens is not None:
            attributes["gen_ai.request.max_tokens"] = options.max_tokens
        if options.seed is not None:
            attributes["gen_ai.request.seed"] = options.seed
        call = tracing.start_span(
            f"{_OPERATION} {model.name}",
            kind=tracing.SpanKind.CLIENT,
            attributes=attributes,
            parent=trace.set_span_in_context(node_span),
        )
        assert call is not None  # tracing was on a moment ago
        return cls(node_span, call, model.name)

    def around(self, chunks: AsyncGenerator[ModelChunk, None]) -> AsyncGenerator[ModelChunk, None]:
        """The model's stream with the call's span current in each step."""
        return tracing.steps(self.call, chunks)

    def end(self, usage: Usage, error: BaseException | None = None) -> None:
        self.call.set_attribute("gen_ai.usage.input_tokens", usage.prompt_tokens)
        self.call.set_attribute("gen_ai.usage.output_tokens", usage.completion_tokens)
        self.call.set_attribute("gen_ai.response.model", self.model)
        tracing.end(self.call, error)
        tracing.end(self.node, error)
