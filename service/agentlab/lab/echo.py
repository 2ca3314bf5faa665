"""The echo backend: answers with the prompt itself, at no cost.

It exists to measure the gateway's own serving overhead (benchmarks, load
tests); metrics name it "echo" so nobody mistakes it for a model.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncGenerator

from agentlab.core.types import GenerationOptions
from agentlab.lab.base import ChatMessage, ModelChunk, TextChunk, Usage

__all__ = ["EchoModel"]

_WORDS = re.compile(r"\S+\s*|\s+")


class EchoModel:
    """``token_delay_s`` (seconds before each word, default none) makes a
    stream long enough for tests and benchmarks to act on it mid-way."""

    backend = "echo"
    name = "echo"

    def __init__(self, token_delay_s: float = 0.0) -> None:
        self._token_delay_s = token_delay_s

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def stream(
        self, messages: list[ChatMessage], options: GenerationOptions
    ) -> AsyncGenerator[ModelChunk, None]:
        text = messages[-1].content if messages else ""
        words = _WORDS.findall(text)
        if options.max_tokens is not None:
            words = words[: options.max_tokens]
        for word in words:
            if self._token_delay_s:
                await asyncio.sleep(self._token_delay_s)
            yield TextChunk(word)
        prompt_tokens = sum(len(_WORDS.findall(m.content)) for m in messages)
        yield Usage(prompt_tokens=prompt_tokens, completion_tokens=len(words))
