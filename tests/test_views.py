"""Issue 9, item 3: no response exceeds the default 4 MiB gRPC receive limit
(nor, as JSON, Envoy's 8 MiB response buffer), whatever the contract allows.

Through the real Envoy and service processes, with gRPC clients on their
default limits, grpcurl and REST. The echo backend answers with its input,
so an orchestration's record holds the prompt many times over (plan, answer
and review each take in what came before)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import httpx
import pytest

from agentlab.api import sizing
from agentlab.api.convert import BASIC_TEXT_CHARS
from agentlab.devstack import ROOT, Stack
from agentlab.v1 import execution_pb2 as pb
from agentlab.v1 import lab_service_pb2 as svc
from agentlab.v1 import lab_service_pb2_grpc as svc_grpc
from tests.helpers.sse import read_events
from tests.helpers.stacks import StackFactory
from tests.helpers.tools import run, tool

GRPC_LIMIT = 4 * 1024 * 1024  # gRPC's default receive limit
ENVOY_JSON_LIMIT = 8 * 1024 * 1024  # max_response_body_size in gateway/envoy.yaml
PROMPT_MAX = 1_000_000  # ExecuteRequest.prompt's max_len in the contract
MAX_TOKENS = 32768  # ExecuteRequest.max_tokens's maximum in the contract
ISSUE_PROMPT_CHARS = 32_000  # AGENTLAB_MAX_PROMPT_CHARS's default


@pytest.fixture(scope="module")
def stack(start_module_stack: StackFactory) -> Stack:
    """The echo backend serves every model name, so each test lists its own
    executions by the model name it gave them. Prompts may be as long as the
    contract allows."""
    return start_module_stack(
        {"AGENTLAB_DEFAULT_BACKEND": "echo", "AGENTLAB_MAX_PROMPT_CHARS": str(PROMPT_MAX)}
    )


def stub(address: str) -> Iterator[svc_grpc.LabServiceStub]:
    # No options: the client keeps gRPC's default 4 MiB receive limit.
    with grpc.insecure_channel(address) as channel:
        yield svc_grpc.LabServiceStub(channel)


@pytest.fixture(scope="module")
def lab(stack: Stack) -> Iterator[svc_grpc.LabServiceStub]:
    """Through Envoy, as a gRPC client sees the gateway."""
    yield from stub(stack.gateway_grpc)


def orchestrate(
    lab: svc_grpc.LabServiceStub, prompt: str, model: str, **options: Any
) -> list[pb.ExecutionEvent]:
    request = svc.OrchestrateRequest(prompt=prompt, model=model, **options)
    events = [message.event for message in lab.Orchestrate(request, timeout=300)]
    assert events[-1].HasField("execution_completed"), events[-1]
    return events


def list_all(
    lab: svc_grpc.LabServiceStub, model: str, view: pb.ExecutionView, page_size: int
) -> list[list[pb.Execution]]:
    pages, token = [], ""
    while True:
        page = lab.ListExecutions(
            svc.ListExecutionsRequest(
                model=model, view=view, page_size=page_size, page_token=token
            ),
            timeout=60,
        )
        assert page.ByteSize() < GRPC_LIMIT
        pages.append(list(page.executions))
        token = page.next_page_token
        if not token:
            return pages


def rest_list_all(stack: Stack, params: dict[str, Any]) -> list[list[dict[str, Any]]]:
    pages, token = [], ""
    with httpx.Client(timeout=60) as client:
        while True:
            answer = client.get(
                f"{stack.url}/api/v1/executions", params={**params, "page_token": token}
            )
            assert answer.status_code == 200, answer.text[:500]
            assert len(answer.content) < ENVOY_JSON_LIMIT
            body = answer.json()
            pages.append(body["executions"])
            token = body["next_page_token"]
            if not token:
                return pages


def flatten(pages: list[list[Any]]) -> list[Any]:
    return [item for page in pages for item in page]


def ids(executions: list[Any]) -> list[str]:
    return [e["execution_id"] if isinstance(e, dict) else e.execution_id for e in executions]


def assert_basic(execution: dict[str, Any], prompt: str) -> None:
    """A BASIC item: the first BASIC_TEXT_CHARS of prompt and output, marked,
    and steps without input and output, marked."""
    assert execution["prompt"] == prompt[:BASIC_TEXT_CHARS]
    assert execution["prompt_truncated"] is True
    result = execution["result"]
    assert len(result["output"]) == BASIC_TEXT_CHARS
    assert result["output_truncated"] is True
    assert [step["node"] for step in result["flow"]] == ["plan", "answer", "review"]
    for step in result["flow"]:
        assert step["input"] == ""
        assert step["input_truncated"] is True
        assert step["output"] == ""
        assert step["output_truncated"] is True


# -- the issue's case: twenty orchestrations with 32,000-character prompts --


@dataclass
class Made:
    """Executions a fixture made: what their streams ended with, their prompts."""

    results: dict[str, pb.ExecuteResponse] = field(default_factory=dict)
    prompts: dict[str, str] = field(default_factory=dict)


@pytest.fixture(scope="module")
def issue_case(lab: svc_grpc.LabServiceStub) -> Made:
    """Twenty orchestrations of the issue: each record holds its prompt
    about sixteen times, about 0.5 MB, 10 MB together. Words of 1,000
    characters keep the token count (and the test) small."""
    made = Made()
    for index in range(20):
        word = f"{index:02d}" + "x" * 997 + " "
        prompt = word * (ISSUE_PROMPT_CHARS // len(word))
        assert len(prompt) == ISSUE_PROMPT_CHARS
        final = orchestrate(lab, prompt, "issue9")[-1].execution_completed.result
        made.results[final.execution_id] = final
        made.prompts[final.execution_id] = prompt
    return made


def test_issue_case_full_records_are_far_over_the_grpc_limit_together(
    issue_case: Made,
) -> None:
    """Guards the premise: one unbounded page of them would not fit."""
    together = sum(result.ByteSize() for result in issue_case.results.values())
    assert together > 2 * GRPC_LIMIT
    assert not any(result.output_truncated for result in issue_case.results.values())


def test_rest_list_is_basic_by_default_and_pages_return_each_once(
    stack: Stack, issue_case: Made
) -> None:
    answer = httpx.get(
        f"{stack.url}/api/v1/executions", params={"page_size": 20, "model": "issue9"}, timeout=60
    )
    assert answer.status_code == 200, answer.text[:500]
    page = answer.json()
    assert sorted(ids(page["executions"])) == sorted(issue_case.results)
    assert page["next_page_token"] == ""
    for execution in page["executions"]:
        assert_basic(execution, issue_case.prompts[execution["execution_id"]])
        full = issue_case.results[execution["execution_id"]]
        assert execution["result"]["output"] == full.output[:BASIC_TEXT_CHARS]

    pages = rest_list_all(stack, {"page_size": 7, "model": "issue9"})
    assert [len(p) for p in pages] == [7, 7, 6]
    assert ids(flatten(pages)) == ids(page["executions"]), "newest first, each once"


def test_grpcurl_lists_the_issue_case(stack: Stack, issue_case: Made) -> None:
    result = run(
        [
            tool("grpcurl"),
            "-plaintext",
            "-d",
            '{"page_size": 20, "model": "issue9"}',
            stack.gateway_grpc,
            "agentlab.v1.LabService/ListExecutions",
        ],
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    listed = json.loads(result.stdout)["executions"]
    assert sorted(e["execution_id"] for e in listed) == sorted(issue_case.results)
    assert all(e["prompt_truncated"] for e in listed)


@pytest.mark.parametrize("view", ["EXECUTION_VIEW_FULL", "execution_view_full", "2"])
def test_rest_full_view_pages_are_cut_by_size_and_lose_nothing(
    stack: Stack, issue_case: Made, view: str
) -> None:
    """Enum names are case-insensitive in the query string (Envoy's
    case_insensitive_enum_parsing) and numbers work too."""
    pages = rest_list_all(stack, {"page_size": 20, "model": "issue9", "view": view})
    assert len(pages) > 1, "20 full records are cut into several pages"
    assert all(0 < len(p) < 20 for p in pages)
    listed = flatten(pages)
    assert sorted(ids(listed)) == sorted(issue_case.results)
    assert len(set(ids(listed))) == 20
    for execution in listed:
        full = issue_case.results[execution["execution_id"]]
        assert execution["prompt"] == issue_case.prompts[execution["execution_id"]]
        assert execution["prompt_truncated"] is False
        assert execution["result"]["output"] == full.output
        assert [s["input"] for s in execution["result"]["flow"]] == [s.input for s in full.flow]
        assert [s["output"] for s in execution["result"]["flow"]] == [s.output for s in full.flow]


@pytest.mark.parametrize("view", ["HUGE", "full", "3"])
def test_unknown_view_is_a_400(stack: Stack, view: str) -> None:
    """Only whole value names (any case) and numbers: `full` alone is not one."""
    answer = httpx.get(f"{stack.url}/api/v1/executions", params={"view": view}, timeout=10)
    assert answer.status_code == 400, answer.text
    assert answer.json()["message"].startswith("view: ")


def test_grpc_full_view_pages_are_cut_by_size_and_lose_nothing(
    lab: svc_grpc.LabServiceStub, issue_case: Made
) -> None:
    pages = list_all(lab, "issue9", pb.EXECUTION_VIEW_FULL, 20)
    assert len(pages) > 1
    listed = flatten(pages)
    assert sorted(ids(listed)) == sorted(issue_case.results)
    for execution in listed:
        assert execution.result.output == issue_case.results[execution.execution_id].output
        assert list(execution.result.flow) != []
        for step, full in zip(
            execution.result.flow, issue_case.results[execution.execution_id].flow, strict=True
        ):
            assert (step.input, step.output) == (full.input, full.output)

    basic = flatten(list_all(lab, "issue9", pb.EXECUTION_VIEW_UNSPECIFIED, 20))
    assert ids(basic) == ids(listed)
    assert all(e.prompt_truncated and len(e.prompt) == BASIC_TEXT_CHARS for e in basic)


def test_get_is_full_by_default_and_complete(
    stack: Stack, lab: svc_grpc.LabServiceStub, issue_case: Made
) -> None:
    largest = max(issue_case.results.values(), key=lambda result: result.ByteSize())
    got = lab.GetExecution(svc.GetExecutionRequest(execution_id=largest.execution_id)).execution
    assert got.ByteSize() < GRPC_LIMIT
    assert got.prompt == issue_case.prompts[largest.execution_id]
    assert not got.prompt_truncated
    expected = pb.ExecuteResponse()
    expected.CopyFrom(largest)
    expected.state = pb.EXECUTION_STATE_SUCCEEDED
    assert got.result == expected

    basic = lab.GetExecution(
        svc.GetExecutionRequest(execution_id=largest.execution_id, view=pb.EXECUTION_VIEW_BASIC)
    ).execution
    assert basic.prompt == got.prompt[:BASIC_TEXT_CHARS]
    assert basic.prompt_truncated

    rest = httpx.get(f"{stack.url}/api/v1/executions/{largest.execution_id}", timeout=30)
    assert rest.status_code == 200
    assert rest.json()["execution"]["result"]["output"] == largest.output


def test_get_full_of_a_32000_character_emoji_orchestration_is_complete(
    lab: svc_grpc.LabServiceStub,
) -> None:
    """The largest record the default configuration makes (about 2 MB: the
    prompt's 128 KB sixteen times over) comes whole: non-ASCII text is not
    cut early for fear of JSON escapes Envoy does not write."""
    prompt = "😀" * ISSUE_PROMPT_CHARS
    final = orchestrate(lab, prompt, "emoji", max_tokens=MAX_TOKENS)[-1]
    result = final.execution_completed.result
    assert result.ByteSize() > 1_900_000
    got = lab.GetExecution(svc.GetExecutionRequest(execution_id=final.execution_id)).execution
    assert got.prompt == prompt
    assert got.result.output == result.output
    assert not got.result.output_truncated
    for step in got.result.flow:
        assert not step.input_truncated
        assert not step.output_truncated


# -- the contract's maxima: 1,000,000-character prompts, 32,768 tokens --


def texts_by_node(events: list[pb.ExecutionEvent]) -> dict[str, str]:
    """Each node's output as its token deltas spell it."""
    texts: dict[str, str] = {}
    for event in events:
        if event.HasField("token_delta"):
            delta = event.token_delta
            texts[delta.node] = texts.get(delta.node, "") + delta.text
    return texts


def assert_bounded_stream(events: list[pb.ExecutionEvent], prompt: str) -> None:
    """Every event arrived (1..n, no gaps), each under the limit; the token
    deltas carry every character; events too big to send whole carry
    prefixes of their texts, marked."""
    assert [event.sequence for event in events] == list(range(1, len(events) + 1))
    assert all(event.ByteSize() < GRPC_LIMIT for event in events)
    spelled = texts_by_node(events)
    # review echoes the prompt and the answer, which echoes the prompt and the plan
    assert len(spelled["review"]) >= 3 * len(prompt)
    finished = {
        e.node_finished.step.node: e.node_finished.step
        for e in events
        if e.HasField("node_finished")
    }
    for node, step in finished.items():
        assert spelled[node].startswith(step.output)
        assert step.output_truncated == (step.output != spelled[node])
    assert finished["review"].output_truncated
    result = events[-1].execution_completed.result
    assert result.output_truncated
    assert spelled["review"].startswith(result.output)
    filled = sizing.cost(events[-1].SerializeToString())
    assert filled > 0.9 * sizing.MESSAGE_BUDGET_BYTES, "cut to fit, not emptied"
    assert [step.node for step in result.flow] == ["plan", "answer", "review"]
    assert result.flow[0].input == prompt[: len(result.flow[0].input)]


@pytest.fixture(scope="module")
def maxima(stack: Stack, lab: svc_grpc.LabServiceStub) -> Made:
    """Orchestrations at the contract's maxima, by their prompts' alphabet:
    ASCII; 2-byte and 4-byte UTF-8; control characters, which JSON writes
    as 6 bytes each. Prompts over Envoy's 1 MiB request bound go straight to
    the service; every answer is read through Envoy."""
    prompts = {
        "ascii": "a" * PROMPT_MAX,
        # 1 MB each: records hold them 16 times over
        "latin": "é" * (PROMPT_MAX // 2),
        "emoji": "😀" * (PROMPT_MAX // 4),
        "control": "\x01" * (PROMPT_MAX - 1) + "a",
    }
    created: dict[str, str] = {}
    for alphabet, prompt in prompts.items():
        address = stack.gateway_grpc if alphabet == "ascii" else stack.service_grpc
        for direct in stub(address):
            request = svc.OrchestrateRequest(
                prompt=prompt,
                model="maxima",
                max_tokens=MAX_TOKENS,
                on_disconnect=svc.DISCONNECT_POLICY_CONTINUE,
            )
            for message in direct.Orchestrate(request, timeout=300):
                created[message.event.execution_id] = alphabet
                break  # the rest is read through Envoy with WatchExecution
    for execution_id, alphabet in created.items():
        events = [
            m.event
            for m in lab.WatchExecution(
                svc.WatchExecutionRequest(execution_id=execution_id), timeout=300
            )
        ]
        assert_bounded_stream(events, prompts[alphabet])
    return Made(prompts={execution_id: prompts[a] for execution_id, a in created.items()})


def test_orchestrate_stream_at_the_maxima_fits_a_default_grpc_client(
    lab: svc_grpc.LabServiceStub,
) -> None:
    prompt = "b" * PROMPT_MAX
    events = orchestrate(lab, prompt, "maxima-stream", max_tokens=MAX_TOKENS)
    assert_bounded_stream(events, prompt)
    assert max(len(e.token_delta.text) for e in events) == 16_384


def test_execute_at_the_maxima_fits_a_default_grpc_client(
    stack: Stack, lab: svc_grpc.LabServiceStub
) -> None:
    """Execute's response is the whole result: 3 MB of 2-byte characters
    (the prompt, the step's input and output, the output) is cut to fit."""
    prompt = "é" * (PROMPT_MAX // 2)
    result = lab.Execute(
        svc.ExecuteRequest(prompt=prompt, model="maxima-execute", max_tokens=MAX_TOKENS),
        timeout=120,
    )
    assert result.ByteSize() < GRPC_LIMIT
    assert result.output_truncated
    assert prompt.startswith(result.output)
    assert len(result.output) > 100_000, "cut to fit, not emptied"
    (step,) = result.flow
    assert step.input_truncated
    assert prompt.startswith(step.input)
    rest = httpx.post(
        f"{stack.url}/api/v1/execute",
        json={"prompt": prompt, "model": "maxima-execute", "max_tokens": MAX_TOKENS},
        timeout=120,
    )
    assert rest.status_code == 200, rest.text[:300]
    assert rest.json()["output_truncated"] is True
    # the cut depends on the bytes of the metrics too: about the same length
    assert prompt.startswith(rest.json()["output"])
    assert abs(len(rest.json()["output"]) - len(result.output)) < 100


def test_rest_sse_streams_at_the_maxima(stack: Stack, maxima: Made) -> None:
    prompt = "c" * PROMPT_MAX
    with httpx.stream(
        "POST",
        f"{stack.url}/api/v1/orchestrate",
        json={"prompt": prompt, "model": "maxima-sse", "max_tokens": MAX_TOKENS},
        timeout=300,
    ) as response:
        assert response.status_code == 200
        orchestrated = [received.event for received in read_events(response)]
    final = orchestrated[-1]["execution_completed"]["result"]
    assert final["output_truncated"] is True
    assert [e["sequence"] for e in orchestrated] == list(range(1, len(orchestrated) + 1))

    for execution_id in maxima.prompts:
        with httpx.stream(
            "GET", f"{stack.url}/api/v1/executions/{execution_id}:watch", timeout=300
        ) as response:
            assert response.status_code == 200
            watched = [received.event for received in read_events(response)]
        assert [e["sequence"] for e in watched] == list(range(1, len(watched) + 1))
        assert "execution_completed" in watched[-1], watched[-1].keys()


def test_get_at_the_maxima_is_bounded_and_marked(
    stack: Stack, lab: svc_grpc.LabServiceStub, maxima: Made
) -> None:
    for execution_id, prompt in maxima.prompts.items():
        got = lab.GetExecution(svc.GetExecutionRequest(execution_id=execution_id)).execution
        assert got.ByteSize() < GRPC_LIMIT
        assert got.result.output_truncated
        assert prompt.startswith(got.prompt)
        assert got.prompt_truncated == (got.prompt != prompt)

        rest = httpx.get(f"{stack.url}/api/v1/executions/{execution_id}", timeout=60)
        assert rest.status_code == 200, (execution_id, rest.text[:300])
        assert len(rest.content) < ENVOY_JSON_LIMIT
        assert rest.json()["execution"]["prompt"] == got.prompt


@pytest.mark.parametrize("view", [pb.EXECUTION_VIEW_BASIC, pb.EXECUTION_VIEW_FULL])
def test_lists_at_the_maxima_with_page_size_100(
    stack: Stack, lab: svc_grpc.LabServiceStub, maxima: Made, view: pb.ExecutionView
) -> None:
    grpc_pages = list_all(lab, "maxima", view, 100)
    assert sorted(ids(flatten(grpc_pages))) == sorted(maxima.prompts)
    rest_pages = rest_list_all(
        stack, {"model": "maxima", "page_size": 100, "view": pb.ExecutionView.Name(view)}
    )
    assert ids(flatten(rest_pages)) == ids(flatten(grpc_pages))
    if view == pb.EXECUTION_VIEW_FULL:
        assert len(grpc_pages) == len(maxima.prompts), "each alone: each is near the bound"
    else:
        assert len(grpc_pages) == 1


def test_a_page_of_100_basic_executions_at_the_maxima(
    stack: Stack, lab: svc_grpc.LabServiceStub
) -> None:
    """page_size=100 of executions whose first 1,000 characters cost the most
    in JSON: 4-byte characters and control characters."""
    prompt = "😀\x01" * (ISSUE_PROMPT_CHARS // 2)
    made = []
    for _ in range(100):
        answer = lab.Execute(svc.ExecuteRequest(prompt=prompt, model="bulk"), timeout=60)
        made.append(answer.execution_id)
    page = lab.ListExecutions(svc.ListExecutionsRequest(model="bulk", page_size=100), timeout=60)
    assert ids(list(page.executions)) == list(reversed(made))
    assert page.next_page_token == ""
    rest = rest_list_all(stack, {"model": "bulk", "page_size": 100})
    assert len(rest) == 1
    assert ids(rest[0]) == list(reversed(made))
    for execution in rest[0]:
        assert execution["prompt"] == prompt[:BASIC_TEXT_CHARS]
        assert execution["result"]["output"] == prompt[:BASIC_TEXT_CHARS]
    full = rest_list_all(stack, {"model": "bulk", "page_size": 100, "view": "EXECUTION_VIEW_FULL"})
    assert ids(flatten(full)) == list(reversed(made))
    assert len(full) > 1, "100 full records of 32,000 such characters exceed the budget"


def test_the_openapi_document_describes_the_view() -> None:
    document = json.loads((ROOT / "build" / "openapi.json").read_text())
    operations = [
        operation
        for path in ("/api/v1/executions", "/api/v1/executions/{execution_id}")
        for operation in document["paths"][path].values()
    ]
    for operation in operations:
        (view,) = [p for p in operation["parameters"] if p["name"] == "view"]
        assert view["in"] == "query"
    schema = document["components"]["schemas"]["agentlab.v1.ExecutionView"]
    assert schema["enum"] == [
        "EXECUTION_VIEW_UNSPECIFIED",
        "EXECUTION_VIEW_BASIC",
        "EXECUTION_VIEW_FULL",
    ]
