"""What an ExecutionStore or an EventBus raises, the same for every backend,
so callers never catch a driver's exception (sqlite3, asyncpg, redis) to tell
one case from another."""

from __future__ import annotations

__all__ = ["DuplicateEvent", "StoreError", "UnknownExecution"]


class StoreError(Exception):
    pass


class DuplicateEvent(StoreError):
    """An event with this sequence is already stored for the execution: two
    writers think they run it, or one replayed an event."""

    def __init__(self, execution_id: str, sequence: int) -> None:
        super().__init__(
            f"execution {execution_id!r} already has an event with sequence {sequence}"
        )
        self.execution_id = execution_id
        self.sequence = sequence


class UnknownExecution(StoreError, LookupError):
    def __init__(self, execution_id: str) -> None:
        super().__init__(f"no execution {execution_id!r}")
        self.execution_id = execution_id


# What an EventBus raises. Either one means the subscriber may have missed
# events: it should go back to the store (the source of truth) from the last
# sequence it saw.
__all__ += ["BusError", "BusUnavailable", "SubscriberLagged"]


class BusError(Exception):
    pass


class SubscriberLagged(BusError):
    """A subscriber fell so far behind that its buffer overflowed; it was
    dropped rather than let publishing block or memory grow without bound."""

    def __init__(self, channel: str, max_pending: int) -> None:
        super().__init__(f"subscriber to {channel} fell more than {max_pending} messages behind")
        self.channel = channel
        self.max_pending = max_pending


class BusUnavailable(BusError):
    """The bus cannot deliver: its server went away, or it was closed."""
