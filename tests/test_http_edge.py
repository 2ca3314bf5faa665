"""The HTTP edge answers what real clients send: health probes in each HTTP
version curl speaks, and browser code on an allowed origin reading the
headers the README promises it (Retry-After on a 429, x-request-id,
grpc-status)."""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

import pytest

from agentlab.devstack import Stack
from tests.helpers.browser import chromium_page
from tests.helpers.stacks import StackFactory
from tests.helpers.tools import run

HEALTHY = {"service": "", "status": "SERVING_STATUS_SERVING"}


def probe(url: str, *options: str) -> tuple[str, str]:
    """curl's status line and body."""
    result = run(["curl", "-sS", "-i", *options, url])
    assert result.returncode == 0, result.stderr
    # Text mode has turned CRLF into LF.
    head, _, body = result.stdout.partition("\n\n")
    return head.split("\n")[0].strip(), body


@pytest.mark.parametrize(
    ("option", "status_line"),
    [
        ("--http1.0", "HTTP/1.0 200 OK"),
        ("--http1.1", "HTTP/1.1 200 OK"),
        # An h2c upgrade request is answered in HTTP/1.1: Envoy does not
        # upgrade (RFC 9113 deprecates it), and the probe still gets its 200.
        ("--http2", "HTTP/1.1 200 OK"),
        ("--http2-prior-knowledge", "HTTP/2 200"),
    ],
)
def test_health_probes_in_every_http_version_curl_speaks(
    echo_stack: Stack, option: str, status_line: str
) -> None:
    status, body = probe(f"{echo_stack.url}/api/v1/health", option)
    assert status == status_line
    assert json.loads(body) == HEALTHY


@pytest.mark.parametrize("option", ["--http1.0", "--http1.1", "--http2-prior-knowledge"])
def test_head_probes_get_the_status_without_a_body(echo_stack: Stack, option: str) -> None:
    result = run(
        [
            "curl",
            "-sS",
            "-I",
            option,
            "-o",
            "/dev/null",
            "-w",
            "%{http_code} %{size_download}",
            f"{echo_stack.url}/api/v1/health",
        ]
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "200 0"


def test_an_http10_probe_without_a_host_header(echo_stack: Stack) -> None:
    status, body = probe(f"{echo_stack.url}/api/v1/health", "--http1.0", "-H", "Host:")
    assert status == "HTTP/1.0 200 OK"
    assert json.loads(body) == HEALTHY


# fetch() from the page; what cross-origin code can read of the answer.
_FETCH = """
async ([url, init]) => {
  const response = await fetch(url, init);
  return {status: response.status, headers: Object.fromEntries(response.headers),
          body: await response.text()};
}
"""


async def fetch(page: Any, url: str, init: dict[str, Any] | None = None) -> dict[str, Any]:
    answer: dict[str, Any] = await page.evaluate(_FETCH, [url, init or {}])
    return answer


def assert_request_id(headers: dict[str, str]) -> None:
    assert uuid.UUID(headers["x-request-id"]), headers


@pytest.fixture
def rate_limited(start_stack: StackFactory) -> Stack:
    """Envoy's per-client bucket shrunk to 3 requests, one more every 5 s."""
    return start_stack({"AGENTLAB_DEFAULT_BACKEND": "echo", "AGENTLAB_RATE_LIMIT": "0.2/3"})


@pytest.fixture
def one_execution_at_a_time(start_stack: StackFactory) -> Stack:
    return start_stack(
        {
            "AGENTLAB_DEFAULT_BACKEND": "echo",
            "AGENTLAB_ECHO_TOKEN_DELAY_S": "0.2",
            "AGENTLAB_MAX_RUNNING_EXECUTIONS": "1",
            "AGENTLAB_MAX_QUEUED_EXECUTIONS": "1",
        },
    )


async def test_a_browser_reads_the_promised_headers_on_success_and_on_envoys_429(
    rate_limited: Stack,
) -> None:
    async with chromium_page() as page:
        ok = await fetch(page, f"{rate_limited.url}/api/v1/models")
        assert ok["status"] == 200
        assert ok["headers"]["grpc-status"] == "0"
        assert_request_id(ok["headers"])

        limited = None
        for _ in range(20):
            answer = await fetch(page, f"{rate_limited.url}/api/v1/models")
            if answer["status"] == 429:
                limited = answer
                break
        assert limited is not None, "the bucket of 3 never ran out"
    assert limited["headers"]["retry-after"] == "5"
    assert_request_id(limited["headers"])
    body = json.loads(limited["body"])
    assert (body["code"], body["message"]) == (8, "local_rate_limited")
    assert body["details"][0]["reason"] == "RATE_LIMITED"


async def test_a_browser_reads_retry_after_on_the_services_429(
    one_execution_at_a_time: Stack,
) -> None:
    url = f"{one_execution_at_a_time.url}/api/v1/execute"
    body = json.dumps({"prompt": "word " * 100, "model": "echo", "background": True})
    # A JSON POST: the browser sends a CORS preflight first.
    init = {"method": "POST", "headers": {"content-type": "application/json"}, "body": body}
    async with chromium_page() as page:
        running = await fetch(page, url, init)
        queued = await fetch(page, url, init)
        refused = await fetch(page, url, init)
    assert [running["status"], queued["status"]] == [200, 200], [running, queued]
    assert refused["status"] == 429, refused
    assert refused["headers"]["retry-after"] == "1"
    assert_request_id(refused["headers"])
    error = json.loads(refused["body"])
    assert error["code"] == 8
    assert re.search(r"too many executions", error["message"])
    [info] = [d for d in error["details"] if d["@type"].endswith("google.rpc.ErrorInfo")]
    assert info["reason"] == "TOO_MANY_EXECUTIONS"
