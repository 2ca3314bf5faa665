"""The FastAPI app this gateway replaces, seed-style: no history, one worker.

The frontend's two calls answered the way our echo backend answers them (the
same fields, a word per token), so `make bench` compares serving costs only.
Run: uvicorn --app-dir bench/peers fastapi_app:app --workers 1 --port N
"""

import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

app = FastAPI()


class ExecuteRequest(BaseModel):
    prompt: str
    model: str = "echo"
    max_tokens: int | None = None


def _metrics(tokens: int, start: float) -> dict[str, object]:
    ms = (time.perf_counter() - start) * 1000
    return {"latency_ms": ms, "completion_tokens": tokens, "backend": "echo", "model": "echo"}


@app.post("/api/v1/execute")
async def execute(request: ExecuteRequest) -> dict[str, object]:
    start = time.perf_counter()
    metrics = _metrics(len(request.prompt.split()), start)
    step = {
        "node": "inference",
        "status": "STEP_STATUS_SUCCEEDED",
        "input": request.prompt,
        "output": request.prompt,
        "metrics": metrics,
    }
    return {
        "execution_id": uuid.uuid4().hex,
        "output": request.prompt,
        "flow": [step],
        "metrics": metrics,
    }


@app.post("/api/v1/orchestrate")
async def orchestrate(request: ExecuteRequest) -> StreamingResponse:
    start, words = time.perf_counter(), request.prompt.split()[:20]
    events: list[dict[str, Any]] = [
        {"execution_started": {"requested_model": request.model}},
        {"node_started": {"node": "inference", "input": request.prompt}},
        *({"token_delta": {"node": "inference", "text": w + " "}} for w in words),
        {"node_finished": {"step": {"node": "inference", "output": " ".join(words)}}},
        {
            "execution_completed": {
                "result": {"output": " ".join(words), "metrics": _metrics(len(words), start)}
            }
        },
    ]

    async def sse() -> AsyncIterator[str]:  # async, as a model client's stream would be
        for n, event in enumerate(events, 1):
            yield f"id: {n}\ndata: {json.dumps({'event': {'sequence': n, **event}})}\n\n"

    return StreamingResponse(sse(), media_type="text/event-stream")
