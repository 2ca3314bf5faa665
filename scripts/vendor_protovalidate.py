"""Write third_party/protovalidate/buf/validate/validate.proto from the
installed protovalidate wheel.

The contract declares its request rules with protovalidate (`buf.validate`).
protoc and buf need `buf/validate/validate.proto` as source to compile a file
that imports it, but the wheel ships only the file's descriptor, and nothing
here may be downloaded (buf would fetch it from the Buf Schema Registry). So
the source is printed back from that descriptor: the same declarations, no
comments (the upstream file, bufbuild/protovalidate, documents every rule).
`tests/test_contract.py` compiles the printed file and checks it against the
wheel's descriptor, so an upgrade of protovalidate without a re-run of this
script fails the tests. Re-run it after upgrading the wheel:

    .venv/bin/python scripts/vendor_protovalidate.py
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

from google.protobuf import (
    descriptor_pb2,
    descriptor_pool,
    duration_pb2,
    field_mask_pb2,
    message_factory,
    text_encoding,
    text_format,
    timestamp_pb2,
    unknown_fields,
)
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

ROOT = Path(__file__).resolve().parent.parent
TARGET = ROOT / "third_party" / "protovalidate" / "buf" / "validate" / "validate.proto"
FILE = "buf/validate/validate.proto"

_LABELS = {
    FieldDescriptor.LABEL_OPTIONAL: "optional",
    FieldDescriptor.LABEL_REQUIRED: "required",
    FieldDescriptor.LABEL_REPEATED: "repeated",
}
_SCALARS = {
    number: name.removeprefix("TYPE_").lower()
    for name, number in descriptor_pb2.FieldDescriptorProto.Type.items()
    if name not in ("TYPE_MESSAGE", "TYPE_ENUM", "TYPE_GROUP")
}
_MAX_FIELD_NUMBER = 536_870_911


def wheel_descriptor() -> descriptor_pb2.FileDescriptorProto:
    """validate.proto's descriptor as the protovalidate wheel carries it."""
    from protovalidate._gen.buf.validate import validate_pb

    file = descriptor_pb2.FileDescriptorProto()
    file.ParseFromString(validate_pb.desc().proto.to_binary())
    return file


def with_options_resolved(
    file: descriptor_pb2.FileDescriptorProto,
) -> descriptor_pb2.FileDescriptorProto:
    """The file parsed again once its own extensions are known, so that the
    rules it declares on its fields (`(buf.validate.predefined)`) read as
    fields rather than unknown bytes."""
    # Its imports are well-known types the protobuf package already holds.
    for module in (duration_pb2, field_mask_pb2, timestamp_pb2):
        assert module.DESCRIPTOR.name in file.dependency
    pool = descriptor_pool.Default()
    try:
        pool.FindFileByName(file.name)
    except KeyError:
        pool.Add(file)
    for extension in file.extension:
        # Registers the extension with its extendee class in the default pool.
        pool.FindExtensionByName(f"{file.package}.{extension.name}")
    message_factory.GetMessageClassesForFiles([file.name], pool)
    resolved = descriptor_pb2.FileDescriptorProto()
    resolved.ParseFromString(file.SerializeToString())
    return resolved


def _value(field: FieldDescriptor, value: object) -> str:
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        assert isinstance(value, Message)
        return "{" + text_format.MessageToString(value, as_one_line=True) + "}"
    if field.type == FieldDescriptor.TYPE_ENUM:
        assert field.enum_type is not None
        assert isinstance(value, int)
        return str(field.enum_type.values_by_number[value].name)
    if field.type == FieldDescriptor.TYPE_BOOL:
        return "true" if value else "false"
    if field.type in (FieldDescriptor.TYPE_STRING, FieldDescriptor.TYPE_BYTES):
        raw = value.encode() if isinstance(value, str) else value
        assert isinstance(raw, bytes)
        return '"' + text_encoding.CEscape(raw, as_utf8=True) + '"'
    return repr(value)


def options(message: Message) -> list[str]:
    """`name = value` for each option set, extensions as `(full.name)`."""
    if len(unknown_fields.UnknownFieldSet(message)):
        raise SystemExit(f"{type(message).__name__} has options this script cannot read")
    found: list[str] = []
    for field, value in message.ListFields():
        name = f"({field.full_name})" if field.is_extension else field.name
        values = value if field.is_repeated else [value]
        found.extend(f"{name} = {_value(field, item)}" for item in values)
    return found


def _range(start: int, end_exclusive: int) -> str:
    end = end_exclusive - 1
    if start == end:
        return str(start)
    return f"{start} to {'max' if end >= _MAX_FIELD_NUMBER else end}"


def _field(field: descriptor_pb2.FieldDescriptorProto, syntax: str) -> str:
    if field.type in (field.TYPE_MESSAGE, field.TYPE_ENUM):
        kind = field.type_name
    elif field.type == field.TYPE_GROUP:
        raise SystemExit(f"groups are not supported ({field.name})")
    else:
        kind = _SCALARS[field.type]
    label = _LABELS[field.label]
    if syntax == "proto3" and not (field.label == field.LABEL_REPEATED or field.proto3_optional):
        label = ""
    in_oneof = field.HasField("oneof_index") and not field.proto3_optional
    prefix = "" if in_oneof else f"{label} " if label else ""
    attributes = []
    if field.HasField("default_value"):
        default = field.default_value
        if field.type in (field.TYPE_STRING, field.TYPE_BYTES):
            default = '"' + text_encoding.CEscape(default.encode(), as_utf8=True) + '"'
        attributes.append(f"default = {default}")
    if field.HasField("json_name") and field.json_name != _camel(field.name):
        attributes.append(f'json_name = "{field.json_name}"')
    attributes.extend(options(field.options))
    suffix = f" [{', '.join(attributes)}]" if attributes else ""
    return f"{prefix}{kind} {field.name} = {field.number}{suffix};"


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part[:1].upper() + part[1:] for part in rest)


def _reserved(ranges: Iterator[str], names: list[str], syntax: str) -> Iterator[str]:
    for text in ranges:
        yield f"reserved {text};"
    for name in names:
        yield f'reserved "{name}";' if syntax != "editions" else f"reserved {name};"


def _enum(enum: descriptor_pb2.EnumDescriptorProto, syntax: str) -> Iterator[str]:
    yield f"enum {enum.name} {{"
    for option in options(enum.options):
        yield f"  option {option};"
    for value in enum.value:
        attributes = options(value.options)
        suffix = f" [{', '.join(attributes)}]" if attributes else ""
        yield f"  {value.name} = {value.number}{suffix};"
    ranges = (_range(r.start, r.end + 1) for r in enum.reserved_range)
    for line in _reserved(ranges, list(enum.reserved_name), syntax):
        yield f"  {line}"
    yield "}"


def _message(message: descriptor_pb2.DescriptorProto, syntax: str) -> Iterator[str]:
    if message.options.map_entry:
        raise SystemExit(f"map fields are not supported ({message.name})")
    yield f"message {message.name} {{"
    for option in options(message.options):
        yield f"  option {option};"
    open_oneof: int | None = None
    for field in message.field:
        oneof = (
            field.oneof_index
            if field.HasField("oneof_index") and not field.proto3_optional
            else None
        )
        if oneof != open_oneof:
            if open_oneof is not None:
                yield "  }"
            if oneof is not None:
                declaration = message.oneof_decl[oneof]
                yield f"  oneof {declaration.name} {{"
                for option in options(declaration.options):
                    yield f"    option {option};"
            open_oneof = oneof
        indent = "    " if oneof is not None else "  "
        yield indent + _field(field, syntax)
    if open_oneof is not None:
        yield "  }"
    for nested in message.nested_type:
        yield from (f"  {line}" for line in _message(nested, syntax))
    for enum in message.enum_type:
        yield from (f"  {line}" for line in _enum(enum, syntax))
    for extension_range in message.extension_range:
        yield f"  extensions {_range(extension_range.start, extension_range.end)};"
    ranges = (_range(r.start, r.end) for r in message.reserved_range)
    for line in _reserved(ranges, list(message.reserved_name), syntax):
        yield f"  {line}"
    yield from (f"  {line}" for line in _extensions(message.extension, syntax))
    yield "}"


def _extensions(
    extensions: Iterable[descriptor_pb2.FieldDescriptorProto], syntax: str
) -> Iterator[str]:
    for extension in extensions:
        yield f"extend {extension.extendee} {{"
        yield f"  {_field(extension, syntax)}"
        yield "}"


def render(file: descriptor_pb2.FileDescriptorProto) -> str:
    syntax = file.syntax or "proto2"
    if syntax not in ("proto2", "proto3"):
        raise SystemExit(f"{file.name}: syntax {syntax!r} is not supported")
    if file.service:
        raise SystemExit(f"{file.name}: services are not supported")
    lines = [
        "// Printed by scripts/vendor_protovalidate.py from the descriptor in the",
        "// protovalidate wheel (Apache License 2.0, Copyright Buf Technologies, Inc.).",
        "// Do not edit: re-run the script. The rules are documented upstream in",
        "// bufbuild/protovalidate, proto/protovalidate/buf/validate/validate.proto.",
        "",
        f'syntax = "{syntax}";',
        "",
        f"package {file.package};",
        "",
    ]
    public = set(file.public_dependency)
    for index, dependency in enumerate(file.dependency):
        lines.append(f'import {"public " if index in public else ""}"{dependency}";')
    lines.append("")
    lines.extend(f"option {option};" for option in options(file.options))
    for message in file.message_type:
        lines.append("")
        lines.extend(_message(message, syntax))
    for enum in file.enum_type:
        lines.append("")
        lines.extend(_enum(enum, syntax))
    for line in _extensions(file.extension, syntax):
        if line.startswith("extend"):
            lines.append("")
        lines.append(line)
    return "\n".join(lines) + "\n"


def main() -> None:
    file = with_options_resolved(wheel_descriptor())
    if file.name != FILE:
        sys.exit(f"the wheel's descriptor is {file.name!r}, expected {FILE!r}")
    TARGET.parent.mkdir(parents=True, exist_ok=True)
    TARGET.write_text(render(file))
    buf = Path(sys.executable).parent / "buf"
    subprocess.run([str(buf), "format", "-w", str(TARGET.relative_to(ROOT))], cwd=ROOT, check=True)
    print(f"wrote {TARGET.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
