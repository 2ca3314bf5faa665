"""Submission: an execution recorded before its work starts, once per
idempotency key.

A call with a ``request_id`` its caller used already gets that execution
back, if it was for the same work (the request's fingerprint); a different
request with the key is refused. Anything else is routed, admitted within
the limits, recorded QUEUED, and launched.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from datetime import UTC, datetime

from agentlab.core.errors import IdempotencyKeyReused
from agentlab.core.runner import Runner, new_execution_id
from agentlab.core.types import GenerationOptions, Task
from agentlab.executions.admission import Admission
from agentlab.executions.fingerprint import fingerprint, fingerprint_of
from agentlab.executions.model import ExecutionRecord, ExecutionStore, NewExecution
from agentlab.executions.runs import Runs
from agentlab.metrics import record as metrics

__all__ = ["Submitted", "submit"]

_Created = tuple[ExecutionRecord, bool]


@dataclass(frozen=True)
class Submitted:
    record: ExecutionRecord
    # False when the request_id had been seen: the record is the earlier one.
    created: bool


async def submit(
    runner: Runner,
    store: ExecutionStore,
    admission: Admission,
    runs: Runs,
    task: Task,
    *,
    owner: str,
    caller: str = "",
    request_id: str = "",
    background: bool = False,
    replay_of: str = "",
) -> Submitted:
    """Record the execution and start its work; a bad request, or one
    beyond the limits of executions, raises before anything is recorded.

    With a ``request_id`` the caller already used, the result is that
    execution (``created`` False), looked up before the model is routed:
    a retry finds it even after the routing file dropped the model, and
    a recorded key is never refused for the limits. The key is bound to
    the request it came with: a different request raises
    IdempotencyKeyReused. ``replay_of``: the execution this one replays
    (ReplayExecution), recorded with it and part of what its key binds."""
    options = _options(task.options)
    # Only a key is bound to its request: a call without one is never
    # looked up again, so its fingerprint is not worth computing.
    work = (
        fingerprint(
            mode=task.mode.value,
            model=task.model,
            prompt=task.prompt,
            options=options,
            replay_of=replay_of,
        )
        if request_id
        else ""
    )
    if request_id and (known := await store.find(caller, request_id)) is not None:
        return _attach(known, work)
    prepared = runner.prepare(task)
    admission.admit()
    launched = False
    try:
        creating = asyncio.ensure_future(
            store.create(
                NewExecution(
                    id=new_execution_id(),
                    request_id=request_id,
                    caller=caller,
                    model=task.model,
                    mode=task.mode.value,
                    prompt=task.prompt,
                    options=options,
                    background=background,
                    created_at=datetime.now(UTC),
                    owner=owner,
                    fingerprint=work,
                    replay_of=replay_of,
                )
            )
        )
        began = time.perf_counter()
        try:
            record, created = await asyncio.shield(creating)
        except asyncio.CancelledError:
            # The caller left while the record was being written. The write
            # goes on (the stores finish what they start), and a record
            # left QUEUED with nothing to run it would stay so until a
            # restart: it is run, or, tied to the call that left, ended.
            record, created = await _outlasting(creating)
            if created:
                runs.launch(record.id, prepared, background=background, admitted=True)
                launched = True
                if not background and not request_id:
                    runs.stop(record.id)
            raise
        metrics.store_write("create").observe(time.perf_counter() - began)
        if not created:
            # A call with the same key got there first, after the lookup.
            return _attach(record, work)
        runs.launch(record.id, prepared, background=background, admitted=True)
        launched = True
    finally:
        if not launched:
            admission.release()
    return Submitted(record, created)


async def _outlasting(creating: asyncio.Future[_Created]) -> _Created:
    """The create's outcome, however often the caller is cancelled
    meanwhile (a deadline, then the server's stop): the store writes the
    record anyway, so what follows it must happen too."""
    while True:
        try:
            return await asyncio.shield(creating)
        except asyncio.CancelledError:
            if creating.cancelled():
                raise


def _attach(known: ExecutionRecord, work: str) -> Submitted:
    """The caller's earlier execution for a key, if it was for the same work."""
    if fingerprint_of(known) != work:
        raise IdempotencyKeyReused(known.request_id, known.id)
    return Submitted(known, created=False)


def _options(options: GenerationOptions) -> dict[str, float | int]:
    given = {
        "temperature": options.temperature,
        "max_tokens": options.max_tokens,
        "seed": options.seed,
    }
    return {key: value for key, value in given.items() if value is not None}
