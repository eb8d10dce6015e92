"""A fake upstream that only records what the gateway sent (Loki, Tempo, or anything)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

from aiohttp import WSMsgType, web
from multidict import CIMultiDict

from tests.loki_lbac import PolicyHeaderError, extract


@dataclass
class Seen:
    method: str
    path: str
    raw_path: str
    query: list[tuple[str, str]]
    headers: CIMultiDict[str]
    body_len: int
    body_sha256: str
    body: bytes  # kept only when small
    raw_query: str = ""  # the query string as received, still percent-encoded


@dataclass
class Recorder:
    """Answers 200 with a small Prometheus-shaped JSON (or ``reply``); remembers every request."""

    seen: list[Seen] = field(default_factory=list)
    reply: bytes = b'{"status":"success","data":{"resultType":"vector","result":[]}}'
    reply_headers: dict[str, str] = field(default_factory=lambda: {"Content-Type": "application/json"})
    status: int = 200
    ws_messages: list[str] = field(default_factory=list)
    lbac: bool = False  # parse X-Prom-Label-Policy like Loki with lbac.enabled (400 on a bad value)
    #: Answers by path suffix, in the shape the real backend gives there (the gateway parses some to filter them)
    shaped: tuple[tuple[str, bytes, str], ...] = ()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if self.lbac:
            try:
                extract(request.headers.getall("X-Prom-Label-Policy", []))
            except PolicyHeaderError as exc:
                return web.json_response({"status": "error", "error": str(exc)}, status=400)
        if request.headers.get("Upgrade", "").lower() == "websocket":
            return await self._ws(request)
        h = hashlib.sha256()
        n = 0
        small = bytearray()
        async for chunk in request.content.iter_chunked(1 << 16):
            h.update(chunk)
            n += len(chunk)
            if len(small) < 1 << 20:
                small += chunk
        self.seen.append(Seen(request.method, request.path, request.rel_url.raw_path,
                              list(request.rel_url.query.items()), CIMultiDict(request.headers), n, h.hexdigest(),
                              bytes(small), request.rel_url.raw_query_string))
        for suffix, body, ctype in self.shaped:
            if request.path.rstrip("/").endswith(suffix):
                return web.Response(status=self.status, body=body, headers={"Content-Type": ctype})
        return web.Response(status=self.status, body=self.reply, headers=self.reply_headers)

    async def _ws(self, request: web.Request) -> web.WebSocketResponse:
        self.seen.append(Seen("WS", request.path, request.rel_url.raw_path, list(request.rel_url.query.items()),
                              CIMultiDict(request.headers), 0, "", b"", request.rel_url.raw_query_string))
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        await ws.send_str('{"streams":[{"stream":{"app":"x"},"values":[["1","hello"]]}]}')
        async for msg in ws:
            if msg.type == WSMsgType.TEXT:
                self.ws_messages.append(msg.data)
                await ws.send_str(f"echo:{msg.data}")
        return ws

    def app(self) -> web.Application:
        app = web.Application(client_max_size=1 << 30)
        app.router.add_route("*", "/{tail:.*}", self.handle)
        return app

    @property
    def last(self) -> Seen:
        assert self.seen, "the upstream received nothing"
        return self.seen[-1]


async def start_recorder(aiohttp_server: Any) -> tuple[Recorder, str]:
    rec = Recorder()
    server = await aiohttp_server(rec.app())
    return rec, f"http://127.0.0.1:{server.port}"
