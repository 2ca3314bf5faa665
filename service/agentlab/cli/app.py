"""`agentlab`: run prompts, watch orchestrations live, compare models,
manage, replay and compare executions from a terminal. Global options
(--target, --api-key, --timeout) come before the command; AGENTLAB_TARGET
and AGENTLAB_API_KEY stand in for the first two."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Annotated, TypeVar

import typer
from rich.console import Console
from rich.live import Live
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from agentlab.cli.live import Progress
from agentlab.cli.output import (
    EXIT_BROKEN_PIPE,
    EXIT_FAILED,
    EXIT_OK,
    EXIT_UNAVAILABLE,
    exit_code,
    failure_of,
    message_dict,
    print_error,
    print_json,
    print_retry,
    stderr,
)
from agentlab.client import AsyncClient, DeadlineExceeded, LabServiceError, new_request_id
from agentlab.client.settings import API_KEY_VARIABLE, TARGET_VARIABLE
from agentlab.v1 import execution_pb2 as pb
from agentlab.v1 import lab_service_pb2 as svc

__all__ = ["app", "main"]

_T = TypeVar("_T")

app = typer.Typer(
    name="agentlab",
    help="The Agent Lab Gateway from a terminal (gRPC, through Envoy or straight to the service).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
executions_app = typer.Typer(
    help="Recorded executions: list, get, watch, cancel, replay, compare.", no_args_is_help=True
)
app.add_typer(executions_app, name="executions")


@dataclass(frozen=True)
class Options:
    target: str | None
    api_key: str | None
    timeout_s: float | None
    quiet: bool


class Mode(StrEnum):
    inference = "inference"
    orchestration = "orchestration"


class State(StrEnum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"


_MODES = {
    Mode.inference: pb.EXECUTION_MODE_INFERENCE,
    Mode.orchestration: pb.EXECUTION_MODE_ORCHESTRATION,
}

_STATES = {
    State.queued: pb.EXECUTION_STATE_QUEUED,
    State.running: pb.EXECUTION_STATE_RUNNING,
    State.succeeded: pb.EXECUTION_STATE_SUCCEEDED,
    State.failed: pb.EXECUTION_STATE_FAILED,
    State.cancelled: pb.EXECUTION_STATE_CANCELLED,
}


def _read_prompt(value: str) -> str:
    """``-`` reads the prompt from stdin (a file, a pipe): an argument is
    limited to 128 KiB by the kernel, the contract's prompts are not."""
    if value != "-":
        return value
    text = sys.stdin.read().rstrip("\n")
    if not text:
        raise typer.BadParameter("'-' read an empty prompt from stdin")
    return text


PromptArgument = Annotated[
    str,
    typer.Argument(help="The prompt; '-' reads it from stdin.", callback=_read_prompt),
]
JsonOption = Annotated[
    bool, typer.Option("--json", help="JSON on stdout (one object per line for lists and streams).")
]
ModelOption = Annotated[str, typer.Option("--model", "-m", help="Model name (routing file's).")]
TemperatureOption = Annotated[
    float | None, typer.Option(help="Sampling temperature, 0 to 2.", min=0, max=2)
]
MaxTokensOption = Annotated[
    int | None, typer.Option("--max-tokens", help="Tokens per model call.", min=1)
]
SeedOption = Annotated[int | None, typer.Option(help="Sampling seed.")]
RequestIdOption = Annotated[
    str | None,
    typer.Option(
        "--request-id",
        help="Idempotency key (default: a fresh one, so retries and resumes are safe).",
    ),
]
NoKeyOption = Annotated[
    bool,
    typer.Option(
        "--no-request-id",
        help="Send no idempotency key: the call is made once, never retried or resumed.",
    ),
]


def _positive(value: float) -> float:
    # Zero or less would only turn every call into DEADLINE_EXCEEDED (exit 3).
    if value <= 0:
        raise typer.BadParameter("must be greater than 0")
    return value


@app.callback()
def _global(
    context: typer.Context,
    target: Annotated[
        str | None,
        typer.Option(
            "--target",
            "-t",
            envvar=TARGET_VARIABLE,
            help="host:port of the gateway (default localhost:8000).",
        ),
    ] = None,
    api_key: Annotated[
        str | None,
        typer.Option(envvar=API_KEY_VARIABLE, help="API key, sent as a Bearer token."),
    ] = None,
    timeout: Annotated[
        float,
        typer.Option(
            help="Deadline of each unary call, retries included, in seconds.",
            callback=_positive,
        ),
    ] = 300.0,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No retry notices.")] = False,
) -> None:
    context.obj = Options(target, api_key, timeout, quiet)


def _client(context: typer.Context) -> AsyncClient:
    options: Options = context.obj
    return AsyncClient(
        options.target,
        api_key=options.api_key,
        timeout_s=options.timeout_s,
        on_retry=None if options.quiet else print_retry,
    )


def _run(context: typer.Context, work: Callable[[AsyncClient], Awaitable[int]]) -> None:
    """Run ``work`` with a client; a LabServiceError becomes its message on
    stderr and its exit code."""

    async def main() -> int:
        async with _client(context) as client:
            try:
                return await work(client)
            except LabServiceError as error:
                print_error(error)
                return exit_code(error)

    try:
        code = asyncio.run(main())
    except KeyboardInterrupt:  # asyncio.run cancelled main() first
        code = 130
    except BrokenPipeError:
        # stdout's reader went away (`| head -1`). Exit as a process that
        # SIGPIPE ended would, and quietly: Python's flush of stdout at exit
        # would otherwise print one more BrokenPipeError.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = EXIT_BROKEN_PIPE
    raise typer.Exit(code)


@app.command(
    epilog="Examples:\n\n  agentlab run 'Dime 3 números primos' -m mistral7b\n\n"
    "  agentlab run 'Name a fruit.' -m echo --json | jq .metrics"
)
def run(
    context: typer.Context,
    prompt: PromptArgument,
    model: ModelOption = "",
    temperature: TemperatureOption = None,
    max_tokens: MaxTokensOption = None,
    seed: SeedOption = None,
    background: Annotated[
        bool, typer.Option(help="Answer at once with the execution id; see `executions watch`.")
    ] = False,
    request_id: RequestIdOption = None,
    no_request_id: NoKeyOption = False,
    as_json: JsonOption = False,
) -> None:
    """Execute one prompt and print the output (metrics on stderr, on a terminal)."""

    key = request_id or (None if no_request_id else new_request_id())

    async def work(client: AsyncClient) -> int:
        try:
            answer = await client.execute(
                prompt,
                model=model,
                temperature=temperature,
                max_tokens=max_tokens,
                seed=seed,
                background=background,
                request_id=key,
                idempotent=not no_request_id,
            )
        except asyncio.CancelledError:
            # Ctrl-C. A keyed execution outlives its call, and Execute
            # answers its id only at the end: find it by its key.
            if key and not background:
                await _cancel_keyed(client, key)
            raise
        if as_json:
            print_json(answer)
        elif background:
            print(answer.execution_id)
        else:
            print(answer.output)
            if stderr.is_terminal:
                metrics = answer.metrics
                stderr.print(
                    f"{answer.execution_id}: {metrics.latency_ms:.0f} ms, first token "
                    f"{metrics.time_to_first_token_ms:.0f} ms, {metrics.completion_tokens} "
                    f"tokens, {metrics.tokens_per_second:.1f} tok/s on {metrics.backend} "
                    f"({metrics.model})",
                    style="dim",
                )
        return EXIT_OK

    _run(context, work)


@app.command(
    epilog="Examples:\n\n  agentlab orchestrate 'Name a fruit.' -m mistral7b\n\n"
    "  agentlab orchestrate 'Name a fruit.' -m echo --json > events.ndjson"
)
def orchestrate(
    context: typer.Context,
    prompt: PromptArgument,
    model: ModelOption = "",
    mode: Annotated[Mode, typer.Option(help="The graph, or one model call.")] = Mode.orchestration,
    temperature: TemperatureOption = None,
    max_tokens: MaxTokensOption = None,
    seed: SeedOption = None,
    request_id: RequestIdOption = None,
    no_request_id: NoKeyOption = False,
    as_json: JsonOption = False,
) -> None:
    """Orchestrate with a live view of the graph's nodes on stderr (on a
    terminal), then print the output; a dropped stream resumes by itself."""

    def events(client: AsyncClient) -> AsyncIterator[pb.ExecutionEvent]:
        return client.orchestrate(
            prompt,
            model=model,
            mode=_MODES[mode],
            temperature=temperature,
            max_tokens=max_tokens,
            seed=seed,
            request_id=request_id,
            idempotent=not no_request_id,
        )

    async def work(client: AsyncClient) -> int:
        progress = Progress()
        try:
            return await _follow(events(client), as_json=as_json, progress=progress)
        except (asyncio.CancelledError, BrokenPipeError):
            # Ctrl-C, or stdout closed. The keyed execution would outlive its
            # call (that is what lets a dropped stream resume): stop the one
            # this started.
            if progress.execution_id and not progress.finished:
                await _cancel(client, progress.execution_id)
            raise

    _run(context, work)


async def _cancel_keyed(client: AsyncClient, key: str) -> None:
    """Cancel the unfinished execution this caller started with ``key`` (or
    a retry's ``key.N``), if the service recorded one."""
    for state in (pb.EXECUTION_STATE_RUNNING, pb.EXECUTION_STATE_QUEUED):
        page = await client.list_executions(page_size=100, state=state, timeout_s=5)
        for execution in page.executions:
            if execution.request_id == key or execution.request_id.startswith(f"{key}."):
                await _cancel(client, execution.execution_id)
                return


async def _cancel(client: AsyncClient, execution_id: str) -> None:
    """Cancel on the way out (Ctrl-C), saying so on stderr; a failure is
    reported, not raised, so the other cancels still happen."""
    try:
        await client.cancel_execution(execution_id, timeout_s=5)
    except DeadlineExceeded:
        # The service stops it at once and then waits for its end to be
        # recorded: a lab in the middle of a long prompt can take longer.
        stderr.print(
            f"asked to cancel execution {execution_id}; it had not stopped after 5 s "
            f"(agentlab executions get {execution_id})"
        )
        return
    except LabServiceError as error:
        stderr.print(f"could not cancel execution {execution_id}: {escape(str(error))}")
        return
    stderr.print(f"cancelled execution {execution_id}")


async def _follow(
    events: AsyncIterator[pb.ExecutionEvent], *, as_json: bool, progress: Progress | None = None
) -> int:
    """Print an execution's events: NDJSON, or the live view then the output.
    ``progress`` (a new one by default) follows them, for the caller to read."""
    progress = progress if progress is not None else Progress()
    live = (
        Live(progress.render(), console=stderr, refresh_per_second=8, transient=False)
        if stderr.is_terminal and not as_json
        else None
    )
    try:
        if live is not None:
            live.start()
        async for event in events:
            progress.add(event)
            if as_json:
                print_json(event)
            elif live is not None:
                live.update(progress.render())
    finally:
        if live is not None:
            live.update(progress.render())
            live.stop()
    if progress.error is not None:
        if not as_json:
            print_error(failure_of(progress.error))
        return exit_code(failure_of(progress.error))
    if progress.result is not None and not as_json:
        print(progress.result.output)
    return EXIT_OK if progress.result is not None else EXIT_FAILED


@app.command(
    epilog="Example:\n\n  agentlab compare 'Name a fruit.' -m mistral7b -m smollm2 -m echo"
)
def compare(
    context: typer.Context,
    prompt: PromptArgument,
    models: Annotated[list[str], typer.Option("--model", "-m", help="A model; repeat it.")],
    mode: Annotated[Mode, typer.Option(help="The graph, or one model call.")] = Mode.orchestration,
    temperature: TemperatureOption = None,
    max_tokens: MaxTokensOption = None,
    seed: SeedOption = None,
    as_json: JsonOption = False,
) -> None:
    """The same prompt on several models at once, side by side per node."""

    progresses = [Progress() for _ in models]

    async def one(client: AsyncClient, model: str, progress: Progress) -> Progress:
        async for event in client.orchestrate(
            prompt,
            model=model,
            mode=_MODES[mode],
            temperature=temperature,
            max_tokens=max_tokens,
            seed=seed,
        ):
            progress.add(event)
        return progress

    async def work(client: AsyncClient) -> int:
        with (
            stderr.status(f"running on {len(models)} models…") if stderr.is_terminal else _nothing()
        ):
            try:
                outcomes = await asyncio.gather(
                    *(
                        one(client, model, progress)
                        for model, progress in zip(models, progresses, strict=True)
                    ),
                    return_exceptions=True,
                )
            except asyncio.CancelledError:
                # Ctrl-C: each keyed execution would run on without us.
                for progress in progresses:
                    if progress.execution_id and not progress.finished:
                        await _cancel(client, progress.execution_id)
                raise
        results: dict[str, Progress | LabServiceError] = {}
        for model, outcome in zip(models, outcomes, strict=True):
            if isinstance(outcome, LabServiceError | Progress):
                results[model] = outcome
            else:
                raise outcome
        if as_json:
            print_json({model: _comparison_json(outcome) for model, outcome in results.items()})
        else:
            # In a pipe, wide enough for the columns rather than 80 characters.
            width = None if sys.stdout.isatty() else 60 + 50 * len(results)
            Console(highlight=False, width=width).print(_comparison_table(results))
        codes = [_outcome_code(outcome) for outcome in results.values()]
        return max(codes)

    _run(context, work)


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *args: object) -> None:
        return None


def _outcome_code(outcome: Progress | LabServiceError) -> int:
    if isinstance(outcome, LabServiceError):
        return exit_code(outcome)
    if outcome.error is not None:
        return exit_code(failure_of(outcome.error))
    return EXIT_OK


def _comparison_json(outcome: Progress | LabServiceError) -> dict[str, object]:
    if isinstance(outcome, LabServiceError):
        return {"error": message_dict(outcome.status)}
    if outcome.result is not None:
        return {"result": message_dict(outcome.result)}
    return {"error": message_dict(outcome.error) if outcome.error is not None else {}}


def _comparison_table(results: dict[str, Progress | LabServiceError]) -> Table:
    """Rows: each node (duration, ttft, tokens/s), the totals and the output;
    one column per model."""
    table = Table(title="ms: duration / first token; tok/s")
    table.add_column("node")
    for model in results:
        table.add_column(model)
    nodes: list[str] = []
    for outcome in results.values():
        if isinstance(outcome, Progress):
            nodes += [node.name for node in outcome.nodes if node.name not in nodes]

    def cell(outcome: Progress | LabServiceError, name: str) -> str:
        if isinstance(outcome, LabServiceError):
            return ""
        for node in outcome.nodes:
            if node.name == name and node.status != "succeeded":
                # A failed node's zero rates would read as a measurement.
                return f"{node.status} after {node.duration_ms or 0:.0f} ms"
            if node.name == name:
                return (
                    f"{node.duration_ms or 0:.0f} / {node.ttft_ms or 0:.0f} ms; "
                    f"{node.tokens_per_second or 0:.1f} tok/s"
                )
        return ""

    for name in nodes:
        table.add_row(name, *(cell(outcome, name) for outcome in results.values()))
    table.add_section()
    totals, outputs = [], []
    for outcome in results.values():
        if isinstance(outcome, LabServiceError):
            totals.append(f"error: {outcome}")
            outputs.append("")
        elif outcome.result is not None:
            metrics = outcome.result.metrics
            totals.append(
                f"{metrics.latency_ms:.0f} / {metrics.time_to_first_token_ms:.0f} ms; "
                f"{metrics.tokens_per_second:.1f} tok/s"
            )
            outputs.append(outcome.result.output)
        else:
            totals.append(f"failed: {outcome.error.message if outcome.error else ''}")
            outputs.append("")
    table.add_row("Total", *totals)
    table.add_row("output", *outputs)
    return table


@app.command(epilog="Examples:\n\n  agentlab models\n\n  agentlab models --json | jq .name")
def models(context: typer.Context, as_json: JsonOption = False) -> None:
    """The models the gateway routes, and whether each backend is ready."""

    async def work(client: AsyncClient) -> int:
        found = await client.list_models()
        if as_json:
            for model in found:
                print_json(model)
            return EXIT_OK
        _print_rows(
            ("name", "backend", "backend model", "ready", "description"),
            [
                (
                    model.name,
                    model.backend,
                    model.backend_model,
                    "yes" if model.ready else "no",
                    model.description,
                )
                for model in found
            ],
        )
        return EXIT_OK

    _run(context, work)


@app.command(
    epilog="Examples:\n\n  agentlab health\n\n  agentlab health --service agentlab.backend.embedded"
)
def health(
    context: typer.Context,
    service: Annotated[
        str, typer.Option(help="A grpc.health.v1 name ('' is the whole gateway).")
    ] = "",
    as_json: JsonOption = False,
) -> None:
    """SERVING (exit 0), or NOT_SERVING (exit 3)."""

    async def work(client: AsyncClient) -> int:
        try:
            answer = await client.health(service)
        except LabServiceError as error:
            # The gateway answered that it is not serving; anything else
            # (unreachable, refused) is reported as the error it is.
            if error.reason != "NOT_SERVING":
                raise
            if as_json:
                print_json({"service": service, "status": "SERVING_STATUS_NOT_SERVING"})
            else:
                print("NOT_SERVING")
                print_error(error)
            return EXIT_UNAVAILABLE
        if as_json:
            print_json(answer)
        else:
            print("SERVING")
        return EXIT_OK

    _run(context, work)


@executions_app.command(
    "list",
    epilog="Examples:\n\n  agentlab executions list --state succeeded -m mistral7b\n\n"
    "  agentlab executions list --all --json | jq -r .execution_id",
)
def list_executions(
    context: typer.Context,
    page_size: Annotated[
        int, typer.Option(help="Executions per page (at most 100).", min=0, max=100)
    ] = 20,
    model: Annotated[str, typer.Option("--model", "-m", help="Only this model's.")] = "",
    state: Annotated[State | None, typer.Option(help="Only those in this state.")] = None,
    every: Annotated[bool, typer.Option("--all", help="Follow every page.")] = False,
    as_json: JsonOption = False,
) -> None:
    """Executions, newest first (one page unless --all)."""

    async def work(client: AsyncClient) -> int:
        state_number = _STATES[state] if state else pb.EXECUTION_STATE_UNSPECIFIED
        found: list[pb.Execution] = []
        if every:
            found = [
                e
                async for e in client.iter_executions(
                    page_size=page_size, model=model, state=state_number
                )
            ]
        else:
            page = await client.list_executions(
                page_size=page_size, model=model, state=state_number
            )
            found = list(page.executions)
        if as_json:
            for execution in found:
                print_json(execution)
            return EXIT_OK
        _print_rows(
            ("id", "state", "model", "mode", "created", "prompt"),
            [
                (
                    execution.execution_id,
                    _state_name(execution.state),
                    execution.model,
                    pb.ExecutionMode.Name(execution.mode).removeprefix("EXECUTION_MODE_").lower(),
                    execution.create_time.ToDatetime().strftime("%Y-%m-%d %H:%M:%S"),
                    " ".join(execution.prompt.split())[:60],
                )
                for execution in found
            ],
        )
        return EXIT_OK

    _run(context, work)


@executions_app.command("get", epilog="Example:\n\n  agentlab executions get 94d3... --json")
def get_execution(
    context: typer.Context,
    execution_id: Annotated[str, typer.Argument(help="The execution's id (32 hex digits).")],
    as_json: JsonOption = False,
) -> None:
    """One execution: state, model, timings and output."""

    async def work(client: AsyncClient) -> int:
        execution = await client.get_execution(execution_id)
        _print_execution(execution, as_json=as_json)
        return EXIT_OK

    _run(context, work)


def _print_execution(execution: pb.Execution, *, as_json: bool) -> None:
    """The record as JSON, or its id, state and model, then its error and
    its output."""
    if as_json:
        print_json(execution)
        return
    print(f"{execution.execution_id}  {_state_name(execution.state)}  {execution.model}")
    if execution.HasField("error"):
        print(f"error: {execution.error.message}")
    if execution.HasField("result"):
        print(execution.result.output)


@executions_app.command(
    "watch", epilog="Example:\n\n  agentlab executions watch 94d3... --after 3 --json"
)
def watch_execution(
    context: typer.Context,
    execution_id: Annotated[str, typer.Argument(help="The execution's id.")],
    after: Annotated[int, typer.Option(help="Only events after this sequence.", min=0)] = 0,
    as_json: JsonOption = False,
) -> None:
    """Follow an execution's events (live view on a terminal), resuming after a drop."""
    _run(
        context,
        lambda client: _follow(client.watch(execution_id, after_sequence=after), as_json=as_json),
    )


@executions_app.command("cancel", epilog="Example:\n\n  agentlab executions cancel 94d3...")
def cancel_execution(
    context: typer.Context,
    execution_id: Annotated[str, typer.Argument(help="The execution's id.")],
    as_json: JsonOption = False,
) -> None:
    """Cancel an execution; prints its state after."""

    async def work(client: AsyncClient) -> int:
        execution = await client.cancel_execution(execution_id)
        if as_json:
            print_json(execution)
        else:
            print(f"{execution.execution_id}  {_state_name(execution.state)}")
        # The state alone reads like a failed cancel: say which case it is.
        if execution.state in (pb.EXECUTION_STATE_SUCCEEDED, pb.EXECUTION_STATE_FAILED):
            stderr.print("it had already finished: nothing to cancel")
        elif execution.state in (pb.EXECUTION_STATE_RUNNING, pb.EXECUTION_STATE_QUEUED):
            stderr.print("asked to stop; it had not stopped yet (agentlab executions get)")
        return EXIT_OK

    _run(context, work)


@executions_app.command(
    "replay",
    epilog="Examples:\n\n  agentlab executions replay 94d3... -m smollm2\n\n"
    "  agentlab executions replay 94d3... -m echo --seed 7 --json | jq .result.metrics",
)
def replay_execution(
    context: typer.Context,
    execution_id: Annotated[str, typer.Argument(help="The execution to replay (32 hex digits).")],
    model: Annotated[
        str, typer.Option("--model", "-m", help="Model to replay it on (default: its own).")
    ] = "",
    temperature: Annotated[
        float | None,
        typer.Option(help="Sampling temperature, 0 to 2 (default: the source's).", min=0, max=2),
    ] = None,
    max_tokens: Annotated[
        int | None,
        typer.Option("--max-tokens", help="Tokens per model call (default: the source's).", min=1),
    ] = None,
    seed: Annotated[int | None, typer.Option(help="Sampling seed (default: the source's).")] = None,
    background: Annotated[
        bool, typer.Option(help="Answer at once with the replay's id; see `executions watch`.")
    ] = False,
    request_id: RequestIdOption = None,
    no_request_id: NoKeyOption = False,
    as_json: JsonOption = False,
) -> None:
    """Run an execution's prompt and mode again (on another model, or with
    other options) as a new execution, then print it as `executions get`
    does. Exit 1 when the replay failed or was cancelled (3 when its backend
    was unavailable), as `run`."""

    key = request_id or (None if no_request_id else new_request_id())

    async def work(client: AsyncClient) -> int:
        try:
            replay = await client.replay_execution(
                execution_id,
                model=model,
                temperature=temperature,
                max_tokens=max_tokens,
                seed=seed,
                background=background,
                request_id=key,
                idempotent=not no_request_id,
            )
        except asyncio.CancelledError:
            # Ctrl-C: as for `run`, a keyed replay outlives its call.
            if key and not background:
                await _cancel_keyed(client, key)
            raise
        if background and not as_json:
            print(replay.execution_id)
            return EXIT_OK
        _print_execution(replay, as_json=as_json)
        if replay.state in (pb.EXECUTION_STATE_FAILED, pb.EXECUTION_STATE_CANCELLED):
            # A failed replay is an answer of the call, not an error: its
            # record's error says how it ended, and the exit code with it.
            if not replay.HasField("error"):
                return EXIT_FAILED
            error = failure_of(replay.error)
            if not as_json:
                print_error(error)
            return exit_code(error)
        return EXIT_OK

    _run(context, work)


@executions_app.command(
    "compare",
    epilog="Examples:\n\n  agentlab executions compare 94d3... 5be0...\n\n"
    "  agentlab executions compare 94d3... 5be0... 0c1f... --json | jq .executions",
)
def compare_executions(
    context: typer.Context,
    execution_ids: Annotated[
        list[str],
        typer.Argument(help="Two to ten execution ids; the first is the baseline."),
    ],
    as_json: JsonOption = False,
) -> None:
    """Executions side by side against the first, node by node: each one's
    output (a word diff summary for all but the baseline) and its tokens,
    time to first token, tokens/s and duration minus the baseline's."""

    async def work(client: AsyncClient) -> int:
        comparison = await client.compare_executions(execution_ids)
        if as_json:
            print_json(comparison)
            return EXIT_OK
        _print_rows(_COMPARISON_HEADERS, _comparison_rows(comparison), sections=True)
        return EXIT_OK

    _run(context, work)


_COMPARISON_HEADERS = (
    "node",
    "execution",
    "model",
    "state",
    "Δ tokens",
    "Δ ttft ms",
    "Δ tok/s",
    "Δ ms",
    "diff",
    "output",
)


def _comparison_rows(comparison: svc.CompareExecutionsResponse) -> list[tuple[str, ...]]:
    """One row per node and execution, then the totals (node "total"), the
    baseline's first; deltas are left empty where there is none (the
    baseline, a node not run)."""
    executions = list(comparison.executions)
    rows: list[tuple[str, ...]] = []
    for node in comparison.nodes:
        name = node.node if node.occurrence <= 1 else f"{node.node} ({node.occurrence})"
        for index, (version, execution) in enumerate(zip(node.versions, executions, strict=False)):
            compared = index > 0 and version.present and version.HasField("delta")
            rows.append(
                (
                    name,
                    version.execution_id,
                    execution.model,
                    _step_status(version.step.status) if version.present else "not run",
                    *(_deltas(version.delta) if compared else ("",) * 4),
                    *_diff_and_output(
                        index, version.output_diff, version.step.output, present=version.present
                    ),
                )
            )
    for index, execution in enumerate(executions):
        rows.append(
            (
                "total",
                execution.execution_id,
                execution.model,
                _state_name(execution.state),
                *(_deltas(execution.delta) if index > 0 else ("",) * 4),
                *_diff_and_output(index, execution.output_diff, execution.output, present=True),
            )
        )
    return rows


def _deltas(delta: svc.MetricsDelta) -> tuple[str, str, str, str]:
    """Signed, so that a column reads as more (+) or less (-) than the baseline."""
    return (
        f"{delta.completion_tokens:+d}",
        _signed(delta.time_to_first_token_ms, 0),
        _signed(delta.tokens_per_second, 1),
        _signed(delta.duration_ms, 0),
    )


def _signed(value: float, digits: int) -> str:
    # Rounded first: -0.3 ms is "+0", not "-0".
    return f"{round(value, digits) + 0.0:+.{digits}f}"


def _diff_and_output(
    index: int, ops: Sequence[svc.DiffOp], output: str, *, present: bool
) -> tuple[str, str]:
    """The diff's summary (``baseline``, ``same``, ``not run``, or the words
    it inserts and deletes) and the output, left out where it is the
    baseline's: the same text twice would only hide the ones that differ."""
    if index == 0:
        return "baseline", output if present else ""
    if not present:
        return "not run", ""
    inserted = sum(len(op.text.split()) for op in ops if op.op == svc.DIFF_OP_KIND_INSERT)
    deleted = sum(len(op.text.split()) for op in ops if op.op == svc.DIFF_OP_KIND_DELETE)
    changed = any(op.op != svc.DIFF_OP_KIND_EQUAL for op in ops)
    if not changed:
        return "same", ""
    return f"+{inserted} -{deleted} words", output


def _step_status(status: int) -> str:
    return pb.StepStatus.Name(status).removeprefix("STEP_STATUS_")


def _print_rows(
    headers: tuple[str, ...], rows: list[tuple[str, ...]], *, sections: bool = False
) -> None:
    """A table on a terminal; in a pipe, tab-separated lines after a header
    line, never cut to the terminal's width (ids stay whole for `cut`).
    ``sections``: on a terminal, a rule wherever the first cell changes."""
    if not sys.stdout.isatty():
        for row in (headers, *rows):
            print("\t".join(cell.replace("\t", " ").replace("\n", " ") for cell in row))
        return
    table = Table(*headers)
    for number, row in enumerate(rows):
        if sections and number and row[0] != rows[number - 1][0]:
            table.add_section()
        # Text, not markup: an output or a prompt may hold "[/x]".
        table.add_row(*(Text(cell) for cell in row))
    Console(highlight=False).print(table)


def _state_name(state: int) -> str:
    return pb.ExecutionState.Name(state).removeprefix("EXECUTION_STATE_")


def main() -> None:
    """The `agentlab` entry point."""
    app(prog_name="agentlab")


if __name__ == "__main__":
    main()
