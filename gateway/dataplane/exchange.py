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
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any, cast

from aiohttp import web

from gateway.proxy.errors import ProxyError, error_response
from gateway.proxy.fastclient import IDEMPOTENT, FastClientError, FastResponse, _Conn
from gateway.proxy.fastpath import Prepared, prepare
from gateway.proxy.forward import Outcome, _failure, _forward_fast, answer_fast
from gateway.proxy.handler import ACCESS_LOG, UPSTREAMS
from gateway.state import STATE, State
from gateway.tally import TALLY

if TYPE_CHECKING:
    from gateway.dataplane.request import DataRequest
    from gateway.dataplane.server import HttpProtocol

log = logging.getLogger("gateway.proxy")
_NO_BODY = (204, 304)


def start(proto: HttpProtocol, req: DataRequest) -> bool:
    """Serve ``req`` by callbacks if it is the common case (then the connection's ``_task`` is the
    exchange); False leaves it, untouched, to the handler task."""
    app = req.app
    st = app.get(STATE)
    upstreams = app.get(UPSTREAMS)
    m = req.route
    if st is None or upstreams is None or m is None:
        return False
    started = time.perf_counter()
    p = prepare(req, st, m, upstreams)
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
    return True


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
