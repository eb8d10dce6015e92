"""The request the data-path handler reads, and the writers of its answer.

``DataRequest`` carries exactly the attributes ``gateway.proxy.handler`` and ``gateway.proxy.forward``
read from an aiohttp request (``method``, ``headers``, ``rel_url.raw_path``/``raw_query_string``,
``content``, ``body_exists``, ``content_length``, ``remote``, ``app``, ``transport``), so the one decision
pipeline serves both servers. A streamed answer goes through ``start_stream``, which ``forward`` calls in
place of aiohttp's ``StreamResponse.prepare``.
"""

from __future__ import annotations

import asyncio
import time
from email.utils import formatdate
from http import HTTPStatus
from typing import TYPE_CHECKING, Any, Final

from aiohttp import web
from aiohttp.http_writer import _serialize_headers
from multidict import CIMultiDict, CIMultiDictProxy, MultiDictProxy
from yarl import URL

from gateway.dataplane.body import Body
from gateway.proxy.headers import response_headers

if TYPE_CHECKING:
    from gateway.dataplane.server import HttpProtocol
    from gateway.routes import RouteMatch

_NO_BODY_STATUS: Final = frozenset({204, 304})
_FRAMING: Final = ("Content-Length", "Transfer-Encoding", "Connection", "Keep-Alive")
_date_cache: list[Any] = [0, ""]
MAX_CACHED_HEADS: Final = 256
_heads: dict[tuple[Any, ...], bytes] = {}
WRITTEN: Final = web.StreamResponse()  # what the handler returns for an answer already written


def http_date() -> str:
    """The Date header, formatted once per second."""
    now = int(time.time())
    if _date_cache[0] != now:
        _date_cache[0], _date_cache[1] = now, formatdate(now, usegmt=True)
    return str(_date_cache[1])


class RelURL:
    __slots__ = ("raw_path", "raw_query_string")

    def __init__(self, raw_path: str, raw_query_string: str):
        self.raw_path, self.raw_query_string = raw_path, raw_query_string


class DataRequest:
    """One parsed request on a protocol connection (see the module docstring).

    Made for every request, so it sets only what differs between requests: what its connection fixes is
    read through it (``remote``, ``app``, ``transport``), and the rest starts from the class's defaults
    (no ``__slots__``, for that)."""

    body_exists = False  # set when the parser has said (HttpProtocol._decide)
    expect_continue = False
    started = False  # the status line is out
    finished = False  # the whole answer is out

    def __init__(self, proto: HttpProtocol, method: str, headers: CIMultiDictProxy[str], rel_url: RelURL,
                 content: Body, content_length: int | None, version: tuple[int, int], keep_alive: bool,
                 route: RouteMatch | None, memo: dict[object, object]):
        self._proto = proto
        self.method, self.headers, self.rel_url, self.content = method, headers, rel_url, content
        self.content_length, self.version, self.keep_alive = content_length, version, keep_alive
        self.route = route  # the route the server matched (the handler matches again)
        # what gateway.proxy.fastpath derived from these same headers (the connection's, per header set)
        self.memo = memo

    @property
    def remote(self) -> str | None:
        return self._proto.remote

    @property
    def app(self) -> web.Application:
        return self._proto.plane.app

    @property
    def transport(self) -> asyncio.Transport | None:
        return self._proto.transport

    # ---- more of aiohttp's request, for code on the data path that reads it ---------------------------

    @property
    def path(self) -> str:
        return str(URL.build(path=self.rel_url.raw_path, encoded=True).path)

    @property
    def raw_path(self) -> str:
        return self.rel_url.raw_path

    @property
    def query_string(self) -> str:
        return self.rel_url.raw_query_string

    @property
    def query(self) -> MultiDictProxy[str]:
        return URL.build(path="/", query_string=self.rel_url.raw_query_string, encoded=True).query

    @property
    def host(self) -> str:
        return self.headers.get("Host") or "localhost"

    @property
    def scheme(self) -> str:
        return "http"

    @property
    def secure(self) -> bool:
        return False

    @property
    def can_read_body(self) -> bool:
        return not self.content.at_eof()

    async def read(self) -> bytes:
        return await self.content.read()

    async def text(self) -> str:
        return (await self.read()).decode("utf-8")

    # ---- answers ------------------------------------------------------------------------------------

    def _head(self, status: int, reason: str | None, headers: CIMultiDict[str] | CIMultiDictProxy[str],
              length: int | None, has_body: bool, copy: bool = True) -> tuple[bytes, bool]:
        """The status line and headers; returns them and whether the body is sent chunked."""
        out: CIMultiDict[str] = CIMultiDict(headers) if copy or not isinstance(headers, CIMultiDict) else headers
        for name in _FRAMING:
            out.popall(name, None)
        if "Date" not in out:
            out["Date"] = http_date()
        chunked = False
        if status in _NO_BODY_STATUS or 100 <= status < 200:
            pass
        elif length is not None:
            out["Content-Length"] = str(length)
        elif not has_body:
            pass  # HEAD of an answer of unknown length
        elif self.version >= (1, 1):
            chunked = True
            out["Transfer-Encoding"] = "chunked"
        else:
            self.keep_alive = False  # an HTTP/1.0 body without a length ends with the connection
        if not self._proto.keep_going(self):
            self.keep_alive = False
            out["Connection"] = "close"
        elif self.version < (1, 1):
            out["Connection"] = "keep-alive"
        line = f"HTTP/{self.version[0]}.{self.version[1]} {status} {reason or HTTPStatus(status).phrase}"
        head: bytes = _serialize_headers(line, out)
        return head, chunked

    def write_whole(self, resp: web.StreamResponse) -> None:
        """An answer not yet sent (a small proxied one, an error): one write for head and body."""
        body = getattr(resp, "body", None)
        data = body if isinstance(body, bytes | bytearray) else b""
        headers = resp.headers
        if data and "Content-Type" not in headers:
            headers = CIMultiDict(headers)
            headers["Content-Type"] = "application/octet-stream"
        status = resp.status
        length = None if status in _NO_BODY_STATUS else len(data)
        head, _ = self._head(status, resp.reason, headers, length, True)
        self.started = True
        send_body = data and self.method != "HEAD" and status not in _NO_BODY_STATUS
        self._proto.write(head + data if send_body else head)
        self.finished = True

    def respond(self, status: int, reason: str | None, upstream: CIMultiDictProxy[str], body: bytes
                ) -> web.StreamResponse:
        """A whole small upstream answer: its head from a cache keyed by the upstream's header block (the same
        for most answers of one upstream within a second), then one write."""
        keep = self._proto.keep_going(self)
        key = (status, reason, self.version, keep, len(body), tuple(upstream.items()))
        head = _heads.get(key)
        if head is None:
            head = self._small_head(key, status, reason, upstream, len(body))
        self._write_small(head, keep, body)
        return WRITTEN

    def _write_small(self, head: bytes, keep: bool, body: bytes) -> None:
        self.keep_alive = keep  # what _head() decided on a cache miss too
        self.started = True
        self._proto.write(head + body)
        self.finished = True

    def _small_head(self, key: tuple[Any, ...], status: int, reason: str | None, upstream: CIMultiDictProxy[str],
                    length: int) -> bytes:
        hdrs = response_headers(upstream)
        if length and "Content-Type" not in hdrs:
            hdrs["Content-Type"] = "application/octet-stream"
        head, _ = self._head(status, reason, hdrs, length, True, copy=False)
        if len(_heads) >= MAX_CACHED_HEADS:
            _heads.clear()
        if "Date" in upstream:  # else the head carries our Date and must not outlive its second
            _heads[key] = head
        return head

    def respond_raw(self, upstream_head: bytes, fields: list[tuple[bytes, bytes]], body: bytes) -> None:
        """``respond`` from the upstream's raw head (status line and header block, as received, which is
        the cache key) and its parsed header fields (read only on a cache miss)."""
        proto = self._proto
        keep = proto.keep_going(self)
        key = (upstream_head, self.version, keep, len(body))
        head = _heads.get(key)
        if head is None:
            line = upstream_head[:upstream_head.index(b"\r\n")].decode("utf-8", "surrogateescape").split(" ", 2)
            status, reason = int(line[1]), line[2] if len(line) > 2 else ""
            upstream = CIMultiDictProxy(CIMultiDict([(n.decode("utf-8", "surrogateescape"),
                                                      v.decode("utf-8", "surrogateescape")) for n, v in fields]))
            head = self._small_head(key, status, reason, upstream, len(body))
        self.keep_alive = keep  # (_write_small and HttpProtocol.write, inline: this runs for most requests)
        self.started = True
        tr = proto.transport
        if tr is not None and not proto.closed:
            tr.write(head + body)
        self.finished = True

    async def start_stream(self, resp: web.StreamResponse) -> StreamWriter:
        """Send the head of a streamed answer; the body follows through the returned writer."""
        has_body = self.method != "HEAD" and resp.status not in _NO_BODY_STATUS
        length = resp.content_length
        head, chunked = self._head(resp.status, resp.reason, resp.headers, length, has_body)
        self.started = True
        self._proto.write(head)
        return StreamWriter(self, chunked, has_body)


class StreamWriter:
    """``write(chunk)`` waits while the client's socket buffer is full; ``write_eof()`` ends the body."""

    __slots__ = ("_req", "_chunked", "_has_body")

    def __init__(self, req: DataRequest, chunked: bool, has_body: bool):
        self._req, self._chunked, self._has_body = req, chunked, has_body

    async def write(self, chunk: bytes) -> None:
        proto = self._req._proto
        if proto.closed:
            raise ConnectionResetError("the client went away")
        if not chunk or not self._has_body:
            return
        if self._chunked:
            proto.write(b"%x\r\n%b\r\n" % (len(chunk), chunk))
        else:
            proto.write(chunk)
        await proto.drain()

    async def write_eof(self) -> None:
        proto = self._req._proto
        if self._chunked and not proto.closed:
            proto.write(b"0\r\n\r\n")
        self._req.finished = True
        await proto.drain()
