"""Request rules, checked in one place for every RPC.

The rules are the contract's: `buf.validate` options on the request fields
in protos/, evaluated by protovalidate. One rule is this deployment's own,
the prompt's configured maximum (AGENTLAB_MAX_PROMPT_CHARS), which can only
be tighter than the contract's. A request that breaks several rules hears
about all of them at once.
"""

from __future__ import annotations

import re

import protovalidate
from google.protobuf.message import Message

from agentlab.core.errors import FieldViolation, InvalidArgument

__all__ = ["RequestRules"]


class RequestRules:
    def __init__(self, *, max_prompt_chars: int) -> None:
        self._max_prompt_chars = max_prompt_chars
        # A validator caches each message type's compiled rules.
        self._validator = protovalidate.Validator()

    def violations(self, request: Message) -> list[FieldViolation]:
        """Every broken rule, the contract's first. Raises protovalidate's
        CompilationError or EvaluationError if a rule itself is broken."""
        found = [
            FieldViolation(
                _path(violation), violation.proto.message, _reason(violation.proto.rule_id)
            )
            for violation in self._validator.collect_violations(request)
        ]
        prompt = getattr(request, "prompt", None)
        if (
            isinstance(prompt, str)
            and len(prompt) > self._max_prompt_chars
            and all(violation.field != "prompt" for violation in found)
        ):
            found.append(
                FieldViolation(
                    "prompt",
                    f"must be at most {self._max_prompt_chars} characters",
                    _reason("string.max_len"),
                )
            )
        return found

    def check(self, request: Message) -> None:
        """Raises InvalidArgument naming every violated field."""
        if found := self.violations(request):
            raise InvalidArgument.of(found)


def _reason(rule_id: str) -> str:
    """A rule's id (`string.max_len`, `prompt.not_blank`) as BadRequest's
    UPPER_SNAKE reason."""
    return re.sub(r"[^A-Z0-9]+", "_", rule_id.upper()).strip("_")


def _path(violation: protovalidate.Violation) -> str:
    """The violated field as a path: `field`, `parent.child`, `list[2]`, `map["key"]`."""
    parts: list[str] = []
    path = violation.proto.field
    for element in path.elements if path is not None else ():
        part = element.field_name
        if element.subscript is not None:
            key = element.subscript.value
            if isinstance(key, bool):
                key = "true" if key else "false"
            elif isinstance(key, str):
                key = f'"{key}"'
            part += f"[{key}]"
        parts.append(part)
    return ".".join(parts)
