"""``python -m agentlab.labservice`` (or ``agentlab-lab``): serve the lab on
AGENTLAB_LAB_ADDRESS until SIGTERM or SIGINT, draining gracefully."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys

from agentlab.config import ConfigError, Settings
from agentlab.core.errors import AgentLabError
from agentlab.labservice.app import ANY_MODEL, LabServer, build_labs, listen
from agentlab.telemetry import logs, tracing

__all__ = ["main", "parse_address"]

logger = logging.getLogger("agentlab.labservice")


def parse_address(address: str) -> tuple[str, int]:
    """Parse host:port, [::1]:port, or :port (every IPv4 interface)."""
    host, colon, port = address.strip().rpartition(":")
    if not colon or not port.isdigit() or int(port) > 65535:
        raise ConfigError(f"AGENTLAB_LAB_ADDRESS must be host:port, not {address!r}")
    return host.removeprefix("[").removesuffix("]") or "0.0.0.0", int(port)


async def serve(settings: Settings, host: str, port: int) -> None:
    service = LabServer(
        build_labs(settings),
        default_max_tokens=settings.default_max_tokens,
        max_prompt_chars=settings.max_prompt_chars,
    )
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    runner, bound = await listen(service, host, port)
    try:
        # Listening first: health answers 503 while the model loads, so a
        # caller can tell "starting" from "not there".
        logger.info("listening on http://%s:%d; loading the lab", host, bound)
        await service.start()
        lab = service.labs[ANY_MODEL]
        logger.info("serving %s/%s", lab.backend, lab.model_name)
        await stopping.wait()
        logger.info("stopping")
    finally:
        # Still listening while draining: health says "stopping" rather than
        # refusing connections, and new runs get a retryable 503.
        await service.drain(settings.shutdown_grace_s)
        await runner.cleanup()
        await service.close()
    logger.info("stopped")


def main() -> None:
    try:
        settings = Settings.from_env()
        host, port = parse_address(settings.lab_address)
    except ConfigError as error:
        sys.exit(f"agentlab-lab: configuration error: {error}")
    logs.configure(settings.log_level, settings.log_format)
    try:
        tracing.configure_from_env("agentlab-lab")
    except tracing.TracingError as error:
        sys.exit(f"agentlab-lab: configuration error: {error}")
    try:
        asyncio.run(serve(settings, host, port))
    except (ConfigError, AgentLabError, OSError) as error:
        sys.exit(f"agentlab-lab: {error}")
    finally:
        tracing.shutdown()  # the spans still buffered


if __name__ == "__main__":
    main()
