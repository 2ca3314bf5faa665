"""The `agentlab` command (the installed entry point) against the real
stack: every command with its output checked, --json parsed, exit codes
that tell usage errors, refusals and an unavailable gateway apart, --help
with examples everywhere, and NO_COLOR."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from agentlab.devstack import Stack, free_port
from tests.helpers.services import missing
from tests.helpers.stacks import StackFactory
from tests.helpers.tools import interruptible

# Every test runs the command as a process.
pytestmark = pytest.mark.e2e

AGENTLAB = str(Path(sys.executable).parent / "agentlab")
KEY = "cli-test-key"
HEX_ID = re.compile(r"^[0-9a-f]{32}$")
COMMANDS = [
    [],
    ["run"],
    ["orchestrate"],
    ["compare"],
    ["models"],
    ["health"],
    ["executions"],
    ["executions", "list"],
    ["executions", "get"],
    ["executions", "watch"],
    ["executions", "cancel"],
    ["executions", "replay"],
    ["executions", "compare"],
]


@pytest.fixture(scope="module")
def stack(start_module_stack: StackFactory) -> Stack:
    return start_module_stack(
        {"AGENTLAB_DEFAULT_BACKEND": "echo", "AGENTLAB_ECHO_TOKEN_DELAY_S": "0.01"},
        keys={"cli": KEY},
    )


def environment(stack: Stack | None) -> dict[str, str]:
    """A user's environment for the command: none of this process's
    AGENTLAB_* or NO_COLOR, the stack's target and key (if any)."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("AGENTLAB_", "NO_COLOR"))}
    if stack is not None:
        environ |= {"AGENTLAB_TARGET": stack.gateway_grpc, "AGENTLAB_API_KEY": KEY}
    return environ


def agentlab(
    stack: Stack | None, *args: str, env: dict[str, str] | None = None, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    """The command as a user runs it, its target and key from the environment."""
    return subprocess.run(
        [AGENTLAB, *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=environment(stack) | (env or {}),
        input=stdin,
    )


def spawn(stack: Stack, *args: str) -> subprocess.Popen[str]:
    """The command started as agentlab() runs it, stdout and stderr piped,
    for the tests that signal it or close its stdout while it runs."""
    return subprocess.Popen(
        interruptible([AGENTLAB, *args]),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=environment(stack),
    )


def state_of(stack: Stack, execution_id: str) -> str:
    """The execution's state as `executions get --json` says it."""
    got = agentlab(stack, "executions", "get", execution_id, "--json")
    state: str = json.loads(got.stdout)["state"]
    return state


def ndjson(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines()]


def kind(event: dict[str, Any]) -> str:
    (found,) = set(event) - {"sequence", "time", "execution_id"}
    return found


def test_run_prints_the_output_and_only_the_output(stack: Stack) -> None:
    done = agentlab(stack, "run", "three plain words", "-m", "echo")
    assert (done.returncode, done.stdout, done.stderr) == (0, "three plain words\n", "")


def test_run_json_is_the_execute_response(stack: Stack) -> None:
    done = agentlab(stack, "run", "as json", "-m", "echo", "--json", "--max-tokens", "8")
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)
    assert answer["output"] == "as json"
    assert HEX_ID.match(answer["execution_id"])
    assert answer["state"] == "EXECUTION_STATE_SUCCEEDED"
    assert answer["metrics"]["backend"] == "echo"
    assert answer["flow"][0]["node"] == "inference"


def test_orchestrate_prints_the_output_and_json_the_events(stack: Stack) -> None:
    plain = agentlab(stack, "orchestrate", "red green", "-m", "echo")
    assert plain.returncode == 0, plain.stderr
    # No terminal: no live view on stderr.
    assert plain.stderr == ""

    events = agentlab(stack, "orchestrate", "red green", "-m", "echo", "--json")
    assert events.returncode == 0, events.stderr
    parsed = ndjson(events.stdout)
    assert [e["sequence"] for e in parsed] == list(range(1, len(parsed) + 1))
    assert kind(parsed[0]) == "execution_started"
    assert [e["node_started"]["node"] for e in parsed if kind(e) == "node_started"] == [
        "plan",
        "answer",
        "review",
    ]
    result = parsed[-1]["execution_completed"]["result"]
    assert plain.stdout == result["output"] + "\n"


def test_background_run_then_get_watch_and_list(stack: Stack) -> None:
    started = agentlab(stack, "run", "later on", "-m", "echo", "--background")
    assert started.returncode == 0, started.stderr
    execution_id = started.stdout.strip()
    assert HEX_ID.match(execution_id)

    watched = agentlab(stack, "executions", "watch", execution_id, "--json")
    assert watched.returncode == 0, watched.stderr
    events = ndjson(watched.stdout)
    assert kind(events[-1]) == "execution_completed"
    after = agentlab(stack, "executions", "watch", execution_id, "--after", "2", "--json")
    assert ndjson(after.stdout) == events[2:]
    plain_watch = agentlab(stack, "executions", "watch", execution_id)
    assert plain_watch.stdout == "later on\n"

    assert state_of(stack, execution_id) == "EXECUTION_STATE_SUCCEEDED"
    plain_get = agentlab(stack, "executions", "get", execution_id)
    assert plain_get.stdout.splitlines()[0].split() == [execution_id, "SUCCEEDED", "echo"]
    assert "later on" in plain_get.stdout

    listed = agentlab(stack, "executions", "list", "--state", "succeeded", "--json")
    assert execution_id in [e["execution_id"] for e in ndjson(listed.stdout)]
    everything = agentlab(stack, "executions", "list", "--all", "--page-size", "1", "--json")
    ids = [e["execution_id"] for e in ndjson(everything.stdout)]
    assert execution_id in ids
    assert len(ids) == len(set(ids))
    table = agentlab(stack, "executions", "list", "-m", "echo")
    rows = [line.split("\t") for line in table.stdout.splitlines()]
    assert rows[0] == ["id", "state", "model", "mode", "created", "prompt"]
    assert [execution_id, "SUCCEEDED", "echo", "inference"] in [row[:4] for row in rows]


def test_cancel_a_running_execution(stack: Stack) -> None:
    long_prompt = " ".join(f"w{n}" for n in range(2000))  # 20 s of echo
    started = agentlab(stack, "run", long_prompt, "-m", "echo", "--background")
    execution_id = started.stdout.strip()

    cancelled = agentlab(stack, "executions", "cancel", execution_id)
    assert (cancelled.returncode, cancelled.stdout.split()) == (0, [execution_id, "CANCELLED"])
    again = agentlab(stack, "executions", "cancel", execution_id, "--json")
    assert json.loads(again.stdout)["state"] == "EXECUTION_STATE_CANCELLED"
    # Its stream ends failed (CANCELLED): the watch says so and exits 1.
    watched = agentlab(stack, "executions", "watch", execution_id)
    assert watched.returncode == 1
    assert "CANCELLED" in watched.stderr


def test_replay_prints_the_replay_as_get_does(stack: Stack) -> None:
    source = json.loads(agentlab(stack, "run", "red green", "-m", "echo", "--json").stdout)

    plain = agentlab(stack, "executions", "replay", source["execution_id"], "-m", "other-name")
    assert plain.returncode == 0, plain.stderr
    first, *rest = plain.stdout.splitlines()
    replay_id, state, model = first.split()
    assert HEX_ID.match(replay_id)
    assert replay_id != source["execution_id"]
    assert (state, model, rest) == ("SUCCEEDED", "other-name", ["red green"])
    assert plain.stderr == ""

    options = ("--seed", "5", "--max-tokens", "9", "--json")
    as_json = agentlab(stack, "executions", "replay", source["execution_id"], *options)
    assert as_json.returncode == 0, as_json.stderr
    replay = json.loads(as_json.stdout)
    assert replay["replay_of"] == source["execution_id"]
    assert replay["model"] == "echo"  # no -m: the source's
    assert (replay["seed"], replay["max_tokens"]) == ("5", 9)  # int64 is a JSON string
    assert replay["state"] == "EXECUTION_STATE_SUCCEEDED"
    assert replay["result"]["output"] == "red green"
    assert HEX_ID.match(replay["request_id"])  # keyed, so a retry is safe

    background = agentlab(stack, "executions", "replay", source["execution_id"], "--background")
    assert background.returncode == 0, background.stderr
    assert HEX_ID.match(background.stdout.strip())
    assert agentlab(stack, "executions", "watch", background.stdout.strip()).stdout == (
        "red green\n"
    )


def test_replay_exits_1_when_the_replay_is_cancelled(stack: Stack) -> None:
    long_prompt = " ".join(f"w{n}" for n in range(2000))  # 20 s of echo
    source = agentlab(stack, "run", long_prompt, "-m", "echo", "--background").stdout.strip()
    agentlab(stack, "executions", "cancel", source)  # a cancelled source replays all the same

    with spawn(stack, "executions", "replay", source) as replaying:
        replay_id = ""
        for _ in range(100):
            running = agentlab(stack, "executions", "list", "--state", "running", "--json")
            found = [e for e in ndjson(running.stdout) if e.get("replay_of") == source]
            if found:
                replay_id = found[0]["execution_id"]
                break
            time.sleep(0.1)
        assert replay_id, "the replay never showed up as running"
        assert agentlab(stack, "executions", "cancel", replay_id).returncode == 0
        out, errors = replaying.communicate(timeout=30)
    assert replaying.returncode == 1, errors
    assert out.splitlines()[0].split() == [replay_id, "CANCELLED", "echo"]
    assert "CANCELLED" in errors


def test_compare_prints_a_row_per_node_and_execution(stack: Stack) -> None:
    def orchestrated(prompt: str) -> str:
        events = ndjson(agentlab(stack, "orchestrate", prompt, "-m", "echo", "--json").stdout)
        execution_id: str = events[-1]["execution_id"]
        return execution_id

    baseline = orchestrated("red green blue")
    other = orchestrated("red yellow blue")
    single = json.loads(agentlab(stack, "run", "red", "-m", "echo", "--json").stdout)
    replay = agentlab(stack, "executions", "replay", baseline, "-m", "again").stdout.split()[0]

    table = agentlab(stack, "executions", "compare", baseline, other, single["execution_id"])
    assert table.returncode == 0, table.stderr
    header, *lines = [line.split("\t") for line in table.stdout.splitlines()]
    assert header == [
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
    ]
    assert all(len(line) == len(header) for line in lines)
    rows = {(line[0], line[1]): dict(zip(header, line, strict=True)) for line in lines}
    assert [line[0] for line in lines] == [
        node for node in ("plan", "answer", "review", "inference", "total") for _ in range(3)
    ]
    plan = rows["plan", baseline]
    assert (plan["diff"], plan["output"], plan["Δ tokens"]) == ("baseline", "red green blue", "")
    changed = rows["plan", other]
    assert (changed["diff"], changed["output"]) == ("+1 -1 words", "red yellow blue")
    assert changed["Δ tokens"] == "+0"
    for column in ("Δ ttft ms", "Δ tok/s", "Δ ms"):
        assert re.fullmatch(r"[+-]\d+(\.\d)?", changed[column]), column
    # The inference run ran none of the graph's nodes, nor they its node.
    assert rows["plan", single["execution_id"]]["diff"] == "not run"
    assert rows["inference", baseline]["state"] == "not run"
    assert rows["inference", single["execution_id"]]["output"] == "red"
    assert rows["total", other]["state"] == "SUCCEEDED"

    same = agentlab(stack, "executions", "compare", baseline, replay)
    replayed = [line.split("\t") for line in same.stdout.splitlines() if replay in line]
    assert [(line[0], line[8], line[9]) for line in replayed] == [
        (node, "same", "") for node in ("plan", "answer", "review", "total")
    ]

    as_json = agentlab(stack, "executions", "compare", baseline, replay, "--json")
    assert as_json.returncode == 0, as_json.stderr
    comparison = json.loads(as_json.stdout)
    assert [e["execution_id"] for e in comparison["executions"]] == [baseline, replay]
    assert comparison["executions"][1]["replay_of"] == baseline
    assert [n["node"] for n in comparison["nodes"]] == ["plan", "answer", "review"]
    assert comparison["nodes"][0]["versions"][1]["output_diff"] == [
        {"op": "DIFF_OP_KIND_EQUAL", "text": "red green blue"}
    ]


def test_compare_on_a_terminal_draws_a_table_with_the_outputs_as_written(stack: Stack) -> None:
    script = shutil.which("script")  # util-linux: the command on a pseudo-terminal
    if script is None:
        missing("script (util-linux) is not installed")

    def run(prompt: str) -> str:
        execution_id: str = json.loads(
            agentlab(stack, "run", prompt, "-m", "echo", "--json").stdout
        )["execution_id"]
        return execution_id

    # Rich markup in an output is text to show, not a style.
    baseline, other = run("[bold]red[/bold] green"), run("[bold]red[/bold] blue [/x]")
    command = shlex.join([AGENTLAB, "executions", "compare", baseline, other])
    done = subprocess.run(
        [script, "-qec", command, "/dev/null"],
        capture_output=True,
        text=True,
        timeout=60,
        env=environment(stack) | {"COLUMNS": "220", "NO_COLOR": "1"},
    )
    assert done.returncode == 0, done.stdout
    rows = [
        [cell.strip() for cell in line.strip().strip("│").split("│")]
        for line in done.stdout.splitlines()
        if line.startswith("│")
    ]
    assert [row[:2] for row in rows] == [
        ["inference", baseline],
        ["inference", other],
        ["total", baseline],
        ["total", other],
    ]
    assert rows[0][8:] == ["baseline", "[bold]red[/bold] green"]
    assert rows[1][8:] == ["+2 -1 words", "[bold]red[/bold] blue [/x]"]
    assert "┏" in done.stdout  # a drawn table, not tab-separated lines


def test_replay_and_compare_refusals(stack: Stack) -> None:
    known = json.loads(agentlab(stack, "run", "known", "-m", "echo", "--json").stdout)
    known_id = known["execution_id"]

    one = agentlab(stack, "executions", "compare", known_id)
    assert (one.returncode, one.stdout) == (4, "")
    assert "INVALID_ARGUMENT" in one.stderr
    assert "execution_ids: must contain at least 2 item(s)" in one.stderr
    unknown = agentlab(stack, "executions", "compare", known_id, "0" * 32)
    assert unknown.returncode == 4
    assert "NOT_FOUND" in unknown.stderr
    assert agentlab(stack, "executions", "compare", known_id, "0" * 32, "--json").stdout == ""

    nobody = agentlab(stack, "executions", "replay", "0" * 32)
    assert (nobody.returncode, nobody.stdout) == (4, "")
    assert "NOT_FOUND" in nobody.stderr
    usage = agentlab(stack, "executions", "replay", known_id, "--temperature", "5")
    assert usage.returncode == 2
    assert "--temperature" in usage.stderr


def test_models_and_health(stack: Stack) -> None:
    models = agentlab(stack, "models")
    assert models.stdout.splitlines()[0].split("\t") == [
        "name",
        "backend",
        "backend model",
        "ready",
        "description",
    ]
    assert models.stdout.splitlines()[1].split("\t")[:4] == ["*", "echo", "echo", "yes"]
    as_json = ndjson(agentlab(stack, "models", "--json").stdout)
    assert as_json[0]["backend"] == "echo"
    assert as_json[0]["ready"] is True

    health = agentlab(stack, "health")
    assert (health.returncode, health.stdout) == (0, "SERVING\n")
    assert json.loads(agentlab(stack, "health", "--json").stdout)["status"] == (
        "SERVING_STATUS_SERVING"
    )
    unknown = agentlab(stack, "health", "--service", "agentlab.backend.nobody")
    assert unknown.returncode == 4
    assert "NOT_FOUND" in unknown.stderr


def test_compare_runs_every_model_side_by_side(stack: Stack) -> None:
    table = agentlab(stack, "compare", "blue sky", "-m", "echo", "-m", "other-name")
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    header = next(line for line in lines if "node" in line)
    assert "echo" in header
    assert "other-name" in header
    for row in ("plan", "answer", "review", "Total", "output"):
        assert any(line.strip("│┃ ").startswith(row) for line in lines), row

    as_json = json.loads(agentlab(stack, "compare", "blue", "-m", "a", "-m", "b", "--json").stdout)
    assert set(as_json) == {"a", "b"}
    for model, outcome in as_json.items():
        assert outcome["result"]["metrics"]["requested_model"] == model
        assert [step["node"] for step in outcome["result"]["flow"]] == ["plan", "answer", "review"]


def test_exit_codes_tell_usage_refusal_and_unavailable_apart(stack: Stack) -> None:
    refused = agentlab(stack, "run", " ", "-m", "echo")
    assert refused.returncode == 4
    assert refused.stdout == ""
    assert "INVALID_ARGUMENT" in refused.stderr
    assert "prompt: must contain at least one non-whitespace character" in refused.stderr

    no_key = agentlab(stack, "models", env={"AGENTLAB_API_KEY": ""})
    assert no_key.returncode == 4
    assert "UNAUTHENTICATED" in no_key.stderr

    unknown = agentlab(stack, "executions", "get", "0" * 32)
    assert unknown.returncode == 4
    assert "NOT_FOUND" in unknown.stderr

    usage = agentlab(stack, "run", "x", "--temperature", "5")
    assert usage.returncode == 2
    assert "--temperature" in usage.stderr

    nobody = agentlab(None, "--target", f"127.0.0.1:{free_port()}", "--quiet", "models")
    assert nobody.returncode == 3
    assert "UNAVAILABLE" in nobody.stderr


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "agentlab")
def test_help_on_every_command(command: list[str]) -> None:
    done = agentlab(None, *command, "--help")
    assert done.returncode == 0, done.stderr
    assert "Usage: agentlab" in done.stdout
    if (len(command) == 1 and command[0] != "executions") or len(command) == 2:
        assert "Example" in done.stdout


def test_no_color_is_honoured() -> None:
    target = f"127.0.0.1:{free_port()}"
    colour = re.compile(r"\x1b\[[0-9;]*3[0-9]m")
    forced = agentlab(None, "-t", target, "-q", "health", env={"FORCE_COLOR": "1"})
    assert colour.search(forced.stderr), "no colour even when forced: the test proves nothing"
    plain = agentlab(None, "-t", target, "-q", "health", env={"FORCE_COLOR": "1", "NO_COLOR": "1"})
    assert not colour.search(plain.stderr)
    assert "UNAVAILABLE" in plain.stderr


def readme_commands() -> list[str]:
    """The `agentlab` lines of README.md's "From a terminal" section."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("\n## From a terminal\n", 1)[1].split("\n## ", 1)[0]
    return [line.strip() for line in section.splitlines() if line.startswith("    agentlab ")]


def test_every_readme_command_runs_as_printed(stack: Stack) -> None:
    commands = readme_commands()
    assert len(commands) >= 10
    # Watch follows it to its end: two seconds of echo.
    prompt = " ".join(f"w{n}" for n in range(200))
    started = agentlab(stack, "run", prompt, "-m", "echo", "--background")
    execution_id = started.stdout.strip()
    replay_id = agentlab(stack, "executions", "replay", execution_id).stdout.split()[0]
    for command in commands:
        named = command.replace("<replay_id>", replay_id).replace("<id>", execution_id)
        args = shlex.split(named)[1:]
        done = agentlab(stack, *args)
        assert done.returncode == 0, f"{command}: {done.stderr}"
        assert done.stdout, command


def test_ctrl_c_stops_the_orchestration_it_started(stack: Stack) -> None:
    # 256 words a node (the default max tokens): about 8 s of echo in all.
    long_prompt = " ".join(f"w{n}" for n in range(2000))
    with spawn(stack, "orchestrate", long_prompt, "-m", "echo", "--json") as running:
        assert running.stdout is not None
        first = json.loads(running.stdout.readline())
        running.send_signal(signal.SIGINT)
        _, errors = running.communicate(timeout=30)
    assert running.returncode == 130
    assert f"cancelled execution {first['execution_id']}" in errors
    assert state_of(stack, first["execution_id"]) == "EXECUTION_STATE_CANCELLED"


def running_with(stack: Stack, marker: str, count: int) -> list[str]:
    """The ids of the ``count`` running executions whose prompt starts with
    ``marker``, once there are that many (within 20 s)."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        listed = agentlab(stack, "executions", "list", "--state", "running", "--json")
        found = [e["execution_id"] for e in ndjson(listed.stdout) if e["prompt"].startswith(marker)]
        if len(found) >= count:
            return found
        time.sleep(0.2)
    pytest.fail(f"never saw {count} running executions of {marker}")


@pytest.mark.parametrize(
    ("command", "models"), [("run", ["echo"]), ("compare", ["echo", "other-name"])]
)
def test_ctrl_c_stops_what_run_and_compare_started(
    stack: Stack, command: str, models: list[str]
) -> None:
    """Their calls carry a key, so the executions would outlive them."""
    marker = f"ctrl-c-{command}"
    long_prompt = marker + " " + " ".join(f"w{n}" for n in range(2000))  # 20 s of echo
    model_options = [option for model in models for option in ("-m", model)]
    with spawn(stack, command, long_prompt, *model_options) as running:
        ids = running_with(stack, marker, len(models))
        running.send_signal(signal.SIGINT)
        _, errors = running.communicate(timeout=30)
    assert running.returncode == 130, errors
    for execution_id in ids:
        assert f"cancelled execution {execution_id}" in errors
        assert state_of(stack, execution_id) == "EXECUTION_STATE_CANCELLED"


@pytest.mark.parametrize("timeout", ["0", "-1"])
def test_a_timeout_of_zero_or_less_is_a_usage_error(timeout: str) -> None:
    # Not a call that fails at once with DEADLINE_EXCEEDED (exit 3, "try again").
    done = agentlab(None, "-t", f"127.0.0.1:{free_port()}", "--timeout", timeout, "models")
    assert done.returncode == 2, done.stderr
    assert "--timeout" in done.stderr
    assert "greater than 0" in done.stderr


def test_a_closed_pipe_ends_orchestrate_quietly_and_cancels_its_execution(stack: Stack) -> None:
    """`agentlab orchestrate … --json | head -1`: exit 141 as SIGPIPE would
    give, no traceback, and the keyed execution does not run on unread."""
    long_prompt = " ".join(f"w{n}" for n in range(2000))  # 20 s of echo per node
    with spawn(stack, "orchestrate", long_prompt, "-m", "echo", "--json") as running:
        assert running.stdout is not None
        assert running.stderr is not None
        first = json.loads(running.stdout.readline())
        running.stdout.close()
        errors = running.stderr.read()
        running.wait(timeout=30)
    assert running.returncode == 141, errors
    assert errors.strip() == f"cancelled execution {first['execution_id']}"
    assert state_of(stack, first["execution_id"]) == "EXECUTION_STATE_CANCELLED"


def test_compare_with_an_unreachable_model(start_stack: StackFactory) -> None:
    """The reachable model's column is filled in; the other's node says it
    failed (no zero rates) and its total gives the error; exit 3."""
    models = (
        "backends:\n"
        "  fast: {kind: echo}\n"
        f'  dead: {{kind: openai, url: "http://127.0.0.1:{free_port()}/v1"}}\n'
        "models:\n"
        "  good: {backend: fast}\n"
        "  gone: {backend: dead, model: nothing}\n"
    )
    stack = start_stack({}, models=models)
    done = agentlab(stack, "compare", "blue sky", "-m", "good", "-m", "gone")
    assert done.returncode == 3, done.stderr
    rows = {
        cells[0]: cells[1:]
        for line in done.stdout.splitlines()
        if len(cells := [cell.strip() for cell in line.strip("│┃").split("│")]) == 3
    }
    assert "tok/s" in rows["plan"][0]
    assert rows["plan"][1].startswith("failed after "), rows["plan"]
    assert "tok/s" not in rows["plan"][1]
    assert rows["Total"][1].startswith("failed: lab backend 'dead'"), rows["Total"]


def test_a_replay_on_an_unreachable_model_is_its_failed_record_and_exit_3(
    start_stack: StackFactory,
) -> None:
    """The replay's record is the answer (printed, FAILED, with its error);
    the exit code is the one its error stands for, as for `run`."""
    models = (
        "backends:\n"
        "  fast: {kind: echo}\n"
        f'  dead: {{kind: openai, url: "http://127.0.0.1:{free_port()}/v1"}}\n'
        "models:\n"
        "  good: {backend: fast}\n"
        "  gone: {backend: dead, model: nothing}\n"
    )
    stack = start_stack({}, models=models)
    source = json.loads(agentlab(stack, "run", "blue sky", "-m", "good", "--json").stdout)

    done = agentlab(stack, "-q", "executions", "replay", source["execution_id"], "-m", "gone")

    assert done.returncode == 3, done.stderr
    first, error = done.stdout.splitlines()[:2]
    assert first.split()[1:] == ["FAILED", "gone"]
    assert error.startswith("error: lab backend 'dead'"), error
    assert "UNAVAILABLE" in done.stderr
    as_json = agentlab(
        stack, "-q", "executions", "replay", source["execution_id"], "-m", "gone", "--json"
    )
    assert as_json.returncode == 3
    assert json.loads(as_json.stdout)["state"] == "EXECUTION_STATE_FAILED"


def test_a_prompt_from_stdin(stack: Stack) -> None:
    """`-` reads the prompt from stdin, beyond what an argument may hold
    (128 KiB: the service's own limit answers instead of the kernel's E2BIG)."""
    piped = agentlab(stack, "run", "-", "-m", "echo", stdin="two lines\nfrom a pipe\n")
    assert (piped.returncode, piped.stdout) == (0, "two lines\nfrom a pipe\n"), piped.stderr
    events = agentlab(stack, "orchestrate", "-", "-m", "echo", "--json", stdin="piped words")
    assert ndjson(events.stdout)[1]["node_started"]["input"] == "piped words"

    huge = agentlab(stack, "-q", "run", "-", "-m", "echo", stdin="x" * 200_000)
    assert huge.returncode == 4
    assert "prompt: must be at most 32000 characters" in huge.stderr

    empty = agentlab(stack, "run", "-", "-m", "echo", stdin="")
    assert empty.returncode == 2
    assert "empty prompt" in empty.stderr


def test_cancel_of_a_finished_execution_says_there_was_nothing_to_cancel(stack: Stack) -> None:
    finished = agentlab(stack, "run", "done already", "-m", "echo", "--json")
    execution_id = json.loads(finished.stdout)["execution_id"]
    cancelled = agentlab(stack, "executions", "cancel", execution_id)
    assert cancelled.returncode == 0
    assert cancelled.stdout.split() == [execution_id, "SUCCEEDED"]
    assert "already finished: nothing to cancel" in cancelled.stderr
