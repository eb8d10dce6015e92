"""A pytest-aiohttp test server that serves a gateway application on the protocol data path
(gateway.dataplane), handing the rest to aiohttp on the same port, as ``gateway serve`` does."""

from __future__ import annotations

from typing import Any

from aiohttp import web
from aiohttp.test_utils import BaseTestServer
from yarl import URL

from gateway.dataplane import DataPlane, Settings


class ProtocolTestServer(BaseTestServer):
    def __init__(self, app: web.Application, settings: Settings | None = None, **kwargs: Any):
        super().__init__(**kwargs)
        self.app = app
        self.settings = settings
        self.plane: DataPlane | None = None

    async def _make_runner(self, **kwargs: Any) -> web.AppRunner:
        return web.AppRunner(self.app, access_log=None, **kwargs)

    async def start_server(self, loop: Any = None, **kwargs: Any) -> None:
        if self.runner:
            return
        self.runner = await self._make_runner(handler_cancellation=True, **kwargs)
        await self.runner.setup()
        self.plane = DataPlane(self.app, self.runner.server, self.settings)
        self.port = await self.plane.start(self.host, self.port or 0)
        self.scheme = "http"
        self._root = URL(f"http://{self.host}:{self.port}")

    async def close(self) -> None:
        if self.plane is not None and not self.closed:
            await self.plane.close()
        await super().close()
