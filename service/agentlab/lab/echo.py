"""The echo backend: answers with the prompt itself, at no cost.

It exists to measure the gateway's own serving overhead (benchmarks, load
tests); metrics name it "echo" so nobody mistakes it for a model.
"""

from __future__ import annotations

import re
from collections.abc import AsyncGenerator

from agentlab.core.types import GenerationOptions
from agentlab.lab.base import ChatMessage, ModelChunk, TextChunk, Usage

__all__ = ["EchoModel"]

_WORDS = re.compile(r"\S+\s*|\s+")


class EchoModel:
    backend = "echo"
    name = "echo"

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
            yield TextChunk(word)
        prompt_tokens = sum(len(_WORDS.findall(m.content)) for m in messages)
        yield Usage(prompt_tokens=prompt_tokens, completion_tokens=len(words))
