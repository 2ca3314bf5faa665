"""A fake Ollama server speaking its documented wire format (docs/api.md):
``GET /api/tags`` and ``POST /api/chat`` streaming NDJSON, the last line a
``done`` chunk with the counts and durations Ollama measures.

Tests set what it answers and read what it saw: the request bodies, how many
lines it sent, and when the client went away.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from tests.helpers.fake_server import FakeServer

__all__ = ["FakeOllama"]


@dataclass
class FakeOllama(FakeServer):
    models: list[str] = field(default_factory=lambda: ["llama3.2:1b"])
    words: list[str] = field(default_factory=lambda: ["Blue", ",", " green", " and", " red"])
    delay_s: float = 0.0
    prompt_eval_count: int = 12
    eval_count: int = 5
    eval_duration_ns: int = 250_000_000
    # What to send after the words, in place of a done chunk.
    error_line: str | None = None
    garbage_line: str | None = None
    omit_done: bool = False
    # Drop the connection after this many words, as a crashing server does.
    die_after: int | None = None

    url: str = ""
    requests: list[dict[str, Any]] = field(default_factory=list)
    lines_sent: int = 0
    disconnected_at: float | None = None
    disconnected: asyncio.Event = field(default_factory=asyncio.Event)

    def add_routes(self, app: web.Application) -> None:
        app.router.add_get("/api/tags", self._tags)
        app.router.add_post("/api/chat", self._chat)

    async def _tags(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "models": [
                    {"name": name, "model": name, "size": 1_300_000_000, "details": {}}
                    for name in self.models
                ]
            }
        )

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.requests.append(body)
        model = body.get("model")
        if model not in self.models:
            return web.json_response({"error": f"model '{model}' not found"}, status=404)

        response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await response.prepare(request)
        try:
            for index, word in enumerate(self.words):
                if self.die_after is not None and index == self.die_after:
                    assert request.transport is not None
                    request.transport.abort()
                    return response
                await self._send(response, self._chunk(model, word, done=False))
                await asyncio.sleep(self.delay_s)
            if self.error_line is not None:
                await self._send(response, json.dumps({"error": self.error_line}))
            elif self.garbage_line is not None:
                await self._send(response, self.garbage_line)
            elif not self.omit_done:
                await self._send(response, self._chunk(model, "", done=True))
            await response.write_eof()
        # aiohttp reports a client that went away either way: the next write
        # fails, or (with handler cancellation on) the handler is cancelled.
        except ConnectionResetError:
            self._disconnect()
        except asyncio.CancelledError:
            self._disconnect()
            raise
        return response

    def _disconnect(self) -> None:
        self.disconnected_at = time.monotonic()
        self.disconnected.set()

    async def _send(self, response: web.StreamResponse, line: str) -> None:
        await response.write(line.encode() + b"\n")
        self.lines_sent += 1

    def _chunk(self, model: str, text: str, *, done: bool) -> str:
        chunk: dict[str, Any] = {
            "model": model,
            "created_at": "2025-01-01T00:00:00.000000Z",
            "message": {"role": "assistant", "content": text},
            "done": done,
        }
        if done:
            chunk |= {
                "done_reason": "stop",
                "total_duration": self.eval_duration_ns + 50_000_000,
                "load_duration": 1_000_000,
                "prompt_eval_count": self.prompt_eval_count,
                "prompt_eval_duration": 40_000_000,
                "eval_count": self.eval_count,
                "eval_duration": self.eval_duration_ns,
            }
        return json.dumps(chunk)
