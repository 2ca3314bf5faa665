"""Size bounds on responses: every message the service sends stays under the
default 4 MiB gRPC receive limit, and its JSON under the 8 MiB the Envoy
transcoder buffers (``max_response_body_size`` in gateway/envoy.yaml).

Sizes are measured by ``cost``: the binary size plus what proto3 JSON
escaping can add to it, so one number bounds both forms. Text is the only
part of a message the contract does not bound (a prompt up to 1,000,000
characters, up to 32,768 tokens per model call), so texts are what ``fit``
shortens, longest first, marking each cut with its ``*_truncated`` field.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

from agentlab.v1 import execution_pb2 as pb

__all__ = ["BUDGET_BYTES", "MESSAGE_BUDGET_BYTES", "cost", "fit", "page"]

BUDGET_BYTES = 3 * 1024 * 1024
"""The most a response may cost: 1 MiB under gRPC's default 4 MiB, and its
JSON (the cost plus field names and punctuation, a few KiB per execution)
well under Envoy's 8 MiB."""

MESSAGE_BUDGET_BYTES = BUDGET_BYTES - 4096
"""One execution or event: room left for the envelope around it (a list
response's framing and next_page_token)."""

_CONTROL = bytes(range(0x20))
_NON_ASCII = bytes(range(0x80, 0x100))

_Message = TypeVar("_Message", pb.Execution, pb.ExecuteResponse, pb.ExecutionEvent)


def cost(data: bytes) -> int:
    """An upper bound, in bytes, of both the binary and the JSON size of
    ``data`` (a serialized message or UTF-8 text). JSON escapes a control
    character as \\u00XX (1 byte becomes 6), a quote or backslash with a
    backslash (1 becomes 2), and may escape a non-ASCII character as \\uXXXX
    or a surrogate pair (at most 3 bytes per byte of UTF-8). Tags and
    lengths in the binary count as text too: the bound only errs upwards."""
    control = len(data) - len(data.translate(None, _CONTROL))
    non_ascii = len(data) - len(data.translate(None, _NON_ASCII))
    quoted = data.count(b'"') + data.count(b"\\")
    return len(data) + 5 * control + 2 * non_ascii + quoted


def _message_cost(message: Any) -> int:
    # A message cannot cost more than 6 times its binary size: most are far
    # under any budget and need no scan.
    size: int = message.ByteSize()
    return size if size * 6 <= MESSAGE_BUDGET_BYTES else cost(message.SerializeToString())


def _slots(message: Any) -> Iterator[tuple[Any, str, str]]:
    """The texts ``fit`` may shorten: (holder, text field, marker field)."""
    if isinstance(message, pb.Execution):
        yield message, "prompt", "prompt_truncated"
        if message.HasField("result"):
            yield from _slots(message.result)
    elif isinstance(message, pb.ExecuteResponse):
        yield message, "output", "output_truncated"
        for step in message.flow:
            yield from _slots(step)
    elif isinstance(message, pb.FlowStep):
        yield message, "input", "input_truncated"
        yield message, "output", "output_truncated"
    elif isinstance(message, pb.ExecutionEvent):
        kind = message.WhichOneof("kind")
        if kind == "node_started":
            yield message.node_started, "input", "input_truncated"
        elif kind == "node_finished":
            yield from _slots(message.node_finished.step)
        elif kind == "execution_completed":
            yield from _slots(message.execution_completed.result)
        elif kind == "execution_failed":
            for step in message.execution_failed.flow:
                yield from _slots(step)


def _prefix(text: str, limit: int) -> str:
    """The longest prefix of ``text`` that costs at most ``limit``."""
    low, high = 0, len(text)
    while low < high:
        middle = (low + high + 1) // 2
        if cost(text[:middle].encode()) <= limit:
            low = middle
        else:
            high = middle - 1
    return text[:low]


def _cap(costs: list[int], excess: int) -> int:
    """The largest cap on each text's cost that removes at least ``excess``."""
    low, high = 0, max(costs, default=0)
    while low < high:
        middle = (low + high + 1) // 2
        if sum(max(0, c - middle) for c in costs) >= excess:
            low = middle
        else:
            high = middle - 1
    return low


def fit(message: _Message, budget: int = MESSAGE_BUDGET_BYTES) -> _Message:
    """``message`` if it costs at most ``budget``; else a copy whose longest
    texts are cut to a common cost, each cut marked by its ``*_truncated``
    field. What is not text (ids, states, metrics, errors) is bounded by the
    contract and kept whole."""
    total = _message_cost(message)
    if total <= budget:
        return message
    shortened = type(message)()
    shortened.CopyFrom(message)
    while total > budget:
        slots = [(holder, name, marker) for holder, name, marker in _slots(shortened)]
        texts = [getattr(holder, name) for holder, name, _ in slots]
        costs = [cost(text.encode()) for text in texts]
        if not any(costs):
            break  # nothing left to cut: the rest is bounded by the contract
        # The markers themselves add a few bytes each.
        cap = _cap(costs, total - budget + 16 * len(slots))
        for (holder, name, marker), text, text_cost in zip(slots, texts, costs, strict=True):
            if text_cost > cap:
                setattr(holder, name, _prefix(text, cap))
                setattr(holder, marker, True)
        total = cost(shortened.SerializeToString())
    return shortened


def page(executions: Iterable[pb.Execution], budget: int = BUDGET_BYTES) -> list[pb.Execution]:
    """The leading executions whose list response costs at most ``budget``;
    always the first (``fit`` to MESSAGE_BUDGET_BYTES), so that a page is
    never empty while executions remain. Stops reading ``executions`` at the
    first that does not fit."""
    kept: list[pb.Execution] = []
    # The envelope: the page token and, per execution, its tag and length.
    total = 1024
    for execution in executions:
        total += cost(execution.SerializeToString()) + 16
        if kept and total > budget:
            break
        kept.append(execution)
    return kept
