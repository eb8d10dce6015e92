"""The common case on the protocol data path without a coroutine: a bodiless request whose decision is
cached (``gateway.proxy.fastpath.prepare``) goes out on an idle pooled upstream connection from the
parser's callback, and a small whole answer is written from the upstream connection's callback.

Everything else takes the ordinary path: a request ``prepare`` declines, or with no idle connection, is
served by the connection's handler task (``handler.handle``) as before; once the request is out, an answer
to stream (large, slow, HEAD), or a pooled connection the upstream had closed (retried once, as the lean
client does), continues in a task running the same code as ``forward`` does. An ``Exchange`` stands in
for the handler task on its connection (``done``, ``cancel``), and keeps the books exactly as
``handler.handle`` does: in-flight counts, the request and refusal metrics, the access-log line, and the
same 502/504 answers for an upstream that fails.
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any, cast

import httptools
from aiohttp import web

from gateway.proxy.errors import ProxyError, error_response
from gateway.proxy.fastclient import IDEMPOTENT, FastClientError, FastResponse, _Conn
from gateway.proxy.fastpath import Prepared, prepare
from gateway.proxy.forward import Outcome, Upstreams, _failure, _forward_fast, answer_fast
from gateway.proxy.handler import ACCESS_LOG, UPSTREAMS
from gateway.state import STATE, State
from gateway.tally import TALLY

if TYPE_CHECKING:
    from gateway.dataplane.request import DataRequest
    from gateway.dataplane.server import HttpProtocol

log = logging.getLogger("gateway.proxy")
# Per application, its state and upstream clients (set once, when the application is built).
_refs: weakref.WeakKeyDictionary[web.Application, tuple[State | None, Upstreams | None]] = \
    weakref.WeakKeyDictionary()
_NO_BODY = (204, 304)
_MAX_FIELD = 8190  # aiohttp's max_field_size and max_line_size, which the lean client's parser applies
_MAX_HEAD = 64 * 1024  # a response head the relay waits for, at most; past it the lean client's parser reads it


def start(proto: HttpProtocol, req: DataRequest) -> bool:
    """Serve ``req`` by callbacks if it is the common case (then the connection's ``_task`` is the
    exchange); False leaves it, untouched, to the handler task."""
    m = req.route
    refs = _refs.get(req.app)
    if refs is None:
        refs = _refs[req.app] = (req.app.get(STATE), req.app.get(UPSTREAMS))
    st, upstreams = refs
    if st is None or upstreams is None or m is None:
        return False
    started = time.perf_counter()
    try:
        p = prepare(req, st, m, upstreams)
    except Exception:  # a bug here must not cost the request: the handler decides it from scratch
        log.exception("data path: preparing %s %s failed", req.method, req.rel_url.raw_path)
        return False
    if p is None:
        return False
    conn = p.fast.idle(p.url)
    if conn is None:
        return False
    sent_at = conn.pool.loop.time()
    try:
        waiter = conn.start(p.head, req.method == "HEAD")
    except FastClientError:
        conn.close()
        return False
    ex = Exchange(proto, req, st, p, conn, started, sent_at)
    proto._task = ex  # it answers done() and cancel() like the task
    waiter.add_done_callback(ex._answered)
    if req.method != "HEAD":
        relay = conn.relay_state
        if isinstance(relay, _Relay):  # the one that read this connection's last answer, whole
            conn.relay_state = None
            relay.reset(ex)
        else:
            relay = _Relay(ex)
        conn.relay = relay.feed
    return True


class _GiveUp(Exception):
    """Raised in a parser callback: not a response the relay takes."""


class _Relay:
    """The upstream's response read with httptools as it arrives, for the case that dominates: a head and
    a small body with one Content-Length, all in the reads that complete the head. Anything else (1xx,
    204, 304, chunked or close-delimited bodies, a body still arriving after the head's read, a second
    response, a parse error) is handed back: the lean client's own parser reads it all, as without a relay.
    """

    __slots__ = ("ex", "parser", "raw", "size", "fields", "length", "head_done", "complete", "keep", "messages")

    def __init__(self, ex: Exchange):
        self.parser = httptools.HttpResponseParser(self)
        self.reset(ex)

    def reset(self, ex: Exchange) -> None:
        """Ready for the next answer on its connection (its parser is between two messages)."""
        self.ex = ex
        self.raw: list[bytes] = []
        self.size = 0
        self.fields: list[tuple[bytes, bytes]] = []
        self.length = -1
        self.head_done = self.complete = self.keep = False
        self.messages = 0

    def on_message_begin(self) -> None:
        self.messages += 1
        if self.messages > 1:
            raise _GiveUp

    def on_header(self, name: bytes, value: bytes) -> None:
        if len(name) > _MAX_FIELD or len(value) > _MAX_FIELD:
            raise _GiveUp  # (the lean client's parser refuses it)
        self.fields.append((name, value))

    def on_headers_complete(self) -> None:
        p = self.parser
        status = p.get_status_code()
        if status < 200 or status in _NO_BODY or p.get_http_version() not in ("1.1", "1.0"):
            raise _GiveUp
        length: bytes | None = None
        for name, value in self.fields:
            low = name.lower()
            if low == b"content-length":
                if length is not None or not value.isdigit():
                    raise _GiveUp
                length = value
            elif low == b"transfer-encoding":
                raise _GiveUp
        if length is None or int(length) > self.ex.p.fast.small_body:
            raise _GiveUp
        self.length = int(length)
        self.head_done = True

    def on_message_complete(self) -> None:
        self.complete = True
        self.keep = self.parser.should_keep_alive()  # (llhttp resets its flags once this returns)

    def feed(self, data: bytes) -> bytes | None:
        """None: taken (the head is still incomplete, or the answer is written); else all bytes so far."""
        self.raw.append(data)
        self.size += len(data)
        try:
            self.parser.feed_data(data)
        except Exception:  # _GiveUp, a parse error, an upgrade: the lean client's parser decides
            return b"".join(self.raw)
        if self.complete:
            whole = b"".join(self.raw) if len(self.raw) > 1 else data
            p = self.parser
            if self.keep:
                self.ex.conn.relay_state = self  # the next answer on the connection may use it again
            self.ex._relayed(p.get_status_code(), whole, self.fields, self.length, self.keep)
            self.raw = []  # (an idle connection holds no answer)
            return None
        if self.head_done or self.size > _MAX_HEAD:
            return b"".join(self.raw)
        return None


class Exchange:
    """One request served by callbacks (see the module docstring)."""

    __slots__ = ("proto", "req", "st", "p", "conn", "started", "sent_at", "entry", "_done")

    def __init__(self, proto: HttpProtocol, req: DataRequest, st: State, p: Prepared, conn: _Conn,
                 started: float, sent_at: float):
        self.proto, self.req, self.st, self.p, self.conn = proto, req, st, p, conn
        self.started, self.sent_at = started, sent_at
        self._done = False
        # handler.handle's bookkeeping, in its order
        self.entry: dict[str, object] = {"method": req.method, "path": req.rel_url.raw_path}
        TALLY.in_flight += 1
        st.in_flight += 1
        st.idle.clear()
        d = p.decision
        ident = d.ident
        self.entry.update(token_id=ident.token.id, policy=ident.policy.name, tenant=d.tenant,
                          client_ip=d.client_ip())
        st.cache.record_use(ident.token.id)
        if p.lbac is not None:
            self.entry["lbac"] = p.lbac
        TALLY.added(p.m.route.backend, time.perf_counter() - started)

    # ---- what the connection asks of its handler task ----------------------------------------------

    def done(self) -> bool:
        return self._done

    def cancel(self) -> bool:
        """The client went away: close the upstream connection (its answer is not wanted)."""
        if self._done:
            return False
        self._done = True
        self.conn.close()
        self._books(500, None)
        self.proto._task = None
        return True

    # ---- the answer --------------------------------------------------------------------------------

    def _relayed(self, status: int, whole: bytes, fields: list[tuple[bytes, bytes]], length: int, keep: bool
                 ) -> None:
        """A whole small answer read by the relay: the connection back to the pool, the answer written."""
        if self._done:
            return
        conn = self.conn
        conn.headers_at = conn.pool.loop.time()
        conn.relayed = keep
        conn.pool.release(conn)
        req = self.req
        try:
            split = len(whole) - length
            req.respond_raw(whole[:split], fields, whole[split:])
            self._end(Outcome(status, length, conn.headers_at - self.sent_at))
        except Exception:
            self._crashed()

    def _answered(self, fut: asyncio.Future[None]) -> None:
        exc = fut.exception() if not fut.cancelled() else asyncio.CancelledError()
        if self._done:
            return
        req = self.req
        try:
            if exc is not None:
                self.conn.close()
                if isinstance(exc, FastClientError) and req.method in IDEMPOTENT and self.conn.got == 0:
                    # The upstream had closed the pooled connection: once more, as the lean client does.
                    p = self.p
                    self._continue(_forward_fast(cast(web.Request, req), p.fast, p.url, p.headers, None))
                elif isinstance(exc, OSError):
                    self._refused(self._upstream_error(_failure(exc)))
                else:
                    raise exc
                return
            up = FastResponse(self.conn, self.sent_at)
            status = up.status
            if up.body is not None and req.method != "HEAD" and status not in _NO_BODY:
                req.respond(status, up.reason, up.headers, up.body)
                self._end(Outcome(status, len(up.body), up.upstream_seconds))
            else:
                self._continue(answer_fast(cast(web.Request, req), up))
        except Exception:
            self._crashed()

    def _upstream_error(self, exc: ProxyError) -> ProxyError:
        """``handler._serve``'s mapping: name the backend; the URL stays in the log."""
        if exc.status in (502, 504):
            backend = self.p.m.route.backend
            log.warning("%s upstream %s: %s", backend, self.p.upstream_base, exc.message)
            return ProxyError(exc.status, f"{backend} {exc.message}", exc.reason)
        return exc

    def _end(self, outcome: Outcome) -> None:
        self._done = True
        TALLY.upstream(self.p.m.route.backend, outcome.upstream_seconds)
        self.entry.update(upstream_ms=round(outcome.upstream_seconds * 1000, 3), bytes=outcome.bytes_out)
        self._books(outcome.status, None)
        self._after()

    def _refused(self, exc: ProxyError) -> None:
        self._done = True
        self._books(exc.status, exc)
        if not self.req.started:
            self.req.write_whole(error_response(exc.status, exc.message, exc.headers))
        self._after()

    def _crashed(self) -> None:
        from gateway.dataplane.server import _internal_error

        log.exception("data path: unhandled error for %s %s", self.req.method, self.req.rel_url.raw_path)
        if not self._done:
            self._done = True
            self._books(500, None)
        req, proto = self.req, self.proto
        if not req.started and not proto.closed:
            req.keep_alive = False
            req.write_whole(_internal_error())
        proto._close()
        self._after()

    def _after(self) -> None:
        proto = self.proto
        if proto._task is self:
            proto._task = None
        proto._after(self.req)

    def _books(self, status: int, refusal: ProxyError | None) -> None:
        """``handler.handle``'s ``except ProxyError`` and ``finally``."""
        route = self.p.m.route
        entry = self.entry
        if refusal is not None:
            TALLY.refusal(refusal.reason)
            entry["refusal"] = refusal.reason
            entry["error"] = refusal.message
        TALLY.in_flight -= 1
        self.st.request_done()
        TALLY.request(route.backend, route.scope, status)
        entry.update(status=status, duration_ms=round((time.perf_counter() - self.started) * 1000, 3),
                     client_ip=entry.get("client_ip") or self.req.remote)
        self.req.app[ACCESS_LOG].write(entry)

    # ---- the rest in a task ---------------------------------------------------------------------------

    def _continue(self, step: Coroutine[Any, Any, tuple[web.StreamResponse, Outcome]]) -> None:
        """Finish in a task that stands for the exchange on the connection from now on."""
        self._done = True  # cancel() now reaches the task
        self.proto._task = self.proto.loop.create_task(self._rest(step))

    async def _rest(self, step: Coroutine[Any, Any, tuple[web.StreamResponse, Outcome]]) -> None:
        req, proto = self.req, self.proto
        try:
            try:
                resp, outcome = await step
            except ProxyError as exc:
                raise self._upstream_error(exc) from None
        except ProxyError as exc:
            self._books(exc.status, exc)
            if not req.started:
                req.write_whole(error_response(exc.status, exc.message, exc.headers))
        except asyncio.CancelledError:
            self._books(500, None)
            proto._task = None
            raise
        except Exception:
            self._done = False  # (the books are not kept yet)
            proto._task = None
            self._crashed()
            return
        else:
            TALLY.upstream(self.p.m.route.backend, outcome.upstream_seconds)
            self.entry.update(upstream_ms=round(outcome.upstream_seconds * 1000, 3), bytes=outcome.bytes_out)
            self._books(outcome.status, None)
            if not req.started:
                req.write_whole(resp)
        proto._task = None
        proto._after(req)
