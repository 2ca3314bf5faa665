"""Two API-key callers, alice and bob: for tests of what one caller may see
of another's executions, on a stack that knows only them
(``start_stack(..., keys=CALLERS)``)."""

from __future__ import annotations

import secrets

__all__ = ["ALICE", "BOB", "CALLERS"]

ALICE = secrets.token_urlsafe(24)
BOB = secrets.token_urlsafe(24)
# Caller name -> API key.
CALLERS = {"alice": ALICE, "bob": BOB}
