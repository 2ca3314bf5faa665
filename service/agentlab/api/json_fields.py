"""Unknown fields in a REST request's JSON body, refused.

Envoy's transcoder drops JSON keys the request message does not have (it has
no option to refuse them: envoyproxy/envoy#46623), so a typo such as
``max_token`` would be ignored. Envoy's Lua filter gateway/lua/json_fields.lua
names the body's top-level keys in the ``x-agentlab-json-fields`` metadata
(comma-separated, each percent-encoded and as written in the JSON, escapes
kept), and this compares them with the fields of the message the body maps to,
read from the contract: the method's ``google.api.http`` rule says which (body
``"*"``: the request; ``"field"``: that field's message). A key is known as the
field's proto name or its JSON name, as the transcoder accepts both; an
explicit ``null`` is a known key like any other. Only the top level is
checked: inside a message-typed field the transcoder still drops unknown
keys (no request of the contract has one today).

The filter bounds the metadata: each key once, at most 32, each cut to 64
bytes, and ``*`` last when more were left out; ``!`` alone when the body
opens an object but is not strict JSON (RFC 8259), which the transcoder's
lenient parser would take and these checks could not see into. The answer
names at most ``MAX_NAMED`` unknown keys, so its trailers stay small too.

Envoy sets the metadata only on REST calls with a body; a gRPC client that
sends it itself only narrows what it may send.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from functools import cache, lru_cache
from urllib.parse import unquote

from google.api import annotations_pb2  # type: ignore[import-untyped]
from google.protobuf import descriptor_pool
from google.protobuf.descriptor import Descriptor

from agentlab.core.errors import FieldViolation

__all__ = ["JSON_FIELDS", "MAX_NAMED", "unknown_fields"]

JSON_FIELDS = "x-agentlab-json-fields"
# Unknown keys named one by one in an answer; the rest are counted.
MAX_NAMED = 8
_MORE = "*"
_NOT_STRICT = "!"
_SHOWN_KEY_CHARS = 64


def unknown_fields(
    method: str, metadata: Iterable[tuple[str, str | bytes]]
) -> list[FieldViolation]:
    """A violation for each key of the JSON body that names no field of the
    message the body of ``method`` (``/package.Service/Method``) maps to."""
    values = [value for key, value in metadata if key == JSON_FIELDS]
    if not values:
        return []
    return list(_unknown(method, str(values[-1])))


# Clients send the same few bodies' keys over and over: each answer is
# computed once (FieldViolation is immutable). Bounded, as the header is the
# client's to choose.
@lru_cache(maxsize=1024)
def _unknown(method: str, header: str) -> tuple[FieldViolation, ...]:
    body = _body_fields(method)
    if body is None:
        return ()
    message, known = body
    if header == _NOT_STRICT:
        return (
            FieldViolation(
                "body",
                "is not strict JSON (RFC 8259: keys and strings in double quotes, no "
                "trailing comma), so its fields cannot be checked",
                "JSON_NOT_STRICT",
            ),
        )
    items = header.split(",")
    more = items[-1:] == [_MORE]
    unknown = [key for key in _keys(items[:-1] if more else items) if key not in known]
    found = [
        FieldViolation(key[:_SHOWN_KEY_CHARS], f"is not a field of {message}", "UNKNOWN_FIELD")
        for key in unknown[:MAX_NAMED]
    ]
    if len(unknown) > MAX_NAMED or more:
        left = f"{len(unknown) - MAX_NAMED} more" if len(unknown) > MAX_NAMED else "more"
        found.append(
            FieldViolation(
                "body",
                f"has {left} keys that are not fields of {message}",
                "UNKNOWN_FIELD",
            )
        )
    return tuple(found)


def _keys(items: list[str]) -> list[str]:
    keys = []
    for item in items:
        if not item:
            continue
        written = unquote(item, errors="replace")
        try:
            keys.append(json.loads(f'"{written}"'))
        except ValueError:
            keys.append(written)
    return keys


@cache
def _body_fields(method: str) -> tuple[str, frozenset[str]] | None:
    """The full name and the field names (proto and JSON) of the message the
    method's HTTP body maps to; None when it has no JSON object body."""
    try:
        service, name = method.strip("/").split("/")
        found = descriptor_pool.Default().FindMethodByName(f"{service}.{name}")
    except (ValueError, KeyError):
        return None
    rule = found.GetOptions().Extensions[annotations_pb2.http]
    body = next((r.body for r in (rule, *rule.additional_bindings) if r.body), "")
    message: Descriptor = found.input_type
    if body != "*":
        field = message.fields_by_name.get(body)
        if field is None or field.message_type is None or field.is_repeated:
            return None
        message = field.message_type
    names = {f.name for f in message.fields} | {f.json_name for f in message.fields}
    return message.full_name, frozenset(names)
