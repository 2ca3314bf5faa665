"""What an idempotency key is bound to: a fingerprint of the work a request
asks for (the IETF Idempotency-Key draft's "request fingerprint").

The work is the mode, the model name as requested, the prompt and the
sampling options the request sets (temperature, max_tokens, seed), exactly as
given: before routing, so a retry matches even after the routing file or a
model's defaults changed. Left out, because they say how the caller waits
and not what is computed: ``background``, ``on_disconnect``, the deadline,
and every transport header (the API key decides whose keys these are, not
what the work is).
"""

from __future__ import annotations

import hashlib
import json

from agentlab.executions.model import ExecutionRecord

__all__ = ["VERSION", "fingerprint", "fingerprint_of"]

# Part of what is hashed: a later change of the definition cannot match a
# fingerprint of this one by accident.
VERSION = 1


def fingerprint(
    *,
    mode: str,
    model: str,
    prompt: str,
    options: dict[str, float | int],
    replay_of: str = "",
) -> str:
    """A SHA-256 in hex of the work's canonical JSON. ``options`` holds only
    the options the request set; 1 and 1.0 differ, as they do in the record.
    A replay's key is bound to its source too (``replay_of``), which is
    hashed only when set, so fingerprints of other requests stay as they
    were."""
    work: dict[str, object] = {
        "v": VERSION,
        "mode": mode,
        "model": model,
        "prompt": prompt,
        "options": options,
    }
    if replay_of:
        work["replay_of"] = replay_of
    canonical = json.dumps(
        work,
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
    )
    return hashlib.sha256(canonical.encode()).hexdigest()


def fingerprint_of(record: ExecutionRecord) -> str:
    """The record's fingerprint: stored since schema version 2, computed
    from the stored request fields for records made before (they keep every
    field it covers, so they need no backfill)."""
    if record.fingerprint:
        return record.fingerprint
    return fingerprint(
        mode=record.mode,
        model=record.model,
        prompt=record.prompt,
        options=record.options,
        replay_of=record.replay_of,
    )
