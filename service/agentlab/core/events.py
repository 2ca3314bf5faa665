"""The events of an execution, in the order a stream delivers them."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from agentlab.core.errors import AgentLabError
from agentlab.core.types import ExecutionMode, FlowStep, Result

__all__ = [
    "Event",
    "EventKind",
    "ExecutionCompleted",
    "ExecutionFailed",
    "ExecutionStarted",
    "NodeFinished",
    "NodeStarted",
    "TokenDelta",
]


@dataclass(frozen=True)
class ExecutionStarted:
    mode: ExecutionMode
    requested_model: str


@dataclass(frozen=True)
class NodeStarted:
    node: str
    input: str


@dataclass(frozen=True)
class TokenDelta:
    node: str
    text: str


@dataclass(frozen=True)
class NodeFinished:
    step: FlowStep


@dataclass(frozen=True)
class ExecutionCompleted:
    result: Result


@dataclass(frozen=True)
class ExecutionFailed:
    error: AgentLabError
    flow: tuple[FlowStep, ...]


EventKind = (
    ExecutionStarted
    | NodeStarted
    | TokenDelta
    | NodeFinished
    | ExecutionCompleted
    | ExecutionFailed
)


@dataclass(frozen=True)
class Event:
    """One event, numbered from 1 within its execution."""

    sequence: int
    time: datetime
    execution_id: str
    kind: EventKind

    @property
    def is_final(self) -> bool:
        return isinstance(self.kind, ExecutionCompleted | ExecutionFailed)
