"""The OpenAPI document (build/openapi.json, which the gateway serves) against
sources the generator does not share: the contract as protoc compiled it into
the stubs (its `google.api.http` rules and request messages) and the rules
the service enforces (`RequestRules` with the default settings).

Comparing the document with another run of its generator would agree with
any mistake the generator makes; these checks do not use it.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from google.api import annotations_pb2, http_pb2  # type: ignore[import-untyped]
from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor, MethodDescriptor
from google.protobuf.message import Message

from agentlab.api.validation import RequestRules
from agentlab.config import Settings
from agentlab.devstack import ROOT
from agentlab.v1 import lab_service_pb2

DOCUMENT: dict[str, Any] = json.loads((ROOT / "build" / "openapi.json").read_text())
# What a default deployment enforces.
RULES = RequestRules(max_prompt_chars=Settings.max_prompt_chars)


@dataclass(frozen=True)
class Route:
    verb: str  # "GET", "POST", ...
    path: str  # the template's variables as {name}
    variables: tuple[str, ...]
    body: str  # the rule's body: "*", a field name, or "" for none
    method: MethodDescriptor


def rules_of(rule: http_pb2.HttpRule) -> Iterator[http_pb2.HttpRule]:
    yield rule
    for binding in rule.additional_bindings:
        yield from rules_of(binding)


def contract_routes() -> list[Route]:
    """Every REST route the contract's http rules declare."""
    routes = []
    for service in lab_service_pb2.DESCRIPTOR.services_by_name.values():
        for method in service.methods:
            options = method.GetOptions()
            if not options.HasExtension(annotations_pb2.http):
                continue
            for rule in rules_of(options.Extensions[annotations_pb2.http]):
                verb = rule.WhichOneof("pattern")
                assert verb is not None
                template = rule.custom.path if verb == "custom" else getattr(rule, verb)
                verb = rule.custom.kind if verb == "custom" else verb
                variables = tuple(re.findall(r"\{([^}=]+)(?:=[^}]*)?\}", template))
                path = re.sub(r"\{([^}=]+)(?:=[^}]*)?\}", r"{\1}", template)
                routes.append(Route(verb.upper(), path, variables, rule.body, method))
    return routes


ROUTES = contract_routes()


def operation(route: Route) -> dict[str, Any]:
    found: dict[str, Any] = DOCUMENT["paths"][route.path][route.verb.lower()]
    return found


def resolve(schema: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in schema:
        name = schema["$ref"].removeprefix("#/components/schemas/")
        schema = {
            **DOCUMENT["components"]["schemas"][name],
            **{k: v for k, v in schema.items() if k != "$ref"},
        }
    return schema


def request_fields(route: Route) -> dict[str, dict[str, Any]]:
    """Each request field the operation lets a client set, by name, with
    its schema: path parameters, query parameters and body properties."""
    op = operation(route)
    fields = {p["name"]: resolve(p["schema"]) for p in op.get("parameters", [])}
    body = op.get("requestBody")
    if body is not None:
        schema = resolve(body["content"]["application/json"]["schema"])
        fields |= {name: resolve(s) for name, s in schema["properties"].items()}
    return fields


def test_every_http_rule_is_an_operation_and_nothing_else() -> None:
    declared = {(r.verb, r.path) for r in ROUTES}
    documented = {
        (verb.upper(), path)
        for path, operations in DOCUMENT["paths"].items()
        for verb in operations
    }
    assert len(declared) == len(ROUTES)
    assert documented == declared


@pytest.mark.parametrize("route", ROUTES, ids=lambda r: f"{r.verb} {r.path}")
def test_each_operation_is_its_rpc(route: Route) -> None:
    op = operation(route)
    assert (
        f"gRPC: `/{route.method.full_name.rpartition('.')[0]}/{route.method.name}`"
        in (op["description"])
    )
    path_parameters = [p["name"] for p in op.get("parameters", []) if p["in"] == "path"]
    assert sorted(path_parameters) == sorted(route.variables)
    assert ("requestBody" in op) == bool(route.body)


def json_type(fld: FieldDescriptor) -> dict[str, Any]:
    """What proto3 JSON makes of a scalar or enum field, from the proto type."""
    if fld.type == FieldDescriptor.TYPE_ENUM:
        assert fld.enum_type is not None  # an enum field has its enum
        return {"type": "string", "enum": [v.name for v in fld.enum_type.values]}
    strings = {FieldDescriptor.TYPE_STRING}
    # 64-bit integers are decimal strings in proto3 JSON.
    strings |= {
        FieldDescriptor.TYPE_INT64,
        FieldDescriptor.TYPE_UINT64,
        FieldDescriptor.TYPE_SINT64,
        FieldDescriptor.TYPE_FIXED64,
        FieldDescriptor.TYPE_SFIXED64,
    }
    if fld.type in strings:
        return {"type": "string"}
    if fld.type == FieldDescriptor.TYPE_BOOL:
        return {"type": "boolean"}
    if fld.type in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        return {"type": "number"}
    return {"type": "integer"}


@pytest.mark.parametrize("route", ROUTES, ids=lambda r: f"{r.verb} {r.path}")
def test_each_operation_takes_exactly_the_request_messages_fields(route: Route) -> None:
    """Body "*": every field not in the path is a body property. No body:
    every field not in the path is a query parameter. Each with the JSON
    type proto3 JSON gives the field's proto type."""
    message: Descriptor = route.method.input_type
    assert route.body in ("*", ""), "a body bound to one field: extend this test"
    documented = request_fields(route)
    assert set(documented) == set(message.fields_by_name)
    if route.body == "":
        query = [p["name"] for p in operation(route).get("parameters", []) if p["in"] == "query"]
        assert sorted(query) == sorted(set(message.fields_by_name) - set(route.variables))
    for name, fld in message.fields_by_name.items():
        expected = json_type(fld)
        schema = documented[name]
        if fld.is_repeated:
            assert schema["type"] == "array", name
            schema = schema["items"]
        assert {k: schema.get(k) for k in expected} == expected, name


# -- The limits: what the document says a field accepts, against what the
# service's request rules accept.


def violated(message_type: Descriptor, name: str, value: Any) -> bool | None:
    """Whether the service's rules refuse ``value`` in field ``name`` (the
    other fields left unset); None when the field's type cannot hold it."""
    request: Message = message_factory.GetMessageClass(message_type)()
    try:
        if isinstance(value, list):  # a repeated field's items
            getattr(request, name).extend(value)
        else:
            setattr(request, name, value)
    except (ValueError, TypeError, OverflowError):
        return None
    # A repeated field's item is named with its index: `name[2]`.
    return any(v.field == name or v.field.startswith(f"{name}[") for v in RULES.violations(request))


def constraints(schema: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """(the keywords that limit a value, whether the empty/zero value is let
    through beside them, as IGNORE_IF_ZERO_VALUE rules are)."""
    for option in schema.get("anyOf", []):
        if "const" not in option:
            return option, True
    return schema, False


def documented_limits() -> Iterator[tuple[str, Descriptor, str, dict[str, Any], bool]]:
    seen = set()
    for route in ROUTES:
        if route.verb.lower() not in DOCUMENT["paths"].get(route.path, {}):
            continue  # test_every_http_rule_is_an_operation_and_nothing_else says so
        for name, schema in request_fields(route).items():
            key = (route.method.input_type.full_name, name)
            if key in seen:
                continue
            seen.add(key)
            limits, zero_allowed = constraints(schema)
            yield f"{key[0]}.{name}", route.method.input_type, name, limits, zero_allowed


LIMITS = list(documented_limits())


def matches(pattern: str, text: str) -> bool:
    """JSON Schema's (ECMA-262's) reading of ``pattern``: unanchored, and a
    final `$` is the end of the text (Python's also matches before a final
    newline)."""
    if pattern.endswith("$") and not pattern.endswith("\\$"):
        pattern = pattern[:-1] + r"\Z"
    return re.search(pattern, text) is not None


# Strings for comparing a documented pattern with the service's verdict.
PROBES = ["a", "Z9", "mistral7b", "llama3.2:1b", "org/model-v1_2", "0" * 32, "f" * 32, "a" * 33]
PROBES += ["-a", ".a", "a b", "A" * 32, "é", "a\n", "a!", "0" * 31, "x:y/z-w.v_u"]


@pytest.mark.parametrize(
    ("message_type", "name", "limits", "zero_allowed"),
    [pytest.param(*limit[1:], id=limit[0]) for limit in LIMITS],
)
def test_documented_limits_are_the_enforced_ones(
    message_type: Descriptor, name: str, limits: dict[str, Any], zero_allowed: bool
) -> None:
    """At each documented bound the service accepts; one step past it, it
    refuses naming the field. A field documented without a bound takes any
    value its type holds; a pattern agrees with the service on every probe."""
    fld = message_type.fields_by_name[name]
    if fld.is_repeated:
        check_list_limits(message_type, name, limits)
    elif fld.type == FieldDescriptor.TYPE_STRING:
        if zero_allowed:
            assert violated(message_type, name, "") is False
        low, high = limits.get("minLength", 0), limits.get("maxLength")
        pattern = limits.get("pattern")
        if pattern is not None:
            for probe in PROBES:
                fits = matches(pattern, probe) and low <= len(probe)
                fits = fits and (high is None or len(probe) <= high)
                assert violated(message_type, name, probe) is (not fits), (probe, pattern)
        if low > 0:
            assert violated(message_type, name, "a" * low) is False
            assert violated(message_type, name, "a" * (low - 1)) is True
        if high is not None:
            assert violated(message_type, name, "a" * high) is False
            assert violated(message_type, name, "a" * (high + 1)) is True
        elif pattern is None:
            # No documented maximum: none enforced.
            assert violated(message_type, name, "a" * 100_000) is False
    elif fld.type in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        low, high = limits.get("minimum", -math.inf), limits.get("maximum", math.inf)
        for bound, outside in ((low, -math.inf), (high, math.inf)):
            if math.isfinite(bound):
                assert violated(message_type, name, float(bound)) is False
                past = math.nextafter(float(bound), outside)
                assert violated(message_type, name, past) is True
            else:
                assert violated(message_type, name, outside) is False
    elif fld.type == FieldDescriptor.TYPE_ENUM:
        assert fld.enum_type is not None  # an enum field has its enum
        names = [v.name for v in fld.enum_type.values]
        assert limits.get("enum", names) == names
        for value in fld.enum_type.values:
            assert violated(message_type, name, value.number) is False
    elif json_type(fld)["type"] == "integer":
        low, high = limits.get("minimum"), limits.get("maximum")
        assert low is not None
        assert high is not None
        for bound, step in ((low, -1), (high, 1)):
            assert violated(message_type, name, bound) is False
            # Past a bound of the type itself the field cannot be set: None.
            assert violated(message_type, name, bound + step) in (True, None)
            if violated(message_type, name, bound + step) is None:
                assert fld.type in TYPE_RANGES
                assert bound in TYPE_RANGES[fld.type]


def check_list_limits(message_type: Descriptor, name: str, limits: dict[str, Any]) -> None:
    """A repeated string field: its documented number of items, their
    uniqueness and each item's pattern, against the service's verdict."""
    assert message_type.fields_by_name[name].type == FieldDescriptor.TYPE_STRING, "extend this"
    pattern = limits["items"].get("pattern")
    candidates = [*PROBES, *(f"{n:032x}" for n in range(1, 200))]
    fitting = [c for c in candidates if pattern is None or matches(pattern, c)]
    low, high = limits.get("minItems", 0), limits.get("maxItems")
    assert violated(message_type, name, fitting[: max(low, 1)]) is False
    if low > 0:
        assert violated(message_type, name, fitting[: low - 1]) is True
    if high is not None:
        assert violated(message_type, name, fitting[:high]) is False
        assert violated(message_type, name, fitting[: high + 1]) is True
    if limits.get("uniqueItems"):
        assert violated(message_type, name, [fitting[0]] * max(low, 2)) is True
    if pattern is not None:
        others = fitting[-max(low - 1, 0) :] if low > 1 else []
        for probe in PROBES:
            if probe not in others:
                fits = matches(pattern, probe)
                assert violated(message_type, name, [probe, *others]) is (not fits), probe


TYPE_RANGES = {
    FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
}


def test_every_field_the_service_limits_is_documented_with_a_limit() -> None:
    """A request field whose rules refuse a value the type holds has a limit
    in the document: probed with values no documented rule would refuse."""
    unbounded = []
    for _, message_type, name, limits, _ in LIMITS:
        fld = message_type.fields_by_name[name]
        limiting = {
            "minLength",
            "maxLength",
            "pattern",
            "minimum",
            "maximum",
            "minItems",
            "maxItems",
        }
        if limits.keys() & limiting:
            continue
        if fld.type == FieldDescriptor.TYPE_STRING:
            refused = violated(message_type, name, "A plain value") or violated(
                message_type, name, "x" * 100_000
            )
        elif fld.type in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
            refused = violated(message_type, name, -1e300) or violated(message_type, name, 1e300)
        else:
            continue
        if refused:
            unbounded.append(f"{message_type.full_name}.{name}")
    assert unbounded == []
