"""A small Server-Sent Events reader for the tests: what a browser's
EventSource does, with arrival times."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import httpx


@dataclass
class Received:
    arrived: float  # time.time() when the event's last line arrived
    data: dict[str, Any]

    @property
    def event(self) -> dict[str, Any]:
        event: dict[str, Any] = self.data["event"]
        return event

    @property
    def produced(self) -> float:
        return datetime.fromisoformat(self.event["time"].replace("Z", "+00:00")).timestamp()


class _Parser:
    """Feeds lines; returns an event's data when a blank line ends it."""

    def __init__(self) -> None:
        self._data: list[str] = []

    def feed(self, line: str) -> Received | None:
        if line.startswith("data:"):
            self._data.append(line[5:].strip())
        elif not line.strip() and self._data:
            return self.flush()
        return None

    def flush(self) -> Received | None:
        if not self._data:
            return None
        data, self._data = "\n".join(self._data), []
        return Received(time.time(), json.loads(data))


def read_events(response: httpx.Response) -> list[Received]:
    parser, received = _Parser(), []
    for line in response.iter_lines():
        if (event := parser.feed(line)) is not None:
            received.append(event)
    if (event := parser.flush()) is not None:
        received.append(event)
    return received


async def aread_events(response: httpx.Response) -> AsyncIterator[Received]:
    parser = _Parser()
    async for line in response.aiter_lines():
        if (event := parser.feed(line)) is not None:
            yield event
    if (event := parser.flush()) is not None:
        yield event
