"""A fake HTTP server for a test: an aiohttp app on 127.0.0.1, started and
stopped by the test; subclasses add the routes of what they fake."""

from __future__ import annotations

from aiohttp import web

__all__ = ["FakeServer"]


class FakeServer:
    url: str = ""
    _runner: web.AppRunner | None = None
    # Cancel a handler when its client goes away, as a real server's work
    # stops: for fakes whose handlers wait.
    handler_cancellation: bool = False

    def add_routes(self, app: web.Application) -> None:
        raise NotImplementedError

    async def start(self, port: int = 0) -> str:
        """Listen on ``port`` (0: any free one); returns the base URL."""
        app = web.Application()
        self.add_routes(app)
        self._runner = web.AppRunner(app, handler_cancellation=self.handler_cancellation)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", port).start()
        host, bound = self._runner.addresses[0][:2]
        self.url = f"http://{host}:{bound}"
        return self.url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
