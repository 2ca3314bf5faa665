"""Size bounds on responses: every message the service sends stays under the
default 4 MiB gRPC receive limit, and its JSON under the 8 MiB the Envoy
transcoder buffers (``max_response_body_size`` in gateway/envoy.yaml).

One number bounds both forms: ``cost`` counts each byte of a message as the
larger of its binary size and 3/7 of what it can become in JSON, so a cost
of at most BUDGET_BYTES (3 MiB) means at most 3 MiB of binary and 7 MiB of
JSON text, plus field names. Text is the only part of a message the
contract does not bound (a prompt up to 1,000,000 characters, up to 32,768
tokens per model call), so texts are what ``fit`` shortens, longest first,
marking each cut with its ``*_truncated`` field.

Worst cases: an orchestration's record holds its prompt P four times (the
prompt, each node's input) and each of its three nodes' outputs twice (the
step's output, and the next node's input or the result's output): 4P plus
twice the outputs. A node generates up to 32,768 tokens; the echo
backend's output is its whole input (P, 2P, 3P), so 16P: 0.5 MB for 32,000 ASCII characters
(AGENTLAB_MAX_PROMPT_CHARS's default), 2 MB for 32,000 four-byte ones, both
sent whole; with the contract's 1,000,000 characters, 16 MB or more, cut.
Stream events carry at most one node's input and output (NodeFinished) or
the record's result (ExecutionCompleted): the same bound, the same cut.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

from agentlab.v1 import execution_pb2 as pb

__all__ = ["BUDGET_BYTES", "MESSAGE_BUDGET_BYTES", "cost", "fit", "fits", "page"]

BUDGET_BYTES = 3 * 1024 * 1024
"""The most a response may cost: 1 MiB under gRPC's default 4 MiB; its JSON
at most 7 MiB plus field names and punctuation (about 1.5 KiB per
execution), under Envoy's 8 MiB."""

MESSAGE_BUDGET_BYTES = BUDGET_BYTES - 4096
"""One execution or event: room left for the envelope around it (a list
response's framing and next_page_token)."""

# What the JSON printer (protobuf's, in Envoy) writes as \uXXXX, 6 bytes for 1:
# control characters, DEL, and < and > (HTML-safe escaping).
_ESCAPED = bytes([*range(0x20), 0x7F, ord("<"), ord(">")])
_NON_ASCII = bytes(range(0x80, 0x100))

_Message = TypeVar("_Message", pb.Execution, pb.ExecuteResponse, pb.ExecutionEvent)


def cost(data: bytes) -> int:
    """The cost of ``data`` (a serialized message or UTF-8 text), in bytes:
    at least its size, and at least 3/7 of its JSON size. JSON writes an
    escaped byte (``_ESCAPED``) as 6 bytes (weight 18/7), a quote or
    backslash as 2 (weight 1), and may write a non-ASCII character as
    \\uXXXX or a surrogate pair, at most 3 bytes per byte of UTF-8 (weight
    9/7; Envoy writes most of them raw). Tags and lengths of the binary count
    as text too: the bound only errs upwards."""
    escaped = len(data) - len(data.translate(None, _ESCAPED))
    non_ascii = len(data) - len(data.translate(None, _NON_ASCII))
    return len(data) + -(-(11 * escaped + 2 * non_ascii) // 7)


def _message_cost(message: Any) -> int:
    # A message cannot cost more than 18/7 of its binary size: most are far
    # under the budget and need no scan.
    size: int = message.ByteSize()
    return size if size * 3 <= MESSAGE_BUDGET_BYTES else cost(message.SerializeToString())


def fits(message: Any, budget: int = BUDGET_BYTES) -> bool:
    """Whether ``message`` (any message: those ``fit`` cannot shorten)
    costs at most ``budget``."""
    return _message_cost(message) <= budget


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
