"""Two API-key callers, alice and bob, and a stack that knows only them: for
tests of what one caller may see of another's executions."""

from __future__ import annotations

import secrets
from pathlib import Path

from agentlab.api.auth import digest
from agentlab.devstack import Stack

__all__ = ["ALICE", "BOB", "start_keyed_stack"]

ALICE = secrets.token_urlsafe(24)
BOB = secrets.token_urlsafe(24)


def start_keyed_stack(directory: Path) -> Stack:
    """An echo stack whose keys file (written as the README says) lists
    alice's and bob's digests."""
    keys = directory / "keys.yaml"
    keys.write_text(
        "keys:\n"
        f"  - {{caller: alice, sha256: {digest(ALICE)}}}\n"
        f"  - {{caller: bob, sha256: {digest(BOB)}}}\n"
    )
    return Stack.start(
        directory, {"AGENTLAB_DEFAULT_BACKEND": "echo", "AGENTLAB_API_KEYS_FILE": str(keys)}
    )
