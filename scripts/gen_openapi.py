"""Generate build/openapi.json, the REST API's OpenAPI document, from the
descriptor set that Envoy's transcoder loads (build/agentlab.pb).

Every route comes from a method's `google.api.http` option (with its
additional_bindings), every schema from the messages, every description from
the comments in the protos. The JSON is what the transcoder prints: proto3
JSON with the proto field names (preserve_proto_field_names), every field
without presence printed even when zero (always_print_primitive_fields),
64-bit integers as strings, enums as their names and Timestamps as RFC 3339.

OpenAPI 3.1: its schemas are JSON Schema 2020-12, which lets a `$ref` carry a
description beside it, and lets the events of a text/event-stream response
say their `data` is JSON of a given schema (contentMediaType, contentSchema),
so a stream's events are checked like any other response.

Request schemas carry the contract's `buf.validate` rules where JSON Schema
can say them (lengths, patterns, ranges); a CEL rule's message goes into the
field's description. Operations declare the Bearer API key the gateway asks
for when keys are configured; health is open.

Why this and not grpc-gateway's protoc-gen-openapiv2 (Debian's
golang-grpc-gateway): that one writes OpenAPI 2.0, which cannot say what
the events of a text/event-stream response hold, so the streams would go
unchecked; it describes grpc-gateway's JSON, not what Envoy's transcoder
prints with this gateway's print options; and it is not on PyPI, so a
fresh clone could not make it with `make setup`.

Build output like the descriptor set: made by `make setup` (gen_protos.py
calls it), never edited, never committed.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path
from typing import Any

from google.api import annotations_pb2, http_pb2  # type: ignore[import-untyped]
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from agentlab.config import Settings

ROOT = Path(__file__).resolve().parent.parent
DESCRIPTOR = ROOT / "build" / "agentlab.pb"
OPENAPI = ROOT / "build" / "openapi.json"

Schema = dict[str, Any]
FieldProto = descriptor_pb2.FieldDescriptorProto

# descriptor.proto field numbers, for the paths of SourceCodeInfo locations.
_FILE_MESSAGE, _FILE_ENUM, _FILE_SERVICE = 4, 5, 6
_MESSAGE_FIELD, _MESSAGE_NESTED, _MESSAGE_ENUM = 2, 3, 4
_ENUM_VALUE, _SERVICE_METHOD = 2, 2

_INT32 = {"type": "integer", "format": "int32", "minimum": -(2**31), "maximum": 2**31 - 1}
_UINT32 = {"type": "integer", "minimum": 0, "maximum": 2**32 - 1}
# At most 19 or 20 digits: every canonical value matches, and anything
# outside the type's range is refused with a 400 by the transcoder.
_INT64 = {"type": "string", "format": "int64", "pattern": r"^-?(0|[1-9][0-9]{0,18})$"}
_UINT64 = {"type": "string", "pattern": r"^(0|[1-9][0-9]{0,19})$"}

_SCALARS: dict[int, Schema] = {
    FieldProto.TYPE_DOUBLE: {"type": "number", "format": "double"},
    FieldProto.TYPE_FLOAT: {"type": "number", "format": "float"},
    FieldProto.TYPE_INT32: _INT32,
    FieldProto.TYPE_SINT32: _INT32,
    FieldProto.TYPE_SFIXED32: _INT32,
    FieldProto.TYPE_UINT32: _UINT32,
    FieldProto.TYPE_FIXED32: _UINT32,
    FieldProto.TYPE_INT64: _INT64,
    FieldProto.TYPE_SINT64: _INT64,
    FieldProto.TYPE_SFIXED64: _INT64,
    FieldProto.TYPE_UINT64: _UINT64,
    FieldProto.TYPE_FIXED64: _UINT64,
    FieldProto.TYPE_BOOL: {"type": "boolean"},
    FieldProto.TYPE_STRING: {"type": "string"},
    FieldProto.TYPE_BYTES: {"type": "string", "contentEncoding": "base64"},
}

# The well-known types have JSON forms of their own.
_ANY = {
    "type": "object",
    "description": "A google.protobuf.Any: the packed message's fields and its type URL in @type.",
    "required": ["@type"],
    "properties": {"@type": {"type": "string"}},
    "additionalProperties": True,
}
_WELL_KNOWN: dict[str, Schema] = {
    "google.protobuf.Timestamp": {"type": "string", "format": "date-time"},
    "google.protobuf.Duration": {"type": "string", "pattern": r"^-?[0-9]+(\.[0-9]{1,9})?s$"},
    "google.protobuf.FieldMask": {"type": "string"},
    "google.protobuf.Any": _ANY,
    "google.protobuf.Struct": {"type": "object", "additionalProperties": True},
    "google.protobuf.Value": {},
    "google.protobuf.ListValue": {"type": "array"},
    "google.protobuf.Empty": {"type": "object", "additionalProperties": False},
    "google.protobuf.DoubleValue": _SCALARS[FieldProto.TYPE_DOUBLE],
    "google.protobuf.FloatValue": _SCALARS[FieldProto.TYPE_FLOAT],
    "google.protobuf.Int64Value": _INT64,
    "google.protobuf.UInt64Value": _UINT64,
    "google.protobuf.Int32Value": _INT32,
    "google.protobuf.UInt32Value": _UINT32,
    "google.protobuf.BoolValue": {"type": "boolean"},
    "google.protobuf.StringValue": {"type": "string"},
    "google.protobuf.BytesValue": _SCALARS[FieldProto.TYPE_BYTES],
}

# Output fields that are not always printed although they have no presence.
# Envoy's own error replies (unknown path, bad JSON, body too large, no
# upstream) are a google.rpc.Status with only a code and a message.
_NOT_ALWAYS_PRINTED = {"google.rpc.Status": {"details"}}

# The one rule the service adds to the contract's (agentlab/api/validation.py):
# a request's `prompt` longer than AGENTLAB_MAX_PROMPT_CHARS is refused, and
# its default is far below the contract's max_len. The document gives the
# maximum a client of a default deployment meets, not the ceiling, which a
# client would only learn of from a 400.
_PROMPT = "prompt"

_ERROR_DESCRIPTION = (
    "The call failed: a google.rpc.Status, with the HTTP status mapped from its code "
    "(INVALID_ARGUMENT 400, NOT_FOUND 404, UNAVAILABLE 503, ...). Errors from the service "
    "carry details (google.rpc.ErrorInfo and others); errors from Envoy itself only a "
    "code and a message."
)

_SSE_DESCRIPTION = (
    "Server-Sent Events: one `data: {{json}}` line for each message of the gRPC stream "
    "({name}), in the same JSON as the unary responses, with `id:` the event's sequence "
    "(the first event also `retry:`, in milliseconds). A reconnect with `Last-Event-ID` "
    "resumes after that event. A failure before the first message is an ordinary error "
    "response instead."
)


# The RPCs the gateway serves without an API key (agentlab.api.auth; a test
# holds the two to the same list).
OPEN_METHODS = frozenset({"agentlab.v1.LabService.GetHealth"})

_SECURITY_SCHEMES = {
    "apiKey": {
        "type": "http",
        "scheme": "bearer",
        "description": (
            "An API key, as `Authorization: Bearer <key>`. Required when the gateway is "
            "configured with keys (AGENTLAB_API_KEYS_FILE); without keys it is open, on "
            "localhost only. A missing or wrong key is a 401."
        ),
    }
}

_RANGE_KEYWORDS = {
    "gte": "minimum",
    "gt": "exclusiveMinimum",
    "lte": "maximum",
    "lt": "exclusiveMaximum",
}
# Rule types whose values are JSON numbers (64-bit integers are strings).
_NUMERIC_RULES = {"int32", "uint32", "sint32", "fixed32", "sfixed32", "float", "double"}


class _FieldRules:
    """The `buf.validate.field` rules of fields, read from the descriptor set
    itself, so nothing generated needs importing."""

    def __init__(self, descriptors: descriptor_pb2.FileDescriptorSet) -> None:
        names = [file.name for file in descriptors.file]
        self._extension: Any = None
        if "buf/validate/validate.proto" not in names:
            return
        pool = descriptor_pool.DescriptorPool()
        for file in descriptors.file:
            pool.Add(file)
        classes = message_factory.GetMessageClassesForFiles(names, pool)
        self._options = classes["google.protobuf.FieldOptions"]
        self._extension = pool.FindExtensionByName("buf.validate.field")

    def of(self, fld: FieldProto) -> Any:
        if self._extension is None:
            return None
        options = self._options.FromString(fld.options.SerializeToString())
        if not options.HasExtension(self._extension):
            return None
        return options.Extensions[self._extension]


def _constrained(schema: Schema, rules: Any) -> Schema:
    """``schema`` with what JSON Schema can say of ``rules`` (a
    buf.validate.FieldRules, of a class made at run time)."""
    constraints: Schema = {}
    kind = rules.WhichOneof("type")
    typed: Any = getattr(rules, kind) if kind else None
    if kind == "string":
        for rule, keyword in (("min_len", "minLength"), ("max_len", "maxLength")):
            if typed.HasField(rule):
                constraints[keyword] = getattr(typed, rule)
        if typed.HasField("len"):
            constraints["minLength"] = constraints["maxLength"] = typed.len
        if typed.HasField("pattern"):
            constraints["pattern"] = typed.pattern
    elif kind in _NUMERIC_RULES:
        for rule, keyword in _RANGE_KEYWORDS.items():
            if typed.HasField(rule):
                constraints[keyword] = getattr(typed, rule)
    notes = [f"Rule `{rule.id}`: {rule.message}." for rule in rules.cel if rule.message]
    if notes:
        description = schema.get("description", "")
        schema["description"] = "\n\n".join(filter(None, [description, *notes]))
    if not constraints:
        return schema
    ignore: Any = rules.DESCRIPTOR.fields_by_name["ignore"].enum_type
    if rules.ignore == ignore.values_by_name["IGNORE_IF_ZERO_VALUE"].number:
        zero = "" if schema.get("type") == "string" else 0
        return {**schema, "anyOf": [{"const": zero}, constraints]}
    return {**schema, **constraints}


def _constrained_list(items: Schema, rules: Any) -> Schema:
    """An array of ``items`` with what JSON Schema can say of ``rules`` (a
    buf.validate.RepeatedRules): its length, uniqueness, and each item's
    own rules."""
    schema: Schema = {"type": "array"}
    if rules.HasField("items"):
        items = _constrained(items, rules.items)
    schema["items"] = items
    for rule, keyword in (("min_items", "minItems"), ("max_items", "maxItems")):
        if rules.HasField(rule):
            schema[keyword] = getattr(rules, rule)
    if rules.unique:
        schema["uniqueItems"] = True
    return schema


def _prompt_limit(schema: Schema) -> Schema:
    """A prompt's schema with the service's default maximum in place of the
    contract's ceiling, and a description naming both and the setting."""
    ceiling = schema.get("maxLength")
    limit = Settings.max_prompt_chars
    if not isinstance(ceiling, int) or limit > ceiling:
        raise SystemExit(f"the prompt's max_len ({ceiling}) must bound the service's ({limit})")
    note = (
        f"At most {limit:,} characters by default: the service refuses longer prompts. "
        f"AGENTLAB_MAX_PROMPT_CHARS sets a deployment's maximum, up to the contract's "
        f"ceiling of {ceiling:,} (the field's max_len)."
    )
    description = "\n\n".join(filter(None, [schema.get("description", ""), note]))
    return {**schema, "maxLength": limit, "description": description}


def _comment(text: str) -> str:
    lines = [line.removeprefix(" ").rstrip() for line in text.strip("\n").split("\n")]
    return "\n".join(lines).strip()


@dataclass
class _Message:
    proto: descriptor_pb2.DescriptorProto
    file: str
    path: tuple[int, ...]


@dataclass
class _Enum:
    proto: descriptor_pb2.EnumDescriptorProto
    file: str
    path: tuple[int, ...]


@dataclass
class _Route:
    method: str
    template: str
    rule: http_pb2.HttpRule


@dataclass
class Generator:
    """Turns a FileDescriptorSet into an OpenAPI document."""

    descriptors: descriptor_pb2.FileDescriptorSet
    messages: dict[str, _Message] = field(default_factory=dict)
    enums: dict[str, _Enum] = field(default_factory=dict)
    comments: dict[tuple[str, tuple[int, ...]], str] = field(default_factory=dict)
    schemas: dict[str, Schema] = field(default_factory=dict)
    output_types: set[str] = field(default_factory=set)
    rules: _FieldRules = field(init=False)

    def __post_init__(self) -> None:
        self.rules = _FieldRules(self.descriptors)
        for file in self.descriptors.file:
            for location in file.source_code_info.location:
                text = location.leading_comments or location.trailing_comments
                if text.strip():
                    self.comments[(file.name, tuple(location.path))] = _comment(text)
            prefix = f"{file.package}." if file.package else ""
            for i, message in enumerate(file.message_type):
                self._index_message(message, prefix, file.name, (_FILE_MESSAGE, i))
            for i, enum in enumerate(file.enum_type):
                self.enums[prefix + enum.name] = _Enum(enum, file.name, (_FILE_ENUM, i))

    def _index_message(
        self, message: descriptor_pb2.DescriptorProto, prefix: str, file: str, path: tuple[int, ...]
    ) -> None:
        name = prefix + message.name
        self.messages[name] = _Message(message, file, path)
        for i, nested in enumerate(message.nested_type):
            self._index_message(nested, f"{name}.", file, (*path, _MESSAGE_NESTED, i))
        for i, enum in enumerate(message.enum_type):
            self.enums[f"{name}.{enum.name}"] = _Enum(enum, file, (*path, _MESSAGE_ENUM, i))

    def _doc(self, file: str, path: tuple[int, ...]) -> str:
        return self.comments.get((file, path), "")

    # Schemas

    def _is_map(self, fld: FieldProto) -> bool:
        if fld.type != FieldProto.TYPE_MESSAGE:
            return False
        return self.messages[fld.type_name.lstrip(".")].proto.options.map_entry

    def _ref(self, type_name: str, *, output: bool) -> Schema:
        """A reference to a message's schema, added to the components on first use."""
        if type_name in _WELL_KNOWN:
            return dict(_WELL_KNOWN[type_name])
        # A message that appears in responses and in requests needs two
        # schemas: only a response has every field without presence.
        name = type_name if output or type_name not in self.output_types else f"{type_name}.Input"
        if name not in self.schemas:
            self.schemas[name] = {}  # recursion guard
            self.schemas[name] = self._message_schema(type_name, output=output)
        return {"$ref": f"#/components/schemas/{name}"}

    def _enum_schema(self, type_name: str) -> Schema:
        enum = self.enums[type_name]
        lines = []
        for i, value in enumerate(enum.proto.value):
            doc = self._doc(enum.file, (*enum.path, _ENUM_VALUE, i))
            lines.append(f"- `{value.name}`: {doc}" if doc else f"- `{value.name}`")
        description = "\n\n".join(filter(None, [self._doc(enum.file, enum.path), "\n".join(lines)]))
        self.schemas[type_name] = {
            "type": "string",
            "title": type_name,
            "enum": [value.name for value in enum.proto.value],
            "description": description,
        }
        return {"$ref": f"#/components/schemas/{type_name}"}

    def _value_schema(self, fld: FieldProto, *, output: bool) -> Schema:
        """The schema of one value of a field (one element if it is repeated)."""
        if fld.type == FieldProto.TYPE_ENUM:
            return self._enum_schema(fld.type_name.lstrip("."))
        if fld.type == FieldProto.TYPE_MESSAGE:
            return self._ref(fld.type_name.lstrip("."), output=output)
        if fld.type == FieldProto.TYPE_GROUP:
            raise SystemExit(f"groups have no JSON mapping: field {fld.name}")
        return dict(_SCALARS[fld.type])

    def field_schema(self, fld: FieldProto, *, output: bool) -> Schema:
        if self._is_map(fld):
            entry = self.messages[fld.type_name.lstrip(".")].proto
            value = next(f for f in entry.field if f.name == "value")
            return {
                "type": "object",
                "additionalProperties": self._value_schema(value, output=output),
            }
        schema = self._value_schema(fld, output=output)
        if fld.label == FieldProto.LABEL_REPEATED:
            rules = None if output else self.rules.of(fld)
            if rules is None or rules.WhichOneof("type") != "repeated":
                return {"type": "array", "items": schema}
            return _constrained_list(schema, rules.repeated)
        # A request's rules; a response is the service's own.
        if not output and (rules := self.rules.of(fld)) is not None:
            schema = _constrained(schema, rules)
            if fld.name == _PROMPT:
                schema = _prompt_limit(schema)
        return schema

    def _message_schema(
        self, type_name: str, *, output: bool, without: frozenset[str] = frozenset()
    ) -> Schema:
        message = self.messages[type_name]
        properties: dict[str, Schema] = {}
        required: list[str] = []
        oneofs: dict[int, list[str]] = {}
        for i, fld in enumerate(message.proto.field):
            if fld.name in without:
                continue
            schema = self.field_schema(fld, output=output)
            notes = []
            real_oneof = fld.HasField("oneof_index") and not fld.proto3_optional
            if fld.proto3_optional:
                notes.append("Optional: absent when not set.")
            if real_oneof:
                oneof_name = message.proto.oneof_decl[fld.oneof_index].name
                notes.append(f"One of `{oneof_name}`: at most one of its fields is present.")
                oneofs.setdefault(fld.oneof_index, []).append(fld.name)
            doc = "\n\n".join(
                filter(None, [self._doc(message.file, (*message.path, _MESSAGE_FIELD, i)), *notes])
            )
            if doc:
                # After the field's comment: what a rule of it says in words.
                schema["description"] = "\n\n".join(filter(None, [doc, schema.get("description")]))
            properties[fld.name] = schema
            # Printed even when zero or empty: every field without presence.
            has_presence = (
                fld.proto3_optional
                or real_oneof
                or (
                    fld.type == FieldProto.TYPE_MESSAGE
                    and fld.label != FieldProto.LABEL_REPEATED
                    and not self._is_map(fld)
                )
            )
            if output and not has_presence:
                required.append(fld.name)
        for name in _NOT_ALWAYS_PRINTED.get(type_name, ()):
            if name in required:
                required.remove(name)
        schema = {"type": "object", "title": type_name}
        doc = self._doc(message.file, message.path)
        if doc:
            schema["description"] = doc
        schema["properties"] = properties
        if required:
            schema["required"] = required
        # Field names only: the proto field names the transcoder prints.
        schema["additionalProperties"] = False
        constraints = [
            {"not": {"anyOf": [{"required": list(pair)} for pair in combinations(names, 2)]}}
            for names in oneofs.values()
            if len(names) > 1
        ]
        if constraints:
            schema["allOf"] = constraints
        return schema

    def _find_field(self, type_name: str, path: str) -> FieldProto:
        message = self.messages[type_name].proto
        head, _, rest = path.partition(".")
        for fld in message.field:
            if fld.name == head:
                return self._find_field(fld.type_name.lstrip("."), rest) if rest else fld
        raise SystemExit(f"{type_name} has no field {path!r} (named in an http rule)")

    def _field_doc(self, type_name: str, name: str) -> str:
        message = self.messages[type_name]
        for i, fld in enumerate(message.proto.field):
            if fld.name == name:
                return self._doc(message.file, (*message.path, _MESSAGE_FIELD, i))
        return ""

    # Routes

    def _routes(self, rule: http_pb2.HttpRule) -> Iterator[_Route]:
        pattern = rule.WhichOneof("pattern")
        if pattern is None:
            raise SystemExit("an http rule without a pattern")
        if pattern == "custom":
            yield _Route(rule.custom.kind.lower(), rule.custom.path, rule)
        else:
            yield _Route(pattern, getattr(rule, pattern), rule)
        for binding in rule.additional_bindings:
            yield from self._routes(binding)

    @staticmethod
    def _openapi_path(template: str) -> tuple[str, list[str]]:
        """`/v1/{name=things/*}:verb` becomes `/v1/{name}:verb`, with its variables."""
        variables: list[str] = []

        def variable(match: re.Match[str]) -> str:
            name, _, segments = match.group(1).partition("=")
            if segments not in ("", "*"):
                raise SystemExit(f"{template}: a variable of several segments has no OpenAPI form")
            variables.append(name)
            return "{" + name + "}"

        path = re.sub(r"\{([^}]*)\}", variable, template)
        if re.search(r"(^|/)\*\*?(/|:|$)", path):
            raise SystemExit(f"{template}: a wildcard without a variable has no OpenAPI form")
        return path, variables

    def _parameter(self, type_name: str, name: str, where: str) -> Schema:
        fld = self._find_field(type_name, name)
        leaf_type = type_name
        if "." in name:
            leaf_type = self._find_field(type_name, name.rpartition(".")[0]).type_name.lstrip(".")
        schema = self.field_schema(fld, output=False)
        parameter: Schema = {"name": name, "in": where}
        doc = self._field_doc(leaf_type, fld.name)
        if doc:
            parameter["description"] = doc
        if where == "path":
            parameter["required"] = True
        elif fld.label == FieldProto.LABEL_REPEATED:
            parameter["style"], parameter["explode"] = "form", True
        parameter["schema"] = schema
        return parameter

    def _query_fields(self, type_name: str, bound: set[str]) -> Iterator[str]:
        """The fields a query string can set: scalars and enums, repeated or not."""
        for fld in self.messages[type_name].proto.field:
            if fld.name in bound:
                continue
            if fld.type != FieldProto.TYPE_MESSAGE:
                yield fld.name

    def _operation(
        self,
        service: descriptor_pb2.ServiceDescriptorProto,
        package: str,
        method: descriptor_pb2.MethodDescriptorProto,
        doc: str,
        route: _Route,
        operation_id: str,
    ) -> Schema:
        request = method.input_type.lstrip(".")
        response = method.output_type.lstrip(".")
        _, variables = self._openapi_path(route.template)
        body = route.rule.body
        response_field = route.rule.response_body

        parameters = [self._parameter(request, name, "path") for name in variables]
        top_level_bound = {name.partition(".")[0] for name in variables}
        if body != "*":
            bound = top_level_bound | ({body} if body else set())
            parameters += [
                self._parameter(request, name, "query")
                for name in self._query_fields(request, bound)
            ]

        summary, _, _ = doc.partition("\n\n")
        operation: Schema = {
            "operationId": operation_id,
            "tags": [f"{package}.{service.name}"],
            "summary": summary.split(". ")[0].replace("\n", " ").rstrip("."),
            "description": f"{doc}\n\ngRPC: `/{package}.{service.name}/{method.name}`".strip(),
        }
        if parameters:
            operation["parameters"] = parameters
        if f"{package}.{service.name}.{method.name}" in OPEN_METHODS:
            operation["security"] = []

        if body:
            if body == "*":
                without = frozenset(name for name in variables if "." not in name)
                if without:
                    schema = self._message_schema(request, output=False, without=without)
                    schema["description"] = (
                        f"{schema.get('description', '')}\n\nThe fields of {request} "
                        f"not in the path ({', '.join(sorted(without))})."
                    ).strip()
                    properties = bool(schema["properties"])
                else:
                    schema = self._ref(request, output=False)
                    properties = bool(self.messages[request].proto.field)
            else:
                schema = self.field_schema(self._find_field(request, body), output=False)
                properties = True
            if method.client_streaming:
                schema = {"type": "array", "items": schema}
            operation["requestBody"] = {
                # An empty body is an empty request message.
                "required": properties,
                "content": {"application/json": {"schema": schema}},
            }

        if response_field:
            result = self.field_schema(self._find_field(response, response_field), output=True)
            result_name = f"{response}.{response_field}"
        else:
            result = self._ref(response, output=True)
            result_name = response
        if method.server_streaming:
            content = {
                "text/event-stream": {
                    "schema": {
                        "type": "object",
                        "description": "One event of the stream.",
                        "required": ["data"],
                        "properties": {
                            "id": {
                                "type": "string",
                                "description": "The event's sequence number.",
                                "pattern": "^[0-9]+$",
                            },
                            "retry": {
                                "type": "integer",
                                "description": "Milliseconds to wait before reconnecting.",
                            },
                            "data": {
                                "type": "string",
                                "description": f"One {result_name} message as JSON.",
                                "contentMediaType": "application/json",
                                "contentSchema": result,
                            },
                        },
                    }
                }
            }
            description = _SSE_DESCRIPTION.format(name=result_name)
        else:
            content = {"application/json": {"schema": result}}
            description = self._doc(self.messages[response].file, self.messages[response].path) or (
                "One " + result_name
            )
        operation["responses"] = {
            "200": {"description": description, "content": content},
            "default": {
                "description": _ERROR_DESCRIPTION,
                "content": {
                    "application/json": {"schema": self._ref("google.rpc.Status", output=True)}
                },
            },
        }
        return operation

    def _methods(
        self,
    ) -> Iterator[
        tuple[
            descriptor_pb2.FileDescriptorProto,
            int,
            descriptor_pb2.ServiceDescriptorProto,
            int,
            descriptor_pb2.MethodDescriptorProto,
        ]
    ]:
        for file in self.descriptors.file:
            for s, service in enumerate(file.service):
                for m, method in enumerate(service.method):
                    if method.options.HasExtension(annotations_pb2.http):
                        yield file, s, service, m, method

    def _collect_output_types(self, type_name: str) -> None:
        if type_name in self.output_types or type_name in _WELL_KNOWN:
            return
        self.output_types.add(type_name)
        for fld in self.messages[type_name].proto.field:
            if fld.type == FieldProto.TYPE_MESSAGE:
                self._collect_output_types(fld.type_name.lstrip("."))

    def document(self) -> Schema:
        self._collect_output_types("google.rpc.Status")
        for _, _, _, _, method in self._methods():
            self._collect_output_types(method.output_type.lstrip("."))

        paths: dict[str, dict[str, Schema]] = {}
        tags: list[Schema] = []
        for file, s, service, m, method in self._methods():
            tag = f"{file.package}.{service.name}"
            if not any(t["name"] == tag for t in tags):
                tags.append({"name": tag, "description": self._doc(file.name, (_FILE_SERVICE, s))})
            doc = self._doc(file.name, (_FILE_SERVICE, s, _SERVICE_METHOD, m))
            rule = method.options.Extensions[annotations_pb2.http]
            for i, route in enumerate(self._routes(rule)):
                operation_id = f"{service.name}_{method.name}" + (str(i + 1) if i else "")
                path, _ = self._openapi_path(route.template)
                if route.method in paths.get(path, {}):
                    raise SystemExit(f"two rules map {route.method.upper()} {path}")
                paths.setdefault(path, {})[route.method] = self._operation(
                    service, file.package, method, doc, route, operation_id
                )

        return {
            "openapi": "3.1.0",
            "info": {
                "title": "Agent Lab Gateway REST API",
                "version": "v1",
                "description": (
                    "The REST face of the gRPC services below, as Envoy's gRPC-JSON "
                    "transcoder serves it. Generated from the protos by "
                    "scripts/gen_openapi.py.\n\n"
                    "JSON is proto3 JSON with the proto field names (snake_case). Every field "
                    "without presence is printed, zero or not; optional fields, oneof members "
                    "and unset messages are absent. 64-bit integers are decimal strings, enums "
                    "their value names, timestamps RFC 3339 strings. Requests may also give "
                    "enums as numbers and 64-bit integers as numbers."
                ),
            },
            "servers": [{"url": "/"}],
            # The key is optional: only a gateway configured with keys asks.
            "security": [{"apiKey": []}, {}],
            "tags": tags,
            "paths": paths,
            "components": {
                "schemas": dict(sorted(self.schemas.items())),
                "securitySchemes": _SECURITY_SCHEMES,
            },
        }


def generate(descriptor: Path = DESCRIPTOR) -> Schema:
    descriptors = descriptor_pb2.FileDescriptorSet.FromString(descriptor.read_bytes())
    return Generator(descriptors).document()


def write_openapi(descriptor: Path = DESCRIPTOR, out: Path = OPENAPI) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(generate(descriptor), indent=2) + "\n")
    print(f"generated {out}")


def main() -> None:
    if not DESCRIPTOR.exists():
        sys.exit(f"{DESCRIPTOR} is missing: run scripts/gen_protos.py (make setup)")
    write_openapi()


if __name__ == "__main__":
    main()
