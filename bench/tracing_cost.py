"""What tracing costs the service per request: the service's CPU
milliseconds per REST Execute (the echo model) through Envoy under wrk,
with tracing off (the default) or on (every span exported over OTLP/gRPC to
a receiver in this process, as to a collector).

CPU per request rather than requests per second: it is what tracing adds to
each call, and it moves less than throughput when other work shares the
machine. Run the variants in turn, a few rounds, and compare medians:

    .venv/bin/python bench/tracing_cost.py --tracing off
    .venv/bin/python bench/tracing_cost.py --tracing on

The same script against another checkout's code (PYTHONPATH=<its service/>)
gives the figure to compare "off" with.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import httpx
import wrk

from agentlab.devstack import Stack

ROOT = Path(__file__).resolve().parent.parent
BODY = {"prompt": "How much does tracing cost?", "model": "echo"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tracing", choices=("off", "on"), default="off")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--connections", type=int, default=16)
    args = parser.parse_args()
    env = {"AGENTLAB_DEFAULT_BACKEND": "echo"}
    receiver = None
    if args.tracing == "on":
        sys.path.insert(0, str(ROOT))
        from tests.helpers.otlp import OtlpReceiver

        receiver = OtlpReceiver().__enter__()
        env |= {**receiver.env("bench"), "OTEL_BSP_SCHEDULE_DELAY": "1000"}
    with tempfile.TemporaryDirectory(prefix="tracing-cost-") as directory:
        stack = Stack.start(Path(directory), env)
        try:
            url = f"{stack.url}/api/v1/execute"
            # Warm up: imports, the first connections, the store's tables.
            for _ in range(200):
                httpx.post(url, json=BODY, timeout=10).raise_for_status()
            time.sleep(0.5)
            assert stack.service.proc is not None
            result = wrk.run(
                url,
                BODY,
                connections=args.connections,
                duration_s=args.seconds,
                pids={"service": stack.service.proc.pid},
            )
        finally:
            stack.stop()
    spans = len(receiver.spans()) if receiver is not None else 0
    print(
        json.dumps(
            {
                "tracing": args.tracing,
                "requests": result.requests,
                "failures": result.failures,
                "rate": round(result.rate, 1),
                "service_cpu_ms_per_request": round(result.cpu_ms["service"], 4),
                "p50_ms": result.p50_ms,
                "spans_received": spans,
            }
        )
    )


if __name__ == "__main__":
    main()
