"""agentlab.client against the real stack (the service and Envoy): every RPC
(ReplayExecution and CompareExecutions too) through the async and the
blocking client, errors as one exception type per status with their
google.rpc details, and the client's variables accepted by a service
started with them in its environment."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator

import grpc
import pytest

from agentlab.client import (
    NO_RETRIES,
    AlreadyExists,
    AsyncClient,
    Client,
    InvalidArgument,
    LabServiceError,
    NotFound,
    Unauthenticated,
    Unavailable,
    is_final,
)
from agentlab.config import Settings
from agentlab.devstack import Stack, free_port
from agentlab.v1 import execution_pb2 as pb
from agentlab.v1 import lab_service_pb2 as svc
from tests.helpers.stacks import StackFactory

KEY = "client-test-key"


@pytest.fixture(scope="module")
def stack(start_module_stack: StackFactory) -> Stack:
    # A second model on a backend nobody listens at: the lab unreachable,
    # the way UNAVAILABLE with RetryInfo reaches a client.
    models = f"""
backends:
  echo: {{kind: echo}}
  gone: {{kind: ollama, url: "http://127.0.0.1:{free_port()}"}}
models:
  echo: {{backend: echo}}
  unreachable: {{backend: gone, model: "llama3.2:1b"}}
"""
    return start_module_stack(
        {"AGENTLAB_ECHO_TOKEN_DELAY_S": "0.01", "AGENTLAB_HEALTH_INTERVAL_S": "0.2"},
        keys={"tester": KEY},
        models=models,
    )


@pytest.fixture
async def lab(stack: Stack) -> AsyncIterator[AsyncClient]:
    async with AsyncClient(stack.gateway_grpc, api_key=KEY, timeout_s=30) as client:
        yield client


@pytest.fixture
def sync_lab(stack: Stack) -> Iterator[Client]:
    with Client(stack.gateway_grpc, api_key=KEY, timeout_s=30) as client:
        yield client


async def test_execute_returns_the_result_with_its_metrics(lab: AsyncClient) -> None:
    answer = await lab.execute("three small words", model="echo")

    assert answer.output == "three small words"
    assert answer.state == pb.EXECUTION_STATE_SUCCEEDED
    assert (answer.metrics.backend, answer.metrics.completion_tokens) == ("echo", 3)
    assert [step.node for step in answer.flow] == ["inference"]
    # The client added a request_id: the record carries it.
    stored = await lab.get_execution(answer.execution_id)
    assert len(stored.request_id) == 32
    assert stored.result.output == "three small words"


async def test_orchestrate_yields_every_event_through_the_final_one(lab: AsyncClient) -> None:
    events = [event async for event in lab.orchestrate("one two", model="echo")]

    assert [event.sequence for event in events] == list(range(1, len(events) + 1))
    assert events[0].WhichOneof("kind") == "execution_started"
    assert is_final(events[-1])
    started = [e.node_started.node for e in events if e.WhichOneof("kind") == "node_started"]
    assert started == ["plan", "answer", "review"]
    result = events[-1].execution_completed.result
    assert [step.node for step in result.flow] == ["plan", "answer", "review"]


async def test_watch_replays_a_finished_execution_after_a_sequence(lab: AsyncClient) -> None:
    done = [event async for event in lab.orchestrate("watch me", model="echo")]
    execution_id = done[-1].execution_id

    replayed = [event async for event in lab.watch(execution_id, after_sequence=3)]

    assert [e.sequence for e in replayed] == [e.sequence for e in done[3:]]
    assert replayed[-1] == done[-1]


async def test_background_execution_then_get_list_and_cancel(lab: AsyncClient) -> None:
    long_prompt = " ".join(f"w{n}" for n in range(400))  # 4 s of echo at 10 ms a word
    accepted = await lab.execute(long_prompt, model="echo", background=True)
    assert accepted.state in (pb.EXECUTION_STATE_QUEUED, pb.EXECUTION_STATE_RUNNING)

    page = await lab.list_executions(page_size=100, model="echo")
    assert accepted.execution_id in [e.execution_id for e in page.executions]
    every = [e.execution_id async for e in lab.iter_executions(page_size=1, model="echo")]
    assert accepted.execution_id in every
    assert len(every) == len(set(every))

    cancelled = await lab.cancel_execution(accepted.execution_id)
    assert cancelled.state == pb.EXECUTION_STATE_CANCELLED
    final = [e async for e in lab.watch(accepted.execution_id)][-1]
    assert final.execution_failed.error.code == grpc.StatusCode.CANCELLED.value[0]


async def test_models_and_health(lab: AsyncClient) -> None:
    models = {model.name: model for model in await lab.list_models()}
    assert models["echo"].ready
    assert models["unreachable"].backend == "gone"

    assert (await lab.health("agentlab.backend.echo")).status == svc.SERVING_STATUS_SERVING
    with pytest.raises(NotFound):
        await lab.health("agentlab.backend.nobody")
    # The only backend of a model other than echo cannot be reached: the
    # gateway as a whole is NOT_SERVING (README, Health), and says so.
    refused: Unavailable | None = None
    for _ in range(50):
        try:
            await lab.health()
        except Unavailable as error:
            refused = error
            break
        await asyncio.sleep(0.1)
    assert refused is not None, "the gateway never reported NOT_SERVING"
    assert refused.reason == "NOT_SERVING"


async def test_invalid_request_raises_invalid_argument_with_its_violations(
    lab: AsyncClient,
) -> None:
    with pytest.raises(InvalidArgument) as raised:
        await lab.execute(" ", model="echo", temperature=3)

    error = raised.value
    assert isinstance(error, LabServiceError)
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert error.reason == "INVALID_ARGUMENT"
    assert error.error_info is not None
    assert error.error_info.domain == "agentlab.v1"
    assert {violation.field for violation in error.violations} == {"prompt", "temperature"}
    assert error.from_service


async def test_a_key_reused_for_other_work_raises_already_exists(lab: AsyncClient) -> None:
    await lab.execute("first", model="echo", request_id="client-test-reused")

    with pytest.raises(AlreadyExists) as raised:
        await lab.execute("second", model="echo", request_id="client-test-reused")

    assert raised.value.reason == "IDEMPOTENCY_KEY_REUSED"
    assert raised.value.error_info is not None
    assert raised.value.error_info.metadata["request_id"] == "client-test-reused"


async def test_unknown_execution_raises_not_found(lab: AsyncClient) -> None:
    with pytest.raises(NotFound) as raised:
        await lab.get_execution("0" * 32)
    assert raised.value.reason == "NOT_FOUND"


async def test_replay_on_echo_then_compare_the_two(lab: AsyncClient) -> None:
    source = await lab.execute("red green blue", model="echo", seed=3)

    replay = await lab.replay_execution(source.execution_id, model="echo", max_tokens=64)

    assert replay.replay_of == source.execution_id
    assert replay.execution_id != source.execution_id
    assert replay.state == pb.EXECUTION_STATE_SUCCEEDED
    assert replay.result.output == "red green blue"
    # The source's options unless the request overrides them.
    assert (replay.seed, replay.max_tokens) == (3, 64)
    assert len(replay.request_id) == 32  # the client keyed it

    comparison = await lab.compare_executions([source.execution_id, replay.execution_id])

    assert [e.execution_id for e in comparison.executions] == [
        source.execution_id,
        replay.execution_id,
    ]
    baseline, compared = comparison.executions
    assert compared.replay_of == source.execution_id
    assert [op.op for op in compared.output_diff] == [svc.DIFF_OP_KIND_EQUAL]
    assert compared.output == "red green blue"
    assert compared.delta.completion_tokens == 0
    assert baseline.delta == svc.MetricsDelta()
    (node,) = comparison.nodes
    assert (node.node, node.occurrence) == ("inference", 1)
    assert [v.execution_id for v in node.versions] == [source.execution_id, replay.execution_id]
    assert all(version.present for version in node.versions)
    assert node.versions[1].step.output == "red green blue"


async def test_a_background_replay_answers_at_once(lab: AsyncClient) -> None:
    source = await lab.execute("later", model="echo")

    replay = await lab.replay_execution(source.execution_id, background=True)

    assert replay.state in (pb.EXECUTION_STATE_QUEUED, pb.EXECUTION_STATE_RUNNING)
    assert replay.model == "echo"  # no model: the source's
    final = [event async for event in lab.watch(replay.execution_id)][-1]
    assert final.execution_completed.result.output == "later"


async def test_a_replay_that_fails_is_a_failed_record_not_an_error(lab: AsyncClient) -> None:
    source = await lab.execute("anyone there?", model="echo")

    replay = await lab.replay_execution(source.execution_id, model="unreachable")

    assert replay.state == pb.EXECUTION_STATE_FAILED
    assert replay.replay_of == source.execution_id
    assert replay.error.code == grpc.StatusCode.UNAVAILABLE.value[0]


async def test_replay_and_compare_of_an_unknown_execution_raise_not_found(
    lab: AsyncClient,
) -> None:
    known = (await lab.execute("known", model="echo")).execution_id
    with pytest.raises(NotFound) as replayed:
        await lab.replay_execution("0" * 32, model="echo")
    assert replayed.value.reason == "NOT_FOUND"

    with pytest.raises(NotFound) as compared:
        await lab.compare_executions([known, "0" * 32])
    assert compared.value.reason == "NOT_FOUND"
    assert compared.value.from_service


async def test_compare_with_one_id_raises_invalid_argument_naming_the_field(
    lab: AsyncClient,
) -> None:
    known = (await lab.execute("alone", model="echo")).execution_id

    with pytest.raises(InvalidArgument) as raised:
        await lab.compare_executions([known])

    error = raised.value
    assert error.reason == "INVALID_ARGUMENT"
    assert error.error_info is not None
    assert error.error_info.domain == "agentlab.v1"
    assert [violation.field for violation in error.violations] == ["execution_ids"]

    with pytest.raises(InvalidArgument) as twice:
        await lab.compare_executions([known, known])
    assert [violation.field for violation in twice.value.violations] == ["execution_ids"]
    with pytest.raises(InvalidArgument) as malformed:
        await lab.replay_execution("not-an-id", temperature=3)
    assert {v.field for v in malformed.value.violations} == {"execution_id", "temperature"}


async def test_compare_refuses_one_string_of_ids_before_calling() -> None:
    # A str is a Sequence[str] too: sent as is, one id would be compared as
    # its 32 one-character "ids", and the error would list 32 violations.
    # Nothing listens at this target: the call is refused before any is made.
    async with AsyncClient(f"127.0.0.1:{free_port()}", retry=NO_RETRIES) as lab:
        with pytest.raises(TypeError, match="execution_ids"):
            await lab.compare_executions("a" * 32)
    with (
        Client(f"127.0.0.1:{free_port()}", retry=NO_RETRIES) as blocking,
        pytest.raises(TypeError, match="execution_ids"),
    ):
        blocking.compare_executions("a" * 32)


async def test_an_unreachable_lab_is_unavailable_with_retry_info(stack: Stack) -> None:
    async with AsyncClient(stack.gateway_grpc, api_key=KEY, retry=NO_RETRIES) as lab:
        with pytest.raises(Unavailable) as raised:
            await lab.execute("anyone there?", model="unreachable")

    error = raised.value
    assert error.reason == "LAB_UNAVAILABLE"
    assert error.error_info is not None
    assert error.error_info.metadata["backend"] == "gone"
    # RetryInfo, unpacked: the service's suggested wait.
    assert error.retry_delay_s is not None
    assert error.retry_delay_s > 0


async def test_a_missing_or_wrong_key_is_unauthenticated(stack: Stack) -> None:
    async with AsyncClient(stack.gateway_grpc, api_key="wrong") as lab:
        with pytest.raises(Unauthenticated):
            await lab.list_models()
    async with AsyncClient(stack.gateway_grpc) as lab:
        with pytest.raises(Unauthenticated):
            await lab.execute("x", model="echo")


def test_the_blocking_client_calls_and_streams(sync_lab: Client) -> None:
    answer = sync_lab.execute("blocking call", model="echo")
    assert answer.output == "blocking call"

    events = list(sync_lab.orchestrate("blocking stream", model="echo"))
    assert events[-1].WhichOneof("kind") == "execution_completed"
    assert [e.sequence for e in events] == list(range(1, len(events) + 1))
    assert sync_lab.get_execution(events[-1].execution_id).state == pb.EXECUTION_STATE_SUCCEEDED
    assert [m.name for m in sync_lab.list_models()].count("echo") == 1
    with pytest.raises(InvalidArgument):
        sync_lab.execute("x", model="bad model name")


def test_the_blocking_client_replays_and_compares(sync_lab: Client) -> None:
    source = sync_lab.execute("one two three", model="echo")

    replay = sync_lab.replay_execution(source.execution_id, model="echo")
    assert (replay.replay_of, replay.result.output) == (source.execution_id, "one two three")
    comparison = sync_lab.compare_executions((source.execution_id, replay.execution_id))
    assert [e.execution_id for e in comparison.executions] == [
        source.execution_id,
        replay.execution_id,
    ]
    assert [node.node for node in comparison.nodes] == ["inference"]

    with pytest.raises(NotFound):
        sync_lab.replay_execution("f" * 32)
    with pytest.raises(NotFound):
        sync_lab.compare_executions(["f" * 32, source.execution_id])
    with pytest.raises(InvalidArgument) as raised:
        sync_lab.compare_executions([source.execution_id])
    assert [violation.field for violation in raised.value.violations] == ["execution_ids"]


def test_target_and_key_come_from_the_environment(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AGENTLAB_TARGET", stack.gateway_grpc)
    monkeypatch.setenv("AGENTLAB_API_KEY", KEY)
    with Client() as lab:
        assert lab.target == stack.gateway_grpc
        assert lab.execute("from the environment", model="echo").output == "from the environment"


def test_the_service_accepts_and_ignores_the_client_variables() -> None:
    env = {
        "AGENTLAB_TARGET": "localhost:8000",
        "AGENTLAB_API_KEY": "k",
        "AGENTLAB_LOG_LEVEL": "INFO",
    }
    assert Settings.from_env(env) == Settings.from_env({"AGENTLAB_LOG_LEVEL": "INFO"})


def test_a_service_started_with_the_client_variables_serves(start_stack: StackFactory) -> None:
    # The shell of a user of the command exports these; the service must start.
    started = start_stack(
        {
            "AGENTLAB_DEFAULT_BACKEND": "echo",
            "AGENTLAB_TARGET": "localhost:8000",
            "AGENTLAB_API_KEY": "not-a-server-setting",
        }
    )
    with Client(started.gateway_grpc) as lab:
        assert lab.execute("still serving", model="echo").output == "still serving"
