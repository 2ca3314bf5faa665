"""Serving the metrics: Prometheus's text format over HTTP, on a thread of
its own, so a scrape never waits for the event loop and the event loop never
waits for a scrape (beyond the GIL while the text is written)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import start_http_server

__all__ = ["OFF", "serve", "split_address"]

OFF = "off"
"""The AGENTLAB_METRICS_ADDRESS that serves no metrics."""


def split_address(address: str) -> tuple[str, int]:
    """``host:port`` (``[::1]:9464`` for IPv6) as (host, port); raises
    ValueError for anything else, or a port outside 1..65535."""
    host, colon, port = address.strip().rpartition(":")
    host = host.strip("[]")
    if not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"not <host>:<port>: {address!r}")
    return host, int(port)


def serve(address: str) -> Callable[[], None]:
    """Serve GET /metrics (any path, as prometheus-client does) at
    ``address`` (``host:port``, or OFF for nothing); returns what stops it.
    Raises OSError when the address cannot be listened on."""
    if address == OFF:
        return lambda: None
    host, port = split_address(address)
    server, thread = start_http_server(port, addr=host)

    def stop() -> None:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5.0)

    return stop
