"""What every HTTP backend shares: a pooled client, retries only where they
are safe, and the translation of transport failures into domain errors.

A request is retried only when the connection was refused or could not be
opened, so nothing was sent and nothing can run twice. Once a response has
started, a failure is the caller's to see.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

import httpx

from agentlab.core.errors import AgentLabError, LabFailed, LabUnavailable
from agentlab.telemetry import logs, tracing

__all__ = ["HttpBackend", "Upstream", "iter_ndjson", "iter_sse_data", "outgoing_headers"]

logger = logging.getLogger(__name__)

_ERROR_BODY_LIMIT = 2048


class Upstream:
    """One backend's HTTP endpoint. ``backend`` is its configured name, used
    in every error so a caller knows which part failed."""

    def __init__(
        self,
        backend: str,
        base_url: str,
        *,
        headers: Mapping[str, str] | None = None,
        connect_timeout_s: float = 5.0,
        connect_attempts: int = 3,
        backoff_s: float = 0.1,
        max_connections: int = 64,
    ) -> None:
        self.backend = backend
        self.address = base_url.rstrip("/")
        self._attempts = max(1, connect_attempts)
        self._backoff_s = backoff_s
        # No read timeout: a generation may pause for long between tokens;
        # the runner bounds the whole call by its deadline and cancels it.
        self._client = httpx.AsyncClient(
            base_url=self.address,
            headers=dict(headers or {}),
            timeout=httpx.Timeout(None, connect=connect_timeout_s, pool=connect_timeout_s),
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=16),
        )

    async def close(self) -> None:
        await self._client.aclose()

    def unavailable(self, detail: str) -> LabUnavailable:
        return LabUnavailable(self.backend, detail, address=self.address)

    def failed(self, detail: str, upstream_status: int | None = None) -> LabFailed:
        return LabFailed(self.backend, detail, upstream_status, address=self.address)

    def rejected(self, body: bytes, status: int, reason: str) -> AgentLabError:
        """The error for a non-2xx answer; a backend that knows its server's
        error bodies better reads more from them."""
        return self.failed(_error_text(body) or reason, status)

    @asynccontextmanager
    async def stream(
        self, method: str, path: str, *, json_body: Any = None, timeout_s: float | None = None
    ) -> AsyncIterator[httpx.Response]:
        """An open response with a 2xx status. Leaving the block closes it,
        which closes the connection if the body was not read to the end: that
        is how a cancelled call stops the backend's work."""
        # The current span's traceparent (the model call's, the lab
        # service call's) and the caller's x-request-id go along.
        headers = outgoing_headers()
        request = self._client.build_request(
            method,
            path,
            json=json_body,
            headers=headers or None,
            timeout=httpx.Timeout(timeout_s, connect=self._client.timeout.connect)
            if timeout_s is not None
            else None,
        )
        response = await self._send(request)
        try:
            if not response.is_success:
                body = (await response.aread())[:_ERROR_BODY_LIMIT]
                raise self.rejected(body, response.status_code, response.reason_phrase)
            yield response
        except httpx.TimeoutException:
            raise self.unavailable("timed out waiting for the response") from None
        except httpx.HTTPError as error:
            # The backend went away in the middle of its answer.
            raise self.unavailable(f"the connection broke mid-response: {error!r}") from None
        finally:
            await response.aclose()

    async def get_json(self, path: str, *, timeout_s: float = 5.0) -> Any:
        async with self.stream("GET", path, timeout_s=timeout_s) as response:
            body = await response.aread()
        try:
            return json.loads(body)
        except ValueError:
            raise self.failed(f"GET {path} answered something that is not JSON") from None

    async def _send(self, request: httpx.Request) -> httpx.Response:
        for attempt in range(1, self._attempts + 1):
            try:
                return await self._client.send(request, stream=True)
            except (httpx.ConnectError, httpx.ConnectTimeout) as error:
                if attempt == self._attempts:
                    raise self.unavailable(_connect_failure(error)) from None
                delay = self._backoff_s * 2 ** (attempt - 1)
                logger.info(
                    "%s at %s: %s; retry %d in %.2f s",
                    self.backend,
                    self.address,
                    _connect_failure(error),
                    attempt,
                    delay,
                )
                await asyncio.sleep(delay)
            except httpx.TimeoutException:
                raise self.unavailable("timed out waiting for the response") from None
            except httpx.HTTPError as error:
                raise self.unavailable(f"the request failed: {error!r}") from None
        raise AssertionError("unreachable")


class HttpBackend:
    """What every HTTP backend shares: one Upstream, its pool owned by the
    backend (closing a lab leaves it open, closing the backend closes it)."""

    def __init__(self, upstream: Upstream) -> None:
        self._upstream = upstream

    @property
    def name(self) -> str:
        return self._upstream.backend

    @property
    def address(self) -> str:
        return self._upstream.address

    async def start(self) -> None:
        # Connections open on demand: a backend that is down when the gateway
        # starts must not stop the gateway; check() reports it instead.
        return None

    async def close(self) -> None:
        await self._upstream.close()


async def iter_ndjson(upstream: Upstream, response: httpx.Response) -> AsyncGenerator[Any, None]:
    """One JSON value per non-empty line (Ollama, the lab service)."""
    async for line in response.aiter_lines():
        if not line.strip():
            continue
        try:
            yield json.loads(line)
        except ValueError:
            raise upstream.failed(f"a streamed line is not JSON: {line[:200]!r}") from None


async def iter_sse_data(upstream: Upstream, response: httpx.Response) -> AsyncGenerator[str, None]:
    """The data of each Server-Sent Event (OpenAI-compatible servers)."""
    data: list[str] = []
    async for line in response.aiter_lines():
        if line.startswith("data:"):
            data.append(line[5:].removeprefix(" "))
        elif not line.strip() and data:
            yield "\n".join(data)
            data = []
    if data:
        yield "\n".join(data)


def outgoing_headers() -> dict[str, str]:
    """What an upstream request carries of the call that caused it: W3C
    ``traceparent`` (tracing on) and ``x-request-id`` (the call's, when it
    came through Envoy); empty for the health checks, which no call causes."""
    headers: dict[str, str] = {}
    tracing.inject_into(headers)
    if request_id := logs.request_id.get():
        headers["x-request-id"] = request_id
    return headers


def _connect_failure(error: Exception) -> str:
    text = str(error) or type(error).__name__
    # httpx words a refusal "All connection attempts failed"; the OS error
    # under it says what happened.
    cause: BaseException | None = error
    while cause is not None:
        if isinstance(cause, ConnectionRefusedError) or "refused" in str(cause).lower():
            return "connection refused"
        cause = cause.__cause__ or cause.__context__
    if isinstance(error, httpx.ConnectTimeout):
        return "timed out connecting"
    return f"cannot connect: {text}"


def _error_text(body: bytes) -> str:
    """The message of an error body: JSON {"error": ...} as most servers send
    it, or the text itself."""
    text = body.decode("utf-8", "replace").strip()
    try:
        parsed = json.loads(text)
    except ValueError:
        return text
    if isinstance(parsed, dict):
        error = parsed.get("error", parsed.get("detail", parsed.get("message")))
        if isinstance(error, dict):
            error = error.get("message", error)
        if error is not None:
            return str(error)
    return text
