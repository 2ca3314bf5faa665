"""AsyncClient: every RPC of agentlab.v1.LabService over grpc.aio, with
retries for the calls that are safe to repeat and streams that resume
after a drop.

    async with AsyncClient("localhost:8000", api_key=key) as lab:
        answer = await lab.execute("Name a fruit.", model="echo")
        replay = await lab.replay_execution(answer.execution_id, model="echo")
        comparison = await lab.compare_executions([answer.execution_id, replay.execution_id])
        async for event in lab.orchestrate("Name a fruit.", model="echo"):
            print(event.WhichOneof("kind"))
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from types import TracebackType
from typing import Any, TypeVar

import grpc
from google.rpc import status_pb2

from agentlab.client.errors import LabServiceError, Unavailable, error_from_rpc
from agentlab.client.retries import OnRetry, Retry, RetryPolicy
from agentlab.client.settings import resolve_api_key, resolve_target
from agentlab.v1 import execution_pb2 as pb
from agentlab.v1 import lab_service_pb2 as svc
from agentlab.v1 import lab_service_pb2_grpc as svc_grpc

__all__ = ["AsyncClient", "is_final", "new_request_id"]

_T = TypeVar("_T")
_FINAL = frozenset({"execution_completed", "execution_failed"})
# The contract's limit on request_id (lab_service.proto).
_REQUEST_ID_MAX = 128
# Codes a stream breaks with when its connection goes (Envoy restarted, the
# connection reset), as grpcio reports them: resumed unless the service
# itself sent the status.
_BROKEN_STREAM = frozenset(
    {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.CANCELLED}
)


def is_final(event: pb.ExecutionEvent) -> bool:
    """Whether ``event`` ends its execution's stream (completed or failed)."""
    return event.WhichOneof("kind") in _FINAL


def new_request_id() -> str:
    """A fresh idempotency key (32 hex digits)."""
    return uuid.uuid4().hex


class AsyncClient:
    """A channel to the gateway (Envoy's port or the service's own).

    ``target``: ``host:port`` (else AGENTLAB_TARGET, else localhost:8000);
    ``api_key``: sent as a Bearer token (else AGENTLAB_API_KEY, else none);
    ``timeout_s``: the default deadline of a unary call, retries included
    (None: no deadline); ``retry``: the retry policy; ``on_retry``: called
    before each retry's wait (the CLI prints it). Make it inside the event
    loop that uses it (grpc.aio binds its channel to that loop); use it as
    an async context manager, or ``await close()``. Errors raise ``LabServiceError``
    subclasses (agentlab.client.errors)."""

    def __init__(
        self,
        target: str | None = None,
        *,
        api_key: str | None = None,
        timeout_s: float | None = 60.0,
        retry: RetryPolicy | None = None,
        on_retry: OnRetry | None = None,
    ) -> None:
        self.target = resolve_target(target)
        key = resolve_api_key(api_key)
        self._metadata: tuple[tuple[str, str], ...] = (
            (("authorization", f"Bearer {key}"),) if key else ()
        )
        self.timeout_s = timeout_s
        self.retry = retry or RetryPolicy()
        self.on_retry = on_retry
        self._channel = grpc.aio.insecure_channel(self.target)
        # protoc writes the stub without annotations.
        self._stub = svc_grpc.LabServiceStub(self._channel)  # type: ignore[no-untyped-call]

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    # Unary calls -------------------------------------------------------

    async def execute(
        self,
        prompt: str,
        *,
        model: str = "",
        mode: pb.ExecutionMode = pb.EXECUTION_MODE_UNSPECIFIED,
        temperature: float | None = None,
        max_tokens: int | None = None,
        seed: int | None = None,
        background: bool = False,
        request_id: str | None = None,
        idempotent: bool = True,
        timeout_s: float | None = None,
    ) -> pb.ExecuteResponse:
        """Execute: the whole result (or, with ``background``, the id and
        state at once). With ``idempotent`` (the default) the call carries a
        ``request_id`` (``request_id``, or a fresh one) and is retried on
        UNAVAILABLE / RESOURCE_EXHAUSTED; with ``idempotent=False`` and no
        ``request_id`` it is sent once, never repeated."""
        keys = _Keys.for_call(request_id, idempotent=idempotent)
        request = svc.ExecuteRequest(
            prompt=prompt,
            model=model,
            mode=mode,
            temperature=temperature,
            max_tokens=max_tokens,
            seed=seed,
            background=background,
        )
        return await self._keyed("Execute", self._stub.Execute, request, keys, timeout_s)

    async def list_models(self, *, timeout_s: float | None = None) -> list[svc.Model]:
        """The models the gateway routes, with whether each is ready now."""
        response: svc.ListModelsResponse = await self._read(
            "ListModels", self._stub.ListModels, svc.ListModelsRequest(), timeout_s
        )
        return list(response.models)

    async def health(
        self, service: str = "", *, timeout_s: float | None = None
    ) -> svc.GetHealthResponse:
        """SERVING, or raises Unavailable (NOT_SERVING) / NotFound (no such
        service name). Not retried: a probe wants the answer of now."""
        return await self._unary(
            "GetHealth",
            lambda remaining: self._stub.GetHealth(
                svc.GetHealthRequest(service=service), metadata=self._metadata, timeout=remaining
            ),
            safe=False,
            timeout_s=timeout_s,
        )

    async def get_execution(
        self,
        execution_id: str,
        *,
        view: pb.ExecutionView = pb.EXECUTION_VIEW_UNSPECIFIED,
        timeout_s: float | None = None,
    ) -> pb.Execution:
        response: svc.GetExecutionResponse = await self._read(
            "GetExecution",
            self._stub.GetExecution,
            svc.GetExecutionRequest(execution_id=execution_id, view=view),
            timeout_s,
        )
        return response.execution

    async def list_executions(
        self,
        *,
        page_size: int = 0,
        page_token: str = "",
        model: str = "",
        state: pb.ExecutionState = pb.EXECUTION_STATE_UNSPECIFIED,
        view: pb.ExecutionView = pb.EXECUTION_VIEW_UNSPECIFIED,
        timeout_s: float | None = None,
    ) -> svc.ListExecutionsResponse:
        """One page, newest first; ``next_page_token`` is '' on the last."""
        return await self._read(
            "ListExecutions",
            self._stub.ListExecutions,
            svc.ListExecutionsRequest(
                page_size=page_size, page_token=page_token, model=model, state=state, view=view
            ),
            timeout_s,
        )

    async def iter_executions(
        self,
        *,
        page_size: int = 0,
        model: str = "",
        state: pb.ExecutionState = pb.EXECUTION_STATE_UNSPECIFIED,
        view: pb.ExecutionView = pb.EXECUTION_VIEW_UNSPECIFIED,
    ) -> AsyncIterator[pb.Execution]:
        """Every execution, page after page."""
        token = ""
        while True:
            page = await self.list_executions(
                page_size=page_size, page_token=token, model=model, state=state, view=view
            )
            for execution in page.executions:
                yield execution
            token = page.next_page_token
            if not token:
                return

    async def cancel_execution(
        self, execution_id: str, *, timeout_s: float | None = None
    ) -> pb.Execution:
        """Cancel; cancelling again is harmless, so it is retried."""
        response: svc.CancelExecutionResponse = await self._read(
            "CancelExecution",
            self._stub.CancelExecution,
            svc.CancelExecutionRequest(execution_id=execution_id),
            timeout_s,
        )
        return response.execution

    async def replay_execution(
        self,
        execution_id: str,
        *,
        model: str = "",
        temperature: float | None = None,
        max_tokens: int | None = None,
        seed: int | None = None,
        background: bool = False,
        request_id: str | None = None,
        idempotent: bool = True,
        timeout_s: float | None = None,
    ) -> pb.Execution:
        """ReplayExecution: run a stored execution's prompt and mode again,
        as a new execution whose ``replay_of`` is ``execution_id`` (32 hex
        digits; any state, any backend).

        ``model``: the model to run it on ('' : the source's again);
        ``temperature`` (0 to 2), ``max_tokens`` (per model call, 1 to
        32768), ``seed``: None keeps the source's (if it set one);
        ``background``: answer at once, QUEUED or RUNNING, without the result;
        ``timeout_s``: seconds, retries included (None: the client's).

        Returns the replay's record (``pb.Execution``): ended, with
        ``result`` (its output, flow and metrics, times in milliseconds) and,
        when its state is FAILED or CANCELLED, ``error`` (a google.rpc.Status)
        — a replay that failed is an answer, not a raised error.

        Raises NotFound (no such execution, or another caller's; an unknown
        model, reason MODEL_NOT_FOUND), InvalidArgument (a malformed id or
        option, with ``violations``), AlreadyExists (a ``request_id`` used
        before for another replay), ResourceExhausted (too many executions,
        with ``retry_delay_s``), Unauthenticated. Retried as ``execute``:
        with ``idempotent`` (the default) it carries a ``request_id``
        (``request_id``, or a fresh one; the key is bound to the source, the
        model and the options) and is retried on UNAVAILABLE /
        RESOURCE_EXHAUSTED; with ``idempotent=False`` and no ``request_id``
        it is sent once."""
        keys = _Keys.for_call(request_id, idempotent=idempotent)
        request = svc.ReplayExecutionRequest(
            execution_id=execution_id,
            model=model,
            temperature=temperature,
            max_tokens=max_tokens,
            seed=seed,
            background=background,
        )
        answer: svc.ReplayExecutionResponse = await self._keyed(
            "ReplayExecution", self._stub.ReplayExecution, request, keys, timeout_s
        )
        return answer.execution

    async def compare_executions(
        self, execution_ids: Sequence[str], *, timeout_s: float | None = None
    ) -> svc.CompareExecutionsResponse:
        """CompareExecutions: two to ten ``execution_ids`` (32 hex digits
        each, no id twice), each set against the first, the baseline.

        Returns ``executions`` (each one's totals in the request's order:
        ``metrics``, ``output``, ``output_diff`` from the baseline's output
        and ``delta``, its metrics minus the baseline's) and ``nodes`` (one
        per node run, matched by name and ``occurrence``; per execution a
        NodeVersion: ``present``, its ``step``, ``output_diff`` and
        ``delta``). A diff is a list of DiffOp: runs of words, whitespace
        included, EQUAL, INSERT (only in this one) or DELETE (only in the
        baseline). Deltas: tokens as counts, time to first token and duration
        in milliseconds, tokens per second; positive means more.

        Raises InvalidArgument (fewer than two ids, more than ten, one twice
        or malformed: a violation naming ``execution_ids``; a comparison over
        3 MiB, reason COMPARISON_TOO_LARGE), NotFound (an unknown id, or
        another caller's), Unauthenticated. A read: retried on UNAVAILABLE /
        RESOURCE_EXHAUSTED.

        Raises TypeError for one string: a str is a sequence of strings too,
        and would be sent as its characters."""
        if isinstance(execution_ids, str):
            raise TypeError(
                "execution_ids: a list of execution ids, not one string "
                f"(compare_executions([{execution_ids!r}, ...]))"
            )
        return await self._read(
            "CompareExecutions",
            self._stub.CompareExecutions,
            svc.CompareExecutionsRequest(execution_ids=list(execution_ids)),
            timeout_s,
        )

    # Streams -------------------------------------------------------------

    def orchestrate(
        self,
        prompt: str,
        *,
        model: str = "",
        mode: pb.ExecutionMode = pb.EXECUTION_MODE_UNSPECIFIED,
        temperature: float | None = None,
        max_tokens: int | None = None,
        seed: int | None = None,
        request_id: str | None = None,
        idempotent: bool = True,
    ) -> AsyncIterator[pb.ExecutionEvent]:
        """Orchestrate's events through the final one (``execution_completed``
        or ``execution_failed``, which is yielded, not raised). With
        ``idempotent`` (the default) the call has a ``request_id`` and the
        stream survives a drop: before the first event the call is made again
        with the key, after it WatchExecution resumes after the last sequence
        seen, so each event arrives exactly once. Without, a drop raises.
        An error before the first event raises its LabServiceError."""
        keys = _Keys.for_call(request_id, idempotent=idempotent)
        request = svc.OrchestrateRequest(
            prompt=prompt,
            model=model,
            mode=mode,
            temperature=temperature,
            max_tokens=max_tokens,
            seed=seed,
        )

        def start() -> Any:
            request.request_id = keys.current
            return self._stub.Orchestrate(request, metadata=self._metadata)

        return self._resumable("Orchestrate", start, 0, resumable=keys.keyed, keys=keys)

    def watch(
        self, execution_id: str, *, after_sequence: int = 0
    ) -> AsyncIterator[pb.ExecutionEvent]:
        """WatchExecution's events after ``after_sequence`` through the final
        one, resuming after a drop (each event exactly once)."""

        def start() -> Any:
            return self._stub.WatchExecution(
                svc.WatchExecutionRequest(execution_id=execution_id, after_sequence=after_sequence),
                metadata=self._metadata,
            )

        return self._resumable("WatchExecution", start, after_sequence, resumable=True)

    async def _resumable(
        self,
        method: str,
        start: Callable[[], Any],
        after_sequence: int,
        *,
        resumable: bool,
        keys: _Keys | None = None,
    ) -> AsyncIterator[pb.ExecutionEvent]:
        last = after_sequence
        execution_id = ""
        failures = 0
        while True:
            if execution_id:
                call = self._stub.WatchExecution(
                    svc.WatchExecutionRequest(execution_id=execution_id, after_sequence=last),
                    metadata=self._metadata,
                )
            else:
                call = start()
            try:
                async for response in call:
                    event: pb.ExecutionEvent = response.event
                    if event.sequence <= last:
                        continue  # seen before the drop
                    last = event.sequence
                    execution_id = event.execution_id
                    failures = 0
                    yield event
                    if is_final(event):
                        return
                broken: LabServiceError | None = None
            except grpc.RpcError as rpc_error:
                broken = error_from_rpc(rpc_error)
            finally:
                call.cancel()
            # Here the stream ended before its final event.
            if broken is not None and not self._resumes(broken):
                raise broken
            if not resumable:
                raise broken or _ended_early(method)
            failures += 1
            if failures >= self.retry.max_attempts:
                raise broken or _ended_early(method)
            if keys is not None and not execution_id and broken is not None:
                keys.after(broken)
            delay = self.retry.delay_s(failures, broken)
            if self.on_retry is not None:
                self.on_retry(Retry(method, failures, broken or _ended_early(method), delay))
            await asyncio.sleep(delay)

    def _resumes(self, error: LabServiceError) -> bool:
        return self.retry.retryable(error) or (
            error.code in _BROKEN_STREAM and not error.from_service
        )

    # Retries ---------------------------------------------------------------

    async def _read(
        self,
        method: str,
        rpc: Callable[..., Awaitable[_T]],
        request: object,
        timeout_s: float | None,
    ) -> _T:
        return await self._unary(
            method,
            lambda remaining: rpc(request, metadata=self._metadata, timeout=remaining),
            safe=True,
            timeout_s=timeout_s,
        )

    async def _keyed(
        self,
        method: str,
        rpc: Callable[..., Awaitable[_T]],
        request: Any,
        keys: _Keys,
        timeout_s: float | None,
    ) -> _T:
        """``rpc(request)`` carrying each attempt's key (``keys.current``):
        retried only when the call is keyed, and after an error the service
        sent under the next key (``_Keys.after``)."""

        async def attempt(remaining: float | None) -> _T:
            request.request_id = keys.current
            return await rpc(request, metadata=self._metadata, timeout=remaining)

        return await self._unary(
            method, attempt, safe=keys.keyed, timeout_s=timeout_s, after_error=keys.after
        )

    async def _unary(
        self,
        method: str,
        attempt: Callable[[float | None], Awaitable[_T]],
        *,
        safe: bool,
        timeout_s: float | None,
        after_error: Callable[[LabServiceError], None] | None = None,
    ) -> _T:
        """``attempt(remaining_s)`` until it succeeds, retrying only a
        ``safe`` call, on the policy's codes, within the attempts and the
        deadline (``timeout_s``, else the client's)."""
        budget = timeout_s if timeout_s is not None else self.timeout_s
        deadline = None if budget is None else time.monotonic() + budget
        tries = 0
        while True:
            tries += 1
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                return await attempt(remaining)
            except grpc.RpcError as rpc_error:
                error = error_from_rpc(rpc_error)
            if not (safe and self.retry.retryable(error) and tries < self.retry.max_attempts):
                raise error
            delay = self.retry.delay_s(tries, error)
            if deadline is not None and time.monotonic() + delay >= deadline:
                raise error
            if after_error is not None:
                after_error(error)
            if self.on_retry is not None:
                self.on_retry(Retry(method, tries, error, delay))
            await asyncio.sleep(delay)


class _Keys:
    """The request_id of each attempt of one logical call.

    The same key again attaches to the execution it started, if it got that
    far; so after a failure nothing says was decided (a dropped connection,
    Envoy's own 503), the key is kept. But a keyed execution that ended
    failed stays failed, and the same key would only return that failure: so
    after a status the service itself sent, the next attempt gets a key of
    its own (the original with ``.2``, ``.3``..., within the contract's 128
    characters)."""

    def __init__(self, base: str) -> None:
        self._base = base
        self._number = 1
        self.current = base

    @classmethod
    def for_call(cls, request_id: str | None, *, idempotent: bool) -> _Keys:
        """Those of a call of Execute, Orchestrate or ReplayExecution: from
        ``request_id``, else with ``idempotent`` a fresh key, else none (sent
        once)."""
        return cls(request_id or (new_request_id() if idempotent else ""))

    @property
    def keyed(self) -> bool:
        """Whether the call has a key: only then is it safe to repeat."""
        return bool(self._base)

    def after(self, error: LabServiceError) -> None:
        if not self._base or not error.from_service:
            return
        self._number += 1
        suffix = f".{self._number}"
        self.current = self._base[: _REQUEST_ID_MAX - len(suffix)] + suffix


def _ended_early(method: str) -> LabServiceError:
    return Unavailable(
        status_pb2.Status(
            code=grpc.StatusCode.UNAVAILABLE.value[0],
            message=f"{method}'s stream ended before its final event",
        )
    )
