"""CompareExecutions (and replays of sources from other backends, one of
them failed mid-way) through a real Envoy, over REST and gRPC. The labs are
built here and served in the test's event loop (serve_in_process): a
scripted model that answers its own words, one that fails in the middle of
the orchestration's second node, and the echo backend to replay on. What a
comparison must say is computed from the executions' own records
(GetExecution), never written down here."""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator
from itertools import pairwise
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from agentlab.core.errors import LabFailed
from agentlab.core.types import GenerationOptions
from agentlab.core.worddiff import MAX_WORDS, word_diff
from agentlab.lab.base import ChatMessage, ModelChunk, TextChunk, Usage
from agentlab.lab.echo import EchoModel
from agentlab.lab.local import LocalBackend
from agentlab.lab.registry import LabRegistry
from agentlab.v1 import execution_pb2 as pb
from agentlab.v1 import lab_service_pb2 as svc
from agentlab.v1 import lab_service_pb2_grpc as svc_grpc
from tests.helpers.in_process import InProcess, serve_in_process
from tests.helpers.statuses import details_of

PROMPT = "Name three primary colours"
SCRIPTED_ANSWER = ["Red, ", "yellow ", "and ", "blue: ", "the ", "painter's ", "primaries."]
# The answer node's request carries the plan (lab/graph.py): how the failing
# model knows it is past the first node.
AFTER_PLAN = "\n\nPlan:\n"
FAILED_AFTER = ["partial ", "answer "]


class ScriptedModel:
    """Answers every call with SCRIPTED_ANSWER, word by word."""

    backend = "scripted"
    name = "scripted-model"

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def stream(
        self, messages: list[ChatMessage], options: GenerationOptions
    ) -> AsyncGenerator[ModelChunk, None]:
        for word in SCRIPTED_ANSWER:
            yield TextChunk(word)
        yield Usage(prompt_tokens=len(messages[-1].content.split()), completion_tokens=7)


class FailingMidWayModel(ScriptedModel):
    """Plans like ScriptedModel, then fails while generating the answer."""

    backend = "failing"
    name = "failing-model"

    async def stream(
        self, messages: list[ChatMessage], options: GenerationOptions
    ) -> AsyncGenerator[ModelChunk, None]:
        if AFTER_PLAN not in messages[-1].content:
            async for chunk in super().stream(messages, options):
                yield chunk
            return
        for word in FAILED_AFTER:
            yield TextChunk(word)
        raise LabFailed("failing", "the model ran out of memory")


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[InProcess]:
    registry = LabRegistry.serving_everything(
        LocalBackend("scripted", ScriptedModel()),
        echo=LocalBackend("echo", EchoModel()),
        failing=LocalBackend("failing", FailingMidWayModel()),
        # Long enough (a word every 2 s) to be compared while it runs.
        slow=LocalBackend("slow", EchoModel(token_delay_s=2.0)),
    )
    async for server in serve_in_process(registry, tmp_path):
        yield server


def joined(ops: list[dict[str, Any]], *kinds: str) -> str:
    return "".join(op["text"] for op in ops if op["op"] in kinds)


async def record(client: httpx.AsyncClient, execution_id: str) -> dict[str, Any]:
    answer = await client.get(f"/executions/{execution_id}")
    assert answer.status_code == 200, answer.text
    execution: dict[str, Any] = answer.json()["execution"]
    return execution


@pytest.mark.e2e
async def test_rest_compare_shows_per_node_diffs_and_deltas(served: InProcess) -> None:
    async with httpx.AsyncClient(base_url=f"{served.url}/api/v1", timeout=30) as client:
        executed = await client.post(
            "/execute",
            json={"prompt": PROMPT, "model": "scripted", "mode": "EXECUTION_MODE_ORCHESTRATION"},
        )
        assert executed.status_code == 200, executed.text
        source = executed.json()["execution_id"]
        replays = []
        for model in ("echo", "scripted"):
            replayed = await client.post(f"/executions/{source}:replay", json={"model": model})
            assert replayed.status_code == 200, replayed.text
            replays.append(replayed.json()["execution"]["execution_id"])
        ids = [source, *replays]
        compared = await client.post("/executions:compare", json={"execution_ids": ids})
        assert compared.status_code == 200, compared.text
        comparison = compared.json()
        records = [await record(client, execution_id) for execution_id in ids]

    totals = comparison["executions"]
    assert [t["execution_id"] for t in totals] == ids
    assert [t["replay_of"] for t in totals] == ["", source, source]
    assert [t["model"] for t in totals] == ["scripted", "echo", "scripted"]
    assert [t["output"] for t in totals] == [r["result"]["output"] for r in records]
    base_metrics = records[0]["result"]["metrics"]
    for total, execution in zip(totals[1:], records[1:], strict=True):
        metrics = execution["result"]["metrics"]
        assert total["delta"]["completion_tokens"] == (
            metrics["completion_tokens"] - base_metrics["completion_tokens"]
        )
        assert total["delta"]["duration_ms"] == pytest.approx(
            metrics["latency_ms"] - base_metrics["latency_ms"]
        )
    assert totals[1]["delta"]["completion_tokens"] != 0  # echo says more than seven words

    rows = comparison["nodes"]
    assert [(row["node"], row["occurrence"]) for row in rows] == [
        ("plan", 1),
        ("answer", 1),
        ("review", 1),
    ]
    for index, row in enumerate(rows):
        steps = [execution["result"]["flow"][index] for execution in records]
        base, echo, same = row["versions"]
        assert [v["execution_id"] for v in row["versions"]] == ids
        assert all(v["present"] for v in row["versions"])
        assert not base.get("output_diff")
        assert "delta" not in base
        assert base["step"]["output"] == steps[0]["output"] == "".join(SCRIPTED_ANSWER)
        # The echo replay's output against the source's, word by word.
        ops = echo["output_diff"]
        assert joined(ops, "DIFF_OP_KIND_EQUAL", "DIFF_OP_KIND_DELETE") == steps[0]["output"]
        assert joined(ops, "DIFF_OP_KIND_EQUAL", "DIFF_OP_KIND_INSERT") == steps[1]["output"]
        assert {"DIFF_OP_KIND_INSERT", "DIFF_OP_KIND_DELETE"} <= {op["op"] for op in ops}
        assert echo["delta"]["completion_tokens"] == (
            steps[1]["metrics"]["completion_tokens"] - steps[0]["metrics"]["completion_tokens"]
        )
        assert echo["delta"]["duration_ms"] == pytest.approx(
            steps[1]["duration_ms"] - steps[0]["duration_ms"]
        )
        assert echo["delta"]["time_to_first_token_ms"] == pytest.approx(
            steps[1]["metrics"]["time_to_first_token_ms"]
            - steps[0]["metrics"]["time_to_first_token_ms"]
        )
        # The replay on the same model said the same words: all equal.
        assert [op["op"] for op in same["output_diff"]] == ["DIFF_OP_KIND_EQUAL"]
        assert same["delta"].get("completion_tokens", 0) == 0


@pytest.mark.e2e
async def test_grpc_replay_and_compare_of_a_source_that_failed_mid_way(
    served: InProcess,
) -> None:
    async with grpc.aio.insecure_channel(served.url.removeprefix("http://")) as channel:
        stub = svc_grpc.LabServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await stub.Execute(
                svc.ExecuteRequest(
                    prompt=PROMPT, model="failing", mode=pb.EXECUTION_MODE_ORCHESTRATION
                ),
                timeout=30,
            )
        assert "ran out of memory" in (failed.value.details() or "")
        [source] = (await stub.ListExecutions(svc.ListExecutionsRequest(page_size=1))).executions
        assert source.state == pb.EXECUTION_STATE_FAILED

        replay = (
            await stub.ReplayExecution(
                svc.ReplayExecutionRequest(execution_id=source.execution_id, model="echo"),
                timeout=30,
            )
        ).execution
        assert replay.replay_of == source.execution_id
        assert replay.state == pb.EXECUTION_STATE_SUCCEEDED
        assert (replay.prompt, replay.mode) == (PROMPT, pb.EXECUTION_MODE_ORCHESTRATION)

        comparison = await stub.CompareExecutions(
            svc.CompareExecutionsRequest(execution_ids=[source.execution_id, replay.execution_id]),
            timeout=30,
        )

    plan, answer, review = comparison.nodes
    assert [row.node for row in comparison.nodes] == ["plan", "answer", "review"]
    # The failed source ran the plan, failed in the answer with part of it
    # generated, and never reached the review: shown as absent there.
    assert [v.present for v in plan.versions] == [True, True]
    assert answer.versions[0].step.status == pb.STEP_STATUS_FAILED
    assert answer.versions[0].step.output == "".join(FAILED_AFTER)
    assert answer.versions[1].step.status == pb.STEP_STATUS_SUCCEEDED
    assert answer.versions[1].HasField("delta")
    assert [v.present for v in review.versions] == [False, True]
    assert not review.versions[1].HasField("delta")  # nothing to subtract from
    assert [op.op for op in review.versions[1].output_diff] == [svc.DIFF_OP_KIND_INSERT]
    assert review.versions[1].output_diff[0].text == review.versions[1].step.output
    # The failed source's totals are its steps' (it recorded none of its own).
    base_total, replay_total = comparison.executions
    assert base_total.state == pb.EXECUTION_STATE_FAILED
    assert base_total.metrics.completion_tokens == sum(
        v.step.metrics.completion_tokens for row in comparison.nodes for v in row.versions[:1]
    )
    assert replay_total.delta.completion_tokens == (
        replay_total.metrics.completion_tokens - base_total.metrics.completion_tokens
    )
    # Its first token and rate too: the plan streamed before the failure, so
    # a delta against them is not one against nothing.
    first = plan.versions[0].step.metrics
    assert base_total.metrics.time_to_first_token_ms == pytest.approx(first.time_to_first_token_ms)
    done = [v.step.metrics for row in comparison.nodes for v in row.versions[:1] if v.present]
    streamed = [m for m in done if m.tokens_per_second > 0]
    assert streamed, done
    assert base_total.metrics.tokens_per_second == pytest.approx(
        sum(m.completion_tokens for m in streamed)
        / sum(m.completion_tokens / m.tokens_per_second for m in streamed)
    )
    assert replay_total.delta.time_to_first_token_ms == pytest.approx(
        replay_total.metrics.time_to_first_token_ms - base_total.metrics.time_to_first_token_ms
    )


@pytest.mark.e2e
async def test_a_replay_that_fails_is_answered_as_a_failed_record(served: InProcess) -> None:
    async with httpx.AsyncClient(base_url=f"{served.url}/api/v1", timeout=30) as client:
        executed = await client.post(
            "/execute",
            json={"prompt": PROMPT, "model": "scripted", "mode": "EXECUTION_MODE_ORCHESTRATION"},
        )
        source = executed.json()["execution_id"]
        answer = await client.post(f"/executions/{source}:replay", json={"model": "failing"})
        assert answer.status_code == 200, answer.text
        replay = answer.json()["execution"]
        assert replay["state"] == "EXECUTION_STATE_FAILED"
        assert replay["replay_of"] == source
        assert "ran out of memory" in replay["error"]["message"]
        assert [step["status"] for step in replay["result"]["flow"]] == [
            "STEP_STATUS_SUCCEEDED",
            "STEP_STATUS_FAILED",
        ]
        assert (await record(client, replay["execution_id"]))["state"] == replay["state"]


@pytest.mark.e2e
async def test_invalid_comparisons_are_refused(served: InProcess) -> None:
    async with httpx.AsyncClient(base_url=f"{served.url}/api/v1", timeout=30) as client:
        executed = await client.post("/execute", json={"prompt": PROMPT, "model": "echo"})
        one = executed.json()["execution_id"]
        for ids in ([one], [one, one], [one, "not-an-id"], []):
            answer = await client.post("/executions:compare", json={"execution_ids": ids})
            assert answer.status_code == 400, (ids, answer.text)
            [bad_request] = details_of(answer.json(), "BadRequest")
            fields = [v["field"] for v in bad_request["field_violations"]]
            assert all(field.startswith("execution_ids") for field in fields), fields
        unknown = await client.post("/executions:compare", json={"execution_ids": [one, "0" * 32]})
        assert unknown.status_code == 404, unknown.text
        assert "0" * 32 in unknown.json()["message"]
        # A running one has no flow to compare yet: wait for its end.
        started = await client.post(
            "/execute", json={"prompt": PROMPT, "model": "slow", "background": True}
        )
        running = started.json()["execution_id"]
        early = await client.post("/executions:compare", json={"execution_ids": [one, running]})
        assert early.status_code == 400, early.text
        assert early.json()["code"] == grpc.StatusCode.FAILED_PRECONDITION.value[0]
        [info] = details_of(early.json(), "ErrorInfo")
        assert info["reason"] == "EXECUTION_NOT_FINISHED"
        assert info["metadata"]["execution_id"] == running
        assert running in early.json()["message"]


@given(st.text(alphabet="ab \n.", max_size=60), st.text(alphabet="ab \n.", max_size=60))
def test_word_diff_reproduces_both_texts(before: str, after: str) -> None:
    ops = word_diff(before, after)
    assert "".join(text for kind, text in ops if kind != "insert") == before
    assert "".join(text for kind, text in ops if kind != "delete") == after
    assert all(text for _, text in ops)
    assert all(a[0] != b[0] for a, b in pairwise(ops))  # merged


def test_word_diff_marks_changed_words() -> None:
    assert word_diff("the red fox", "the blue fox") == [
        ("equal", "the "),
        ("delete", "red"),
        ("insert", "blue"),
        ("equal", " fox"),
    ]
    long = "word " * MAX_WORDS
    assert word_diff(long, long + "more") == [("delete", long), ("insert", long + "more")]
