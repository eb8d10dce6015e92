"""Forward one request upstream and stream the answer back; WebSocket relay for Loki tail."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from gateway.config import Upstream
from gateway.errors import ProxyError, body_too_large, check_body_length
from gateway.proxy.fastclient import FastClient, FastResponse
from gateway.proxy.headers import response_headers

log = logging.getLogger("gateway.proxy")
CHUNK = 256 * 1024
SMALL_BODY = 256 * 1024


# The lean client that serves a session's requests to http upstreams (streamed request bodies included);
# WebSocket and https stay on the aiohttp session.
_FAST: dict[aiohttp.ClientSession, FastClient] = {}


def describe(exc: BaseException) -> str:
    """A short, address-free reason for the client (the log line has the details)."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ConnectionRefusedError):
            return "connection refused"
        if isinstance(seen, ConnectionResetError):
            return "connection reset"
        if isinstance(seen, TimeoutError):
            return "no answer in time"
        if isinstance(seen, OSError) and seen.errno is not None:
            return os.strerror(seen.errno).lower()
        seen = seen.__cause__ or seen.__context__ or getattr(seen, "os_error", None)
    return "connection failed or closed early"


class Upstreams:
    """One pooled client session per upstream base URL, created on first use, with its lean client."""

    def __init__(self) -> None:
        self._sessions: dict[tuple[str, float, float], aiohttp.ClientSession] = {}

    def session(self, upstream: Upstream) -> aiohttp.ClientSession:
        key = (upstream.signal, upstream.connect_timeout, upstream.read_timeout)
        s = self._sessions.get(key)
        if s is None or s.closed:
            timeout = aiohttp.ClientTimeout(total=None, sock_connect=upstream.connect_timeout,
                                            sock_read=upstream.read_timeout)
            s = aiohttp.ClientSession(
                timeout=timeout, auto_decompress=False, skip_auto_headers=("Accept-Encoding", "User-Agent"),
                connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=60, enable_cleanup_closed=True),
                cookie_jar=aiohttp.DummyCookieJar())
            old = self._sessions.get(key)
            if old is not None and (old_fast := _FAST.pop(old, None)) is not None:
                old_fast.shutdown()
            self._sessions[key] = s
            _FAST[s] = FastClient(upstream.connect_timeout, upstream.read_timeout, SMALL_BODY)
        return s

    async def close(self) -> None:
        for s in self._sessions.values():
            fast = _FAST.pop(s, None)
            if fast is not None:
                await fast.close()
            await s.close()
        self._sessions.clear()


@dataclass(slots=True)
class Outcome:
    status: int
    bytes_out: int
    upstream_seconds: float


class _LimitedBody:
    """Stream the request body, refusing it past ``limit`` bytes (chunked bodies have no length).

    The client library wraps errors raised by a body generator, so the verdict is kept here too.
    """

    def __init__(self, stream: aiohttp.StreamReader, limit: int):
        self.stream, self.limit, self.exceeded = stream, limit, False

    async def chunks(self) -> AsyncIterator[bytes]:
        seen = 0
        async for chunk in self.stream.iter_chunked(CHUNK):
            seen += len(chunk)
            if seen > self.limit:
                self.exceeded = True
            check_body_length(seen, self.limit)
            yield chunk


def _failure(exc: BaseException) -> ProxyError:
    """An upstream that could not be reached or answered in time: 504 for timeouts, 502 otherwise."""
    if isinstance(exc, TimeoutError):  # aiohttp's timeouts derive from it
        return ProxyError(504, f"upstream timed out: {describe(exc)}", "upstream_timeout")
    return ProxyError(502, f"upstream unavailable: {describe(exc)}", "upstream_unavailable")


async def _start(request: web.Request, resp: web.StreamResponse) -> Any:
    """Send the head of a streamed answer; the returned object takes ``write`` and ``write_eof``."""
    start = getattr(request, "start_stream", None)  # the protocol data path's request (gateway.dataplane)
    if start is not None:
        return await start(resp)
    await resp.prepare(request)
    return resp


async def _stream(request: web.Request, resp: web.StreamResponse, chunks: AsyncIterator[bytes]) -> int:
    """Send the headers, then the body chunk by chunk; returns the bytes sent."""
    out = await _start(request, resp)
    sent = 0
    try:
        async for chunk in chunks:
            await out.write(chunk)
            sent += len(chunk)
        await out.write_eof()
    except (TimeoutError, aiohttp.ClientError, OSError) as exc:
        # Headers are out: all we can do is cut the connection so the client sees a broken body.
        log.warning("upstream response broke after %d bytes: %s", sent, exc.__class__.__name__)
        if request.transport is not None:
            request.transport.close()
    return sent


async def forward(request: web.Request, session: aiohttp.ClientSession, url: str, headers: CIMultiDict[str],
                  body: bytes | None, body_limit: int) -> tuple[web.StreamResponse, Outcome]:
    """Send upstream; stream the response. ``body`` replaces the client's body when not None."""
    fast = _FAST.get(session)
    limited = _LimitedBody(request.content, body_limit)
    if fast is not None:
        try:
            parsed: URL | None = URL(url)
        except ValueError:  # aiohttp reports it (502)
            parsed = None
        if parsed is not None and fast.accepts(parsed):
            stream = limited.chunks() if body is None and request.body_exists else None
            return await _forward_fast(request, fast, parsed, headers, body, stream)
    data: bytes | AsyncIterator[bytes] | None = body
    if body is None and request.body_exists:
        data = limited.chunks()
    loop = asyncio.get_running_loop()
    started = loop.time()
    try:
        up = await session.request(request.method, url, headers=headers, data=data, allow_redirects=False,
                                   compress=None)
    except ProxyError:
        raise
    except (TimeoutError, aiohttp.ClientError, OSError) as exc:
        if limited.exceeded:
            raise body_too_large(body_limit) from None
        raise _failure(exc) from None
    upstream_seconds = loop.time() - started
    try:
        if up.content_length is not None and up.content_length <= SMALL_BODY and request.method != "HEAD":
            # Most query answers are small: one write for headers and body instead of three.
            try:
                data = await up.read()
            except (TimeoutError, aiohttp.ClientError, OSError) as exc:
                raise ProxyError(502, f"upstream response broke: {describe(exc)}",
                                 "upstream_unavailable") from None
            small = web.Response(status=up.status, reason=up.reason, headers=response_headers(up.headers),
                                 body=data)
            return small, Outcome(up.status, len(data), upstream_seconds)
        resp = web.StreamResponse(status=up.status, reason=up.reason, headers=response_headers(up.headers))
        if up.content_length is not None:
            resp.content_length = up.content_length
        sent = await _stream(request, resp, up.content.iter_chunked(CHUNK))
        return resp, Outcome(up.status, sent, upstream_seconds)
    finally:
        up.release()


async def _forward_fast(request: web.Request, fast: FastClient, url: URL, headers: CIMultiDict[str],
                        body: bytes | None, stream: AsyncIterator[bytes] | None = None
                        ) -> tuple[web.StreamResponse, Outcome]:
    """``forward`` through the lean client (plain http): ``body``, or the client's body streamed."""
    try:
        up: FastResponse = await fast.request(request.method, url, headers, body, stream)
    except OSError as exc:  # TimeoutError is one
        raise _failure(exc) from None
    return await answer_fast(request, up)


def whole_body(up: FastResponse, method: str) -> bytes | None:
    """What the protocol data path writes with the head in one write (``DataRequest.respond``), or None to
    stream the answer: nothing for a 204 or 304 (a push's answer), the small whole body otherwise, but
    never for HEAD (its head announces the length of a body it does not carry)."""
    if up.body is None:
        return None
    if up.status in (204, 304):
        return b""
    return None if method == "HEAD" else up.body


async def answer_fast(request: web.Request, up: FastResponse) -> tuple[web.StreamResponse, Outcome]:
    """The client's answer from the lean client's response: whole when small, else streamed."""
    try:
        status = up.status
        body = whole_body(up, request.method)
        if body is not None:
            respond = getattr(request, "respond", None)  # the protocol data path writes it without a Response
            if respond is not None:
                return respond(status, up.reason, up.headers, body), Outcome(status, len(body),
                                                                             up.upstream_seconds)
            if status != 204 and status != 304:  # (aiohttp's Response: whole and small, one write)
                small = web.Response(status=status, reason=up.reason, headers=response_headers(up.headers),
                                     body=body)
                return small, Outcome(status, len(body), up.upstream_seconds)
        resp = web.StreamResponse(status=status, reason=up.reason, headers=response_headers(up.headers))
        if up.content_length is not None:
            resp.content_length = up.content_length
        sent = await _stream(request, resp, up.chunks())
        return resp, Outcome(status, sent, up.upstream_seconds)
    finally:
        up.release()


async def relay_websocket(request: web.Request, session: aiohttp.ClientSession, url: str,
                          headers: CIMultiDict[str]) -> tuple[web.WebSocketResponse, Outcome]:
    """Loki tail: connect upstream first (so refusals surface as HTTP errors), then pump both ways."""
    return await relay_websockets(request, session, [url], headers, _unfiltered)


def _unfiltered(text: str) -> str | None:
    return text


async def relay_websockets(request: web.Request, session: aiohttp.ClientSession, urls: list[str],
                           headers: CIMultiDict[str], text_filter: Callable[[str], str | None]
                           ) -> tuple[web.WebSocketResponse, Outcome]:
    """Loki tail under several label policies: one upstream socket per selector, frames merged onto the
    client's socket (text frames through ``text_filter``; the legs are disjoint, so none is dropped as a repeat),
    all closed together."""
    for h in ("Sec-WebSocket-Key", "Sec-WebSocket-Version", "Sec-WebSocket-Extensions", "Content-Length"):
        headers.popall(h, None)
    ups: list[aiohttp.ClientWebSocketResponse] = []
    try:
        for url in urls:
            ws_url = "ws" + url[4:] if url.startswith("http") else url
            ups.append(await session.ws_connect(ws_url, headers=headers, autoclose=True, autoping=True,
                                                heartbeat=30))
    except BaseException as exc:
        for up in ups:
            await up.close()
        if isinstance(exc, aiohttp.WSServerHandshakeError):
            raise ProxyError(exc.status if 400 <= exc.status < 600 else 502,
                             f"upstream refused the tail: {exc.message}", "upstream_refused") from None
        if isinstance(exc, aiohttp.ClientConnectionError | OSError | TimeoutError):
            raise _failure(exc) from None
        raise
    client = web.WebSocketResponse(autoping=True, heartbeat=30)
    await client.prepare(request)
    sent = 0
    lock = asyncio.Lock()

    async def down(up: aiohttp.ClientWebSocketResponse) -> None:
        nonlocal sent
        async for msg in up:
            if msg.type == aiohttp.WSMsgType.TEXT:
                text = text_filter(msg.data)
                if text is not None:
                    async with lock:
                        sent += len(text)
                        await client.send_str(text)
            elif msg.type == aiohttp.WSMsgType.BINARY:
                async with lock:
                    sent += len(msg.data)
                    await client.send_bytes(msg.data)
            else:
                break

    async def upward() -> None:
        async for msg in client:
            if msg.type == aiohttp.WSMsgType.TEXT:
                for up in ups:
                    await up.send_str(msg.data)
            elif msg.type == aiohttp.WSMsgType.BINARY:
                for up in ups:
                    await up.send_bytes(msg.data)
            else:
                break

    tasks = [asyncio.create_task(down(up)) for up in ups] + [asyncio.create_task(upward())]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        for up in ups:
            await up.close()
        await client.close()
    return client, Outcome(101, sent, 0.0)
