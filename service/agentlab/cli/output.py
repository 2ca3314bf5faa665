"""What the command prints and how it exits.

stdout carries only the result (the output text, a table, or JSON with
``--json``: one object, or one object per line for lists and streams), so it
pipes cleanly; progress, retries and errors go to stderr.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import grpc
from google.protobuf import json_format
from google.protobuf.message import Message
from google.rpc import status_pb2
from rich.console import Console
from rich.markup import escape

from agentlab.client.errors import LabServiceError, error_for_status
from agentlab.client.retries import Retry

__all__ = [
    "EXIT_BROKEN_PIPE",
    "EXIT_FAILED",
    "EXIT_OK",
    "EXIT_REFUSED",
    "EXIT_UNAVAILABLE",
    "EXIT_USAGE",
    "exit_code",
    "message_dict",
    "print_error",
    "print_json",
    "print_retry",
    "stderr",
]

EXIT_OK = 0
# The execution ran and failed (its error, cancelled, an internal error).
EXIT_FAILED = 1
# Bad options or arguments: click's own code for usage errors.
EXIT_USAGE = 2
# The gateway or its backend could not take the call now: try again later.
EXIT_UNAVAILABLE = 3
# The gateway refused the request as it stands (invalid, unknown id, key):
# trying again unchanged will not help.
EXIT_REFUSED = 4
# stdout was closed before everything was written (a pipe into `head`): what
# a shell reports for a process ended by SIGPIPE, 128 + 13.
EXIT_BROKEN_PIPE = 141

_UNAVAILABLE = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.DEADLINE_EXCEEDED,
    }
)
_REFUSED = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.ALREADY_EXISTS,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.OUT_OF_RANGE,
        grpc.StatusCode.UNIMPLEMENTED,
    }
)

# Rich honours NO_COLOR and drops styles when stderr is not a terminal.
# soft_wrap: a message stays one line in a log, whatever the width.
stderr = Console(stderr=True, highlight=False, soft_wrap=True)


def exit_code(error: LabServiceError) -> int:
    if error.code in _UNAVAILABLE:
        return EXIT_UNAVAILABLE
    if error.code in _REFUSED:
        return EXIT_REFUSED
    return EXIT_FAILED


def message_dict(message: Message) -> dict[str, Any]:
    """A message as the REST API writes it: proto field names, enum names."""
    return json_format.MessageToDict(message, preserving_proto_field_name=True)


def print_json(value: Message | dict[str, Any] | list[Any]) -> None:
    """One JSON document on one line of stdout."""
    data = message_dict(value) if isinstance(value, Message) else value
    sys.stdout.write(json.dumps(data, ensure_ascii=False) + "\n")
    sys.stdout.flush()


def print_error(error: LabServiceError) -> None:
    """``error: CODE: message`` on stderr, then the reason and each field
    violation on lines of their own."""
    stderr.print(f"[bold red]error:[/] {escape(str(error))}")
    if error.reason:
        stderr.print(f"  reason: {escape(error.reason)}")
    for violation in error.violations:
        stderr.print(f"  {escape(violation.field)}: {escape(violation.description)}")
    if error.retry_delay_s is not None:
        stderr.print(f"  retry after: {error.retry_delay_s:g} s")


def failure_of(status: status_pb2.Status) -> LabServiceError:
    """An execution_failed event's status as the error it stands for."""
    return error_for_status(status)


def print_retry(retry: Retry) -> None:
    stderr.print(
        f"[yellow]retry {retry.attempt}[/] of {retry.method} in {retry.delay_s:.2f} s "
        f"after {escape(str(retry.error))}"
    )
