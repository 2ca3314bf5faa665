"""ReplayExecution through the real stack (the service and Envoy as
processes, API keys on): over REST with httpx and over gRPC through Envoy.
A source runs on one model name and is replayed on ``echo``; what the
replay is (a new execution linked to its source, with the source's prompt,
mode and options) is read back from the store with GetExecution.

Sources that failed mid-way are in tests/test_compare.py, whose labs the
test builds itself."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from typing import Any

import grpc
import httpx
import pytest

from agentlab.devstack import Stack
from agentlab.v1 import execution_pb2 as pb
from agentlab.v1 import lab_service_pb2 as svc
from agentlab.v1 import lab_service_pb2_grpc as svc_grpc
from tests.helpers.callers import ALICE, BOB, CALLERS
from tests.helpers.stacks import StackFactory
from tests.helpers.statuses import details_of

pytestmark = pytest.mark.e2e

# "mirror" is a second echo backend under another name: a source served by
# one backend, its replay by another ("echo", which every routing file has).
MODELS = """
backends:
  mirror:
    kind: echo
models:
  mirror:
    backend: mirror
"""

PROMPT = "Name three primary colours and say why they are primary"


@pytest.fixture(scope="module")
def stack(start_module_stack: StackFactory) -> Stack:
    return start_module_stack(keys=CALLERS, models=MODELS)


@pytest.fixture(scope="module")
def alice(stack: Stack) -> Iterator[httpx.Client]:
    with httpx.Client(
        base_url=f"{stack.url}/api/v1", headers={"Authorization": f"Bearer {ALICE}"}, timeout=30
    ) as client:
        yield client


@pytest.fixture(scope="module")
def bob(stack: Stack) -> Iterator[httpx.Client]:
    with httpx.Client(
        base_url=f"{stack.url}/api/v1", headers={"Authorization": f"Bearer {BOB}"}, timeout=30
    ) as client:
        yield client


@pytest.fixture(scope="module")
def grpc_stub(stack: Stack) -> Iterator[svc_grpc.LabServiceStub]:
    with grpc.insecure_channel(stack.gateway_grpc) as channel:
        yield svc_grpc.LabServiceStub(channel)


AS_ALICE = (("authorization", f"Bearer {ALICE}"),)


def execute(client: httpx.Client, **fields: Any) -> dict[str, Any]:
    answer = client.post("/execute", json={"prompt": PROMPT, "model": "mirror", **fields})
    assert answer.status_code == 200, answer.text
    result: dict[str, Any] = answer.json()
    return result


def replay(client: httpx.Client, execution_id: str, **fields: Any) -> httpx.Response:
    return client.post(f"/executions/{execution_id}:replay", json=fields)


def get(client: httpx.Client, execution_id: str) -> dict[str, Any]:
    answer = client.get(f"/executions/{execution_id}")
    assert answer.status_code == 200, answer.text
    execution: dict[str, Any] = answer.json()["execution"]
    return execution


def nodes(execution: dict[str, Any]) -> list[str]:
    return [step["node"] for step in execution["result"]["flow"]]


def listed_ids(client: httpx.Client) -> set[str]:
    answer = client.get("/executions", params={"page_size": 100})
    assert answer.status_code == 200, answer.text
    return {execution["execution_id"] for execution in answer.json().get("executions", [])}


def test_rest_replay_of_an_orchestration_on_echo(alice: httpx.Client) -> None:
    source = execute(alice, mode="EXECUTION_MODE_ORCHESTRATION", temperature=0.25)
    answer = replay(alice, source["execution_id"], model="echo")
    assert answer.status_code == 200, answer.text
    replayed = answer.json()["execution"]

    assert replayed["execution_id"] != source["execution_id"]
    assert replayed["replay_of"] == source["execution_id"]
    assert replayed["state"] == "EXECUTION_STATE_SUCCEEDED"
    assert replayed["model"] == "echo"
    assert replayed["mode"] == "EXECUTION_MODE_ORCHESTRATION"
    assert replayed["prompt"] == PROMPT
    assert replayed["temperature"] == 0.25  # the source's option, kept
    # Really run again, on the other backend: the same graph, echo's metrics.
    source_record = get(alice, source["execution_id"])
    assert nodes(replayed) == nodes(source_record) == ["plan", "answer", "review"]
    assert replayed["result"]["metrics"]["backend"] == "echo"
    assert source_record["result"]["metrics"]["requested_model"] == "mirror"
    assert replayed["result"]["metrics"]["requested_model"] == "echo"
    # Stored so: GetExecution shows the link, and the source has none.
    assert get(alice, replayed["execution_id"])["replay_of"] == source["execution_id"]
    assert source_record.get("replay_of", "") == ""


def test_grpc_replay_of_an_inference_through_envoy(
    alice: httpx.Client, grpc_stub: svc_grpc.LabServiceStub
) -> None:
    source = execute(alice, mode="EXECUTION_MODE_INFERENCE", max_tokens=4, seed=7)
    answer = grpc_stub.ReplayExecution(
        svc.ReplayExecutionRequest(execution_id=source["execution_id"], model="echo", seed=11),
        metadata=AS_ALICE,
        timeout=30,
    )
    replayed = answer.execution
    assert replayed.replay_of == source["execution_id"]
    assert replayed.state == pb.EXECUTION_STATE_SUCCEEDED
    assert replayed.mode == pb.EXECUTION_MODE_INFERENCE
    assert (replayed.model, replayed.prompt) == ("echo", PROMPT)
    # The source's max_tokens kept, its seed replaced by the request's.
    assert (replayed.max_tokens, replayed.seed) == (4, 11)
    assert [step.node for step in replayed.result.flow] == ["inference"]
    # echo answers with the prompt, cut at max_tokens words.
    assert replayed.result.output == " ".join(PROMPT.split()[:4]) + " "
    assert replayed.result.metrics.completion_tokens == 4


def test_background_replay_returns_at_once_and_finishes(alice: httpx.Client) -> None:
    source = execute(alice)
    answer = replay(alice, source["execution_id"], model="echo", background=True)
    assert answer.status_code == 200, answer.text
    accepted = answer.json()["execution"]
    assert accepted["state"] == "EXECUTION_STATE_QUEUED"
    assert accepted["replay_of"] == source["execution_id"]
    assert not accepted.get("result", {}).get("flow")
    # WatchExecution follows it to its end.
    with alice.stream("GET", f"/executions/{accepted['execution_id']}:watch") as events:
        assert events.status_code == 200
        text = events.read().decode()
    assert "execution_completed" in text
    assert get(alice, accepted["execution_id"])["state"] == "EXECUTION_STATE_SUCCEEDED"


def test_another_callers_execution_is_not_found(
    alice: httpx.Client, bob: httpx.Client, grpc_stub: svc_grpc.LabServiceStub
) -> None:
    source = execute(alice)
    before = listed_ids(bob)
    refused = replay(bob, source["execution_id"], model="echo")
    assert refused.status_code == 404, refused.text
    assert details_of(refused.json(), "ErrorInfo")[0]["reason"] == "NOT_FOUND"
    with pytest.raises(grpc.RpcError) as over_grpc:
        grpc_stub.ReplayExecution(
            svc.ReplayExecutionRequest(execution_id=source["execution_id"], model="echo"),
            metadata=(("authorization", f"Bearer {BOB}"),),
            timeout=30,
        )
    assert over_grpc.value.code() == grpc.StatusCode.NOT_FOUND
    # Nor may he compare it with his own, over REST or gRPC.
    own = execute(bob)["execution_id"]
    compared = bob.post(
        "/executions:compare", json={"execution_ids": [own, source["execution_id"]]}
    )
    assert compared.status_code == 404, compared.text
    with pytest.raises(grpc.RpcError) as compared_over_grpc:
        grpc_stub.CompareExecutions(
            svc.CompareExecutionsRequest(execution_ids=[source["execution_id"], own]),
            metadata=(("authorization", f"Bearer {BOB}"),),
            timeout=30,
        )
    assert compared_over_grpc.value.code() == grpc.StatusCode.NOT_FOUND
    # Bob's refused replays recorded nothing; Alice's own works.
    assert listed_ids(bob) == before | {own}
    assert replay(alice, source["execution_id"], model="echo").status_code == 200


def test_invalid_requests_name_the_field(alice: httpx.Client) -> None:
    source = execute(alice)["execution_id"]
    before = listed_ids(alice)
    cases: list[tuple[str, dict[str, Any], str]] = [
        ("0123", {"model": "echo"}, "execution_id"),
        (source, {"model": "-not a model-"}, "model"),
        (source, {"model": "echo", "temperature": 3}, "temperature"),
        (source, {"model": "echo", "max_tokens": 0}, "max_tokens"),
        (source, {"model": "echo", "request_id": "has space"}, "request_id"),
        (source, {"model": "echo", "modle": "typo"}, "modle"),
    ]
    for execution_id, body, field in cases:
        answer = replay(alice, execution_id, **body)
        assert answer.status_code == 400, (body, answer.text)
        violations = details_of(answer.json(), "BadRequest")[0]["field_violations"]
        assert field in [violation["field"] for violation in violations], answer.text
    # An unknown model is NOT_FOUND, as for Execute, and names the known ones.
    unknown = replay(alice, source, model="no-such-model")
    assert unknown.status_code == 404, unknown.text
    [info] = details_of(unknown.json(), "ErrorInfo")
    assert info["reason"] == "MODEL_NOT_FOUND"
    assert "echo" in info["metadata"]["known_models"]
    assert listed_ids(alice) == before  # nothing recorded for any of them


def test_request_id_makes_a_replay_idempotent(alice: httpx.Client) -> None:
    source = execute(alice)["execution_id"]
    first = replay(alice, source, model="echo", request_id="replay-once")
    again = replay(alice, source, model="echo", request_id="replay-once")
    assert first.status_code == again.status_code == 200, (first.text, again.text)
    replay_id = first.json()["execution"]["execution_id"]
    assert again.json()["execution"]["execution_id"] == replay_id
    replays = [
        execution
        for execution in alice.get("/executions", params={"page_size": 100}).json()["executions"]
        if execution.get("replay_of") == source
    ]
    assert [execution["execution_id"] for execution in replays] == [replay_id]
    # The key is bound to that replay: another model with it is refused.
    other = replay(alice, source, model="mirror", request_id="replay-once")
    assert other.status_code == 409, other.text
    assert details_of(other.json(), "ErrorInfo")[0]["reason"] == "IDEMPOTENCY_KEY_REUSED"


def test_a_keyed_replay_retried_after_its_source_is_gone_gets_its_replay(
    stack: Stack, alice: httpx.Client
) -> None:
    source = execute(alice)["execution_id"]
    first = replay(alice, source, model="echo", request_id="outlives-its-source")
    assert first.status_code == 200, first.text
    replay_id = first.json()["execution"]["execution_id"]
    # Retention deletes the source (its events go with it: ON DELETE CASCADE).
    with sqlite3.connect(stack.log_dir / "data" / "agentlab.db", timeout=10) as db:
        db.execute("PRAGMA foreign_keys = ON")
        assert db.execute("DELETE FROM executions WHERE id = ?", (source,)).rowcount == 1
    assert alice.get(f"/executions/{source}").status_code == 404

    again = replay(alice, source, model="echo", request_id="outlives-its-source")
    assert again.status_code == 200, again.text
    assert again.json()["execution"]["execution_id"] == replay_id
    assert again.json()["execution"]["state"] == "EXECUTION_STATE_SUCCEEDED"
    # The key still binds its request: another model with it is refused...
    other = replay(alice, source, model="mirror", request_id="outlives-its-source")
    assert other.status_code == 409, other.text
    assert details_of(other.json(), "ErrorInfo")[0]["reason"] == "IDEMPOTENCY_KEY_REUSED"
    # ...and without the key, or with a new one, the source is simply gone.
    for fields in ({}, {"request_id": "a-new-key"}):
        gone = replay(alice, source, model="echo", **fields)
        assert gone.status_code == 404, gone.text
