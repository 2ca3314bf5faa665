"""A real browser for the tests: headless Chromium (Debian's `chromium`)
driven by Playwright from PyPI, and a page on another origin to run code from.

Where Chromium or Playwright is missing the browser tests skip, saying why;
in CI they fail instead (.ci/run installs Chromium): services.missing.
"""

from __future__ import annotations

import shutil
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from agentlab.devstack import free_port
from tests.helpers.services import missing

__all__ = ["chromium_browser", "chromium_page", "frontend_origin"]

# Root needs --no-sandbox; the rest keeps a headless run quiet and small.
_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--headless",
    "--disable-background-networking",
    "--disable-dev-shm-usage",
    "--no-first-run",
]


def _require_chromium() -> str:
    path = shutil.which("chromium")
    reason = None
    if path is None:
        reason = "chromium is not installed (apt-get install -y chromium)"
    else:
        try:
            import playwright  # noqa: F401
        except ImportError:
            reason = "playwright is not installed (make setup; pip install playwright)"
    if reason is not None:
        missing(reason)
    assert path is not None
    return path


class _Page(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = b"<!doctype html><meta charset=utf-8><title>frontend</title><p>frontend"
        self.send_response(200)
        self.send_header("content-type", "text/html; charset=utf-8")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        return None


@contextmanager
def frontend_origin() -> Iterator[str]:
    """A blank page served from http://localhost:<port>: another origin than
    the gateway's http://127.0.0.1:<port>, and one its CORS policy allows."""
    server = ThreadingHTTPServer(("127.0.0.1", free_port()), _Page)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://localhost:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@asynccontextmanager
async def chromium_browser() -> AsyncIterator[Any]:
    """A Playwright Browser: headless Chromium, closed after."""
    executable = _require_chromium()
    from playwright.async_api import async_playwright

    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=executable, args=_ARGS, headless=True
        )
        try:
            yield browser
        finally:
            await browser.close()


@asynccontextmanager
async def chromium_page() -> AsyncIterator[Any]:
    """A Playwright page in headless Chromium, opened on the frontend origin."""
    async with chromium_browser() as browser:
        with frontend_origin() as origin:
            page = await browser.new_page()
            await page.goto(f"{origin}/")
            yield page
