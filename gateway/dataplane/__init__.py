"""The data path on ``asyncio.Protocol``: an HTTP/1.1 server on uvloop and httptools (llhttp).

The only data path (``data_path: aiohttp`` was removed, issue 24). It serves only data-path requests (a route in the
route tables); everything else on the same listener (the admin API, the page, /health, /ready,
/metrics, unknown paths and the Loki tail's WebSocket upgrade) goes to the aiohttp application, so
operators keep one URL: from the first such request on, the connection's requests reach aiohttp
re-written from what llhttp parsed (see ``server``), so one parser frames every byte. The pipeline is
the same for every request: ``gateway.proxy.handler.handle`` (decide → plan → execute), given a request
object with the attributes it reads, or its per-connection memo ``gateway.proxy.fastpath`` for the
callback exchange.
"""

from gateway.dataplane.server import DataPlane, Settings

__all__ = ["DataPlane", "Settings"]
