"""SSE ids and Last-Event-ID, with curl as a user would: every event of
Orchestrate and WatchExecution carries `id: <sequence>`, the stream opens with
a `retry:` hint, and a reconnect with Last-Event-ID: N resumes after N."""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import urlencode

import httpx
import pytest

from agentlab.devstack import Stack
from tests.helpers.tools import json_stream, run, tool

PROMPT = "one two three four five six seven eight"


def curl(*args: str) -> str:
    result = run(["curl", "-sS", "-N", *args])
    assert result.returncode == 0, result.stderr
    return result.stdout


def sse_blocks(text: str) -> list[dict[str, str]]:
    """Each block of a text/event-stream as {field: value}."""
    blocks = []
    for raw in text.split("\n\n"):
        if not raw.strip():
            continue
        block: dict[str, str] = {}
        for line in raw.split("\n"):
            field, _, value = line.partition(":")
            block[field] = value.removeprefix(" ")
        blocks.append(block)
    return blocks


def events_with_ids(text: str) -> list[tuple[int, dict[str, Any]]]:
    """(the id, the event) of every block; asserts each is an event whose id
    is its sequence, and the first carries the retry hint."""
    blocks = sse_blocks(text)
    assert blocks, "no events"
    assert blocks[0].pop("retry") == "1000", blocks[0]
    found = []
    for block in blocks:
        assert set(block) == {"id", "data"}, block
        event = json.loads(block["data"])["event"]
        assert block["id"] == str(event["sequence"]), block
        found.append((int(block["id"]), event))
    return found


def post_orchestrate(stack: Stack, body: dict[str, Any]) -> str:
    """The SSE text of Orchestrate's POST binding for ``body``."""
    return curl(
        "-X",
        "POST",
        f"{stack.url}/api/v1/orchestrate",
        "-H",
        "Content-Type: application/json",
        "-d",
        json.dumps(body),
    )


def orchestrate_url(stack: Stack, **extra: str) -> str:
    query = {"prompt": PROMPT, "model": "echo", "mode": "EXECUTION_MODE_INFERENCE", **extra}
    return f"{stack.url}/api/v1/orchestrate?{urlencode(query)}"


def error_of(text: str) -> tuple[int, list[dict[str, str]]]:
    body = json.loads(text)
    [bad_request] = [d for d in body["details"] if d["@type"].endswith("google.rpc.BadRequest")]
    return body["code"], bad_request["field_violations"]


def test_every_event_carries_its_sequence_as_id(echo_stack: Stack) -> None:
    get = events_with_ids(curl(orchestrate_url(echo_stack)))
    post = events_with_ids(
        post_orchestrate(
            echo_stack, {"prompt": PROMPT, "model": "echo", "mode": "EXECUTION_MODE_INFERENCE"}
        )
    )
    # execution_started, node_started, a token per word, node_finished, completed
    expected = list(range(1, len(PROMPT.split()) + 5))
    assert [i for i, _ in get] == expected
    assert [i for i, _ in post] == expected
    execution_id = get[0][1]["execution_id"]
    watched = events_with_ids(curl(f"{echo_stack.url}/api/v1/executions/{execution_id}:watch"))
    assert [i for i, _ in watched] == expected


def test_watch_resumes_after_last_event_id(echo_stack: Stack) -> None:
    events = events_with_ids(curl(orchestrate_url(echo_stack)))
    final = events[-1][0]
    watch = f"{echo_stack.url}/api/v1/executions/{events[0][1]['execution_id']}:watch"

    resumed = events_with_ids(curl("-H", "Last-Event-ID: 3", watch))
    assert [i for i, _ in resumed] == list(range(4, final + 1))
    assert [e for _, e in resumed] == [e for _, e in events[3:]]
    # The later of after_sequence and Last-Event-ID wins.
    later = events_with_ids(curl("-H", "Last-Event-ID: 3", f"{watch}?after_sequence=6"))
    assert [i for i, _ in later] == list(range(7, final + 1))
    assert [
        i for i, _ in events_with_ids(curl("-H", "Last-Event-ID: 9", f"{watch}?after_sequence=2"))
    ] == list(range(10, final + 1))
    # After the final event there is nothing left to send.
    assert sse_blocks(curl("-H", f"Last-Event-ID: {final}", watch)) == []


def test_grpc_clients_resume_with_the_same_metadata(echo_stack: Stack) -> None:
    events = events_with_ids(curl(orchestrate_url(echo_stack)))
    request = json.dumps({"execution_id": events[0][1]["execution_id"]})
    result = run(
        [
            tool("grpcurl"),
            "-plaintext",
            "-H",
            "last-event-id: 5",
            "-d",
            request,
            echo_stack.gateway_grpc,
            "agentlab.v1.LabService/WatchExecution",
        ]
    )
    assert result.returncode == 0, result.stderr
    sequences = [m["event"]["sequence"] for m in json_stream(result.stdout)]
    assert sequences == list(range(6, events[-1][0] + 1))


def test_orchestrate_with_a_request_id_resumes_the_same_execution(echo_stack: Stack) -> None:
    url = orchestrate_url(echo_stack, request_id="resume-curl-1")
    first = events_with_ids(curl(url))
    resumed = events_with_ids(curl("-H", "Last-Event-ID: 2", url))
    assert [i for i, _ in resumed] == list(range(3, first[-1][0] + 1))
    assert [e for _, e in resumed] == [e for _, e in first[2:]]

    listed = httpx.get(f"{echo_stack.url}/api/v1/executions", params={"page_size": 100}).json()
    keyed = [e for e in listed["executions"] if e["request_id"] == "resume-curl-1"]
    assert [e["execution_id"] for e in keyed] == [first[0][1]["execution_id"]]


def test_last_event_id_on_a_new_request_id_streams_the_new_execution_whole(
    echo_stack: Stack,
) -> None:
    # Nothing to resume: the key names no execution yet, so none of its
    # events can have been seen.
    events = events_with_ids(
        curl("-H", "Last-Event-ID: 4", orchestrate_url(echo_stack, request_id="fresh-key"))
    )
    assert [i for i, _ in events] == list(range(1, len(PROMPT.split()) + 5))


def test_last_event_id_without_a_request_id_is_refused(echo_stack: Stack) -> None:
    before = httpx.get(f"{echo_stack.url}/api/v1/executions").json().get("executions", [])
    result = run(
        [
            "curl",
            "-sS",
            "-w",
            "\n%{http_code}",
            "-H",
            "Last-Event-ID: 3",
            orchestrate_url(echo_stack),
        ]
    )
    body, _, status = result.stdout.rpartition("\n")
    assert status == "400"
    code, violations = error_of(body)
    assert code == 3
    assert [(v["field"], v["reason"]) for v in violations] == [
        ("last-event-id", "REQUEST_ID_REQUIRED")
    ]
    assert "request_id" in violations[0]["description"]
    after = httpx.get(f"{echo_stack.url}/api/v1/executions").json().get("executions", [])
    assert len(after) == len(before), "a refused resume started an execution"


@pytest.mark.parametrize("value", ["abc", "-1", "4294967296", "1.5", "٣"])
def test_a_malformed_last_event_id_is_invalid_argument_naming_it(
    echo_stack: Stack, value: str
) -> None:
    events = events_with_ids(curl(orchestrate_url(echo_stack, request_id="malformed-lei")))
    for url in (
        orchestrate_url(echo_stack, request_id="malformed-lei"),
        f"{echo_stack.url}/api/v1/executions/{events[0][1]['execution_id']}:watch",
    ):
        answer = httpx.get(url, headers=[(b"Last-Event-ID", value.encode())])
        assert answer.status_code == 400, answer.text
        code, violations = error_of(answer.text)
        assert code == 3
        assert [(v["field"], v["reason"]) for v in violations] == [
            ("last-event-id", "LAST_EVENT_ID_INVALID")
        ]


def test_ids_survive_events_split_across_chunks(echo_stack: Stack) -> None:
    # ~3,000 events and a last one of ~100 KB (the prompt near the contract's
    # 32,000-character maximum), through Envoy: an id on every event, the
    # JSON intact. test_lua_filters.py cuts a stream at every point.
    prompt = " ".join(f"w{i:05d}" for i in range(3000)) + " " + "x" * 10000
    text = post_orchestrate(
        echo_stack,
        {"prompt": prompt, "model": "echo", "mode": "EXECUTION_MODE_INFERENCE", "max_tokens": 3001},
    )
    events = events_with_ids(text)
    assert [i for i, _ in events] == list(range(1, 3001 + 5))
    assert events[-1][1]["execution_completed"]["result"]["output"] == prompt
