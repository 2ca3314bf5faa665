"""The lab service's HTTP API over the embedded lab (``agentlab.lab.wire``).

    POST /inference/     one model call
    POST /orchestrate/   the LangGraph orchestration
    GET  /orchestrate/   health: 200 once the model is loaded, 503 before

Requests name a model as the gateway does: "echo" is the echo lab, any other
name the default lab (the local model, or echo with
AGENTLAB_DEFAULT_BACKEND=echo).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncGenerator, Mapping
from contextlib import aclosing, suppress
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from agentlab.api.validation import RequestRules
from agentlab.config import Settings
from agentlab.core.errors import AgentLabError, InternalError, LabUnavailable
from agentlab.core.ports import (
    Lab,
    LabEvent,
    LabNodeEnded,
    LabNodeStarted,
    LabOutput,
    LabToken,
    Route,
)
from agentlab.core.runner import Runner
from agentlab.core.types import ExecutionMode, Task
from agentlab.lab import wire
from agentlab.lab.echo import EchoModel
from agentlab.lab.graph_lab import GraphLab
from agentlab.lab.local import ECHO, local_model
from agentlab.telemetry import logs, tracing
from agentlab.v1 import lab_service_pb2

__all__ = ["ANY_MODEL", "ECHO_MODEL", "LabServer", "build_labs", "listen"]

logger = logging.getLogger("agentlab.labservice")

ECHO_MODEL = ECHO
ANY_MODEL = "*"


def build_labs(settings: Settings) -> dict[str, Lab]:
    """The gateway's local labs, from the same settings: the default model
    under ``ANY_MODEL`` and the echo model under its own name."""
    echo = GraphLab(EchoModel())
    if settings.default_backend == ECHO_MODEL:
        return {ANY_MODEL: echo, ECHO_MODEL: echo}
    return {ANY_MODEL: GraphLab(local_model(settings)), ECHO_MODEL: echo}


class LabServer:
    """``labs`` by model name; ``ANY_MODEL`` serves every other name."""

    def __init__(
        self,
        labs: Mapping[str, Lab],
        *,
        default_max_tokens: int,
        max_prompt_chars: int = Settings.max_prompt_chars,
    ) -> None:
        self._labs = dict(labs)
        self._default = self._labs[ANY_MODEL]
        # The gateway's rules and defaults, so a task fails the same way on
        # either side. Only the runner's prepare() is used.
        self._rules = RequestRules(max_prompt_chars=max_prompt_chars)
        self._runner = Runner(self._route, default_max_tokens=default_max_tokens)
        self._running: set[asyncio.Task[object]] = set()
        self._draining = False

    @property
    def labs(self) -> Mapping[str, Lab]:
        return self._labs

    async def start(self) -> None:
        """Load the models; health answers 503 until this returns."""
        await asyncio.gather(*(lab.start() for lab in self._distinct()))

    async def drain(self, grace_s: float) -> None:
        """Refuse new runs, give the running ones ``grace_s`` to finish, then
        cancel the rest and wait until they have unwound: their models have
        stopped generating before close() unloads them."""
        self._draining = True
        if not self._running:
            return
        logger.info("draining %d runs for up to %g s", len(self._running), grace_s)
        _, late = await asyncio.wait(set(self._running), timeout=grace_s)
        for task in late:
            task.cancel()
        if late:
            await asyncio.wait(late)

    async def close(self) -> None:
        await asyncio.gather(*(lab.close() for lab in self._distinct()), return_exceptions=True)

    def _distinct(self) -> list[Lab]:
        return list({id(lab): lab for lab in self._labs.values()}.values())

    def _route(self, model: str) -> Route:
        lab = self._labs.get(model, self._default)
        if self._draining:
            raise LabUnavailable(lab.backend, "the lab service is stopping")
        if not lab.ready:
            raise LabUnavailable(lab.backend, "the lab is starting or stopping; retry shortly")
        return Route(lab)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post(wire.PATHS[ExecutionMode.INFERENCE], self.inference)
        app.router.add_post(wire.PATHS[ExecutionMode.ORCHESTRATION], self.orchestrate)
        app.router.add_get(wire.HEALTH_PATH, self.health)
        return app

    async def health(self, request: web.Request) -> web.Response:
        if self._draining or not self._default.ready:
            status = "stopping" if self._draining else "starting"
            return web.json_response({"status": status}, status=503)
        return web.json_response(
            {"status": "ok", "backend": self._default.backend, "model": self._default.model_name}
        )

    async def inference(self, request: web.Request) -> web.StreamResponse:
        return await self._logged(request, ExecutionMode.INFERENCE)

    async def orchestrate(self, request: web.Request) -> web.StreamResponse:
        return await self._logged(request, ExecutionMode.ORCHESTRATION)

    async def _logged(self, request: web.Request, mode: ExecutionMode) -> web.StreamResponse:
        """The run under its caller's ids (logs) and, with tracing on, in a
        SERVER span that continues the caller's trace (its traceparent)."""
        headers = {key.lower(): value for key, value in request.headers.items()}
        logs.request_id.set(headers.get("x-request-id", ""))
        logs.trace_id.set(logs.trace_id_of(headers.get("traceparent", "")))
        span = tracing.start_span(
            f"{request.method} {request.path}",
            kind=tracing.SpanKind.SERVER,
            attributes={
                "http.request.method": request.method,
                "url.path": request.path,
                "agentlab.request_id": logs.request_id.get(),
            },
            parent=tracing.extract_context(headers),
        )
        with tracing.use_span(span):
            response = await self._observed(request, mode)
            if span is not None:
                span.set_attribute("http.response.status_code", response.status)
            return response

    async def _observed(self, request: web.Request, mode: ExecutionMode) -> web.StreamResponse:
        run = _Run(request)
        task = asyncio.current_task()
        assert task is not None
        self._running.add(task)
        try:
            response = await self._run(run, mode)
        except asyncio.CancelledError:
            # With handler_cancellation, how a disconnect reaches us; by now
            # the lab run has been closed on the way out.
            transport = request.transport
            if transport is None or transport.is_closing():
                run.log_gone()
            else:
                run.log("cancelled (shutting down)")
            raise
        finally:
            self._running.discard(task)
        if not run.gone:
            run.log(f"-> {response.status}")
        return response

    async def _run(self, run: _Run, mode: ExecutionMode) -> web.StreamResponse:
        try:
            task, stream = wire.decode_request(await run.request.read(), mode)
            self._rules.check(_as_request(task))
            prepared = self._runner.prepare(task)
        except wire.MalformedRequest as error:
            return web.json_response(
                {"error": {"code": "INVALID_ARGUMENT", "message": str(error)}}, status=422
            )
        except AgentLabError as error:
            return _error_response(error)
        async with aclosing(prepared.lab.run(prepared.task)) as events:
            if stream:
                return await _stream(run, events)
            return await _complete(run, events)


@dataclass
class _Run:
    """One request's progress, for its log lines."""

    request: web.Request
    started: float = field(default_factory=time.perf_counter)
    events: int = 0
    gone: bool = False

    def log(self, what: str) -> None:
        logger.info(
            "%s %s %s, %d events in %.0f ms",
            self.request.method,
            self.request.path,
            what,
            self.events,
            (time.perf_counter() - self.started) * 1000,
        )

    def log_gone(self) -> None:
        self.gone = True
        logger.info(
            "%s %s: client went away after %d events, %.0f ms",
            self.request.method,
            self.request.path,
            self.events,
            (time.perf_counter() - self.started) * 1000,
        )


async def _stream(run: _Run, events: AsyncGenerator[LabEvent, None]) -> web.StreamResponse:
    """One line per event, written as it happens. The response starts with
    the first event, so a lab that fails before it still gets a real status."""
    response = web.StreamResponse(headers={"Content-Type": wire.NDJSON})
    try:
        async for event in events:
            await _write_line(run.request, response, wire.encode_event(event))
            run.events += 1
    except ConnectionResetError:
        # The client left and a write noticed before aiohttp cancelled us.
        # Returning closes the lab run (the caller's aclosing).
        run.log_gone()
        return response
    except AgentLabError as error:
        failure = error
    except Exception:
        failure = InternalError.logged(logger, "lab run")
    else:
        if not response.prepared:
            await response.prepare(run.request)
        return response
    if not response.prepared:
        return _error_response(failure)
    with suppress(ConnectionResetError):
        await _write_line(run.request, response, {"type": "error", **wire.encode_error(failure)})
    return response


async def _write_line(
    request: web.Request, response: web.StreamResponse, line: dict[str, Any]
) -> None:
    if not response.prepared:
        await response.prepare(request)
    await response.write(json.dumps(line).encode() + b"\n")


async def _complete(run: _Run, events: AsyncGenerator[LabEvent, None]) -> web.StreamResponse:
    """The whole run as one JSON answer. A lab that does not report its
    generation time gets it measured here, where the tokens arrive: the
    client sees none of them to time."""
    steps: list[wire.Step] = []
    inputs: dict[str, str] = {}
    first_tokens: dict[str, float] = {}
    output = ""
    try:
        async for event in events:
            run.events += 1
            match event:
                case LabNodeStarted(node, node_input):
                    inputs[node] = node_input
                case LabToken(node):
                    first_tokens.setdefault(node, time.perf_counter())
                case LabNodeEnded(node, node_output, prompt_tokens, completion_tokens, gen_s):
                    if gen_s is None and node in first_tokens:
                        gen_s = time.perf_counter() - first_tokens.pop(node)
                    steps.append(
                        wire.Step(
                            node,
                            inputs.pop(node, ""),
                            node_output,
                            prompt_tokens,
                            completion_tokens,
                            gen_s,
                        )
                    )
                case LabOutput(output):
                    pass
    except AgentLabError as error:
        return _error_response(error)
    except Exception:
        return _error_response(InternalError.logged(logger, "lab run"))
    return web.json_response(wire.encode_result(output, steps))


def _as_request(task: Task) -> lab_service_pb2.ExecuteRequest:
    """The task as the gateway's request, to hold it to the same rules."""
    options = task.options
    return lab_service_pb2.ExecuteRequest(
        prompt=task.prompt,
        model=task.model,
        temperature=options.temperature,
        max_tokens=options.max_tokens,
        seed=options.seed,
    )


def _error_response(error: AgentLabError) -> web.Response:
    return web.json_response({"error": wire.encode_error(error)}, status=wire.http_status(error))


async def listen(service: LabServer, host: str, port: int) -> tuple[web.AppRunner, int]:
    """Serve ``service`` on host:port (0 picks one); returns the runner and the
    bound port. Drain the service before the runner's cleanup()."""
    runner = web.AppRunner(
        service.app(),
        # aiohttp does not cancel a handler when its client disconnects
        # unless asked; without it a run would only notice at its next
        # write, and a non-streamed run never.
        handler_cancellation=True,
        access_log=None,  # each run logs its own line, with its events
        # LabServer.drain has already let the runs finish (aiohttp's own
        # drain reads 0 as "forever" and waits up to twice its timeout); this
        # only bounds the 503s answered meanwhile.
        shutdown_timeout=1.0,
    )
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except OSError:
        await runner.cleanup()
        raise
    bound = runner.addresses[0][1]
    return runner, int(bound)
