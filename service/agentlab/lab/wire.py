"""The lab service's wire format, shared by the service (``agentlab.labservice``)
and its client (``agentlab.lab.http_lab``) so the two cannot drift apart.

Requests are JSON objects; the endpoint gives the mode. A streamed answer is
NDJSON: one event per line, the last one ``output`` or ``error``. A complete
answer is one JSON object with the output and the steps. docs/lab-service.md
describes it for people.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from agentlab.core.errors import (
    AgentLabError,
    FieldViolation,
    InvalidArgument,
    LabFailed,
    LabUnavailable,
)
from agentlab.core.ports import LabEvent, LabNodeEnded, LabNodeStarted, LabOutput, LabToken
from agentlab.core.types import ExecutionMode, GenerationOptions, Task

__all__ = [
    "HEALTH_PATH",
    "JSON",
    "NDJSON",
    "PATHS",
    "MalformedRequest",
    "Step",
    "WireError",
    "decode_error",
    "decode_event",
    "decode_request",
    "decode_result",
    "encode_error",
    "encode_event",
    "encode_request",
    "encode_result",
    "http_status",
]

_T = TypeVar("_T")

PATHS = {
    ExecutionMode.INFERENCE: "/inference/",
    ExecutionMode.ORCHESTRATION: "/orchestrate/",
}
HEALTH_PATH = PATHS[ExecutionMode.ORCHESTRATION]
NDJSON = "application/x-ndjson"
JSON = "application/json"


class WireError(ValueError):
    """A message that does not follow this format."""


class MalformedRequest(WireError):
    """A request body that is not a JSON object at all (HTTP 422)."""


@dataclass(frozen=True)
class Step:
    """One node of a complete (non-streamed) answer."""

    node: str
    input: str
    output: str
    prompt_tokens: int
    completion_tokens: int
    generation_s: float | None = None

    def ended(self) -> LabNodeEnded:
        return LabNodeEnded(
            self.node, self.output, self.prompt_tokens, self.completion_tokens, self.generation_s
        )


# Requests.


def encode_request(task: Task, *, stream: bool) -> dict[str, Any]:
    options = {
        name: value
        for name, value in (
            ("temperature", task.options.temperature),
            ("max_tokens", task.options.max_tokens),
            ("seed", task.options.seed),
        )
        if value is not None
    }
    return {"prompt": task.prompt, "model": task.model, "options": options, "stream": stream}


def decode_request(body: bytes, mode: ExecutionMode) -> tuple[Task, bool]:
    """The task and whether to stream it. Only types are checked here: the
    lab service holds the values to the contract's rules, as the gateway
    does (``agentlab.api.validation``)."""
    try:
        request = json.loads(body)
    except ValueError as error:
        raise MalformedRequest(f"the body is not JSON: {error}") from None
    if not isinstance(request, dict):
        raise MalformedRequest("the body must be a JSON object")
    options = request.get("options")
    if options is None:
        options = {}
    elif not isinstance(options, dict):
        raise InvalidArgument("options", "must be an object")
    task = Task(
        prompt=_required(request, "prompt", str, "a string"),
        model=_optional(request, "model", str, "a string") or "",
        mode=mode,
        options=GenerationOptions(
            temperature=_number(options, "temperature"),
            max_tokens=_optional(options, "max_tokens", int, "an integer"),
            seed=_optional(options, "seed", int, "an integer"),
        ),
    )
    stream = _optional(request, "stream", bool, "true or false")
    return task, True if stream is None else stream


def _optional(obj: Mapping[str, Any], key: str, kind: type[_T], what: str) -> _T | None:
    value = obj.get(key)
    # bool is an int in Python, not in JSON.
    if value is None or (isinstance(value, kind) and (kind is bool or not isinstance(value, bool))):
        return value
    raise InvalidArgument(key, f"must be {what}")


def _required(obj: Mapping[str, Any], key: str, kind: type[_T], what: str) -> _T:
    value = _optional(obj, key, kind, what)
    if value is None:
        raise InvalidArgument(key, "is required")
    return value


def _number(obj: Mapping[str, Any], key: str) -> float | None:
    value = obj.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InvalidArgument(key, "must be a number")
    return float(value)


# Events (streamed answers).


def encode_event(event: LabEvent) -> dict[str, Any]:
    match event:
        case LabNodeStarted(node, node_input):
            return {"type": "node_started", "node": node, "input": node_input}
        case LabToken(node, text):
            return {"type": "token", "node": node, "text": text}
        case LabNodeEnded():
            return {"type": "node_finished", **_step_fields(event)}
        case LabOutput(output):
            return {"type": "output", "output": output}
    raise TypeError(f"not a lab event: {event!r}")


def decode_event(line: Any) -> LabEvent:
    """A streamed line other than ``error``; raises ``WireError``."""
    if not isinstance(line, dict):
        raise WireError(f"a streamed line is not an object: {line!r}")
    match line.get("type"):
        case "node_started":
            return LabNodeStarted(_text(line, "node"), _text(line, "input"))
        case "token":
            return LabToken(_text(line, "node"), _text(line, "text"))
        case "node_finished":
            return _step(line).ended()
        case "output":
            return LabOutput(_text(line, "output"))
    raise WireError(f"unknown line type {line.get('type')!r}")


# Complete answers.


def encode_result(output: str, steps: list[Step]) -> dict[str, Any]:
    return {
        "output": output,
        "steps": [{"node": s.node, "input": s.input, **_step_fields(s)} for s in steps],
    }


def decode_result(body: Any) -> list[LabEvent]:
    """A complete answer as the events a stream would have had, less the tokens."""
    if not isinstance(body, dict) or not isinstance(body.get("steps"), list):
        raise WireError("a complete answer needs an object with output and steps")
    events: list[LabEvent] = []
    for item in body["steps"]:
        if not isinstance(item, dict):
            raise WireError(f"a step is not an object: {item!r}")
        step = _step(item)
        events.append(LabNodeStarted(step.node, step.input))
        events.append(step.ended())
    events.append(LabOutput(_text(body, "output")))
    return events


def _step_fields(step: LabNodeEnded | Step) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "node": step.node,
        "output": step.output,
        "prompt_tokens": step.prompt_tokens,
        "completion_tokens": step.completion_tokens,
    }
    if step.generation_s is not None:
        fields["generation_s"] = step.generation_s
    return fields


def _step(obj: Mapping[str, Any]) -> Step:
    generation_s = obj.get("generation_s")
    if generation_s is not None and (
        isinstance(generation_s, bool) or not isinstance(generation_s, int | float)
    ):
        raise WireError(f"generation_s is not a number: {generation_s!r}")
    return Step(
        node=_text(obj, "node"),
        # A streamed node_finished has no input: its node_started had it.
        input=str(obj.get("input", "")),
        output=_text(obj, "output"),
        prompt_tokens=_count(obj, "prompt_tokens"),
        completion_tokens=_count(obj, "completion_tokens"),
        generation_s=None if generation_s is None else float(generation_s),
    )


def _text(obj: Mapping[str, Any], key: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str):
        raise WireError(f"{key} is not a string: {value!r}")
    return value


def _count(obj: Mapping[str, Any], key: str) -> int:
    value = obj.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise WireError(f"{key} is not a token count: {value!r}")
    return value


# Errors: the body of a non-2xx answer is {"error": encode_error(...)}, the
# last line of a stream that failed is {"type": "error", **encode_error(...)}.


def encode_error(error: AgentLabError) -> dict[str, Any]:
    encoded: dict[str, Any] = {"code": error.reason, "message": error.message}
    if isinstance(error, InvalidArgument):
        encoded["field"] = error.field
        encoded["violations"] = [
            {"field": v.field, "description": v.description, "reason": v.reason}
            for v in error.violations
        ]
    return encoded


def decode_error(error: Mapping[str, Any], backend: str, address: str = "") -> AgentLabError:
    """The domain error a client raises for the lab service's error."""
    code = error.get("code")
    message = str(error.get("message", "")) or "no message"
    if code == InvalidArgument.reason:
        violations = error.get("violations")
        if (
            isinstance(violations, list)
            and violations
            and all(isinstance(v, dict) for v in violations)
        ):
            return InvalidArgument.of(
                [
                    FieldViolation(
                        str(v.get("field", "")),
                        str(v.get("description", "")),
                        str(v.get("reason", "")),
                    )
                    for v in violations
                ]
            )
        field = str(error.get("field", ""))
        # The message is InvalidArgument's own "field: description".
        return InvalidArgument(field, message.removeprefix(f"{field}: "))
    if code == LabUnavailable.reason:
        return LabUnavailable(backend, message, address=address)
    return LabFailed(backend, message, address=address)


def http_status(error: AgentLabError) -> int:
    if isinstance(error, InvalidArgument):
        return 400
    if isinstance(error, LabUnavailable):
        return 503
    return 500
