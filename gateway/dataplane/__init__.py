"""The data path on ``asyncio.Protocol``: an HTTP/1.1 server on uvloop and httptools (llhttp).

Enabled by ``data_path: protocol`` in the config. It serves only data-path requests (a route in the
route tables); everything else on the same listener (the admin API, the page, /health, /ready,
/metrics, unknown paths and the Loki tail's WebSocket upgrade) goes to the aiohttp application, so
operators keep one URL: from the first such request on, the connection's requests reach aiohttp
re-written from what llhttp parsed (see ``server``), so one parser frames every byte. The decision
pipeline is the same function for both servers: ``gateway.proxy.handler.handle``, given a request
object with the attributes it reads.
"""

from gateway.dataplane.server import DataPlane, Settings

__all__ = ["DataPlane", "Settings"]
