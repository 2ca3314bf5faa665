"""A bounded load test: REST Execute through Envoy at a fixed concurrency for
a fixed time, against a service with small execution limits, so the bound is
crossed on purpose.

It prints every second the requests done, the statuses seen and the memory
(RSS) of the service and of Envoy, then a summary: which statuses came back
(200 and, beyond the bound, 429 are expected; anything else is an error), and
whether memory stayed flat from the 10th second on.

    .venv/bin/python bench/load.py                      # echo, 30 s, concurrency 32
    .venv/bin/python bench/load.py --model --concurrency 8
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import sys
import tempfile
import time
from pathlib import Path

import httpx
from procstat import rss_kib

from agentlab.devstack import Stack

EXPECTED = {200, 429}


async def run(args: argparse.Namespace, stack: Stack) -> int:
    body = (
        {"prompt": "Dime 3 números primos", "model": "mistral7b", "max_tokens": 16}
        if args.model
        else {"prompt": "How much does the gateway cost?", "model": "echo"}
    )
    statuses: collections.Counter[int] = collections.Counter()
    errors: collections.Counter[str] = collections.Counter()
    done = 0
    stop_at = time.monotonic() + args.duration
    limits = httpx.Limits(max_connections=args.concurrency)

    async with httpx.AsyncClient(timeout=60, limits=limits) as client:

        async def worker() -> None:
            nonlocal done
            while time.monotonic() < stop_at:
                try:
                    answer = await client.post(f"{stack.url}/api/v1/execute", json=body)
                    statuses[answer.status_code] += 1
                    if answer.status_code == 429:
                        # What a well-behaved client does with Retry-After.
                        await asyncio.sleep(float(answer.headers.get("retry-after", "0.1")))
                except httpx.HTTPError as error:
                    errors[type(error).__name__] += 1
                done += 1

        assert stack.service.proc is not None
        assert stack.envoy.proc is not None
        service_pid, envoy_pid = stack.service.proc.pid, stack.envoy.proc.pid
        samples: list[tuple[int, int, int]] = []
        workers = [asyncio.create_task(worker()) for _ in range(args.concurrency)]
        print(
            f"{'s':>3} {'requests':>9} {'200':>7} {'429':>6} {'other':>6} "
            f"{'service MiB':>12} {'envoy MiB':>10}"
        )
        for second in range(1, int(args.duration) + 1):
            await asyncio.sleep(1)
            service, envoy = rss_kib(service_pid), rss_kib(envoy_pid)
            samples.append((second, service, envoy))
            other = sum(n for code, n in statuses.items() if code not in EXPECTED)
            print(
                f"{second:>3} {done:>9} {statuses[200]:>7} {statuses[429]:>6} "
                f"{other + sum(errors.values()):>6} {service / 1024:>12.1f} {envoy / 1024:>10.1f}",
                flush=True,
            )
        await asyncio.gather(*workers)

    unexpected = {code: n for code, n in statuses.items() if code not in EXPECTED}
    print(f"\n{done} requests in {args.duration:.0f} s: {done / args.duration:,.0f} req/s")
    print(f"statuses: {dict(sorted(statuses.items()))}; transport errors: {dict(errors)}")
    late = [s for s in samples if s[0] >= 10]
    if late:
        for name, column in (("service", 1), ("envoy", 2)):
            values = [s[column] / 1024 for s in late]
            print(
                f"{name} RSS from the 10th second: min {min(values):.1f} MiB, "
                f"max {max(values):.1f} MiB, growth {values[-1] - values[0]:+.1f} MiB"
            )
    if unexpected or errors:
        print(f"UNEXPECTED: {unexpected} {dict(errors)}", file=sys.stderr)
        return 1
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--duration", type=float, default=30.0)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--model", action="store_true", help="the real model instead of echo")
    parser.add_argument("--max-running", type=int, default=8)
    parser.add_argument("--max-queued", type=int, default=8)
    args = parser.parse_args()
    env = {
        "AGENTLAB_MAX_RUNNING_EXECUTIONS": str(args.max_running),
        "AGENTLAB_MAX_QUEUED_EXECUTIONS": str(args.max_queued),
        "AGENTLAB_LOG_LEVEL": "WARNING",
    }
    print(
        f"load: {'model' if args.model else 'echo'}, concurrency {args.concurrency}, "
        f"{args.duration:.0f} s; limits: {args.max_running} running + {args.max_queued} queued"
    )
    with tempfile.TemporaryDirectory(prefix="agentlab-load-") as logs:
        # One client address at full speed: Envoy's per-client rate limit off.
        stack = Stack.start(Path(logs), {**env, "AGENTLAB_RATE_LIMIT": "off"})
        try:
            return asyncio.run(run(args, stack))
        finally:
            stack.stop()


if __name__ == "__main__":
    sys.exit(main())
