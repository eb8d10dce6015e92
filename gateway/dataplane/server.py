"""The protocol server: one ``HttpProtocol`` per connection, parsing with httptools, answering through the
shared handler, handing non-data-path connections to aiohttp.

Per connection, requests are answered one at a time and in order (pipelined ones wait, their bodies
buffered under the same flow control). Parsing is llhttp's strict mode plus the checks aiohttp's server
makes: a target in origin form of visible ASCII, bounded request line, header sizes and count.
A client that hangs up cancels its handler (and so the upstream exchange). Deadlines: the head must
arrive within ``head_timeout`` of its first byte, an idle keep-alive connection closes after
``keepalive_timeout``, a body that stops arriving for ``body_timeout`` fails and closes the connection.
Past ``max_connections`` per worker a new connection gets a 503 and is closed.

Framing has one source of truth, llhttp (strict mode). Whether a request has a body is what the parser does
after its head: a bodiless request is complete at once, anything else gets body bytes. The header text only
has to agree: a request whose Content-Length or Transfer-Encoding says "no body" while the parser reads one
(or the reverse) is refused with 400 before any body byte is kept. Every request gets its own body object.

Hand-over: a request that is not for the data path (admin API, page, health, metrics, an unknown path) turns
the rest of its connection over to aiohttp's ``RequestHandler``, still read by this parser: each request from
there on is written to aiohttp anew from what llhttp parsed (request line, header fields, and the body as
llhttp framed it, with one Content-Length or chunked), so no byte is read by two parsers that might frame it
differently, and nothing already answered is fed again. Data-path answers under way go out first. A protocol
switch (a WebSocket upgrade) gets the transport itself, with the re-written head and the bytes llhttp left
after it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, Final, cast

import httptools
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from gateway.dataplane import exchange
from gateway.dataplane.body import Body, BodyError
from gateway.dataplane.request import DataRequest, RelURL
from gateway.proxy.errors import internal_error as _internal_error
from gateway.proxy.handler import handle
from gateway.routes import RouteMatch, match

log = logging.getLogger("gateway.dataplane")

MAX_LINE: Final = 8190  # aiohttp's max_line_size and max_field_size
MAX_HEADERS: Final = 128  # aiohttp's max_headers
MAX_HEAD: Final = 64 * 1024
_VISIBLE: Final = bytes(range(0x21, 0x7F))
_H2_PREFACE: Final = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


@dataclass(frozen=True, slots=True)
class Settings:
    head_timeout: float = 30.0
    keepalive_timeout: float = 75.0  # aiohttp's default
    body_timeout: float = 60.0
    max_connections: int = 10_000
    linger: float = 2.0  # seconds to read (and drop) a body the answer did not need before closing


class _Bad(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


_ERROR_TYPES: Final = {408: "timeout", 500: "internal", 503: "unavailable"}


def _error_bytes(status: int, message: str) -> bytes:
    """The Prometheus-shaped error of a request the handler never saw; the connection closes after it."""
    kind = _ERROR_TYPES.get(status, "bad_data")
    body = json.dumps({"status": "error", "errorType": kind, "error": message, "message": message}).encode()
    phrase = HTTPStatus(status).phrase
    retry = "Retry-After: 1\r\n" if status == 503 else ""
    return (f"HTTP/1.1 {status} {phrase}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            f"{retry}Connection: close\r\n\r\n").encode() + body


def wants_aiohttp(method: str, path: str, headers: CIMultiDictProxy[str]) -> bool:
    """Whether aiohttp serves this request: anything that is not a data-path route, and WebSocket upgrades
    (the same test ``_serve`` makes before relaying a tail)."""
    return _wants(match(method, path), _HeadFacts(headers))


class _HeadFacts:
    """What the server reads from a request's header fields, derived once per header set (a keep-alive
    client sends the same fields request after request).

    The framing fields here are what the header text *declares*; llhttp has already accepted them (one
    Content-Length of digits, optional whitespace around it, never with Transfer-Encoding, which ends in
    ``chunked``). They are only checked against what the parser then does (``HttpProtocol._decide``)."""

    __slots__ = ("websocket", "switch", "length", "chunked", "declares_body", "refusal", "expect", "host", "plain")

    def __init__(self, headers: CIMultiDictProxy[str], raw: Sequence[tuple[bytes, bytes]] = ()):
        self.websocket = headers.get("Upgrade", "").lower() == "websocket"
        # any other protocol switch: as aiohttp does
        self.switch = "upgrade" in headers.get("Connection", "").lower() and "Upgrade" in headers
        cl = headers.get("Content-Length")
        unreadable = cl is not None and not (cl.isascii() and cl.isdigit())  # (values arrive stripped)
        self.length = int(cl) if cl is not None and not unreadable else None
        te = headers.getall("Transfer-Encoding", ())
        self.chunked = bool(te)
        self.declares_body = self.chunked or bool(self.length)
        expect = headers.getall("Expect", ())
        self.expect = expect[0] if expect else None
        hosts = headers.getall("Host", ())
        #: The first of these rules the header set breaks, as (status, message): refused before any body byte.
        self.refusal: tuple[int, str] | None = None
        for broken, status, message in (
                (unreadable, 400, "the request's Content-Length is not a plain decimal number"),
                (any(b"\t" in v for n, v in raw if n.lower() in _FRAMING_NAMES), 400,
                 "a tab in Content-Length or Transfer-Encoding is read differently by different servers"),
                (len(te) > 1 or (te and te[0].lower() != "chunked"), 501,
                 "the only transfer coding this gateway reads is a single 'chunked'"),
                (len(expect) > 1, 400, "more than one Expect field"),
                (len(hosts) > 1, 400, "more than one Host field"),
                (any(not _HOST.fullmatch(h) for h in hosts), 400, "the Host field is not a valid host[:port]")):
            if broken:
                self.refusal = (status, message)
                break
        self.host = bool(hosts)
        #: Nothing in these fields for ``on_headers_complete``'s header checks to refuse on HTTP/1.1, nor to
        #: route to aiohttp: no framing field, no Expect, no protocol switch, one valid Host.
        self.plain = (self.refusal is None and self.host and not self.chunked and self.length is None
                      and self.expect is None and not self.websocket and not self.switch)


def _wants(m: RouteMatch | None, h: _HeadFacts) -> bool:
    """Whether aiohttp serves the request (see ``wants_aiohttp``)."""
    return m is None or (h.websocket and m.route.websocket) or h.switch


def _decode(raw: list[tuple[bytes, bytes]]) -> CIMultiDictProxy[str]:
    """Header fields as text. llhttp strips whitespace before a value, not after it; aiohttp and nginx
    strip both, and so does this; a length is written as the number llhttp read (``0005 `` is 5), for every
    reader after this one."""
    out: CIMultiDict[str] = CIMultiDict()
    for n, v in raw:
        v = v.rstrip(b" \t")
        if n.lower() == b"content-length" and v.isdigit():
            v = b"%d" % int(v)
        out.add(n.decode("utf-8", "surrogateescape"), v.decode("utf-8", "surrogateescape"))
    return CIMultiDictProxy(out)


_FRAMING_NAMES: Final = frozenset({b"content-length", b"transfer-encoding"})
_HOST: Final = re.compile(r"[A-Za-z0-9._~!$&'()*+,;=%-]+(:[0-9]*)?|\[[0-9A-Fa-f:.]+\](:[0-9]*)?")
#: A tab before a framing field's value (llhttp strips it, nginx does not): refused, for one reading of them.
_LEADING_TAB: Final = re.compile(rb"\n(?i:content-length|transfer-encoding):[ \t]*\t")
#: Below this many bytes of header fields no bound of ``on_header`` can be broken: a field counts at least
#: 4 bytes (its ": " and CRLF), so MAX_HEADERS of them pass it, and MAX_LINE and MAX_HEAD are above it.
_HEAD_CHECKS_FROM: Final = 4 * MAX_HEADERS
#: A read of at most this many bytes that starts outside a head holds no field that breaks a bound of
#: ``on_header``: its heads start in it, a field takes at least 3 bytes (":" and CRLF) after a request
#: line of at least 16, so at most MAX_HEADERS fields, each far under MAX_LINE, all far under MAX_HEAD.
#: Their fields are only collected; they are counted when the count matters (``_count_fields``).
_LIGHT_READ: Final = 16 + 3 * MAX_HEADERS
#: What aiohttp is fed in place of a request that did not parse after a hand-over: a request line it refuses.
_UNPARSABLE: Final = b"\x00 / HTTP/1.1\r\n\r\n"
_REFUSED_METHODS: Final = {b"CONNECT": "CONNECT (this gateway is no forward proxy)",
                           b"TRACE": "TRACE (it would echo credentials)"}


def _target(raw_url: bytes) -> tuple[bytes, str, str, bool, bool]:
    """What ``on_headers_complete`` reads from a request target: (the target, its path, its query, whether
    aiohttp judges it, whether it is no path at all). Kept per connection while it repeats."""
    if not raw_url.startswith(b"/") or raw_url.translate(None, _VISIBLE):
        handover = True  # absolute form, '*', or bytes aiohttp judges: its answer, as today
        path = query = ""
    else:
        path, _, query = raw_url.decode("ascii").partition("?")
        path = path.partition("#")[0]
        handover = False
    # ('*', or a '#' fragment, which clients never send)
    return raw_url, path, query, handover, raw_url == b"*" or b"#" in raw_url


def _rewritten_head(method: bytes, url: bytes, version: str, raw: list[tuple[bytes, bytes]],
                    facts: _HeadFacts) -> bytes:
    """A request head for aiohttp, written from what llhttp parsed (every part passed its strict checks):
    the framing is the one llhttp applies, stated once."""
    lines = [b"%s %s HTTP/%s\r\n" % (method, url, version.encode("ascii"))]
    lines += [b"%s: %s\r\n" % (n, v.rstrip(b" \t")) for n, v in raw if n.lower() not in _FRAMING_NAMES]
    if facts.chunked:
        lines.append(b"Transfer-Encoding: chunked\r\n")
    elif facts.length is not None:
        lines.append(b"Content-Length: %d\r\n" % facts.length)
    lines.append(b"\r\n")
    return b"".join(lines)


class HttpProtocol(asyncio.Protocol):
    """One client connection (see the module docstring)."""

    def __init__(self, plane: DataPlane):
        self.plane = plane
        self.loop = plane.loop
        self.transport: asyncio.Transport | None = None
        self.remote: str | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.closed = False
        self.handed = False  # the transport is aiohttp's (a protocol switch)
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        # The previous request's raw header fields and what was made of them: a keep-alive client sends the
        # same fields request after request, so they are decoded once, and ``memo`` keeps what the fast path
        # derives from them (gateway.proxy.fastpath), for as long as they stay the same.
        self._last_raw: list[tuple[bytes, bytes]] | None = None
        self._last_headers: CIMultiDictProxy[str] | None = None
        self._memo: dict[object, object] = {}
        self._facts = _HeadFacts(CIMultiDictProxy(CIMultiDict()))
        self._keepalive = plane.settings.keepalive_timeout
        # The last (method, path) routed and its match: a client asks one endpoint request after request.
        self._routed: tuple[str, str, RouteMatch | None] = ("", "", None)
        self._target = _target(b"")  # the last request target read (_target), while it repeats
        self._head_bytes = 0
        self._light = False  # this read holds only heads that start in it and is short (_LIGHT_READ)
        self._window: list[bytes] = []
        self._cur: DataRequest | None = None
        self._undecided = False  # _cur's head is parsed; whether a body follows is not known yet
        self._queue: deque[DataRequest] = deque()
        self._task: asyncio.Task[None] | exchange.Exchange | None = None  # the request being answered
        self._pauses = 0
        self._write_paused = False
        self._drain: asyncio.Future[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        # The keep-alive deadline is kept lazily: a busy connection moves ``_idle_until`` on every answer, and
        # its one timer, when it fires early, waits again until then (no timer made and cancelled per request).
        self._idle_until: float | None = None
        self._idle_timer: asyncio.TimerHandle | None = None
        self._in_head = False
        self._body_seen = 0.0  # when the current body's last piece arrived (its deadline counts from it)
        self._fresh = True  # no byte received yet: a silent connection gets the head deadline, not keep-alive's
        # After a hand-over: aiohttp's handler, fed the requests this parser reads (re-written, see the module
        # docstring); ``_relay_out`` holds what it is fed until the data-path answers before it are out.
        self._relay: Any = None
        self._relaying = False  # the requests from here on are aiohttp's
        self._relay_out: list[bytes] | None = None
        self._relay_chunked = False
        self._relay_in_body = False
        self._relay_length = self._relay_sent = 0
        self._switch_tail: bytes | None = None  # a protocol switch's bytes after its head, for aiohttp
        self._refusal: tuple[int, str] | None = None  # a parse error to answer once the answer under way is out
        self._lingering = False

    # ---- asyncio.Protocol -------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        tr = cast(asyncio.Transport, transport)
        self.transport = tr
        peer = tr.get_extra_info("peername")
        self.remote = str(peer[0]) if isinstance(peer, tuple) and peer else None
        tr.set_write_buffer_limits(high=256 * 1024)
        plane = self.plane
        if len(plane.conns) >= plane.settings.max_connections or plane.draining:
            tr.write(_error_bytes(503, "too many connections to this gateway worker; retry later"))
            tr.close()
            self.closed = True
            return
        plane.conns.add(self)
        self._arm(plane.settings.head_timeout)

    def connection_lost(self, exc: BaseException | None) -> None:
        self.closed = True
        self._disarm()
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        self.plane.conns.discard(self)
        for req in (self._cur, *self._queue):
            if req is not None and not req.content.is_eof():
                req.content.set_exception(BodyError("the client closed the connection"))
        if self._task is not None and not self._task.done():
            self._task.cancel()
        d = self._drain
        if d is not None and not d.done():
            d.set_exception(ConnectionResetError("the client went away"))
        if self._relay is not None:
            self._relay.connection_lost(exc)

    def pause_writing(self) -> None:
        self._write_paused = True
        if self._relay is not None:
            self._relay.pause_writing()

    def resume_writing(self) -> None:
        self._write_paused = False
        d = self._drain
        if d is not None:
            self._drain = None
            if not d.done():
                d.set_result(None)
        if self._relay is not None:
            self._relay.resume_writing()

    def eof_received(self) -> bool:
        return False

    def data_received(self, data: bytes) -> None:
        if self.closed or self.handed or self._refusal is not None or self._lingering:
            return  # (a lingering connection reads only to drop what the client still sends)
        if self._switch_tail is not None:  # after a protocol switch's head, waiting for the answers before it
            self._switch_tail += data
            return
        if self._in_head:  # the reads that hold the current head (see _tab_before_framing)
            self._window.append(data)
            self._light = False
        else:
            self._window = [data]
            self._light = len(data) <= _LIGHT_READ
        if self._fresh:
            self._fresh = False
            if data.startswith(_H2_PREFACE[:14]):  # "PRI * HTTP/2.0": gRPC (Tempo streaming) speaks HTTP/2 only
                self._refuse(505, "HTTP/2 is not supported by this gateway (gRPC, e.g. Tempo streaming): turn "
                                  "Streaming off in the Tempo data source, or put an HTTP/2-to-HTTP/1.1 proxy in front")
                return
        try:
            self.parser.feed_data(data)
            if self._undecided:  # the head is complete and the read ended without the message: a body follows
                self._decide(True)
        except httptools.HttpParserUpgrade as up:
            self._switch_protocol(data[up.args[0]:])
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__context__
            if isinstance(cause, _Bad):
                self._refuse(cause.status, cause.message)
            else:
                log.exception("data path: parser callback failed", exc_info=cause)
                self._refuse(500, "internal error parsing the request")
        except _Bad as exc:
            self._refuse(exc.status, exc.message)
        except httptools.HttpParserError as exc:
            self._refuse(400, f"malformed HTTP request: {exc}")
            return
        if not self._in_head:
            self._window = []  # (kept only while a head is incomplete: a read can be 256 KiB of body)
        else:
            if self._light:  # the head goes on in the next read: what on_header did not count, counted now
                self._count_fields()
            if self._timer is None and not self.closed:
                self._arm(self.plane.settings.head_timeout)
        if self._relay_out is not None:
            self._flush_relay()

    # ---- parser callbacks (httptools) -------------------------------------------------------------

    # These run for every request: written for few bytecodes (the interpreter is most of a request's cost,
    # bench/README.md): checks that cannot fail for a common head are skipped by one test that says so.

    def on_message_begin(self) -> None:
        self._in_head = True
        self._url = b""
        self._headers = []
        self._head_bytes = 0
        self._idle_until = None  # (_disarm, of which only this is needed when no timer is armed)
        if self._timer is not None:
            self._disarm()  # the head deadline is armed after this read if the head is still incomplete

    def on_url(self, url: bytes) -> None:
        self._url = u = self._url + url  # (bytes: llhttp passes a target in one piece per read)
        if len(u) > MAX_LINE:
            raise _Bad(414, f"request target longer than {MAX_LINE} bytes")

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._light and self._in_head:  # (see _LIGHT_READ: no bound to check, counted only if needed)
            self._headers.append((name, value))
            return
        self._head_bytes = size = self._head_bytes + len(name) + len(value) + 4
        if size > _HEAD_CHECKS_FROM:  # (below it every bound holds: see _HEAD_CHECKS_FROM)
            if len(name) > MAX_LINE or len(value) > MAX_LINE or size > MAX_HEAD:
                raise _Bad(431, "request header fields too large")
            if self._in_head and len(self._headers) >= MAX_HEADERS:
                raise _Bad(431, f"more than {MAX_HEADERS} request header fields")
        if self._in_head:  # (else a chunked body's trailer fields: bounded, and dropped, as nginx does)
            self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._idle_until = None
        if self._timer is not None:
            self._disarm()
        p = self.parser
        raw_url = self._url
        target = self._target
        if raw_url != target[0]:
            target = self._target = _target(raw_url)
        _, path, query, handover, not_a_path = target
        raw_method = p.get_method()
        method = raw_method.decode("ascii", "replace")
        raw_headers = self._headers
        headers = self._last_headers
        if headers is None or raw_headers != self._last_raw:
            headers = _decode(raw_headers)
            self._last_raw, self._last_headers, self._memo = raw_headers, headers, {}
            self._facts = _HeadFacts(headers, raw_headers)
        facts = self._facts
        version_text = p.get_http_version()
        if facts.plain and version_text == "1.1":
            version = (1, 1)  # (the checks of the header fields below cannot fail: see _HeadFacts.plain)
        else:
            version = self._check_head(version_text, facts)
        # (after a hand-over aiohttp answers them: 405, and it echoes nothing)
        refused = None if self._relaying else _REFUSED_METHODS.get(raw_method)
        if refused is not None:
            raise _Bad(405, f"this gateway does not serve {refused}")
        if not_a_path:
            raise _Bad(400, "the request target is not a path (a '*', or a '#' fragment, which clients never send)")
        upgrade = p.should_upgrade()
        if upgrade and facts.declares_body:
            raise _Bad(400, "a protocol switch (Upgrade) with a request body is ambiguous")
        if handover or self._relaying or upgrade:
            self._to_relay(raw_method, raw_url, version_text, raw_headers, facts)
            return
        routed = self._routed
        if routed[1] == path and routed[0] == method:
            m = routed[2]  # (a match depends on the method and path only)
        else:
            m = match(method, path)
            self._routed = (method, path, m)
        if m is None or (facts.websocket and m.route.websocket) or facts.switch:  # _wants
            self._to_relay(raw_method, raw_url, version_text, raw_headers, facts)
            return
        req = DataRequest(self, method, headers, RelURL(path, query), Body(self._pause, self._resume),
                          facts.length, version, p.should_keep_alive(), m, self._memo)
        expect = facts.expect
        if expect is not None and (expect.lower() != "100-continue" or version < (1, 1)):
            raise _Bad(417, f"unsupported Expect: {expect}")
        self._cur = req
        self._undecided = True  # the parser says next whether a body follows (on_body, on_message_complete)

    def _count_fields(self) -> None:
        """``on_header``'s count of the current head's fields, for those it took without counting (a light
        read): the count goes on in the next read, or in a chunked body's trailer fields."""
        self._head_bytes = sum(len(n) + len(v) + 4 for n, v in self._headers)

    def _check_head(self, version_text: str, facts: _HeadFacts) -> tuple[int, int]:
        """The checks of a head that ``_HeadFacts.plain`` on HTTP/1.1 passes; returns its version."""
        if self._light and facts.chunked:  # (its trailer fields count on from its head's: see on_header)
            self._count_fields()
        version = (1, 1) if version_text == "1.1" else (1, 0)
        if version_text not in ("1.1", "1.0"):
            raise _Bad(505, f"HTTP/{version_text} is not supported; this gateway speaks HTTP/1.1 and 1.0")
        if facts.refusal is not None:
            raise _Bad(*facts.refusal)
        if version >= (1, 1) and not facts.host:
            raise _Bad(400, "an HTTP/1.1 request without a Host field")
        if facts.chunked and version < (1, 1):
            raise _Bad(400, "Transfer-Encoding is not allowed in an HTTP/1.0 request")
        if (facts.chunked or facts.length is not None) and self._tab_before_framing():
            raise _Bad(400, "a tab in Content-Length or Transfer-Encoding is read differently by different servers")
        return version

    def _tab_before_framing(self) -> bool:
        """Whether a framing field's value starts with a tab: llhttp skips it before the value begins, so it
        is read from the bytes of the reads that hold the head (a superset: a match in a body before it only
        refuses the connection that sent it)."""
        window = self._window
        return any(b"\t" in part for part in window) and _LEADING_TAB.search(b"".join(window)) is not None

    def on_body(self, data: bytes) -> None:
        if self._relaying:
            self._relay_body(data)
            return
        cur = self._cur
        if cur is None:
            raise _Bad(400, "request body bytes outside of a request")
        if self._undecided:
            self._decide(True)
        cur.content.feed(data)
        # The body deadline counts from the last piece: kept lazily (see _on_deadline), no timer per piece.
        self._body_seen = self.loop.time()
        if not cur.content.discard and self._timer is None:
            self._arm(self.plane.settings.body_timeout)

    def on_message_complete(self) -> None:
        if self._relaying:
            self._relay_end()
            return
        if self._undecided:  # no body: _decide(False), inline (it runs for most requests)
            self._undecided = False
            cur, facts = self._cur, self._facts
            assert cur is not None
            if facts.declares_body and not facts.chunked:  # (a chunked body of no chunks is one)
                raise _Bad(400, "the request's framing is ambiguous: its header fields and its bytes disagree "
                                "on whether it has a body")
            cur.content.feed_eof()
            if facts.chunked:
                cur.content_length = 0
            if self._task is None:
                if not exchange.start(self, cur):  # (_start)
                    self._task = self.loop.create_task(self._run(cur))
            else:
                self._queue.append(cur)
                self._pause()  # one request waits at most: the rest stays in the socket
            self._cur = None
            self._idle_until = None
            if self._timer is not None:
                self._disarm()
            # (its length is none or 0 and nothing was received: nothing more to check, its end is fed)
        else:
            cur, self._cur = self._cur, None
            self._idle_until = None
            if self._timer is not None:
                self._disarm()
            if cur is not None:
                if cur.content_length is not None and cur.content.received != cur.content_length:
                    raise _Bad(400, "the request body does not match its Content-Length")
                cur.content.feed_eof()
        if self._task is None and not self._queue:
            self._idle()

    def _decide(self, has_body: bool) -> None:
        """The parser has said whether the current request has a body; the header text must agree, and the
        request is then answered (or queued)."""
        self._undecided = False
        req, facts = self._cur, self._facts
        assert req is not None
        if has_body != facts.declares_body and (has_body or not facts.chunked):
            # (the one agreement that is not exact: a chunked body of no chunks, whole in this read)
            raise _Bad(400, "the request's framing is ambiguous: its header fields and its bytes disagree on "
                            "whether it has a body")
        req.body_exists = has_body
        if has_body:
            self._body_seen = self.loop.time()
            self._arm(self.plane.settings.body_timeout)
            if facts.expect is not None:
                req.expect_continue = True
                req.content.on_first_read = self._send_continue
        else:
            req.content.feed_eof()
            if facts.chunked:
                req.content_length = 0
        if self._task is None:
            self._start(req)
        else:
            self._queue.append(req)
            self._pause()  # one request waits at most: the rest stays in the socket

    # ---- the hand-over to aiohttp -----------------------------------------------------------------

    def _to_relay(self, method: bytes, url: bytes, version: str, raw: list[tuple[bytes, bytes]],
                  facts: _HeadFacts) -> None:
        """This request and every one after it on the connection are aiohttp's."""
        if self.plane.aiohttp is None:
            raise _Bad(404, "no such data-path route")
        if not self._relaying:
            self._relaying = True
            self._relay_out = []
            if self._task is not None:
                self._pause()  # the answers under way go out first; until then, this read is all that is kept
        self._relay_chunked, self._relay_length, self._relay_sent = facts.chunked, facts.length or 0, 0
        self._relay_in_body = True
        self._relay_write(_rewritten_head(method, url, version, raw, facts))

    def _relay_body(self, data: bytes) -> None:
        self._relay_sent += len(data)
        if not self._relay_chunked and self._relay_sent > self._relay_length:
            raise _Bad(400, "the request's framing is ambiguous: its header fields and its bytes disagree on "
                            "its body's length")
        self._relay_write(b"%x\r\n%b\r\n" % (len(data), data) if self._relay_chunked else data)

    def _relay_end(self) -> None:
        self._relay_in_body = False
        if self._relay_chunked:
            self._relay_write(b"0\r\n\r\n")
        elif self._relay_sent != self._relay_length:
            raise _Bad(400, "the request body does not match its Content-Length")

    def _relay_write(self, data: bytes) -> None:
        if self._relay_out is not None:
            self._relay_out.append(data)
        else:
            self._relay.data_received(data)

    def _flush_relay(self) -> None:
        """Start aiohttp's handler once no data-path answer is under way, and feed it what was kept."""
        out = self._relay_out
        if out is None or self._task is not None or self._queue or self.closed:
            return
        tr, srv = self.transport, self.plane.aiohttp
        if tr is None or srv is None:
            return
        self._relay_out = None
        self._disarm()
        self.plane.conns.discard(self)
        self._resume_all()
        self._relay = handler = srv()
        handler.connection_made(tr)
        if out:
            handler.data_received(b"".join(out))
        if self._refusal is not None:
            self._end_relay()
            return
        tail, self._switch_tail = self._switch_tail, None
        if tail is not None:  # a protocol switch: the transport is aiohttp's from here on
            self.handed = True
            tr.set_protocol(handler)
            if tail:
                handler.data_received(tail)

    def _end_relay(self) -> None:
        """A request behind those fed to aiohttp did not parse: aiohttp answers those, then this one with its
        own 400 and closes (it is fed a request line it refuses, so the answers stay in order)."""
        if self._relay_in_body:
            self._relay.force_close()  # (its request's body will never be whole)
        else:
            self._relay.data_received(_UNPARSABLE)

    def _switch_protocol(self, tail: bytes) -> None:
        """llhttp stopped after a protocol switch's head (a WebSocket upgrade): the rest is not HTTP."""
        if self._relay is not None:  # aiohttp already reads this connection
            self.handed = True
            assert self.transport is not None
            self.transport.set_protocol(self._relay)
            if tail:
                self._relay.data_received(tail)
        else:
            self._switch_tail = tail
            self._pause()

    # ---- requests ---------------------------------------------------------------------------------

    def _send_continue(self) -> None:
        if not self.closed and self.transport is not None:
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def _start(self, req: DataRequest) -> None:
        if exchange.start(self, req):
            return  # served by callbacks: self._task is the exchange (a body goes to it as it arrives)
        self._task = self.loop.create_task(self._run(req))

    async def _run(self, req: DataRequest) -> None:
        try:
            resp = await handle(cast(web.Request, req))
            if not req.started and self._refusal is not None and req.content.exception() is not None:
                self._close_with_refusal()  # its own body did not parse: that is the answer
            elif not req.started:
                req.write_whole(resp)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("data path: unhandled error for %s %s", req.method, req.rel_url.raw_path)
            if not req.started and not self.closed:
                req.keep_alive = False
                req.write_whole(_internal_error())
            self._close()
        finally:
            self._task = None
        self._after(req)

    def keep_going(self, req: DataRequest) -> bool:
        """Whether the connection serves another request after ``req`` (asked when its head is written)."""
        if not req.keep_alive or self.plane.draining or self.closed:
            return False  # (a parse error behind it is answered after it, with its own Connection: close)
        if not req.content.at_eof():
            # The answer did not read the whole body: drop the rest, and close (the client may not send it at
            # all after an answer to Expect: 100-continue). Whether it had all arrived does not matter: the
            # connection's fate must not depend on how the client's bytes were cut into reads.
            req.content.discard = True
            return False
        return True

    def _after(self, req: DataRequest) -> None:
        if self.closed:
            return
        if not req.finished:
            self._close()
            return
        if self._relay_out is not None and not self._queue and req.keep_alive:
            self._flush_relay()
        elif self._refusal is not None and not (self._queue and req.keep_alive):
            if req.keep_alive:
                self._close_with_refusal()
            else:
                self._close()  # (no answer after one that said Connection: close)
        elif not req.keep_alive:
            self._linger(req)
        elif self._queue:
            nxt = self._queue.popleft()
            self._resume()
            self._start(nxt)
        elif self._cur is None and self._timer is None:  # (_idle, inline: most answers end here)
            seconds = self._keepalive
            if seconds > 0:
                self._idle_until = until = self.loop.time() + seconds
                if self._idle_timer is None:
                    self._idle_timer = self.loop.call_at(until, self._on_idle)

    def _linger(self, req: DataRequest) -> None:
        """Close after the answer; a body still arriving is read and dropped for a moment first, so that the
        client reads the answer instead of a reset."""
        tr = self.transport
        if tr is None or req.content.is_eof():
            self._close()
            return
        req.content.discard = True
        self._lingering = True
        with contextlib.suppress(OSError, RuntimeError, NotImplementedError):
            if tr.can_write_eof():
                tr.write_eof()
        self._resume_all()
        self._disarm()
        self._timer = self.loop.call_later(self.plane.settings.linger, self._close)

    # ---- transport --------------------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        tr = self.transport
        if tr is not None and not self.closed:
            tr.write(data)

    async def drain(self) -> None:
        if self.closed:
            raise ConnectionResetError("the client went away")
        if not self._write_paused:
            return
        self._drain = d = self.loop.create_future()
        await d

    def _pause(self) -> None:
        self._pauses += 1
        if self._pauses == 1 and self.transport is not None and not self.closed:
            self.transport.pause_reading()

    def _resume(self) -> None:
        if self._pauses == 0:
            return
        self._pauses -= 1
        if self._pauses == 0 and self.transport is not None and not self.closed:
            self.transport.resume_reading()

    def _resume_all(self) -> None:
        if self._pauses:
            self._pauses = 1
            self._resume()

    def _refuse(self, status: int, message: str) -> None:
        """A request that does not parse or breaks a limit: answer (unless an answer is under way) and close.
        After a hand-over, aiohttp writes the answers: it closes the connection once those before are out."""
        if self._relaying:
            log.info("data path: refused a request from %s after a hand-over: %d %s", self.remote, status, message)
            self._refusal = (status, message)
            if self._relay is not None:
                self._end_relay()
            else:
                self._flush_relay()  # (once the data-path answers before it are out: see _after)
            return
        if self._cur is not None and not self._cur.content.is_eof():
            self._cur.content.set_exception(BodyError(f"the request body broke: {message}"))
        log.info("data path: refused a request from %s: %d %s", self.remote, status, message)
        self._refusal = (status, message)
        if self._task is None:
            self._close_with_refusal()
        else:
            self._pause()  # the parser is done with this connection; the answer under way goes out first

    def _close_with_refusal(self) -> None:
        if self._refusal is not None:
            self.write(_error_bytes(*self._refusal))
        self._close()

    def _close(self) -> None:
        self._disarm()
        if self.transport is not None and not self.closed:
            self.transport.close()
        self.closed = True

    def close_if_idle(self) -> None:
        if self._task is None and self._cur is None and not self._queue:
            self._close()

    # ---- deadlines --------------------------------------------------------------------------------

    def _arm(self, seconds: float) -> None:
        if self._timer is None and seconds > 0:
            self._timer = self.loop.call_later(seconds, self._on_deadline)

    def _disarm(self) -> None:
        self._idle_until = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _idle(self) -> None:
        """Close the connection if no request starts within ``keepalive_timeout`` (lazily: see __init__)."""
        seconds = self._keepalive
        if seconds <= 0 or self.closed:
            return
        self._idle_until = until = self.loop.time() + seconds
        if self._idle_timer is None:
            self._idle_timer = self.loop.call_at(until, self._on_idle)

    def _on_idle(self) -> None:
        self._idle_timer = None
        until = self._idle_until
        if until is None or self.closed:
            return
        if self.loop.time() < until:
            self._idle_timer = self.loop.call_at(until, self._on_idle)
        elif self._task is None and self._timer is None:
            self._close()  # idle keep-alive

    def _on_deadline(self) -> None:
        self._timer = None
        if self.closed:
            return
        if self._in_head or self._fresh:
            self._refuse(408, f"request head not received within {self.plane.settings.head_timeout:g}s")
        elif self._cur is not None and not self._cur.content.is_eof():
            seconds = self.plane.settings.body_timeout
            if self._pauses:  # the handler is slow, not the client
                self._arm(seconds)
                return
            if self.loop.time() < self._body_seen + seconds:  # a piece came since the timer was armed
                self._timer = self.loop.call_at(self._body_seen + seconds, self._on_deadline)
                return
            self._cur.content.set_exception(BodyError("the request body stopped arriving"))
            self._close()
        elif self._task is None:
            self._close()  # idle keep-alive


class DataPlane:
    """The listener of one worker: ``start`` it, ``stop_listening`` on SIGTERM, ``close`` at the end."""

    def __init__(self, app: web.Application, aiohttp_server: Any | None, settings: Settings | None = None):
        self.app = app
        self.aiohttp = aiohttp_server  # aiohttp's web.Server: called for a RequestHandler per hand-over
        self.settings = settings or Settings()
        self.loop = asyncio.get_running_loop()
        self.conns: set[HttpProtocol] = set()
        self.draining = False
        self._server: asyncio.AbstractServer | None = None
        self.refs: Any = None  # what the callback path takes from the application, once (exchange.start)

    async def start(self, host: str, port: int, reuse_port: bool = False, backlog: int = 1024) -> int:
        """Listen; returns the bound port."""
        self._server = await self.loop.create_server(lambda: HttpProtocol(self), host, port,
                                                     reuse_port=reuse_port or None, backlog=backlog)
        sockets = self._server.sockets
        return int(sockets[0].getsockname()[1]) if sockets else port

    async def stop_listening(self) -> None:
        """Close the listener and the idle connections; answers under way end with ``Connection: close``."""
        self.draining = True
        if self._server is not None:
            self._server.close()
        for conn in list(self.conns):
            conn.close_if_idle()

    async def close(self) -> None:
        self.draining = True
        if self._server is not None:
            self._server.close()
        for conn in list(self.conns):
            conn._close()
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 5)
