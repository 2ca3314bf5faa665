"""Fuzzing, bounded and reproducible (derandomized, no example database).

The REST API through the real Envoy with schemathesis, from the OpenAPI
document the gateway serves (generated from the protos): no 5xx, and every
response, SSE events included, as the document describes it. Then the gRPC
port with hypothesis: random bytes as the serialized request of every method,
and random well-formed requests; the service never crashes and answers every
call with a proper status.

Each test prints how many cases it ran (past pytest's capture).
"""

from __future__ import annotations

import json
import re
import time
from collections import Counter
from typing import Any, cast

import grpc
import httpx
import pytest
import schemathesis
from google.protobuf import message_factory
from google.protobuf.message import DecodeError
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance

from agentlab.api.auth import OPEN_PREFIXES
from agentlab.config import Settings
from agentlab.devstack import ROOT, Stack
from agentlab.v1 import execution_pb2, lab_service_pb2, lab_service_pb2_grpc
from tests.helpers.stacks import StackFactory

# Every REST route of the contract. The served document must list exactly
# these (test_served_document), so a new route cannot go unfuzzed.
OPERATIONS = [
    "POST /api/v1/execute",
    "POST /api/v1/orchestrate",
    "GET /api/v1/orchestrate",
    "GET /api/v1/models",
    "GET /api/v1/health",
    "GET /api/v1/executions/{execution_id}",
    "GET /api/v1/executions",
    "POST /api/v1/executions/{execution_id}:cancel",
    "GET /api/v1/executions/{execution_id}:watch",
    "POST /api/v1/executions/{execution_id}:replay",
    "POST /api/v1/executions:compare",
]

REST_EXAMPLES = 30
# A hung call fails its case instead of the whole run.
REST_TIMEOUT_S = 5.0
GRPC_TIMEOUT_S = 10.0

_MODES = ["UNSPECIFIED", "INFERENCE", "ORCHESTRATION"]


def _request_fields(**extra: st.SearchStrategy[Any]) -> st.SearchStrategy[dict[str, Any]]:
    """JSON fields of an ExecuteRequest or OrchestrateRequest that the service accepts."""
    return st.fixed_dictionaries(
        {"prompt": st.text(min_size=1, max_size=500).filter(str.strip)},
        optional={
            "model": st.sampled_from(["", "echo", "any-name"]),
            "mode": st.sampled_from([f"EXECUTION_MODE_{mode}" for mode in _MODES]),
            "temperature": st.floats(0, 2),
            "max_tokens": st.integers(1, 512),
            "seed": st.integers(-(2**63), 2**63 - 1).map(str),
            "request_id": st.text(max_size=40),
            **extra,
        },
    )


_on_disconnect = st.sampled_from(
    ["DISCONNECT_POLICY_UNSPECIFIED", "DISCONNECT_POLICY_CANCEL", "DISCONNECT_POLICY_CONTINUE"]
)
VALID_INPUTS: dict[str, tuple[str, st.SearchStrategy[dict[str, Any]]]] = {
    "POST /api/v1/execute": ("body", _request_fields(background=st.booleans())),
    "POST /api/v1/orchestrate": ("body", _request_fields(on_disconnect=_on_disconnect)),
    "GET /api/v1/orchestrate": ("query", _request_fields(on_disconnect=_on_disconnect)),
    "GET /api/v1/executions": (
        "query",
        st.fixed_dictionaries({}, optional={"page_size": st.integers(0, 100)}),
    ),
}


SUPPRESSED = [
    HealthCheck.too_slow,
    HealthCheck.filter_too_much,
    HealthCheck.data_too_large,
    HealthCheck.large_base_example,
]


def fuzz_settings(max_examples: int) -> settings:
    # No shrinking: a failure is reported as found, which keeps a failing run
    # (a hung call costs its timeout per attempt) as bounded as a passing one.
    return settings(
        max_examples=max_examples,
        deadline=None,
        derandomize=True,
        database=None,
        phases=[Phase.explicit, Phase.generate],
        report_multiple_bugs=False,
        suppress_health_check=SUPPRESSED,
    )


def report(capsys: pytest.CaptureFixture[str], line: str) -> None:
    with capsys.disabled():
        print(f"\n[fuzz] {line}")


@pytest.fixture(scope="module")
def fuzz_stack(start_module_stack: StackFactory) -> Stack:
    """One echo stack for the module: echo answers at once."""
    return start_module_stack({"AGENTLAB_DEFAULT_BACKEND": "echo"})


@pytest.fixture(scope="module")
def execution_ids(fuzz_stack: Stack) -> list[str]:
    """Executions that exist, so that the routes on one execution are fuzzed
    past their 404: a finished one, a background one and a streamed one."""
    ids = []
    with httpx.Client(base_url=fuzz_stack.url, timeout=30) as client:
        for body in ({"prompt": "one", "model": "echo"}, {"prompt": "two", "background": True}):
            answer = client.post("/api/v1/execute", json=body)
            assert answer.status_code == 200, answer.text
            ids.append(answer.json()["execution_id"])
        answer = client.post("/api/v1/orchestrate", json={"prompt": "three"})
        assert answer.status_code == 200, answer.text
        first_data = next(line for line in answer.text.split("\n") if line.startswith("data: "))
        first = json.loads(first_data.removeprefix("data: "))
        ids.append(first["event"]["execution_id"])
    return ids


@pytest.fixture(scope="module")
def api_schema(fuzz_stack: Stack) -> Any:
    return schemathesis.openapi.from_url(f"{fuzz_stack.url}/api/v1/openapi.json")


def test_served_document(fuzz_stack: Stack) -> None:
    """The gateway serves build/openapi.json as it is, and it lists every
    route of the contract."""
    answer = httpx.get(f"{fuzz_stack.url}/api/v1/openapi.json")
    assert answer.status_code == 200
    assert answer.headers["content-type"] == "application/json"
    assert answer.content == (ROOT / "build" / "openapi.json").read_bytes()
    document = answer.json()
    assert document["openapi"] == "3.1.0"
    served = {
        f"{method.upper()} {path}"
        for path, operations in document["paths"].items()
        for method in operations
    }
    assert served == {op if isinstance(op, str) else op.values[0] for op in OPERATIONS}


@pytest.mark.parametrize("label", OPERATIONS)
def test_rest_api(
    label: str,
    api_schema: Any,
    execution_ids: list[str],
    capsys: pytest.CaptureFixture[str],
) -> None:
    operation = api_schema.find_operation_by_label(label)
    assert operation is not None, f"{label} is not in the served document"
    strategies = [
        operation.as_strategy(schemathesis.GenerationMode.POSITIVE),
        operation.as_strategy(schemathesis.GenerationMode.NEGATIVE),
    ]
    # Rules JSON Schema cannot say (a non-blank prompt, a printable
    # request_id) fail many generated requests: add requests that pass, so
    # that successful answers are checked too.
    if label in VALID_INPUTS:
        where, inputs = VALID_INPUTS[label]
        strategies.append(
            inputs.flatmap(
                lambda fields: operation.as_strategy(
                    schemathesis.GenerationMode.POSITIVE, **{where: fields}
                )
            )
        )
    if "{execution_id}" in label:
        strategies.append(
            st.sampled_from(execution_ids).flatmap(
                lambda execution_id: operation.as_strategy(
                    schemathesis.GenerationMode.POSITIVE,
                    path_parameters={"execution_id": execution_id},
                )
            )
        )
    if label == "POST /api/v1/executions:compare":
        # Ids that exist, so that comparisons are answered (and checked) too.
        strategies.append(
            st.lists(st.sampled_from(execution_ids), min_size=2, unique=True).flatmap(
                lambda ids: operation.as_strategy(
                    schemathesis.GenerationMode.POSITIVE, body={"execution_ids": ids}
                )
            )
        )
    statuses: Counter[int] = Counter()

    @fuzz_settings(REST_EXAMPLES)
    @given(case=st.one_of(strategies))
    def check(case: Any) -> None:
        response = case.call(timeout=REST_TIMEOUT_S)
        statuses[response.status_code] += 1
        case.validate_response(response, checks=[not_a_server_error, response_schema_conformance])

    start = time.monotonic()
    try:
        check()
    finally:
        report(
            capsys,
            f"{label}: {statuses.total()} cases in {time.monotonic() - start:.1f} s, "
            f"by status {dict(sorted(statuses.items()))}",
        )
    # A route without parameters or body has one case only.
    has_inputs = bool(operation.definition.raw.get("parameters")) or bool(
        operation.definition.raw.get("requestBody")
    )
    assert statuses.total() >= (REST_EXAMPLES if has_inputs else 1)


@pytest.mark.parametrize(
    ("method", "path", "request_type"),
    [
        ("GET", "/api/v1/models?bogus=1", "ListModelsRequest"),
        ("GET", "/api/v1/executions?page_size=5&bogus=1", "ListExecutionsRequest"),
        ("POST", "/api/v1/execute?bogus=1", "ExecuteRequest"),
        # The EventSource route: refused before any stream starts.
        ("GET", "/api/v1/orchestrate?prompt=hi&bogus=1", "OrchestrateRequest"),
    ],
)
def test_unknown_query_parameter_is_400_from_the_gateway(
    fuzz_stack: Stack, method: str, path: str, request_type: str
) -> None:
    """README: an unknown query parameter is 400, answered by Envoy with
    {"code", "message", "details": [ErrorInfo]}: domain agentlab.v1,
    metadata {"source": "gateway"}, reason INVALID_ARGUMENT, and a message
    naming the field."""
    body = {"prompt": "hi"} if method == "POST" else None
    answer = httpx.request(method, f"{fuzz_stack.url}{path}", json=body, timeout=10)
    assert answer.status_code == 400, answer.text
    assert answer.headers["content-type"] == "application/json"
    error = answer.json()
    assert set(error) == {"code", "message", "details"}, error
    assert error["code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert '"bogus"' in error["message"]
    assert f"agentlab.v1.{request_type}" in error["message"]
    assert error["details"] == [
        {
            "@type": "type.googleapis.com/google.rpc.ErrorInfo",
            "reason": "INVALID_ARGUMENT",
            "domain": "agentlab.v1",
            "metadata": {"source": "gateway"},
        }
    ]


def test_watch_after_the_final_event_ends(fuzz_stack: Stack, execution_ids: list[str]) -> None:
    finished = execution_ids[0]
    with grpc.insecure_channel(fuzz_stack.service_grpc) as channel:
        stub = lab_service_pb2_grpc.LabServiceStub(channel)
        execution = stub.GetExecution(
            lab_service_pb2.GetExecutionRequest(execution_id=finished), timeout=5
        ).execution
        assert execution.state == execution_pb2.EXECUTION_STATE_SUCCEEDED
        request = lab_service_pb2.WatchExecutionRequest(
            execution_id=finished, after_sequence=execution.last_sequence
        )
        assert list(stub.WatchExecution(request, timeout=3)) == []


# gRPC: the service's own port, no Envoy in between.

UNARY = ["Execute", "ListModels", "GetHealth", "GetExecution", "ListExecutions", "CancelExecution"]
STREAMING = ["Orchestrate", "WatchExecution"]
REQUESTS: dict[str, type[Any]] = {
    "Execute": lab_service_pb2.ExecuteRequest,
    "Orchestrate": lab_service_pb2.OrchestrateRequest,
    "ListModels": lab_service_pb2.ListModelsRequest,
    "GetHealth": lab_service_pb2.GetHealthRequest,
    "GetExecution": lab_service_pb2.GetExecutionRequest,
    "ListExecutions": lab_service_pb2.ListExecutionsRequest,
    "CancelExecution": lab_service_pb2.CancelExecutionRequest,
    "WatchExecution": lab_service_pb2.WatchExecutionRequest,
}
# What a bad or impossible request may get; never UNKNOWN or INTERNAL (an
# unhandled exception), UNAVAILABLE (a crash) or DEADLINE_EXCEEDED (a hang).
PROPER = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.OUT_OF_RANGE,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.ALREADY_EXISTS,
}

int32s = st.integers(-(2**31), 2**31 - 1)
int64s = st.integers(-(2**63), 2**63 - 1)
# Texts without surrogates: a proto3 string is UTF-8.
prompts = st.text(max_size=2000)
names = st.one_of(st.sampled_from(["", "echo", "missing"]), st.text(max_size=30))


@st.composite
def execute_requests(draw: st.DrawFn) -> lab_service_pb2.ExecuteRequest:
    request = lab_service_pb2.ExecuteRequest(
        prompt=draw(prompts),
        model=draw(names),
        # Unknown enum values included: proto3 enums are open.
        mode=cast(Any, draw(st.integers(-1, 4))),  # the stubs' enum types are closed
        background=draw(st.booleans()),
        request_id=draw(st.one_of(st.just(""), st.text(max_size=40))),
    )
    temperature = draw(st.none() | st.floats())
    if temperature is not None:
        request.temperature = temperature
    max_tokens = draw(st.none() | int32s)
    if max_tokens is not None:
        request.max_tokens = max_tokens
    seed = draw(st.none() | int64s)
    if seed is not None:
        request.seed = seed
    return request


@st.composite
def orchestrate_requests(draw: st.DrawFn) -> lab_service_pb2.OrchestrateRequest:
    execute = draw(execute_requests())
    request = lab_service_pb2.OrchestrateRequest(
        on_disconnect=cast(Any, draw(st.integers(-1, 3))), request_id=execute.request_id
    )
    for name in ("prompt", "model", "mode", "temperature", "max_tokens", "seed"):
        if name in ("prompt", "model", "mode") or execute.HasField(name):
            setattr(request, name, getattr(execute, name))
    return request


# Random bytes, and real requests with bytes appended or cut off.
payloads = st.one_of(
    st.binary(max_size=4096),
    st.tuples(execute_requests(), st.binary(max_size=64)).map(
        lambda pair: pair[0].SerializeToString() + pair[1]
    ),
    st.tuples(execute_requests(), st.integers(0, 64)).map(
        lambda pair: pair[0].SerializeToString()[: -pair[1] or None]
    ),
)


def call_raw(channel: grpc.Channel, method: str, payload: bytes) -> grpc.RpcError | None:
    path = f"/agentlab.v1.LabService/{method}"
    try:
        if method in STREAMING:
            stream = channel.unary_stream(path, request_serializer=None, response_deserializer=None)
            for _ in stream(payload, timeout=GRPC_TIMEOUT_S):
                pass
        else:
            unary = channel.unary_unary(path, request_serializer=None, response_deserializer=None)
            unary(payload, timeout=GRPC_TIMEOUT_S)
    except grpc.RpcError as error:
        return error
    return None


def assert_still_serving(stack: Stack) -> None:
    assert stack.service.proc is not None
    assert stack.service.proc.poll() is None
    with grpc.insecure_channel(stack.service_grpc) as channel:
        answer = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=5
        )
    assert answer.status == health_pb2.HealthCheckResponse.SERVING


def assert_proper(error: grpc.RpcError | None, what: str) -> None:
    if error is None:
        return
    code, details = error.code(), error.details() or ""
    assert code in PROPER, f"{what}: {code.name} {details!r}"
    assert "Traceback" not in details, f"{what}: {details!r}"


def test_grpc_random_bytes(fuzz_stack: Stack, capsys: pytest.CaptureFixture[str]) -> None:
    codes: Counter[str] = Counter()
    start = time.monotonic()
    with grpc.insecure_channel(fuzz_stack.service_grpc) as channel:

        @fuzz_settings(100)
        @given(method=st.sampled_from(UNARY + STREAMING), payload=payloads)
        def check(method: str, payload: bytes) -> None:
            error = call_raw(channel, method, payload)
            codes["OK" if error is None else error.code().name] += 1
            assert_proper(error, f"{method}({payload!r})")

        try:
            check()
        finally:
            report(
                capsys,
                f"gRPC random bytes: {codes.total()} calls in "
                f"{time.monotonic() - start:.1f} s, by status {dict(sorted(codes.items()))}",
            )
    assert codes.total() >= 100
    assert_still_serving(fuzz_stack)


def parses(method: str, payload: bytes) -> bool:
    service = lab_service_pb2.DESCRIPTOR.services_by_name["LabService"]
    request = message_factory.GetMessageClass(service.methods_by_name[method].input_type)()
    try:
        request.ParseFromString(payload)
    except DecodeError:
        return False
    return True


@pytest.mark.parametrize("method", UNARY + STREAMING)
def test_malformed_request_is_invalid_argument(fuzz_stack: Stack, method: str) -> None:
    with grpc.insecure_channel(fuzz_stack.service_grpc) as channel:
        for payload in (b"\xff\xff\xff", b"\x0a\x02\xc3\x28"):  # corrupt; bad UTF-8
            if parses(method, payload):
                continue  # field 1 is not a string here: valid bytes for this method
            error = call_raw(channel, method, payload)
            assert error is not None
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()


def test_grpc_random_requests(fuzz_stack: Stack, capsys: pytest.CaptureFixture[str]) -> None:
    codes: Counter[str] = Counter()
    start = time.monotonic()
    with grpc.insecure_channel(fuzz_stack.service_grpc) as channel:
        stub = lab_service_pb2_grpc.LabServiceStub(channel)

        @fuzz_settings(100)
        @given(
            request=st.one_of(execute_requests(), orchestrate_requests()),
        )
        def check(request: Any) -> None:
            try:
                if isinstance(request, lab_service_pb2.ExecuteRequest):
                    answer = stub.Execute(request, timeout=GRPC_TIMEOUT_S)
                    assert answer.execution_id
                else:
                    events = list(stub.Orchestrate(request, timeout=GRPC_TIMEOUT_S))
                    assert events
                    last = events[-1].event
                    assert last.WhichOneof("kind") in ("execution_completed", "execution_failed")
            except grpc.RpcError as error:
                codes[error.code().name] += 1
                assert_proper(error, repr(request))
            else:
                codes["OK"] += 1

        try:
            check()
        finally:
            report(
                capsys,
                f"gRPC random requests: {codes.total()} calls in "
                f"{time.monotonic() - start:.1f} s, by status {dict(sorted(codes.items()))}",
            )
    assert codes.total() >= 100
    assert_still_serving(fuzz_stack)


def _built_document() -> Any:
    return json.loads((ROOT / "build" / "openapi.json").read_text())


def test_request_schemas_carry_the_contract_rules() -> None:
    """The buf.validate rules of the protos, as JSON Schema, so a client (and
    schemathesis) can see them before sending."""
    document = _built_document()
    execute = document["components"]["schemas"]["agentlab.v1.ExecuteRequest"]["properties"]
    assert execute["prompt"]["minLength"] == 1
    # The service's default maximum, below the contract's (tests/test_limits.py).
    assert execute["prompt"]["maxLength"] == Settings.max_prompt_chars
    assert "Rule `prompt.not_blank`: must contain at least one" in execute["prompt"]["description"]
    assert (execute["temperature"]["minimum"], execute["temperature"]["maximum"]) == (0, 2)
    assert (execute["max_tokens"]["minimum"], execute["max_tokens"]["maximum"]) == (1, 32768)
    # Empty is the default model; anything else has the model name's form.
    assert execute["model"]["anyOf"][0] == {"const": ""}
    assert execute["model"]["anyOf"][1]["maxLength"] == 128
    # Responses are the service's own: no rules there.
    execution = document["components"]["schemas"]["agentlab.v1.Execution"]["properties"]
    assert "minLength" not in execution["prompt"]

    [page_size] = [
        p
        for p in document["paths"]["/api/v1/executions"]["get"]["parameters"]
        if p["name"] == "page_size"
    ]
    assert (page_size["schema"]["minimum"], page_size["schema"]["maximum"]) == (0, 100)
    get = document["paths"]["/api/v1/executions/{execution_id}"]["get"]["parameters"]
    [execution_id] = [p for p in get if p["name"] == "execution_id"]
    assert execution_id["in"] == "path"
    assert execution_id["schema"]["pattern"] == "^[0-9a-f]{32}$"


def test_operations_declare_the_api_key_health_is_open() -> None:
    """Every operation takes the Bearer key (optional: only a gateway with
    keys asks for it) except those the auth interceptor leaves open."""
    document = _built_document()
    assert document["components"]["securitySchemes"]["apiKey"] == {
        "type": "http",
        "scheme": "bearer",
        "description": document["components"]["securitySchemes"]["apiKey"]["description"],
    }
    assert document["security"] == [{"apiKey": []}, {}]
    open_operations = set()
    for operations in document["paths"].values():
        for operation in operations.values():
            match = re.search(r"gRPC: `(/[^`]+)`", operation["description"])
            assert match is not None
            if match.group(1).startswith(OPEN_PREFIXES):
                open_operations.add(match.group(1))
                assert operation["security"] == []
            else:
                assert "security" not in operation
    assert open_operations == {"/agentlab.v1.LabService/GetHealth"}
