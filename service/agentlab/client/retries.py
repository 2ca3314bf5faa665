"""When a failed call is tried again, and after how long.

Only UNAVAILABLE and RESOURCE_EXHAUSTED are retried, and only for calls that
are safe to repeat (the caller says which: reads, and Execute, Orchestrate
and ReplayExecution with a ``request_id``). The wait is exponential backoff
with jitter, never shorter than what the server asked for in RetryInfo (or
``retry-after``).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

import grpc

from agentlab.client.errors import LabServiceError

__all__ = ["NO_RETRIES", "Retry", "RetryPolicy"]


@dataclass(frozen=True)
class Retry:
    """One retry about to happen: ``method`` (the RPC's name), ``attempt``
    (1 for the first retry), the ``error`` that caused it, ``delay_s``."""

    method: str
    attempt: int
    error: LabServiceError
    delay_s: float


OnRetry = Callable[[Retry], None]


@dataclass(frozen=True)
class RetryPolicy:
    """``max_attempts`` counts the first call too (4: up to 3 retries).
    Backoff: ``initial_backoff_s`` times ``multiplier`` per retry, at most
    ``max_backoff_s``, each scaled by a random factor in [1 - jitter, 1]."""

    max_attempts: int = 4
    initial_backoff_s: float = 0.25
    max_backoff_s: float = 5.0
    multiplier: float = 2.0
    jitter: float = 0.2
    codes: frozenset[grpc.StatusCode] = frozenset(
        {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED}
    )

    def retryable(self, error: LabServiceError) -> bool:
        return error.code in self.codes

    def delay_s(self, retry: int, error: LabServiceError | None = None) -> float:
        """Seconds to wait before retry number ``retry`` (1-based)."""
        backoff = min(self.max_backoff_s, self.initial_backoff_s * self.multiplier ** (retry - 1))
        backoff *= 1 - self.jitter * random.random()
        asked = error.retry_delay_s if error is not None else None
        return max(backoff, asked or 0.0)


# For callers that want every failure at once.
NO_RETRIES = RetryPolicy(max_attempts=1)
