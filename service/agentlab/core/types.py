"""Domain types shared by the use cases, the lab and the api layer."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime

__all__ = [
    "ExecutionMode",
    "FlowStep",
    "GenerationOptions",
    "Metrics",
    "ModelInfo",
    "Result",
    "StepStatus",
    "Task",
]


class ExecutionMode(enum.Enum):
    INFERENCE = "inference"
    ORCHESTRATION = "orchestration"


class StepStatus(enum.Enum):
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


@dataclass(frozen=True)
class GenerationOptions:
    """Sampling options for one model call; None means the backend's default."""

    temperature: float | None = None
    max_tokens: int | None = None
    seed: int | None = None


@dataclass(frozen=True)
class Task:
    """What a caller asked the lab to do."""

    prompt: str
    model: str
    mode: ExecutionMode
    options: GenerationOptions = field(default_factory=GenerationOptions)
    # Seconds the execution may take: the caller's deadline, or the model's
    # configured timeout if that is shorter. None: no limit.
    timeout_s: float | None = None


@dataclass(frozen=True)
class Metrics:
    """Plain numbers: milliseconds, token counts and tokens per second."""

    latency_ms: float = 0.0
    time_to_first_token_ms: float = 0.0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    tokens_per_second: float = 0.0
    backend: str = ""
    model: str = ""
    requested_model: str = ""


@dataclass(frozen=True)
class FlowStep:
    """One step the lab went through: a graph node or a single model call."""

    node: str
    status: StepStatus
    input: str
    output: str
    start_time: datetime
    duration_ms: float
    metrics: Metrics


@dataclass(frozen=True)
class Result:
    """The complete result of an execution."""

    execution_id: str
    output: str
    flow: tuple[FlowStep, ...]
    metrics: Metrics


@dataclass(frozen=True)
class ModelInfo:
    """A model name requests may use, and who serves it."""

    name: str
    backend: str
    backend_model: str
    ready: bool
    description: str
