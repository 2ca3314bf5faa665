"""The gateway's Lua filters (gateway/lua/), run in LuaJIT (what Envoy embeds)
through lupa with stand-ins for Envoy's handles: every way a stream can be cut
into chunks, and the JSON bodies the key scanner must get right. The tests
through Envoy (test_sse_resume.py, test_unknown_fields.py) show them in place;
Envoy never hands over some of these chunkings on its own."""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import unquote

import pytest
from lupa import luajit21

from agentlab.devstack import ROOT

LUA = ROOT / "gateway" / "lua"


class Buffer:
    """Envoy's buffer, with its method names."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    def length(self) -> int:
        return len(self.data)

    def getBytes(self, start: int, length: int) -> bytes:
        return self.data[start : start + length]

    def setBytes(self, data: bytes) -> None:
        self.data = bytes(data)


class Headers:
    """Lua hands over bytes (the runtime has no encoding): kept as text here."""

    def __init__(self, values: dict[str, str]) -> None:
        self.values = dict(values)

    def get(self, name: bytes) -> bytes | None:
        value = self.values.get(name.decode())
        return None if value is None else value.encode()

    def add(self, name: bytes, value: bytes) -> None:
        self.values[name.decode()] = value.decode()

    def remove(self, name: bytes) -> None:
        self.values.pop(name.decode(), None)


def runtime(script: str) -> Any:
    lua = luajit21.LuaRuntime(encoding=None)
    lua.execute((LUA / script).read_bytes())
    return lua


def _iterator(lua: Any, chunks: list[Buffer]) -> Any:
    items = iter(chunks)
    return lua.eval("function(next_chunk) return function() return next_chunk() end end")(
        lambda: next(items, None)
    )


class ResponseHandle:
    def __init__(self, lua: Any, content_type: str, chunks: list[bytes]) -> None:
        self._headers = Headers({"content-type": content_type})
        self.chunks = [Buffer(c) for c in chunks]
        self._lua = lua

    def headers(self) -> Headers:
        return self._headers

    def bodyChunks(self) -> Any:
        return _iterator(self._lua, self.chunks)


def rewrite(chunks: list[bytes], content_type: str = "text/event-stream") -> list[bytes]:
    lua = runtime("sse_ids.lua")
    handle = ResponseHandle(lua, content_type, chunks)
    lua.globals().envoy_on_response(handle)
    return [c.data for c in handle.chunks]


def message(sequence: int, text: str = "hi") -> bytes:
    event = {"event": {"sequence": sequence, "token_delta": {"text": text}}}
    return b"data: " + json.dumps(event, separators=(",", ":")).encode() + b"\n\n"


# Texts that look like what the filter looks for.
STREAM = b"".join(
    [
        message(1),
        message(2, 'say "sequence":99\n\ndata: x'),
        message(3, "\n"),
        message(4, "\\n\\n"),
        message(10, "x" * 5000),
    ]
)
EXPECTED = b"retry: 1000\n" + b"".join(
    b"id: %d\n" % s + message(s, t)
    for s, t in [
        (1, "hi"),
        (2, 'say "sequence":99\n\ndata: x'),
        (3, "\n"),
        (4, "\\n\\n"),
        (10, "x" * 5000),
    ]
)


def test_each_message_gets_its_sequence_as_id_and_the_first_a_retry_hint() -> None:
    assert b"".join(rewrite([STREAM])) == EXPECTED


@pytest.mark.parametrize("cut", range(1, len(STREAM) - 5000, 7))
def test_a_message_split_between_two_chunks(cut: int) -> None:
    assert b"".join(rewrite([STREAM[:cut], STREAM[cut:]])) == EXPECTED


def test_a_chunk_per_byte() -> None:
    small = STREAM[: STREAM.index(message(10, "x" * 5000))]
    expected = EXPECTED[: EXPECTED.index(b"id: 10\n")]
    assert b"".join(rewrite([small[i : i + 1] for i in range(len(small))])) == expected


def test_the_blank_line_split_between_chunks() -> None:
    first = message(1)
    out = rewrite([first[:-1], b"\n" + message(2)])
    assert out == [b"", b"retry: 1000\nid: 1\n" + first + b"id: 2\n" + message(2)]


def test_a_streams_own_failure_event_gets_no_id() -> None:
    """Sequence 0 is not an event of the execution: the browser's
    Last-Event-ID must stay at the last one it can resume after."""
    out = b"".join(rewrite([message(1) + message(0, "failed")]))
    assert out == b"retry: 1000\nid: 1\n" + message(1) + message(0, "failed")


def test_other_responses_are_left_alone() -> None:
    body = b'{"code":3,"message":"x"}'
    assert rewrite([body], "application/json") == [body]


def keys_header(body: bytes | None) -> str | None:
    lua = runtime("json_fields.lua")
    headers = Headers({"x-agentlab-json-fields": "forged"})

    class RequestHandle:
        def headers(self) -> Headers:
            return headers

        def body(self) -> Buffer | None:
            return None if body is None else Buffer(body)

    lua.globals().envoy_on_request(RequestHandle())
    return headers.values.get("x-agentlab-json-fields")


def keys_of(body: bytes) -> list[str] | None:
    header = keys_header(body)
    if header is None:
        return None
    return [json.loads(f'"{unquote(k)}"') for k in header.split(",") if k]


@pytest.mark.parametrize(
    ("body", "keys"),
    [
        (b'{"prompt": "x", "model": "echo", "max_token": 5}', ["prompt", "model", "max_token"]),
        (b"{}", []),
        (b' \n{ "a" : null , "b":true,"c":-1.5e3 }\n', ["a", "b", "c"]),
        # Nested values are skipped, whatever they hold.
        (
            b'{"a": {"b": {"prompt": [1, {"c": "}"}]}}, "d": ["]", "{", "\\""], "e": 1}',
            ["a", "d", "e"],
        ),
        # Escapes in keys and values; keys with commas and non-ASCII.
        (
            b'{"x\\"y": "v\\\\", "c,d": 1, "n\\u00famero": 2, "\xc3\xb1": 3}',
            ['x"y', "c,d", "número", "ñ"],
        ),
        (b'{"prompt": "a \\" } , \\"model\\": 1"}', ["prompt"]),
        # Runs of backslashes: even ends the string at the quote, odd escapes it.
        (b'{"a": "x\\\\", "b": "y\\\\\\"z\\\\\\\\", "c": 0}', ["a", "b", "c"]),
    ],
)
def test_the_top_level_keys_of_a_json_body(body: bytes, keys: list[str]) -> None:
    assert keys_of(body) == keys


@pytest.mark.parametrize("body", [b"", b"[1, 2]", b'"text"', b"null"])
def test_anything_but_a_json_object_sets_no_header(body: bytes) -> None:
    # The transcoder refuses what is not an object; a forged header never passes.
    assert keys_header(body) is None


@pytest.mark.parametrize(
    "body",
    [
        b"{",
        b'{"a" 1}',
        b'{"a": "x',
        b'{"a": 1,',
        # What the transcoder's lenient parser takes, and so would pass unchecked.
        b'{"prompt": "x", "max_token": 5,}',
        b"{'prompt': 'x', 'max_token': 5}",
        b'{prompt: "x", max_token: 5}',
    ],
)
def test_an_object_that_is_not_strict_json_is_marked(body: bytes) -> None:
    assert keys_header(body) == "!"


def test_each_key_is_named_once() -> None:
    body = b"{" + b", ".join([b'"prompt": "x"'] * 3000) + b', "model": "echo"}'
    assert keys_of(body) == ["prompt", "model"]


def test_the_header_stays_small_whatever_the_body() -> None:
    many = "{" + ", ".join(f'"u{i}": 1' for i in range(700)) + "}"
    header = keys_header(many.encode())
    assert header is not None
    listed = header.split(",")
    assert listed[:32] == [f"u{i}" for i in range(32)]
    assert listed[32:] == ["*"]  # more were left out
    long_key = keys_of(b'{"' + b"k" * 20_000 + b'": 1}')
    assert long_key == ["k" * 64]  # cut: still no field of any message


def test_a_request_without_a_body_sets_no_header() -> None:
    assert keys_header(None) is None
