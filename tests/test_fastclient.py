"""The lean upstream client (gateway.proxy.fastclient) against real aiohttp servers and raw asyncio servers,
under both the default loop and uvloop; and forward() using it."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import os
import socket
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
import uvloop
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from gateway.config import Upstream
from gateway.proxy.fastclient import FastClient, FastResponse
from gateway.proxy.forward import _FAST, Upstreams, forward

# Both loops: the gateway runs on uvloop, the rest of the suite on asyncio's. (The event_loop_policy fixture is
# deprecated in pytest-asyncio in favour of a conftest hook; this module keeps to its own files.)
pytestmark = pytest.mark.filterwarnings("ignore:.*event_loop_policy.*:DeprecationWarning")

SMALL = b'{"status":"success","data":{"resultType":"vector","result":[]}}'


@pytest.fixture(scope="module", params=["asyncio", "uvloop"])
def event_loop_policy(request: pytest.FixtureRequest) -> asyncio.AbstractEventLoopPolicy:
    return uvloop.EventLoopPolicy() if request.param == "uvloop" else asyncio.DefaultEventLoopPolicy()


# ---- servers ------------------------------------------------------------------------------------


@dataclass
class Raw:
    """A raw asyncio server: ``handler(reader, writer)`` per connection; counts connections and hang-ups."""

    handler: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
    connections: int = 0
    closed: int = 0
    heads: list[bytes] = field(default_factory=list)
    gone: asyncio.Event = field(default_factory=asyncio.Event)
    server: asyncio.Server | None = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            await self.handler(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self.closed += 1
            self.gone.set()
            writer.close()

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"


@contextlib.asynccontextmanager
async def raw_server(handler: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
                     ) -> AsyncIterator[Raw]:
    raw = Raw(handler)
    raw.server = await asyncio.start_server(raw._serve, "127.0.0.1", 0)
    try:
        yield raw
    finally:
        raw.server.close()
        for w in list(getattr(raw.server, "_clients", ()) or ()):
            w.close()


async def read_request(reader: asyncio.StreamReader, raw: Raw | None = None) -> bytes:
    """One request head (and its Content-Length body, discarded); b"" at a clean EOF."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        if exc.partial:
            raise
        return b""
    if raw is not None:
        raw.heads.append(head)
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            await reader.readexactly(int(line.split(b":", 1)[1]))
    return head


def answering(*responses: bytes, then_close: bool = False) -> Callable[..., Awaitable[None]]:
    """A keep-alive server answering each request on a connection with the next of ``responses`` (cycling)."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        i = 0
        while await read_request(reader):
            writer.write(responses[i % len(responses)])
            await writer.drain()
            i += 1
            if then_close:
                return

    return handler


def ok(body: bytes = SMALL, extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n" + extra + \
        b"Content-Length: %d\r\n\r\n" % len(body) + body


def chunked(body: bytes, size: int = 7) -> bytes:
    parts = [b"%x\r\n%s\r\n" % (len(body[i:i + size]), body[i:i + size]) for i in range(0, len(body), size)]
    return b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + b"".join(parts) + b"0\r\n\r\n"


@contextlib.asynccontextmanager
async def aiohttp_app(routes: Callable[[web.Application], None]) -> AsyncIterator[tuple[str, list[int]]]:
    """A real aiohttp server; yields its URL and the list of peer ports seen (one per connection)."""
    ports: list[int] = []

    @web.middleware
    async def count(request: web.Request, handler: Any) -> web.StreamResponse:
        peer = request.transport.get_extra_info("peername")[1] if request.transport else 0
        if peer not in ports:
            ports.append(peer)
        return await handler(request)

    app = web.Application(middlewares=[count])
    routes(app)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}", ports
    finally:
        await runner.cleanup()


@pytest.fixture
async def fc() -> AsyncIterator[FastClient]:
    client = FastClient(2.0, 2.0)
    yield client
    await client.close()


async def get(client: FastClient, url: str, method: str = "GET", headers: dict[str, str] | None = None,
              body: bytes | None = None) -> FastResponse:
    return await client.request(method, URL(url), CIMultiDict(headers or {"X-Scope-OrgID": "1"}), body)


async def read_all(resp: FastResponse) -> bytes:
    try:
        return b"".join([c async for c in resp.chunks()])
    finally:
        resp.release()


def idle(client: FastClient) -> int:
    return sum(len(p.idle) for p in client._pools.values())


# ---- reuse and framing --------------------------------------------------------------------------


async def test_keep_alive_reuses_one_connection_against_aiohttp(fc: FastClient) -> None:
    async def h(r: web.Request) -> web.Response:
        return web.Response(body=SMALL, content_type="application/json")

    async with aiohttp_app(lambda app: app.router.add_get("/q", h)) as (url, ports):
        for _ in range(20):
            r = await get(fc, url + "/q?query=up")
            assert (r.status, r.body) == (200, SMALL)
            r.release()
        assert len(ports) == 1
        assert idle(fc) == 1


async def test_sequential_requests_in_parallel_tasks_use_separate_connections(fc: FastClient) -> None:
    async with raw_server(answering(ok())) as raw:
        rs = await asyncio.gather(*(get(fc, raw.url + "/q") for _ in range(5)))
        assert {r.body for r in rs} == {SMALL}
        assert raw.connections == 5
        for _ in range(10):
            assert (await get(fc, raw.url + "/q")).body == SMALL
        assert raw.connections == 5 and idle(fc) == 5


@pytest.mark.parametrize("kind", ["length", "chunked", "close"])
async def test_content_length_chunked_and_close_delimited_bodies(fc: FastClient, kind: str) -> None:
    body = os.urandom(3000)
    response = {"length": ok(body), "chunked": chunked(body),
                "close": b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n\r\n" + body}[kind]
    async with raw_server(answering(response, then_close=kind == "close")) as raw:
        for _ in range(3):
            r = await get(fc, raw.url + "/x")
            assert r.status == 200 and r.body == body
            r.release()
        # close-delimited: a connection per response; the others are reused
        assert raw.connections == (3 if kind == "close" else 1)


@pytest.mark.parametrize("response", [ok(b"ok", b"Connection: close\r\n"),
                                      b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok"])
async def test_connection_close_and_http_1_0_answers_are_not_reused(fc: FastClient, response: bytes) -> None:
    async with raw_server(answering(response)) as raw:
        # the server would answer again on the same connection; the client must not ask it to
        assert (await get(fc, raw.url + "/")).body == b"ok"
        assert (await get(fc, raw.url + "/")).body == b"ok"
        assert raw.connections == 2 and idle(fc) == 0


async def test_chunked_with_trailers_and_extensions(fc: FastClient) -> None:
    resp = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-T\r\n\r\n"
            b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-T: 1\r\n\r\n")
    async with raw_server(answering(resp)) as raw:
        for _ in range(2):
            assert (await get(fc, raw.url + "/")).body == b"hello world"
        assert raw.connections == 1


async def test_head_204_304_have_no_body_and_keep_the_connection(fc: FastClient) -> None:
    responses = {
        b"HEAD": b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\nContent-Type: text/plain\r\n\r\n",
        b"GET /204": b"HTTP/1.1 204 No Content\r\nX-A: 1\r\n\r\n",
        b"GET /304": b"HTTP/1.1 304 Not Modified\r\nETag: \"x\"\r\nContent-Length: 50\r\n\r\n",
        b"GET /ok": ok(b"after"),
    }

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while head := await read_request(reader):
            key = next(k for k in responses if head.startswith(k))
            writer.write(responses[key])

    async with raw_server(handler) as raw:
        r = await get(fc, raw.url + "/h", method="HEAD")
        assert (r.status, r.body, r.content_length) == (200, b"", 1000)
        assert (await get(fc, raw.url + "/ok")).body == b"after"
        r = await get(fc, raw.url + "/204")
        assert (r.status, r.body, r.headers["X-A"]) == (204, b"", "1")
        r = await get(fc, raw.url + "/304")
        assert (r.status, r.body) == (304, b"")
        assert (await get(fc, raw.url + "/ok")).body == b"after"
        assert raw.connections == 1


async def test_1xx_responses_are_skipped(fc: FastClient) -> None:
    resp = (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>; rel=preload\r\n\r\n"
            + ok(b"final", b"X-Final: yes\r\n"))
    async with raw_server(answering(resp)) as raw:
        for _ in range(2):
            r = await get(fc, raw.url + "/", method="POST", body=b"q=up")
            assert (r.status, r.body, r.headers["X-Final"]) == (200, b"final", "yes")
            assert "Link" not in r.headers
        assert raw.connections == 1


async def test_repeated_headers_keep_their_order(fc: FastClient) -> None:
    async def h(r: web.Request) -> web.Response:
        resp = web.Response(body=b"x")
        for v in ("a=1; Path=/", "b=2; Path=/", "a=3; Path=/x"):
            resp.headers.add("Set-Cookie", v)
        resp.headers.add("Vary", "Accept-Encoding")
        resp.headers.add("Vary", "Origin")
        return resp

    async with aiohttp_app(lambda app: app.router.add_get("/", h)) as (url, _):
        r = await get(fc, url + "/")
        assert r.headers.getall("Set-Cookie") == ["a=1; Path=/", "b=2; Path=/", "a=3; Path=/x"]
        assert r.headers.getall("Vary") == ["Accept-Encoding", "Origin"]


@pytest.mark.parametrize("size", [100, 400_000])
async def test_gzip_content_encoding_is_passed_through_byte_for_byte(fc: FastClient, size: int) -> None:
    payload = gzip.compress(os.urandom(size // 2).hex().encode()[:size])

    async def h(r: web.Request) -> web.Response:
        return web.Response(body=payload, headers={"Content-Encoding": "gzip", "Content-Type": "application/json"})

    async with aiohttp_app(lambda app: app.router.add_get("/", h)) as (url, _):
        r = await get(fc, url + "/", headers={"Accept-Encoding": "gzip"})
        assert r.headers["Content-Encoding"] == "gzip"
        assert await read_all(r) == payload


@pytest.mark.parametrize("kind", ["length", "chunked"])
async def test_a_5mb_response_is_streamed_not_buffered(fc: FastClient, kind: str) -> None:
    big = os.urandom(5 * 1024 * 1024)

    async def h(r: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        if kind == "length":
            resp.content_length = len(big)
        else:
            resp.enable_chunked_encoding()
        await resp.prepare(r)
        for i in range(0, len(big), 64 * 1024):
            await resp.write(big[i:i + 64 * 1024])
        await resp.write_eof()
        return resp

    async with aiohttp_app(lambda app: app.router.add_get("/", h)) as (url, ports):
        r = await get(fc, url + "/")
        assert r.streaming and r.body is None
        conn = r._conn
        assert conn is not None
        chunks, biggest, held = 0, 0, 0
        got = bytearray()
        async for chunk in r.chunks():
            chunks += 1
            biggest = max(biggest, len(chunk))
            assert conn.payload is not None
            held = max(held, conn.payload._size)
            got += chunk
            await asyncio.sleep(0.001)  # a slow reader: flow control must hold the upstream back
        r.release()
        assert bytes(got) == big
        assert chunks >= 10 and biggest <= 1024 * 1024 and held <= 1024 * 1024
        # the connection went back to the pool once the body was read
        again = await get(fc, url + "/")
        again.release()  # unread: closed, not pooled
        assert len(ports) == 1


async def test_a_slowly_streamed_small_body_is_relayed_as_it_comes(fc: FastClient) -> None:
    release = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await read_request(reader):
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n")
            await release.wait()
            writer.write(b"4\r\nlast\r\n0\r\n\r\n")
            release.clear()

    async with raw_server(handler) as raw:
        for _ in range(2):
            r = await asyncio.wait_for(get(fc, raw.url + "/"), 2)  # not held until the body ends
            assert r.streaming
            chunks = r.chunks()
            assert await anext(chunks) == b"first"
            release.set()
            assert b"".join([c async for c in chunks]) == b"last"
            r.release()
        assert raw.connections == 1 and idle(fc) == 1


async def test_an_unread_stream_closes_its_connection(fc: FastClient) -> None:
    big = b"x" * (1024 * 1024)
    async with raw_server(answering(ok(big))) as raw:
        r = await get(fc, raw.url + "/")
        assert r.streaming
        r.release()
        await asyncio.wait_for(raw.gone.wait(), 5)
        assert idle(fc) == 0
        assert (await get(fc, raw.url + "/")).streaming
        assert raw.connections == 2


# ---- failures -----------------------------------------------------------------------------------


async def test_server_closing_an_idle_pooled_connection(fc: FastClient) -> None:
    """The server closes after answering (keep-alive advertised): the next request opens a new one."""
    async with raw_server(answering(ok(), then_close=True)) as raw:
        assert (await get(fc, raw.url + "/")).body == SMALL
        await asyncio.wait_for(raw.gone.wait(), 5)
        await asyncio.sleep(0.05)
        assert (await get(fc, raw.url + "/")).body == SMALL
        assert raw.connections == 2


@pytest.mark.parametrize("method", ["GET", "HEAD", "DELETE"])
async def test_a_stale_connection_is_retried_once_for_idempotent_methods(fc: FastClient, method: str) -> None:
    """The race: the server drops the reused connection as the request arrives, before any response byte."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader, raw)
        writer.write(ok(b"first") if method != "HEAD" else b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n")
        await writer.drain()
        await read_request(reader, raw)  # the second request on this connection: hang up without a word

    async with raw_server(handler) as raw:
        assert (await get(fc, raw.url + "/", method=method)).status == 200
        r = await get(fc, raw.url + "/", method=method)
        assert r.status == 200
        assert raw.connections == 2 and len(raw.heads) == 3


async def test_a_stale_connection_is_not_retried_for_post(fc: FastClient) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader, raw)
        writer.write(ok())
        await writer.drain()
        await read_request(reader, raw)

    async with raw_server(handler) as raw:
        assert (await get(fc, raw.url + "/", method="POST", body=b"q=1")).status == 200
        with pytest.raises(ConnectionError):
            await get(fc, raw.url + "/", method="POST", body=b"q=1")
        assert raw.connections == 1 and len(raw.heads) == 2


async def test_a_fresh_connection_is_not_retried(fc: FastClient) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader, raw)

    async with raw_server(handler) as raw:
        with pytest.raises(ConnectionError):
            await get(fc, raw.url + "/")
        assert raw.connections == 1


@pytest.mark.parametrize("size", [1000, 2_000_000])
async def test_server_reset_mid_response(fc: FastClient, size: int) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size + b"x" * (size // 3))
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.transport.abort()  # RST

    async with raw_server(handler) as raw:
        with pytest.raises(ConnectionError):
            r = await get(fc, raw.url + "/")
            assert r.streaming
            await read_all(r)
        assert idle(fc) == 0
        assert all(not p.conns for p in fc._pools.values())
        assert raw.connections == 1


async def test_close_before_the_end_of_a_chunked_body_is_an_error(fc: FastClient) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        await writer.drain()

    async with raw_server(handler) as raw:
        with pytest.raises(ConnectionError):
            await get(fc, raw.url + "/")
        assert idle(fc) == 0 and raw.connections == 1


async def test_read_timeout_before_and_during_the_body() -> None:
    client = FastClient(2.0, 0.3)

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        assert await reader.read() == b""

    async def stalls(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2000000\r\n\r\n" + b"x" * 300_000)
        await writer.drain()
        assert await reader.read() == b""

    try:
        async with raw_server(silent) as raw:
            t = time.monotonic()
            with pytest.raises(TimeoutError):
                await get(client, raw.url + "/")
            assert 0.25 < time.monotonic() - t < 2
            await asyncio.wait_for(raw.gone.wait(), 5)  # the timed-out connection is closed
        async with raw_server(stalls) as raw:
            r = await get(client, raw.url + "/")
            assert r.streaming
            with pytest.raises(TimeoutError):
                await read_all(r)
            await asyncio.wait_for(raw.gone.wait(), 5)
        assert idle(client) == 0
    finally:
        await client.close()


async def test_a_slow_but_steady_upstream_does_not_time_out() -> None:
    client = FastClient(2.0, 0.3)

    async def trickle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await read_request(reader):
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            for _ in range(6):
                await asyncio.sleep(0.1)
                writer.write(b"1\r\nx\r\n")
            writer.write(b"0\r\n\r\n")

    try:
        async with raw_server(trickle) as raw:
            for _ in range(2):
                assert await read_all(await get(client, raw.url + "/")) == b"x" * 6
            assert raw.connections == 1
    finally:
        await client.close()


async def test_connect_refused_is_a_connection_error(fc: FastClient) -> None:
    with contextlib.closing(__import__("socket").socket()) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(ConnectionError):
        await get(fc, f"http://127.0.0.1:{port}/")


async def test_cancellation_mid_request_closes_the_connection(fc: FastClient) -> None:
    arrived = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await read_request(reader):
            arrived.set()
            if raw.connections == 1:
                assert await reader.read() == b""  # nothing more: the client hung up
                return
            writer.write(ok())

    async with raw_server(handler) as raw:
        task = asyncio.create_task(get(fc, raw.url + "/"))
        await asyncio.wait_for(arrived.wait(), 5)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.wait_for(raw.gone.wait(), 5)  # the server saw the disconnect
        assert idle(fc) == 0
        assert (await get(fc, raw.url + "/")).body == SMALL
        assert raw.connections == 2


async def test_cancellation_mid_stream_closes_the_connection(fc: FastClient) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5000000\r\n\r\n" + b"x" * 400_000)
        await writer.drain()
        assert await reader.read() == b""

    async with raw_server(handler) as raw:
        r = await get(fc, raw.url + "/")

        async def consume() -> None:
            try:
                async for _ in r.chunks():
                    pass
            finally:
                r.release()

        task = asyncio.create_task(consume())
        await asyncio.sleep(0.1)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await asyncio.wait_for(raw.gone.wait(), 5)
        assert idle(fc) == 0


@pytest.mark.parametrize("garbage", [
    b"garbage\r\n\r\n",
    b"HTTP/1.1 2000 OK\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: abc\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nBad Header\r\n\r\n",
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n",
])
async def test_malformed_responses_are_errors_without_hanging(fc: FastClient, garbage: bytes) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(garbage)
        await writer.drain()
        assert await reader.read() == b""  # keeps the connection open until the client closes it

    async with raw_server(handler) as raw:
        with pytest.raises(ConnectionError):
            await asyncio.wait_for(get(fc, raw.url + "/"), 1.5)
        await asyncio.wait_for(raw.gone.wait(), 5)
        assert idle(fc) == 0


async def test_bytes_after_the_response_make_the_connection_unusable(fc: FastClient) -> None:
    async with raw_server(answering(ok(b"one") + ok(b"two"))) as raw:
        assert (await get(fc, raw.url + "/")).body == b"one"
        assert (await get(fc, raw.url + "/")).body == b"one"
        assert raw.connections == 2


@pytest.mark.parametrize("headers", [
    {"X-A": "v\r\nX-Injected: 1"}, {"X-A": "v\nX-Injected: 1"}, {"X-A": "v\rX"}, {"X-A": "v\x00"},
    {"X-A\r\nX-Injected": "1"}, {"X-A: b": "1"}, {"X A": "1"}, {"": "1"},
])
async def test_no_header_injection(fc: FastClient, headers: dict[str, str]) -> None:
    async with raw_server(answering(ok())) as raw:
        with pytest.raises(ValueError):
            await get(fc, raw.url + "/", headers=headers)
        assert raw.heads == []
        with pytest.raises(ValueError):
            await get(fc, raw.url + "/", method="GET\r\nX: 1")
        # the target is percent-encoded by yarl, as aiohttp sends it
        assert (await get(fc, raw.url + "/a b\r\nX-Injected: 1?q=\r\n")).status == 200
        assert raw.connections == 1


# ---- what is sent ---------------------------------------------------------------------------------


async def test_requests_are_what_aiohttp_would_send() -> None:
    """Same URL, headers and body through the gateway's aiohttp session and the lean client: same bytes."""
    heads: list[bytes] = []
    bodies: list[bytes] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError:
                return
            heads.append(head)
            n = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length:")), 0)
            bodies.append(await reader.readexactly(n))
            writer.write(ok() if not head.startswith(b"HEAD") else ok().split(b"\r\n\r\n")[0] + b"\r\n\r\n")

    cases: list[tuple[str, str, dict[str, str], bytes | None]] = [
        ("GET", "/prometheus/api/v1/query?query=up", {"X-Scope-OrgID": "100", "X-Forwarded-For": "1.2.3.4"}, None),
        ("GET", "/api/v1/query?query=sum(rate(x%7Ba=%22b%20c%22%7D[5m]))&x=%7e%2F|^&y=a b#frag", {}, None),
        ("GET", "/p%2fq/%7E/r?", {"Accept": "application/json", "Content-Length": "0"}, None),
        ("HEAD", "/x", {"User-Agent": "grafana"}, None),
        ("DELETE", "/loki/api/v1/delete?query=%7Ba%3D%22b%22%7D&start=1", {}, None),
        ("POST", "/api/v1/query", {"Content-Type": "application/x-www-form-urlencoded"}, b"query=up&time=1"),
        ("POST", "/api/v1/read", {}, b"\x00\x01binary"),
        ("POST", "/api/v1/rules", {"Content-Length": "3"}, b"abc"),
        ("POST", "/empty", {}, None),
        ("PUT", "/x", {"Content-Type": "text/plain"}, b""),
        ("OPTIONS", "/x", {"Accept": "*/*"}, None),
    ]
    async with raw_server(handler) as raw:
        up = Upstreams()
        session = up.session(Upstream(signal="metrics", urls={"read": raw.url}))
        fast = _FAST[session]
        try:
            for method, path, hdrs, body in cases:
                heads.clear()
                bodies.clear()
                async with session.request(method, raw.url + path, headers=CIMultiDict(hdrs), data=body,
                                           allow_redirects=False, compress=None) as r:
                    await r.read()
                (await fast.request(method, URL(raw.url + path), CIMultiDict(hdrs), body)).release()
                assert len(heads) == 2, (method, path)
                a_line, *a_headers = heads[0].decode().split("\r\n")
                f_line, *f_headers = heads[1].decode().split("\r\n")
                assert a_line == f_line
                assert sorted(h.lower() for h in a_headers) == sorted(h.lower() for h in f_headers), (method, path)
                assert bodies[0] == bodies[1] == (body or b"")
        finally:
            await up.close()


# ---- forward() on the lean client -----------------------------------------------------------------


@contextlib.asynccontextmanager
async def gateway_like(upstream_url: str, read_timeout: float = 5.0) -> AsyncIterator[tuple[Any, Upstreams]]:
    """A tiny app whose handler forwards everything with forward(), as the proxy handler does."""
    ups = Upstreams()
    upstream = Upstream(signal="metrics", urls={"read": upstream_url}, read_timeout=read_timeout)

    async def handler(request: web.Request) -> web.StreamResponse:
        from gateway.proxy.errors import ProxyError, error_response
        from gateway.proxy.headers import upstream_headers
        headers = upstream_headers(request.headers, "100", request.remote or "unknown")
        url = upstream_url + request.rel_url.raw_path + (f"?{request.rel_url.raw_query_string}"
                                                         if request.rel_url.raw_query_string else "")
        try:
            resp, _outcome = await forward(request, ups.session(upstream), url, headers, None, 64 << 20)
        except ProxyError as exc:
            return error_response(exc.status, exc.message)
        return resp

    app = web.Application(handler_args={"auto_decompress": False, "handler_cancellation": True},
                          client_max_size=1 << 30)
    app.router.add_route("*", "/{tail:.*}", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        async with aiohttp.ClientSession(base_url=f"http://127.0.0.1:{port}", auto_decompress=False) as client:
            yield client, ups
    finally:
        await ups.close()
        await runner.cleanup()


async def test_forward_uses_the_lean_client_and_passes_everything_through() -> None:
    big = os.urandom(3 * 1024 * 1024)
    zipped = gzip.compress(b"x" * 5000)

    async def small(r: web.Request) -> web.Response:
        resp = web.Response(body=zipped, headers={"Content-Encoding": "gzip", "X-Q": r.query_string})
        resp.headers.add("Set-Cookie", "a=1")
        resp.headers.add("Set-Cookie", "b=2")
        return resp

    async def large(r: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        resp.enable_chunked_encoding()
        await resp.prepare(r)
        for i in range(0, len(big), 100_000):
            await resp.write(big[i:i + 100_000])
        await resp.write_eof()
        return resp

    async def echo(r: web.Request) -> web.Response:
        return web.Response(body=await r.read())

    def routes(app: web.Application) -> None:
        app.router.add_get("/small", small)
        app.router.add_get("/large", large)
        app.router.add_post("/echo", echo)

    async with aiohttp_app(routes) as (url, ports), gateway_like(url) as (client, ups):
        for _ in range(3):
            async with client.get("/small?query=up") as r:
                assert r.status == 200 and await r.read() == zipped
                assert r.headers["Content-Encoding"] == "gzip" and r.headers["X-Q"] == "query=up"
                assert r.headers.getall("Set-Cookie") == ["a=1", "b=2"]
            async with client.head("/small") as r:
                assert r.status == 200 and r.headers["Content-Length"] == str(len(zipped))
            async with client.get("/large") as r:
                assert r.status == 200 and await r.read() == big
        assert len(ports) == 1  # all of it on one pooled lean connection
        (fast,) = _FAST.values()
        assert idle(fast) == 1
        # a streamed request body goes on the same pooled lean connection, and it stays reusable
        async with client.post("/echo", data=b"y" * 100_000) as r:
            assert await r.read() == b"y" * 100_000
        assert len(ports) == 1 and idle(fast) == 1
    assert not _FAST  # Upstreams.close() closed the lean pools too


async def test_forward_maps_errors_and_close_drops_pooled_connections() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while head := await read_request(reader):
            if b"/slow" in head:
                assert await reader.read() == b""
                return
            writer.write(ok())

    async with raw_server(handler) as raw:
        async with gateway_like(raw.url, read_timeout=0.3) as (client, _ups):
            async with client.get("/fast") as r:
                assert r.status == 200 and await r.read() == SMALL
            async with client.get("/slow") as r:
                assert r.status == 504  # on the pooled connection, which is then dropped
            await asyncio.wait_for(raw.gone.wait(), 5)
            raw.gone.clear()
            async with client.get("/fast") as r:
                assert r.status == 200 and await r.read() == SMALL
            assert (raw.connections, raw.closed) == (2, 1)
        await asyncio.wait_for(raw.gone.wait(), 5)
        assert raw.closed == 2  # Upstreams.close() closed the idle pooled connection
    with contextlib.closing(__import__("socket").socket()) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    async with gateway_like(f"http://127.0.0.1:{port}") as (client, _ups):
        async with client.get("/x") as r:
            assert r.status == 502


async def _gen(parts: list[bytes], gate: asyncio.Event | None = None) -> AsyncIterator[bytes]:
    for i, p in enumerate(parts):
        if gate is not None and i == 1:
            await gate.wait()
        yield p


@pytest.mark.parametrize("with_length", [True, False])
async def test_a_streamed_request_body_arrives_whole_with_its_length_or_chunked(fc: FastClient,
                                                                               with_length: bool) -> None:
    import hashlib

    body = os.urandom(900_000)  # under aiohttp's client_max_size
    seen: list[tuple[str | None, str | None]] = []

    async def h(r: web.Request) -> web.Response:
        seen.append((r.headers.get("Content-Length"), r.headers.get("Transfer-Encoding")))
        return web.Response(text=hashlib.sha256(await r.read()).hexdigest())

    async with aiohttp_app(lambda app: app.router.add_post("/push", h)) as (url, ports):
        for _ in range(2):
            headers = CIMultiDict({"Content-Length": str(len(body))} if with_length else {})
            parts = [body[i:i + 100_000] for i in range(0, len(body), 100_000)]
            r = await fc.request("POST", URL(url + "/push"), headers, stream=_gen(parts))
            assert (r.status, r.body) == (200, hashlib.sha256(body).hexdigest().encode())
            r.release()
        assert seen == [(str(len(body)), None)] * 2 if with_length else [(None, "chunked")] * 2
        assert len(ports) == 1 and idle(fc) == 1  # reused after a whole exchange


async def test_an_early_answer_stops_a_streamed_body_and_the_connection_is_not_reused(fc: FastClient) -> None:
    got = bytearray()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")  # answers on the head, before the body
        writer.write(b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 2\r\n\r\nno")
        await writer.drain()
        with contextlib.suppress(OSError):
            got.extend(await reader.read())

    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    gate = asyncio.Event()
    try:
        task = asyncio.ensure_future(fc.request("POST", URL(f"http://127.0.0.1:{port}/push"),
                                                CIMultiDict({"Content-Length": "20"}),
                                                stream=_gen([b"x" * 10, b"y" * 10], gate)))
        await asyncio.sleep(0.2)
        gate.set()  # the second piece comes after the answer: it is not sent
        r = await asyncio.wait_for(task, 5)
        assert (r.status, r.body) == (413, b"no")
        r.release()
        assert idle(fc) == 0
        for _ in range(50):  # the connection closes; the second piece never went out
            if b"x" * 10 in got:
                break
            await asyncio.sleep(0.02)
        assert bytes(got) == b"x" * 10
    finally:
        server.close()


def _data_segments_in(sock: socket.socket) -> int:
    """tcpi_data_segs_in of struct tcp_info (Linux >= 4.6): segments with data this socket received."""
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
    return int(struct.unpack_from("I", info, 152)[0])


async def test_a_streamed_body_goes_out_with_its_head_in_one_segment(fc: FastClient) -> None:
    """The head waits for the body's first piece: one write, one segment for a small body (issue 25:
    the floor's and a client's count), two when the body comes in two pieces a moment apart."""
    segments: list[int] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        while True:
            before = _data_segments_in(sock)
            if not await read_request(reader):
                break
            segments.append(_data_segments_in(sock) - before)
            writer.write(ok())
            await writer.drain()

    async with raw_server(handler) as raw:
        body = b"b" * 5000
        r = await fc.request("POST", URL(raw.url + "/push"), CIMultiDict({"Content-Length": "5000"}),
                             stream=_gen([body]))
        assert (r.status, r.body) == (200, SMALL)
        r.release()
        gate = asyncio.Event()
        asyncio.get_running_loop().call_later(0.1, gate.set)
        r = await fc.request("POST", URL(raw.url + "/push"), CIMultiDict({"Content-Length": "5000"}),
                             stream=_gen([body[:2500], body[2500:]], gate))
        assert (r.status, r.body) == (200, SMALL)
        r.release()
    assert segments == [1, 2]
