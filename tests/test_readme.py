"""Every curl and grpcurl command README.md shows runs as printed.

The commands are read from README.md's code blocks (indented or fenced, a
trailing `\\` continuing a command; a leading `$ ` is a prompt, and the lines
after such a command are its output) and from inline code that is a whole
command. Each runs with `bash -c` as printed, except that:

- the ports become the test stack's (8000: Envoy, 50051: the service,
  9901: Envoy's admin, 9464: the service's metrics);
- placeholders are filled: `<id>` with a real execution's id, `<replay_id>`
  with its replay's on echo; `$KEY` and
  `$ID` are set in the environment;
- `curl` is a shell function that calls the real curl with one `--write-out`
  added first (the HTTP status, to stderr) and records the arguments it got,
  so the test sees every status and that each URL reached curl whole (a
  shell cuts an unquoted URL at its first `&`).

A command passes when bash exits 0 and each HTTP status is 2xx, or one of
those its trailing comment lists (`# 400`, `# 200 or 503`).

The stack routes every model name (the README's mistral7b, and requests
without one) to the echo backend, under the README's backend name
(local-ollama): the commands then run in seconds, where the real model would
take minutes on two cores. What they show of the model
itself is tested elsewhere (tests/test_make_run.py, tests/test_backends_e2e.py).
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from agentlab.devstack import ROOT, Stack
from tests.helpers.stacks import StackFactory

README = ROOT / "README.md"
BIN = Path(sys.executable).parent
GATEWAY_PORT, SERVICE_PORT = 8000, 50051
ADMIN_PORT, METRICS_PORT = 9901, 9464  # Envoy's admin, the service's metrics
STATUS = "__readme_test_http_status__="
# "*" is the registry's catch-all (agentlab.lab.registry.ANY_MODEL): every
# other model name is served too, as without a routing file.
ROUTING = """
backends:
  local-ollama: {kind: echo}
models:
  mistral7b: {backend: local-ollama}
  "*": {backend: local-ollama}
"""
_PROGRAMS = ("curl", "grpcurl")
_EXPECTED = re.compile(r"#\s*(\d{3}(?:\s+or\s+\d{3})*)\s*$")
_PLACEHOLDER = re.compile(r"<[a-z_]+>")


@dataclass(frozen=True)
class Command:
    line: int  # in README.md, where it starts
    text: str  # as printed, `\` continuations included, without a `$ ` prompt

    @property
    def expected(self) -> set[int] | None:
        """The HTTP statuses its trailing comment lists; None: any 2xx."""
        found = _EXPECTED.search(self.text)
        return None if found is None else {int(n) for n in found.group(1).split(" or ")}


def is_command(text: str) -> bool:
    return text.split(" ", 1)[0] in _PROGRAMS and " " in text


def readme_commands(markdown: str) -> list[Command]:
    commands: list[Command] = []
    lines = markdown.splitlines()
    fenced = False
    # The lines after a `$ ` command show what it printed, up to a blank line
    # or the next command.
    in_output = False
    index = 0
    while index < len(lines):
        raw = lines[index]
        if raw.lstrip().startswith("```"):
            fenced = not fenced
            in_output = False
            index += 1
            continue
        code = fenced or raw.startswith("    ")
        if not code:
            in_output = False
            commands.extend(
                Command(index + 1, span)
                for span in re.findall(r"`([^`]+)`", raw)
                if is_command(span) and re.search(r"(localhost|127\.0\.0\.1):\d+", span)
            )
            index += 1
            continue
        text = raw.strip()
        prompted = text.startswith("$ ")
        if prompted:
            text = text[2:]
        elif in_output and not is_command(text):
            index += 1
            continue
        in_output = prompted
        start = index
        while text.endswith("\\") and index + 1 < len(lines):
            index += 1
            text += "\n" + lines[index]
        if is_command(text):
            commands.append(Command(start + 1, text))
        index += 1
    return commands


COMMANDS = readme_commands(README.read_text(encoding="utf-8"))


def test_the_readme_commands_are_found() -> None:
    """The extraction finds what README.md shows (so the test below cannot
    pass by finding nothing), and not a line that is not a command."""
    texts = [c.text for c in COMMANDS]
    assert len(COMMANDS) >= 15, texts
    assert any("/api/v1/executions?page_size=10&model=mistral7b" in t for t in texts)
    assert any(t.startswith("grpcurl -plaintext localhost:50051 list") for t in texts)
    assert any(c.expected == {400} for c in COMMANDS)
    assert any("\\\n" in t for t in texts)  # continued commands are whole
    assert not any(t.startswith("grpcurl,") for t in texts)  # the architecture drawing


def test_the_extraction_reads_prompts_output_and_continuations() -> None:
    markdown = (
        "Text `curl localhost:8000/x` and `grpcurl -H` (a flag, not a command).\n\n"
        "    $ curl -s localhost:8000/a   # 400\n"
        '    {"code": 3}\n'
        "    curl localhost:8000/b \\\n"
        "      -d '{}'\n\n"
        "```\n"
        "grpcurl -plaintext localhost:50051 list\n"
        "```\n"
    )
    assert readme_commands(markdown) == [
        Command(1, "curl localhost:8000/x"),
        Command(3, "curl -s localhost:8000/a   # 400"),
        Command(5, "curl localhost:8000/b \\\n      -d '{}'"),
        Command(9, "grpcurl -plaintext localhost:50051 list"),
    ]


@dataclass(frozen=True)
class ReadmeStack:
    stack: Stack
    execution_id: str
    replay_id: str

    def rewrite(self, text: str) -> str:
        text = re.sub(rf":{GATEWAY_PORT}\b", f":{self.stack.envoy.ports.gateway}", text)
        text = re.sub(rf":{SERVICE_PORT}\b", f":{self.stack.service.port}", text)
        text = re.sub(rf":{ADMIN_PORT}\b", f":{self.stack.envoy.ports.admin}", text)
        text = re.sub(rf":{METRICS_PORT}\b", f":{self.stack.envoy.ports.metrics}", text)
        text = text.replace("<id>", self.execution_id)
        text = text.replace("<replay_id>", self.replay_id)
        unknown = _PLACEHOLDER.findall(text)
        assert not unknown, f"no value for {unknown} in {text!r}: add it to ReadmeStack.rewrite"
        return text


@pytest.fixture(scope="module")
def readme_stack(start_module_stack: StackFactory) -> ReadmeStack:
    stack = start_module_stack(models=ROUTING)
    # A real execution for `<id>`, with more events than `after_sequence=3`.
    answer = httpx.post(
        f"{stack.url}/api/v1/execute",
        json={"prompt": "Dime 3 números primos", "model": "mistral7b"},
        timeout=30,
    )
    assert answer.status_code == 200, answer.text
    execution_id = answer.json()["execution_id"]
    # Its replay, for `<replay_id>` (the README compares the two).
    replay = httpx.post(
        f"{stack.url}/api/v1/executions/{execution_id}:replay", json={"model": "echo"}, timeout=30
    )
    assert replay.status_code == 200, replay.text
    return ReadmeStack(stack, execution_id, replay.json()["execution"]["execution_id"])


def script(command: str, args_file: Path) -> str:
    """``command`` after a `curl` function that reports each status and
    records its arguments, one per line, a blank line after each call."""
    return (
        "set -o pipefail\n"
        "curl() {\n"
        f"  printf '%s\\n' \"$@\" '' >> {shlex.quote(str(args_file))}\n"
        f"  command curl --write-out '%{{stderr}}{STATUS}%{{http_code}}\\n' \"$@\"\n"
        "}\n"
        f"{command}\n"
    )


def urls(command: str) -> list[str]:
    """The URLs in ``command``, each whole as its author meant it."""
    words = shlex.split(command, comments=True)
    return [w for w in words if re.match(r"(https?://)?(localhost|127\.0\.0\.1):\d+/", w)]


@pytest.mark.parametrize("command", COMMANDS, ids=[f"README.md:{c.line}" for c in COMMANDS])
def test_command_runs_as_printed(
    readme_stack: ReadmeStack, command: Command, tmp_path: Path
) -> None:
    text = readme_stack.rewrite(command.text)
    args_file = tmp_path / "curl-args"
    done = subprocess.run(
        ["bash", "-c", script(text, args_file)],
        cwd=ROOT,
        env={
            **os.environ,
            "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",  # grpcurl, as `make setup` puts it
            "KEY": "readme-test-key",
            "ID": readme_stack.execution_id,
        },
        capture_output=True,
        text=True,
        timeout=120,
    )
    shown = f"{text}\n--- exit {done.returncode}\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
    assert done.returncode == 0, shown
    if not text.startswith("curl") and "| curl" not in text and "$(curl" not in text:
        return
    statuses = [
        int(line[len(STATUS) :]) for line in done.stderr.splitlines() if line.startswith(STATUS)
    ]
    assert statuses, f"curl reported no status: {shown}"
    for status in statuses:
        if command.expected is None:
            assert 200 <= status < 300, shown
        else:
            assert status in command.expected, shown
    received = args_file.read_text().split("\n")
    for url in urls(text):
        assert url in received, f"curl did not get {url!r} whole (quote it): {received}"
