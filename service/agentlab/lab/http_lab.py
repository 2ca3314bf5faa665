"""The http_lab backend: the lab service (``agentlab.labservice``, or any
server speaking ``agentlab.lab.wire``) called over HTTP.

A streamed answer is relayed event by event as it arrives; a complete JSON
answer (a lab that does not stream) is replayed as the same events without
tokens. Closing a run closes the HTTP response, and with it the connection:
that is what tells the lab service to stop the work.
"""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator, Callable
from contextlib import aclosing
from dataclasses import replace
from typing import Any, TypeVar

import httpx

from agentlab.core.errors import AgentLabError, InvalidArgument, LabFailed
from agentlab.core.ports import LabEvent, LabOutput
from agentlab.core.types import Task
from agentlab.lab import wire
from agentlab.lab.upstream import HttpBackend, Upstream, iter_ndjson
from agentlab.telemetry import tracing

__all__ = ["HttpLab", "HttpLabBackend"]

_T = TypeVar("_T")


class _Rejected(LabFailed):
    """A non-2xx answer that keeps the lab service's own message: a 400's
    message says which field was wrong."""

    def __init__(
        self, backend: str, detail: str, upstream_status: int | None, address: str
    ) -> None:
        super().__init__(backend, detail, upstream_status, address=address)
        self.detail = detail


class _LabServiceUpstream(Upstream):
    def failed(self, detail: str, upstream_status: int | None = None) -> LabFailed:
        return _Rejected(self.backend, detail, upstream_status, self.address)

    def rejected(self, body: bytes, status: int, reason: str) -> AgentLabError:
        # A 400 in the wire format names every field that was wrong.
        if status == 400:
            try:
                error = json.loads(body)["error"]
            except (ValueError, KeyError, TypeError):
                error = None
            if isinstance(error, dict):
                return wire.decode_error(error, self.backend, self.address)
        return super().rejected(body, status, reason)


class HttpLabBackend(HttpBackend):
    kind = "http_lab"

    def __init__(
        self, name: str, url: str, *, connect_attempts: int = 3, stream: bool = True
    ) -> None:
        super().__init__(_LabServiceUpstream(name, url, connect_attempts=connect_attempts))
        self._stream = stream

    async def check(self) -> None:
        try:
            await self._upstream.get_json(wire.HEALTH_PATH)
        except _Rejected as error:
            if error.upstream_status is not None and error.upstream_status >= 500:
                raise self._upstream.unavailable(
                    f"health check answered HTTP {error.upstream_status}: {error.detail}"
                ) from None
            raise

    def lab(self, model: str) -> HttpLab:
        return HttpLab(self._upstream, model, stream=self._stream)


class HttpLab:
    def __init__(self, upstream: Upstream, model: str, *, stream: bool) -> None:
        self._upstream = upstream
        self._model = model
        self._stream = stream
        self._ready = False

    @property
    def backend(self) -> str:
        return self._upstream.backend

    @property
    def model_name(self) -> str:
        return self._model

    @property
    def ready(self) -> bool:
        return self._ready

    async def start(self) -> None:
        self._ready = True

    async def close(self) -> None:
        self._ready = False

    def run(self, task: Task) -> AsyncGenerator[LabEvent, None]:
        """The run's events; with tracing on, under a CLIENT span for the
        call to the lab service, whose spans (its nodes, its model calls)
        become its children through the request's traceparent."""
        path = wire.PATHS[task.mode]
        span = tracing.start_span(
            f"POST {path}",
            kind=tracing.SpanKind.CLIENT,
            attributes={
                "http.request.method": "POST",
                "url.full": f"{self._upstream.address}{path}",
                "gen_ai.request.model": self._model,
            },
        )
        events = self._run(task, path)
        return events if span is None else _ended_with(span, tracing.steps(span, events))

    async def _run(self, task: Task, path: str) -> AsyncGenerator[LabEvent, None]:
        body = wire.encode_request(replace(task, model=self._model), stream=self._stream)
        try:
            async with self._upstream.stream("POST", path, json_body=body) as response:
                content_type = response.headers.get("content-type", "").split(";")[0].strip()
                if content_type == wire.NDJSON:
                    events = self._streamed(response)
                elif content_type == wire.JSON:
                    events = self._complete(response)
                else:
                    raise self._upstream.failed(f"unexpected content type {content_type!r}")
                async with aclosing(events):
                    async for event in events:
                        yield event
        except _Rejected as error:
            # Only answers that arrived before the stream began have a status.
            if error.upstream_status == 400:
                raise _invalid_argument(error.detail) from None
            if error.upstream_status == 503:
                raise self._upstream.unavailable(error.detail) from None
            raise

    async def _streamed(self, response: httpx.Response) -> AsyncGenerator[LabEvent, None]:
        async with aclosing(iter_ndjson(self._upstream, response)) as lines:
            async for line in lines:
                if isinstance(line, dict) and line.get("type") == "error":
                    raise wire.decode_error(line, self.backend, self._upstream.address)
                yield (event := self._decode(wire.decode_event, line))
                if isinstance(event, LabOutput):
                    return
        raise self._upstream.failed("the lab's stream ended early")

    async def _complete(self, response: httpx.Response) -> AsyncGenerator[LabEvent, None]:
        try:
            body = json.loads(await response.aread())
        except ValueError:
            raise self._upstream.failed("the lab answered something that is not JSON") from None
        for event in self._decode(wire.decode_result, body):
            yield event

    def _decode(self, decode: Callable[[Any], _T], value: Any) -> _T:
        try:
            return decode(value)
        except wire.WireError as error:
            raise self._upstream.failed(f"the lab answered off the wire format: {error}") from None


async def _ended_with(
    span: tracing.Span, events: AsyncGenerator[LabEvent, None]
) -> AsyncGenerator[LabEvent, None]:
    """``events``, ending ``span`` with them (failed if they raised)."""
    try:
        async with aclosing(events):
            async for event in events:
                yield event
    except BaseException as error:
        tracing.end(span, error)
        raise
    tracing.end(span)


def _invalid_argument(message: str) -> InvalidArgument:
    # Upstream keeps only a 400's message, InvalidArgument's "field: description".
    field, found, description = message.partition(": ")
    return InvalidArgument(field, description) if found else InvalidArgument("", message)
