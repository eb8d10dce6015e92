"""A lean, pooled HTTP/1.1 client for the proxy's hot path: every request to a plain-http upstream (bodiless,
a small in-memory body, or the client's body streamed).

aiohttp's ClientSession costs most of the CPU of a proxied query (request and response objects, tracing
hooks, timers, the connector); this client keeps only what forwarding needs, and reuses aiohttp's own
pieces where they matter for correctness:

- the response is parsed by aiohttp's C parser (llhttp) into aiohttp's ``StreamReader``, with the same
  lenient settings aiohttp's client uses, and no decompression (``Content-Encoding`` passes untouched);
- the request head is serialized by aiohttp's serializer, which refuses control characters (CR, LF, NUL)
  in the request line, names and values; names are also checked to be HTTP tokens;
- the request is what aiohttp would send: the target is yarl's ``raw_path_qs`` of the same URL, ``Host``
  from the URL, ``Accept: */*`` and ``Content-Type: application/octet-stream`` defaults, ``Content-Length``.

A response whose body is complete within ``small_body`` bytes is returned whole (``body``), and its
connection is back in the pool before the caller sees it. A larger one (by Content-Length, or a chunked or
close-delimited body that grows past the bound), or one still incomplete ``STREAM_AFTER`` seconds after its
headers, is returned as a stream (``chunks()``), read with flow control: the transport is paused while
``small_body`` bytes wait for the reader.

Connections are reused only after a fully read response that did not ask to close; any error, a
cancellation, or an unread body closes the connection. A pooled connection that fails before a single
response byte arrived is retried once on a fresh connection for idempotent methods (as aiohttp does).

Errors: ``TimeoutError`` subclasses for the connect and read timeouts (``read_timeout`` is the longest
silence of the upstream while a response is awaited or read); ``ConnectionError`` subclasses for the rest
(refused, reset, closed early, malformed response).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Callable
from typing import Any, Final

from aiohttp.base_protocol import BaseProtocol
from aiohttp.http_parser import HttpResponseParser
from aiohttp.http_writer import _serialize_headers
from aiohttp.streams import StreamReader
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

SMALL_BODY: Final = 256 * 1024
# A body still incomplete this long after its headers is handed over as a stream, so that an upstream that
# streams slowly (a chunked answer produced as it goes) is relayed as it comes, not when it ends.
STREAM_AFTER: Final = 0.05
KEEPALIVE: Final = 15.0  # seconds an idle connection stays pooled (aiohttp's default keepalive_timeout)
MAX_IDLE: Final = 256  # idle connections kept per upstream host
STREAM_IDLE_MAX: Final = 2.0  # a streamed body goes only on a connection idle for less than this (else a new one)
IDEMPOTENT: Final = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
_GET_METHODS: Final = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})  # no Content-Length: 0 without a body
_POST_METHODS: Final = frozenset({"POST", "PUT", "PATCH"})  # a default Content-Type, as aiohttp sends
_TOKEN: Final = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_checked_names: set[str] = set()
MAX_BLOCKS: Final = 1024
_blocks: dict[tuple[object, ...], bytes] = {}


class FastClientError(ConnectionError):
    """The upstream connection failed: refused, reset, closed early, or a response that does not parse."""


class ServerDisconnected(FastClientError):
    pass


class BadResponse(FastClientError):
    pass


class ConnectTimeout(TimeoutError):
    pass


class ReadTimeout(TimeoutError):
    pass


def _check_names(headers: CIMultiDict[str]) -> None:
    for name in headers:
        if name not in _checked_names:
            if not _TOKEN.fullmatch(name):
                raise ValueError(f"invalid header name {name!r}")
            if len(_checked_names) < 4096:
                _checked_names.add(name)


def request_head(method: str, url: URL, headers: CIMultiDict[str], body: bytes | None, streamed: bool = False
                 ) -> bytes:
    """The request line and headers, as aiohttp would send them (ValueError on anything injectable).

    The header block is kept per (method, host, body length, headers): a client sends the same headers
    request after request, and the gateway's own (tenant, forwarding chain) are the same per client and
    tenant, so most requests only format their request line.
    """
    key = (method, url.host_port_subcomponent, -2 if streamed else -1 if body is None else len(body),
           tuple(headers.items()))
    block = _blocks.get(key)
    line = f"{method} {url.raw_path_qs} HTTP/1.1"
    if block is not None:
        if "\r" in line or "\n" in line or "\x00" in line:
            raise ValueError(f"invalid request line {line!r}")
        return line.encode("utf-8") + block
    head = _request_head(method, url, headers, body, streamed)
    if len(_blocks) >= MAX_BLOCKS:
        _blocks.clear()
    _blocks[key] = head[head.index(b"\r\n"):]
    return head


def _request_head(method: str, url: URL, headers: CIMultiDict[str], body: bytes | None, streamed: bool) -> bytes:
    if not _TOKEN.fullmatch(method):
        raise ValueError(f"invalid method {method!r}")
    out: CIMultiDict[str] = CIMultiDict()
    host = headers.get("Host")
    out["Host"] = host if host is not None else (url.host_port_subcomponent or "")
    out.extend(headers)
    if host is not None:
        del out["Host"]
        out["Host"] = host
    lengths = out.popall("Content-Length", None)
    had_length = lengths is not None
    out.popall("Transfer-Encoding", None)
    if "Accept" not in out:
        out["Accept"] = "*/*"
    if streamed:  # the client's length when it sent one (aiohttp's client does the same), else chunked
        if lengths:
            out["Content-Length"] = lengths[-1]
        else:
            out["Transfer-Encoding"] = "chunked"
    elif body is not None:
        out["Content-Length"] = str(len(body))
    elif had_length or method not in _GET_METHODS:
        out["Content-Length"] = "0"
    if method in _POST_METHODS and "Content-Type" not in out:
        out["Content-Type"] = "application/octet-stream"
    _check_names(out)
    head: bytes = _serialize_headers(f"{method} {url.raw_path_qs} HTTP/1.1", out)
    return head


class _Conn(BaseProtocol):
    """One keep-alive connection; serves one request at a time."""

    def __init__(self, pool: _Pool) -> None:
        super().__init__(pool.loop)
        self.pool = pool
        self.read_timeout: float = pool.client.read_timeout or 0.0
        self.limit = max(pool.client.small_body // 2, 1)  # StreamReader pauses reading past 2 x limit
        self.body_parser: Any = None
        self.head_parser: Any = None
        self.closed = False
        self.busy = False
        self.broken = False  # do not reuse: extra bytes, a parse error after the response, ...
        self.got = 0  # response bytes received for the current request
        self.waiter: asyncio.Future[None] | None = None
        self.msg: Any = None
        self.payload: StreamReader | None = None
        self.want_stream = False
        self.headers_at = 0.0
        self.last_io = 0.0
        self.idle_since = 0.0
        self.timer: asyncio.TimerHandle | None = None
        self.grace: asyncio.TimerHandle | None = None
        # A reader of the raw response set by the caller after ``start`` (gateway.dataplane.exchange):
        # ``relay(data)`` returns None when it took the bytes, else all the response's bytes so far, which
        # this connection's own parser then reads as if they had just arrived.
        self.relay: Callable[[bytes], bytes | None] | None = None
        self.relayed: bool | None = None  # a relayed response ended: whether the connection may be reused
        self.relay_state: object = None  # kept for the relay's owner across responses
        # Called once when the upstream's write buffer has drained after ``send`` filled it (the callback
        # exchange pauses the client's reading meanwhile; ``drain`` is the awaiting callers' way).
        self.on_writable: Callable[[], None] | None = None

    def _new_parser(self, with_body: bool) -> Any:
        return HttpResponseParser(self, self._loop, self.limit, payload_exception=BadResponse,
                                  response_with_body=with_body, read_until_eof=True, auto_decompress=False)

    # ---- the request ----------------------------------------------------------------------------

    def start(self, data: bytes, head: bool, send: bool = True) -> asyncio.Future[None]:
        """Ready for a response and send ``data`` (the request head, maybe its body); ``send=False``: the
        caller sends it with ``send()`` (with the body's first piece)."""
        parser = self.head_parser if head else self.body_parser
        if parser is None:
            parser = self._new_parser(not head)
            if head:
                self.head_parser = parser
            else:
                self.body_parser = parser
        self._parser = parser
        tr = self.transport
        if self.closed or tr is None or tr.is_closing():
            raise ServerDisconnected("the upstream closed the connection")
        self.busy = True
        self.relay = self.relayed = None
        self.got = 0  # (msg and payload are None: a new connection, or one _Pool.release / relayed_done pooled)
        self.want_stream = False
        loop = self._loop
        self.waiter = waiter = loop.create_future()
        self.last_io = now = loop.time()
        if self.timer is None and self.read_timeout:
            self.timer = loop.call_at(now + self.read_timeout, self._on_timer)
        if send:
            try:
                tr.write(data)
            except Exception as exc:
                raise ServerDisconnected(f"cannot write to the upstream: {exc!r}") from exc
        return waiter

    def relayed_done(self, keep: bool) -> None:
        """The caller's relay read the response whole (``keep``: the upstream lets the connection be reused):
        back to the pool, or closed. ``_Pool.release`` with ``reusable``, written out for the end of most
        requests; the response's head came with the read that ended it (``last_io``: the loop's time)."""
        self.headers_at = self.idle_since = self.last_io
        self.busy = False
        self.waiter = None
        pool = self.pool
        tr = self.transport
        if (not keep or self.broken or self.closed or tr is None or tr.is_closing() or pool.client.closed
                or len(pool.idle) >= MAX_IDLE):
            self.close()
            return
        pool.idle.append(self)  # (msg and payload are None: this connection's parser read nothing)
        if pool.sweeper is None:
            pool.sweeper = pool.loop.call_later(KEEPALIVE, pool._sweep)

    def send(self, data: bytes) -> None:
        """More of a streamed request body."""
        tr = self.transport
        if self.closed or tr is None or tr.is_closing():
            raise ServerDisconnected("the upstream closed the connection while the request body was sent")
        self.last_io = self._loop.time()  # sending is activity: a long upload is not a silent upstream
        tr.write(data)

    async def drain(self) -> None:
        if self._paused:
            try:
                await self._drain_helper()
            except ConnectionError as exc:
                raise ServerDisconnected(f"upstream connection lost while sending: {exc!r}") from exc

    def _wake(self, exc: BaseException | None = None) -> None:
        if self.grace is not None:
            self.grace.cancel()
            self.grace = None
        waiter = self.waiter
        if waiter is not None:
            self.waiter = None
            if not waiter.done():
                if exc is None:
                    waiter.set_result(None)
                else:
                    waiter.set_exception(exc)

    def _fail(self, exc: BaseException) -> None:
        self.broken = True
        self._wake(exc)
        if self.payload is not None and not self.payload.is_eof():
            self.payload.set_exception(exc)
        self.close()

    def _on_timer(self) -> None:
        self.timer = None
        if not self.busy or self.closed:
            return
        now = self._loop.time()
        if self._reading_paused:  # the reader is slow, not the upstream
            self.last_io = now
        elif now - self.last_io >= self.read_timeout * 0.999:
            self._fail(ReadTimeout(f"no data from the upstream for {self.read_timeout} s"))
            return
        self.timer = self._loop.call_at(self.last_io + self.read_timeout, self._on_timer)

    @property
    def complete(self) -> bool:
        return self.payload is not None and self.payload.is_eof() and self.payload.exception() is None

    @property
    def reusable(self) -> bool:
        tr = self.transport
        if tr is None or tr.is_closing() or self.closed or self.broken:
            return False
        if self.relayed is not None:
            return self.relayed
        return self.msg is not None and not self.msg.should_close and self.complete

    # ---- asyncio.Protocol -----------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if not self.busy:
            # Bytes on an idle connection: the peer is confused or hostile; never reuse it.
            if data:
                self.broken = True
                self.close()
            return
        if data:
            self.got += len(data)
            self.last_io = self._loop.time()
        relay = self.relay
        if relay is not None:
            rest = relay(data)
            if rest is None:
                return
            self.relay, data = None, rest  # the relay gave up: read everything so far the usual way
        parser = self._parser
        if parser is None:
            return
        try:
            messages, upgraded, _tail = parser.feed_data(data)
        except Exception as exc:
            if self.complete:  # the response is whole; what follows it is not ours to answer for
                self.broken = True
                self.close()
            else:
                self._fail(BadResponse(f"malformed upstream response: {exc!r}"))
            return
        for msg, payload in messages:
            if self.msg is not None:  # a second response to one request
                self.broken = True
                continue
            if 100 <= msg.code < 200:
                if msg.code == 101 or upgraded:
                    self._fail(BadResponse("unexpected protocol switch from the upstream"))
                    return
                continue  # 100 Continue, 103 Early Hints: the final answer follows
            self.msg, self.payload = msg, payload
            self.headers_at = self._loop.time()
            if not payload.is_eof():
                length = msg.headers.get("Content-Length")
                if length is not None and length.isdigit() and int(length) > self.pool.client.small_body:
                    self.want_stream = True
                elif self.waiter is not None:
                    self.grace = self._loop.call_later(STREAM_AFTER, self._grace_over)
        current = self.payload
        if current is not None and current.exception() is not None:
            self._fail(BadResponse(f"malformed upstream response body: {current.exception()!r}"))
        elif self.waiter is not None and self.msg is not None and (self.want_stream or self.complete):
            self._wake()

    def resume_writing(self) -> None:
        super().resume_writing()
        cb = self.on_writable
        if cb is not None:
            self.on_writable = None
            cb()

    def pause_reading(self) -> None:
        super().pause_reading()
        # The body outgrew the buffer: hand it over as a stream (woken in data_received).
        self.want_stream = True

    def _grace_over(self) -> None:
        self.grace = None
        if self.waiter is not None and self.msg is not None:
            self.want_stream = True
            self._wake()

    def resume_reading(self, resume_parser: bool = True) -> None:
        # The StreamReader calls this after every read; only a paused transport (and parser) has work.
        if self._reading_paused:
            super().resume_reading(resume_parser)

    def eof_received(self) -> bool:
        return False  # close our side too; connection_lost finishes the response or fails it

    def _cancel_timers(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.grace is not None:
            self.grace.cancel()
            self.grace = None

    def connection_lost(self, exc: BaseException | None) -> None:
        self.closed = True
        self._cancel_timers()
        parser, self._parser = self._parser, None
        if self.busy:
            if self.msg is None:
                self._wake(ServerDisconnected(
                    "the upstream closed the connection before answering" if exc is None
                    else f"upstream connection lost: {exc!r}"))
            elif self.payload is not None and not self.payload.is_eof():
                try:
                    if parser is not None:
                        parser.feed_eof()  # a close-delimited body ends here; any other one is cut short
                except Exception as err:
                    self.payload.set_exception(ServerDisconnected(f"upstream response cut short: {err!r}"))
                if not self.payload.is_eof() and self.payload.exception() is None:
                    self.payload.set_exception(ServerDisconnected("upstream response cut short"))
                self._wake(self.payload.exception())
        self.pool.forget(self)
        super().connection_lost(exc)

    def close(self) -> None:
        self._cancel_timers()
        self.broken = True
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()
        self.pool.forget(self)


class FastResponse:
    """A response: ``body`` when it was small and is whole, else read it with ``chunks()``; always
    ``release()`` (a no-op once the body is read)."""

    __slots__ = ("status", "reason", "headers", "body", "content_length", "upstream_seconds", "_conn", "_payload")

    def __init__(self, conn: _Conn, started: float) -> None:
        msg = conn.msg
        self.status: int = msg.code
        self.reason: str = msg.reason
        self.headers: CIMultiDictProxy[str] = msg.headers
        self.upstream_seconds = conn.headers_at - started
        length = msg.headers.get("Content-Length")
        self.content_length: int | None = int(length) if length is not None and length.isdigit() else None
        self._payload: StreamReader | None = conn.payload
        self.body: bytes | None = None
        self._conn: _Conn | None = conn
        if conn.complete and self._payload is not None:
            self.body = self._payload.read_nowait(-1)
            self._finish()

    @property
    def streaming(self) -> bool:
        return self.body is None

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives (at most about ``small_body`` bytes held); errors are OSError/TimeoutError."""
        if self.body is not None:
            if self.body:
                yield self.body
            return
        payload = self._payload
        assert payload is not None
        while True:
            chunk = await payload.readany()
            if not chunk:
                break
            yield chunk
        self._finish()

    def _finish(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.pool.release(conn)

    def release(self) -> None:
        """Done with the response: an unread or broken body closes the connection."""
        conn, self._conn = self._conn, None
        if conn is not None:
            if conn.reusable:
                conn.pool.release(conn)
            else:
                conn.close()


class _Pool:
    """Keep-alive connections to one (host, port)."""

    def __init__(self, client: FastClient, host: str, port: int) -> None:
        self.client, self.host, self.port = client, host, port
        self.loop = asyncio.get_running_loop()
        self.idle: list[_Conn] = []
        self.conns: set[_Conn] = set()
        self.sweeper: asyncio.TimerHandle | None = None

    def acquire(self) -> _Conn | None:
        idle = self.idle
        while idle:
            conn = idle.pop()
            tr = conn.transport
            if conn.closed or tr is None or tr.is_closing() or conn.broken:
                conn.close()
                continue
            return conn
        return None

    async def connect(self) -> _Conn:
        timeout = self.client.connect_timeout
        try:
            async with asyncio.timeout(timeout or None):
                _tr, conn = await self.loop.create_connection(lambda: _Conn(self), self.host, self.port)
        except TimeoutError:
            raise ConnectTimeout(f"connecting to {self.host}:{self.port} took over {timeout} s") from None
        except OSError as exc:
            raise FastClientError(f"cannot connect to {self.host}:{self.port}: {exc!r}") from exc
        self.conns.add(conn)
        return conn

    def release(self, conn: _Conn) -> None:
        conn.busy = False
        conn.waiter = None
        if not conn.reusable or self.client.closed or len(self.idle) >= MAX_IDLE:
            conn.close()
            return
        conn.msg = conn.payload = None
        conn.idle_since = self.loop.time()
        self.idle.append(conn)
        if self.sweeper is None:
            self.sweeper = self.loop.call_later(KEEPALIVE, self._sweep)

    def forget(self, conn: _Conn) -> None:
        self.conns.discard(conn)
        if conn.busy:
            return
        try:
            self.idle.remove(conn)
        except ValueError:
            pass

    def _sweep(self) -> None:
        self.sweeper = None
        cutoff = self.loop.time() - KEEPALIVE
        for conn in [c for c in self.idle if c.idle_since <= cutoff]:
            conn.close()
        if self.idle:
            self.sweeper = self.loop.call_later(KEEPALIVE, self._sweep)

    def close(self) -> None:
        if self.sweeper is not None:
            self.sweeper.cancel()
            self.sweeper = None
        for conn in list(self.conns) + self.idle:
            conn.close()
        self.idle.clear()
        self.conns.clear()


class FastClient:
    """Pools per (host, port) of one upstream's plain-http connections, with its timeouts."""

    def __init__(self, connect_timeout: float | None, read_timeout: float | None, small_body: int = SMALL_BODY):
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.small_body = small_body
        self.closed = False
        self._pools: dict[tuple[str, int], _Pool] = {}

    @staticmethod
    def accepts(url: URL) -> bool:
        """Plain http with a host and no credentials in the URL (aiohttp turns those into Basic auth)."""
        return url.scheme == "http" and bool(url.raw_host) and url.raw_user is None and url.raw_password is None

    def idle(self, url: URL, streamed: bool = False) -> _Conn | None:
        """A pooled idle connection to ``url``'s host, taken out of the pool, or None (for callers that send
        a prepared head with ``_Conn.start`` and read ``FastResponse`` themselves, without awaiting).
        ``streamed``: for a streamed body, which cannot be sent twice: a connection idle for longer than
        ``STREAM_IDLE_MAX`` is closed and None returned, as ``request`` does before it connects anew."""
        if self.closed:
            return None
        pool = self._pools.get((url.raw_host or "", url.port or 0))
        if pool is None:
            return None
        idle = pool.idle
        while idle:  # (_Pool.acquire, inline: the callback exchange takes one per request)
            conn = idle.pop()
            tr = conn.transport
            if conn.closed or tr is None or tr.is_closing() or conn.broken:
                conn.close()
                continue
            if streamed and pool.loop.time() - conn.idle_since > STREAM_IDLE_MAX:
                conn.close()
                return None
            return conn
        return None

    async def request(self, method: str, url: URL, headers: CIMultiDict[str], body: bytes | None = None,
                      stream: AsyncIterator[bytes] | None = None) -> FastResponse:
        """Send one request; the answer comes back whole when small, else as a stream.

        ``stream`` sends the body as it comes, with the Content-Length in ``headers`` or else chunked,
        waiting while the upstream's socket buffer is full; it is never retried (it cannot be replayed),
        and an answer that arrives before the body is all sent stops the sending (the connection is
        then not reused). An error raised by ``stream`` passes through unchanged.

        Call ``accepts(url)`` first. Raises ValueError for an unsendable head, TimeoutError subclasses for
        timeouts and ConnectionError subclasses for everything else that goes wrong on the wire.
        """
        if self.closed:
            raise FastClientError("the client is closed")
        host, port = url.raw_host, url.port
        assert host is not None and port is not None
        pool = self._pools.get((host, port))
        if pool is None:
            pool = self._pools[(host, port)] = _Pool(self, host, port)
        head = request_head(method, url, headers, body, streamed=stream is not None)
        data = head + body if body else head
        is_head = method == "HEAD"
        if stream is not None:
            return await self._streamed(pool, data, is_head, stream, "Content-Length" not in headers)
        retry = method in IDEMPOTENT
        while True:
            conn = pool.acquire()
            reused = conn is not None
            if conn is None:
                conn = await pool.connect()
            started = pool.loop.time()
            try:
                await conn.start(data, is_head)
            except asyncio.CancelledError:
                conn.close()
                raise
            except FastClientError:
                conn.close()
                if retry and reused and conn.got == 0:
                    retry = False  # the peer had closed the idle connection: once more on a fresh one
                    continue
                raise
            except BaseException:
                conn.close()
                raise
            return FastResponse(conn, started)

    async def _streamed(self, pool: _Pool, head: bytes, is_head: bool, stream: AsyncIterator[bytes],
                        chunked: bool) -> FastResponse:
        conn = pool.acquire()
        if conn is not None and pool.loop.time() - conn.idle_since > STREAM_IDLE_MAX:
            # A body cannot be sent twice: do not bet it on a connection the upstream may be closing.
            conn.close()
            conn = None
        conn = conn or await pool.connect()
        started = pool.loop.time()
        waiter: asyncio.Future[None] | None = None
        # The head goes out with the body's first piece, in one write (one segment for a small body, as a
        # client sends it), or alone when the body is empty: a write and a segment fewer per request.
        pending = head
        try:
            waiter = conn.start(head, is_head, send=False)
            async for chunk in stream:
                if waiter.done():  # answered early (a refusal): stop sending; the connection is spent
                    conn.broken = True
                    break
                if not chunk:
                    continue
                data = b"%x\r\n%b\r\n" % (len(chunk), chunk) if chunked else chunk
                if pending:
                    data, pending = pending + data, b""
                conn.send(data)
                await conn.drain()
            else:
                end = pending + b"0\r\n\r\n" if chunked else pending
                if end:
                    conn.send(end)
            await waiter
        except BaseException:
            if waiter is not None:
                if waiter.done():
                    if not waiter.cancelled():
                        waiter.exception()  # retrieved: the error that matters is the one raised here
                else:
                    waiter.cancel()  # (no one awaits it now: the connection's loss must not set an error on it)
            conn.close()
            raise
        return FastResponse(conn, started)

    def shutdown(self) -> None:
        """Close every connection, pooled or in use; later requests fail."""
        self.closed = True
        for pool in self._pools.values():
            pool.close()
        self._pools.clear()

    async def close(self) -> None:
        self.shutdown()
