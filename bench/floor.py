"""Python's floor: the least a proxy on uvloop ``asyncio.Protocol`` + httptools can do per request.

No authentication, no routing, no logs, no metrics: the client's request head is re-sent with
``Authorization`` dropped and ``X-Scope-OrgID`` set, the body streamed as it arrives (same length), and
the upstream's answer passed through byte for byte, its end found by httptools. One keep-alive pool of
upstream connections per worker; reading pauses on either side while the other's buffer is full.
``python -m bench.floor --listen 127.0.0.1:8081 --upstream 127.0.0.1:8080 --workers 2``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from typing import Any

import httptools

_DROP = frozenset({b"authorization", b"x-scope-orgid", b"connection", b"keep-alive", b"host"})


class Upstream(asyncio.Protocol):
    """One keep-alive connection to the upstream, answering one client request at a time."""

    def __init__(self, pool: list[Upstream]) -> None:
        self.pool = pool
        self.tr: asyncio.Transport | None = None
        self.client: Client | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.done = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.tr = transport  # type: ignore[assignment]
        self.ready.set_result(None)

    def data_received(self, data: bytes) -> None:
        client = self.client
        if client is None or client.tr is None:
            return
        client.tr.write(data)  # the answer passes through as it came
        self.parser.feed_data(data)
        if self.done:
            self.done = False
            self.client = None
            self.pool.append(self)
            client.answered()

    def on_message_complete(self) -> None:
        self.done = True

    def pause_writing(self) -> None:
        if self.client is not None and self.client.tr is not None:
            self.client.tr.pause_reading()

    def resume_writing(self) -> None:
        if self.client is not None and self.client.tr is not None:
            self.client.tr.resume_reading()

    def connection_lost(self, exc: BaseException | None) -> None:
        if self in self.pool:
            self.pool.remove(self)
        if self.client is not None and self.client.tr is not None:
            self.client.tr.close()


class Client(asyncio.Protocol):
    def __init__(self, host: str, port: int, pool: list[Upstream]) -> None:
        self.host, self.port, self.pool = host, port, pool
        self.tr: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.url = b""
        self.head: list[bytes] = []
        self.up: Upstream | None = None
        self.pending: list[bytes] = []
        self.keep = True

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.tr = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            assert self.tr is not None
            self.tr.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            self.tr.close()

    def on_message_begin(self) -> None:
        self.url, self.head = b"", []

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() not in _DROP:
            self.head.append(name + b": " + value + b"\r\n")

    def on_headers_complete(self) -> None:
        p = self.parser
        self.keep = p.should_keep_alive()
        head = (p.get_method() + b" " + self.url + b" HTTP/1.1\r\nHost: %s:%d\r\nX-Scope-OrgID: 100\r\n"
                % (self.host.encode(), self.port) + b"".join(self.head) + b"\r\n")
        self._send(head)

    def on_body(self, body: bytes) -> None:
        self._send(body)

    def _send(self, data: bytes) -> None:
        up = self.up
        if up is None:
            self.pending.append(data)
            if len(self.pending) == 1:
                asyncio.get_running_loop().create_task(self._connect())
        elif up.tr is not None:
            up.tr.write(data)

    async def _connect(self) -> None:
        if self.pool:
            up = self.pool.pop()
        else:
            loop = asyncio.get_running_loop()
            _tr, up = await loop.create_connection(lambda: Upstream(self.pool), self.host, self.port)
        up.client = self
        self.up = up
        data, self.pending = b"".join(self.pending), []
        assert up.tr is not None
        up.tr.write(data)

    def answered(self) -> None:
        self.up = None
        if not self.keep and self.tr is not None:
            self.tr.close()

    def connection_lost(self, exc: BaseException | None) -> None:
        up, self.up = self.up, None
        if up is not None and up.tr is not None:
            up.tr.close()  # an answer cut short: never reuse its connection


async def serve(listen: tuple[str, int], upstream: tuple[str, int]) -> None:
    loop = asyncio.get_running_loop()
    pool: list[Upstream] = []
    server = await loop.create_server(lambda: Client(upstream[0], upstream[1], pool), *listen, reuse_port=True,
                                      backlog=1024)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    print(f"floor listening on {listen[0]}:{listen[1]} (pid {os.getpid()})", flush=True)
    await stop.wait()
    server.close()


def _hostport(v: str) -> tuple[str, int]:
    host, _, port = v.rpartition(":")
    return host, int(port)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.floor")
    ap.add_argument("--listen", type=_hostport, required=True)
    ap.add_argument("--upstream", type=_hostport, required=True)
    ap.add_argument("--workers", type=int, default=1)
    a = ap.parse_args(argv)
    import uvloop

    kids: list[int] = []
    for _ in range(a.workers):
        pid = os.fork()
        if pid == 0:
            uvloop.run(serve(a.listen, a.upstream))
            os._exit(0)
        kids.append(pid)

    def stop(*_: Any) -> None:
        for k in kids:
            os.kill(k, signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    for k in kids:
        os.waitpid(k, 0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
