"""An orchestration drawn as it happens: one row per graph node (status,
time to first token, tokens, tokens/s, duration), the text of the node
running now, and the totals once the execution ends. ``Progress`` follows
the events; ``render()`` draws its state for rich's Live."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from google.rpc import status_pb2
from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from agentlab.v1 import execution_pb2 as pb

__all__ = ["NodeProgress", "Progress"]

# The tail of the running node's text shown under the table, in characters.
_TAIL_CHARS = 240


@dataclass
class NodeProgress:
    """One node's run. Times in milliseconds; ``tokens`` counts token_delta
    events until the node's own metrics arrive with node_finished."""

    name: str
    started: datetime | None = None
    first_token: datetime | None = None
    tokens: int = 0
    text: str = ""
    status: str = "running"
    ttft_ms: float | None = None
    duration_ms: float | None = None
    tokens_per_second: float | None = None


@dataclass
class Progress:
    """What an execution's events said so far."""

    execution_id: str = ""
    nodes: list[NodeProgress] = field(default_factory=list)
    result: pb.ExecuteResponse | None = None
    error: status_pb2.Status | None = None
    last_sequence: int = 0

    @property
    def finished(self) -> bool:
        return self.result is not None or self.error is not None

    def add(self, event: pb.ExecutionEvent) -> None:
        self.execution_id = event.execution_id
        self.last_sequence = event.sequence
        kind = event.WhichOneof("kind")
        at = event.time.ToDatetime() if event.HasField("time") else None
        if kind == "node_started":
            self.nodes.append(NodeProgress(event.node_started.node, started=at))
        elif kind == "token_delta":
            node = self._node(event.token_delta.node, at)
            node.tokens += 1
            node.text += event.token_delta.text
            if node.first_token is None and at is not None:
                node.first_token = at
                if node.started is not None:
                    node.ttft_ms = (at - node.started).total_seconds() * 1000
        elif kind == "node_finished":
            self._finish(event.node_finished.step, at)
        elif kind == "execution_completed":
            self.result = event.execution_completed.result
        elif kind == "execution_failed":
            self.error = event.execution_failed.error
            for step in event.execution_failed.flow:
                if step.status != pb.STEP_STATUS_SUCCEEDED:
                    self._finish(step, at)

    def _node(self, name: str, at: datetime | None) -> NodeProgress:
        for node in reversed(self.nodes):
            if node.name == name:
                return node
        self.nodes.append(NodeProgress(name, started=at))
        return self.nodes[-1]

    def _finish(self, step: pb.FlowStep, at: datetime | None) -> None:
        node = self._node(step.node, at)
        node.status = pb.StepStatus.Name(step.status).removeprefix("STEP_STATUS_").lower()
        node.duration_ms = step.duration_ms
        if step.HasField("metrics"):
            metrics = step.metrics
            if metrics.time_to_first_token_ms:
                node.ttft_ms = metrics.time_to_first_token_ms
            if metrics.completion_tokens:
                node.tokens = metrics.completion_tokens
            if metrics.tokens_per_second:
                node.tokens_per_second = metrics.tokens_per_second
        if not node.text and step.output:
            node.text = step.output

    def render(self) -> RenderableType:
        table = Table(title=f"execution {self.execution_id}" if self.execution_id else None)
        for column in ("node", "status", "ttft ms", "tokens", "tok/s", "duration ms"):
            table.add_column(column, justify="left" if column in ("node", "status") else "right")
        for node in self.nodes:
            table.add_row(
                node.name,
                node.status,
                _number(node.ttft_ms),
                str(node.tokens),
                _number(node.tokens_per_second),
                _number(node.duration_ms),
            )
        if self.result is not None:
            metrics = self.result.metrics
            table.add_section()
            table.add_row(
                "Total",
                "succeeded",
                _number(metrics.time_to_first_token_ms),
                f"{metrics.prompt_tokens}+{metrics.completion_tokens}",
                _number(metrics.tokens_per_second),
                _number(metrics.latency_ms),
            )
        parts: list[RenderableType] = [table]
        running = [node for node in self.nodes if node.status == "running"]
        if running and running[-1].text:
            parts.append(_wrapped(f"{running[-1].name}: …{running[-1].text[-_TAIL_CHARS:]}"))
        if self.result is not None:
            metrics = self.result.metrics
            parts.append(
                _wrapped(
                    f"Total: {metrics.latency_ms:.0f} ms, first token "
                    f"{metrics.time_to_first_token_ms:.0f} ms, {metrics.prompt_tokens} prompt + "
                    f"{metrics.completion_tokens} completion tokens, "
                    f"{metrics.tokens_per_second:.1f} tok/s on {metrics.backend} ({metrics.model})"
                )
            )
        if self.error is not None:
            parts.append(_wrapped(f"failed: {self.error.message}", style="red"))
        return Group(*parts)


def _wrapped(line: str, style: str = "") -> Text:
    """A line that wraps at the terminal's width. The CLI's stderr console
    soft-wraps (a message stays one line in a log), and rich's Live crops
    such a line at the width: the newest tokens and the end of the totals
    would never show."""
    return Text(line, style=style, no_wrap=False, overflow="fold")


def _number(value: float | None) -> str:
    return "" if value is None else f"{value:.1f}"
