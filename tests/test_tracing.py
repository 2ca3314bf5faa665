"""Traces (README, Operating it > Traces): one request through Envoy, the
service and the lab service yields one trace, under the caller's trace id,
with a span per RPC, execution, graph node and model call; and tracing is
off unless the standard OTEL_* variables ask for it."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest
import yaml
from opentelemetry.sdk.trace import TracerProvider

from agentlab.devstack import LabServiceProcess, Stack, free_port
from agentlab.lab.graph import NODES
from agentlab.telemetry import tracing
from agentlab.v1 import lab_service_pb2 as svc
from agentlab.v1 import lab_service_pb2_grpc as svc_grpc
from tests.helpers.otlp import OtlpReceiver, ReceivedSpan
from tests.helpers.stacks import StackFactory

ROOT = Path(__file__).resolve().parent.parent

SERVER, CLIENT = 2, 3  # OTLP's SpanKind numbers

ROUTING = """
backends:
  lab:
    kind: http_lab
    url: {url}
models:
  remote:
    backend: lab
"""


@pytest.fixture(scope="module")
def receiver() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as running:
        yield running


@pytest.fixture(scope="module")
def lab_service(
    receiver: OtlpReceiver, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LabServiceProcess]:
    log = tmp_path_factory.mktemp("traced-lab") / "lab.log"
    env = {
        "AGENTLAB_DEFAULT_BACKEND": "echo",
        "AGENTLAB_LOG_FORMAT": "json",
        **receiver.env("lab-under-test"),
    }
    service = LabServiceProcess(free_port(), log, env).start()
    yield service
    service.stop()


@pytest.fixture(scope="module")
def stack(
    receiver: OtlpReceiver, lab_service: LabServiceProcess, start_module_stack: StackFactory
) -> Stack:
    env = {"AGENTLAB_LOG_FORMAT": "json", **receiver.env("gateway-under-test")}
    return start_module_stack(env, models=ROUTING.format(url=lab_service.url))


def _orchestrate(stack: Stack, headers: dict[str, str]) -> httpx.Response:
    answer = httpx.post(
        f"{stack.url}/api/v1/execute",
        json={"prompt": "Name a fruit", "model": "remote", "mode": "EXECUTION_MODE_ORCHESTRATION"},
        headers=headers,
        timeout=30,
    )
    assert answer.status_code == 200, answer.text
    return answer


def _one(spans: list[ReceivedSpan], name: str, service: str = "gateway-under-test") -> ReceivedSpan:
    found = [span for span in spans if span.name == name and span.service == service]
    assert len(found) == 1, (name, [span.name for span in spans])
    return found[0]


@pytest.mark.e2e
def test_a_request_is_one_trace_from_the_caller_to_the_model_calls(
    stack: Stack, lab_service: LabServiceProcess, receiver: OtlpReceiver
) -> None:
    trace_id, caller_span = secrets.token_hex(16), secrets.token_hex(8)
    answer = _orchestrate(stack, {"traceparent": f"00-{trace_id}-{caller_span}-01"})
    execution_id = answer.json()["execution_id"]

    # RPC, execution, the call to the lab service; there: its handler, and
    # per node the node and its model call.
    spans = receiver.wait_for(4 + 2 * len(NODES), trace_id)

    rpc = _one(spans, "agentlab.v1.LabService/Execute")
    assert (rpc.service, rpc.kind, rpc.parent_span_id) == (
        "gateway-under-test",
        SERVER,
        caller_span,
    )
    assert rpc.attributes["rpc.system"] == "grpc"
    assert rpc.attributes["agentlab.request_id"] == answer.headers["x-request-id"]
    assert rpc.attributes["agentlab.execution.id"] == execution_id

    execution = _one(spans, "execution orchestration")
    assert execution.parent_span_id == rpc.span_id
    assert execution.attributes["agentlab.execution.id"] == execution_id
    assert execution.attributes["gen_ai.request.model"] == "remote"

    outgoing = _one(spans, "POST /orchestrate/")
    assert (outgoing.service, outgoing.kind) == ("gateway-under-test", CLIENT)
    assert outgoing.parent_span_id == execution.span_id

    # The lab service continued the trace from the request's traceparent.
    [handler] = [s for s in spans if s.service == "lab-under-test" and s.kind == SERVER]
    assert handler.name == "POST /orchestrate/"
    assert handler.parent_span_id == outgoing.span_id
    assert handler.attributes["agentlab.request_id"] == answer.headers["x-request-id"]

    for node in NODES:
        node_span = _one(spans, f"node {node}", "lab-under-test")
        assert (node_span.service, node_span.parent_span_id) == ("lab-under-test", handler.span_id)
        [call] = [s for s in spans if s.parent_span_id == node_span.span_id]
        assert (call.name, call.kind) == ("chat echo", CLIENT)
        assert call.attributes["gen_ai.operation.name"] == "chat"
        assert call.attributes["gen_ai.provider.name"] == "echo"
        assert call.attributes["gen_ai.usage.output_tokens"] > 0
    assert not [span for span in spans if span.error]
    # One trace: nothing of this request went elsewhere.
    assert len(spans) == 4 + 2 * len(NODES)

    # The lab service's own log lines of the run carry the same trace id.
    lab_lines = [line for line in lab_service.log().splitlines() if trace_id in line]
    assert lab_lines, lab_service.log()[-2000:]


@pytest.mark.e2e
def test_without_a_traceparent_the_rpc_span_is_the_root(
    stack: Stack, receiver: OtlpReceiver
) -> None:
    answer = httpx.post(
        f"{stack.url}/api/v1/execute",
        json={"prompt": "Name a colour", "model": "remote"},
        timeout=30,
    )
    assert answer.status_code == 200, answer.text
    request_id = answer.headers["x-request-id"]
    rpc = None
    for _ in range(200):
        rpc = next(
            (
                span
                for span in receiver.spans()
                if span.name.endswith("/Execute")
                and span.attributes.get("agentlab.request_id") == request_id
            ),
            None,
        )
        if rpc is not None:
            break
        receiver.wait_for(1, "-", timeout_s=0.05)
    assert rpc is not None
    assert rpc.parent_span_id == ""

    # Inference: one node, one model call, in the same new trace.
    spans = receiver.wait_for(6, rpc.trace_id)
    assert {span.name for span in spans} >= {
        "execution inference",
        "POST /inference/",
        "node inference",
        "chat echo",
    }


@pytest.mark.e2e
def test_health_probes_make_no_traces(stack: Stack, receiver: OtlpReceiver) -> None:
    assert httpx.get(f"{stack.url}/api/v1/health", timeout=10).status_code == 200
    # A traced call after it: by the time its spans are here, a probe's
    # would be too (one process, one export queue).
    trace_id = secrets.token_hex(16)
    _orchestrate(stack, {"traceparent": f"00-{trace_id}-{secrets.token_hex(8)}-01"})
    assert len(receiver.wait_for(4 + 2 * len(NODES), trace_id)) == 4 + 2 * len(NODES)
    assert not [span for span in receiver.spans() if "Health" in span.name]


@pytest.mark.e2e
def test_a_stream_is_traced_the_same_way(stack: Stack, receiver: OtlpReceiver) -> None:
    """Orchestrate as Server-Sent Events: the streaming RPC's span is the
    execution's parent, and ends with the stream."""
    trace_id, caller_span = secrets.token_hex(16), secrets.token_hex(8)
    with httpx.stream(
        "POST",
        f"{stack.url}/api/v1/orchestrate",
        json={"prompt": "Name a tree", "model": "remote"},
        headers={"traceparent": f"00-{trace_id}-{caller_span}-01"},
        timeout=30,
    ) as answer:
        assert answer.status_code == 200
        body = answer.read().decode()
    assert "execution_completed" in body
    spans = receiver.wait_for(4 + 2 * len(NODES), trace_id)
    rpc = _one(spans, "agentlab.v1.LabService/Orchestrate")
    assert (rpc.parent_span_id, rpc.error) == (caller_span, False)
    assert rpc.attributes["rpc.grpc.status_code"] == 0
    assert _one(spans, "execution orchestration").parent_span_id == rpc.span_id
    assert len([span for span in spans if span.name.startswith("chat ")]) == len(NODES)


@pytest.mark.e2e
def test_a_browser_may_send_its_trace_context(stack: Stack) -> None:
    """A cross-origin page that sends traceparent gets past the preflight."""
    answer = httpx.options(
        f"{stack.url}/api/v1/execute",
        headers={
            "Origin": "http://localhost:3000",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type, traceparent, tracestate",
        },
        timeout=10,
    )
    assert answer.status_code == 200
    allowed = answer.headers["access-control-allow-headers"].replace(" ", "").split(",")
    assert {"traceparent", "tracestate"} <= set(allowed)


@pytest.mark.e2e
def test_a_grpc_client_continues_its_trace_through_envoy(
    stack: Stack, receiver: OtlpReceiver
) -> None:
    """Native gRPC through Envoy's port: traceparent as call metadata."""
    trace_id, caller_span = secrets.token_hex(16), secrets.token_hex(8)
    with grpc.insecure_channel(stack.gateway_grpc) as channel:
        svc_grpc.LabServiceStub(channel).Execute(
            svc.ExecuteRequest(prompt="Name a river", model="remote"),
            metadata=[("traceparent", f"00-{trace_id}-{caller_span}-01")],
            timeout=30,
        )
    spans = receiver.wait_for(4 + 2, trace_id)
    rpc = _one(spans, "agentlab.v1.LabService/Execute")
    assert rpc.parent_span_id == caller_span
    assert _one(spans, "execution inference").parent_span_id == rpc.span_id
    assert _one(spans, "chat echo", "lab-under-test").trace_id == trace_id


@pytest.mark.e2e
def test_a_failed_call_is_a_failed_span_named_by_its_status(
    stack: Stack, receiver: OtlpReceiver
) -> None:
    trace_id = secrets.token_hex(16)
    answer = httpx.post(
        f"{stack.url}/api/v1/execute",
        json={"prompt": "x", "model": "no-such-model"},
        headers={"traceparent": f"00-{trace_id}-{secrets.token_hex(8)}-01"},
        timeout=30,
    )
    assert answer.status_code == 404, answer.text
    [rpc] = receiver.wait_for(1, trace_id)
    assert rpc.error
    assert rpc.attributes["error.type"] == "NOT_FOUND"
    assert rpc.attributes["rpc.grpc.status_code"] == 5


@pytest.mark.parametrize(
    "env",
    [
        {},
        {"OTEL_SERVICE_NAME": "x"},
        {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4317", "OTEL_SDK_DISABLED": "true"},
        {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4317", "OTEL_TRACES_EXPORTER": "none"},
    ],
    ids=["nothing set", "no endpoint", "sdk disabled", "exporter none"],
)
def test_tracing_is_off_unless_an_endpoint_is_set(env: dict[str, str]) -> None:
    assert tracing.configure_from_env("test", env) is False
    assert not tracing.enabled()


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"OTEL_TRACES_EXPORTER": "zipkin"}, "OTEL_TRACES_EXPORTER"),
        ({"OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"}, "OTEL_EXPORTER_OTLP_PROTOCOL"),
    ],
)
def test_settings_it_cannot_honour_are_refused(env: dict[str, str], named: str) -> None:
    with pytest.raises(tracing.TracingError, match=named):
        tracing.configure_from_env(
            "test", {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4317", **env}
        )
    assert not tracing.enabled()


def test_docker_compose_passes_the_otel_variables_through() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    for name in ("service", "lab"):
        environment = compose["services"][name]["environment"]
        for variable in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_SDK_DISABLED"):
            assert environment[variable] == f"${{{variable}:-}}", (name, variable)


def test_docker_compose_passes_the_sampler_with_the_sdks_defaults(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """README's advice for heavy traffic (OTEL_TRACES_SAMPLER=...traceidratio)
    once could not reach a compose replica; unset, the values compose gives
    must sample as an unset variable does (an empty one makes the SDK warn)."""
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    defaults = {"OTEL_TRACES_SAMPLER": "parentbased_always_on", "OTEL_TRACES_SAMPLER_ARG": "1.0"}
    for name in ("service", "service-2", "lab"):
        environment = compose["services"][name]["environment"]
        for variable, default in defaults.items():
            assert environment[variable] == f"${{{variable}:-{default}}}", (name, variable)
    for variable in defaults:
        monkeypatch.delenv(variable, raising=False)
    unset = TracerProvider().sampler.get_description()
    for variable, default in defaults.items():
        monkeypatch.setenv(variable, default)
    assert TracerProvider().sampler.get_description() == unset
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "parentbased_traceidratio")
    monkeypatch.setenv("OTEL_TRACES_SAMPLER_ARG", "0.1")
    assert "0.1" in TracerProvider().sampler.get_description()
