"""The common case on the protocol data path without a coroutine: a request whose decision is cached
(``gateway.proxy.fastpath.prepare``) goes out on an idle pooled upstream connection from the parser's
callback, and a small whole answer (or a push's 204) is written from the upstream connection's callback.
A body with a Content-Length (a push) goes upstream piece by piece as the parser reads it, the head with
the first piece; while the upstream's socket buffer is full the client's connection stops reading. A
body that breaks (the client leaves, its deadline passes, the upstream closes) ends as ``forward`` ends
it, and an upstream connection whose request body was not all sent is never reused. Chunked bodies,
``Expect: 100-continue`` and a body read ahead of its turn (pipelining) take the task.

Everything else takes the ordinary path: a request ``prepare`` declines, or with no idle connection, is
served by the connection's handler task (``handler.handle``) as before; once the request is out, an answer
to stream (large, slow, HEAD), or a pooled connection the upstream had closed (retried once, as the lean
client does), continues in a task running the same code as ``forward`` does. An ``Exchange`` stands in
for the handler task on its connection (``done``, ``cancel``), and keeps the books exactly as
``handler.handle`` does: in-flight counts, the request and refusal metrics, the access-log line, and the
same 502/504 answers for an upstream that fails. The limit stage's share (request rates, a read's concurrent
queries: ``Prepared.limits``) is taken when it starts, all or none (none: the handler refuses the request);
its in-flight counts are given back once, with the books, however the exchange ends.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any, cast

import httptools
from aiohttp import web

from gateway.accesslog import AccessLog
from gateway.logfmt import ACCESS_JSON as _ACCESS_JSON
from gateway.logfmt import json_string as _str
from gateway.proxy.errors import ProxyError, error_response, internal_error
from gateway.proxy.fastclient import IDEMPOTENT, FastClientError, FastResponse, _Conn
from gateway.proxy.fastpath import Prepared, prepare
from gateway.proxy.forward import Outcome, _failure, _forward_fast, answer_fast, whole_body
from gateway.proxy.handler import ACCESS_LOG, UPSTREAMS, upstream_error
from gateway.state import STATE, State
from gateway.tally import TALLY

if TYPE_CHECKING:
    from gateway.dataplane.request import DataRequest
    from gateway.dataplane.server import HttpProtocol

log = logging.getLogger("gateway.proxy")
_LBAC_FIELD: dict[str | None, str] = {mode: f',"lbac":{_str(mode)}' for mode in ("header", "enforce")}
_MAX_FIELD = 8190  # aiohttp's max_field_size and max_line_size, which the lean client's parser applies
_MAX_HEAD = 64 * 1024  # a response head the relay waits for, at most; past it the lean client's parser reads it


def start(proto: HttpProtocol, req: DataRequest) -> bool:
    """Serve ``req`` by callbacks if it is the common case (then the connection's ``_task`` is the
    exchange); False leaves it, untouched, to the handler task."""
    refs = proto.plane.refs
    if refs is None:  # (kept once the application has all three)
        app = req.app
        refs = (app.get(STATE), app.get(UPSTREAMS), app.get(ACCESS_LOG))
        if refs[0] is None or refs[1] is None or refs[2] is None:
            return False
        proto.plane.refs = refs
    m = req.route
    if m is None:
        return False
    st, upstreams, access_log = refs
    body = req.body_exists
    head = req.method == "HEAD"
    if body and (req.content_length is None or req.expect_continue or req.content.received or head):
        return False  # chunked, Expect: 100-continue, a queued request's body already read: the task's
    started = time.perf_counter()
    try:
        p = prepare(req, st, m, upstreams)
    except Exception:  # a bug here must not cost the request: the handler decides it from scratch
        log.exception("data path: preparing %s %s failed", req.method, req.rel_url.raw_path)
        return False
    if p is None:
        return False
    lim = p.limits  # request rates, a read's concurrent queries (gateway.limits)
    if lim is not None and not lim.acquire():
        return False  # a limit is reached: the handler refuses it, and counts it, as any other
    conn = p.fast.idle(p.url, body)
    if conn is None:
        if lim is not None:
            lim.give_back()
        return False
    try:
        waiter = conn.start(p.head, head, not body)
    except FastClientError:
        conn.close()
        if lim is not None:
            lim.give_back()
        return False
    ex = Exchange(proto, req, st, p, conn, started, conn.last_io, access_log)  # (last_io: the loop's time, sent)
    proto._task = ex  # it answers done() and cancel() like the task
    waiter.add_done_callback(ex._answered)
    if body:  # the head goes out with the body's first piece (Exchange.piece)
        ex.pending = p.head
        req.content.sink = ex
    if not head:
        relay = conn.relay_state
        if isinstance(relay, _Relay):  # the one that read this connection's last answer, whole (and so reset)
            conn.relay_state = None
            relay.ex = ex
        else:
            relay = _Relay(ex)
        conn.relay = relay.feed
    return True


class _GiveUp(Exception):
    """Raised in a parser callback: not a response the relay takes."""


#: Response heads a relay has read whole with llhttp, by their exact bytes (status line to the blank line):
#: status, Content-Length, keep-alive and fields. The same bytes parse the same way, so an answer that is
#: a known head followed by exactly its body, in one read, is relayed without parsing it again (an
#: upstream repeats its answers' heads; its Date header moves them on once a second).
_KNOWN_HEADS: dict[bytes, tuple[int, int, bool, list[tuple[bytes, bytes]]]] = {}
_MAX_KNOWN_HEADS = 256


class _Relay:
    """The upstream's response read with httptools as it arrives, for the case that dominates: a head and
    a small body with one Content-Length, all in the reads that complete the head. Anything else (1xx,
    204, 304, chunked or close-delimited bodies, a body still arriving after the head's read, a second
    response, a parse error) is handed back: the lean client's own parser reads it all, as without a relay.
    The parser is between two messages whenever a relay starts reading an answer (it is new, or it read
    the connection's previous answer whole), which is what lets a known head skip it.
    """

    __slots__ = ("ex", "parser", "raw", "size", "fields", "length", "head_done", "complete", "keep", "messages")

    def __init__(self, ex: Exchange):
        self.parser = httptools.HttpResponseParser(self)
        self.ex = ex
        self._clear()

    def _clear(self) -> None:
        """Ready for the next answer on its connection (its parser is between two messages). Done when an
        answer is read whole, not when the next starts: an answer with a known head leaves all this as it
        was, so reusing the relay for the next request only sets its ``ex``."""
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
        if status < 200 or status == 304 or p.get_http_version() not in ("1.1", "1.0"):
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
        if status == 204:  # (a push's answer) no body, and no framing field to read otherwise
            if length is not None:
                raise _GiveUp
            length = b"0"
        elif length is None or int(length) > self.ex.p.fast.small_body:
            raise _GiveUp
        self.length = int(length)
        self.head_done = True

    def on_message_complete(self) -> None:
        self.complete = True
        self.keep = self.parser.should_keep_alive()  # (llhttp resets its flags once this returns)

    def feed(self, data: bytes) -> bytes | None:
        """None: taken (the head is still incomplete, or the answer is written); else all bytes so far."""
        if not self.raw:
            end = data.find(b"\r\n\r\n") + 4
            if end > 3:
                head = data[:end]
                known = _KNOWN_HEADS.get(head)
                if known is not None:
                    status, length, keep, fields = known
                    ex = self.ex
                    if len(data) - end == length <= ex.p.fast.small_body:
                        if keep:
                            ex.conn.relay_state = self
                        ex._relayed(status, head, data[end:], fields, keep)
                        return None
        self.raw.append(data)
        self.size += len(data)
        try:
            self.parser.feed_data(data)
        except Exception:  # _GiveUp, a parse error, an upgrade: the lean client's parser decides
            return b"".join(self.raw)
        if self.complete:
            whole = b"".join(self.raw) if len(self.raw) > 1 else data
            p = self.parser
            status = p.get_status_code()
            if self.keep:
                self.ex.conn.relay_state = self  # the next answer on the connection may use it again
            if len(_KNOWN_HEADS) >= _MAX_KNOWN_HEADS:
                _KNOWN_HEADS.clear()
            fields, length, keep = self.fields, self.length, self.keep
            split = len(whole) - length
            head = whole[:split]
            _KNOWN_HEADS[head] = (status, length, keep, fields)
            self._clear()  # (an idle connection holds no answer)
            self.ex._relayed(status, head, whole[split:], fields, keep)
            return None
        if self.head_done or self.size > _MAX_HEAD:
            return b"".join(self.raw)
        return None


class Exchange:
    """One request served by callbacks (see the module docstring).

    One is made per request: the state every exchange starts in is the class's (no ``__slots__``, for that).
    """

    _done = False
    pending = b""  # a streamed body's request head, until its first piece
    paused = False  # the client's reading is paused while the upstream's write buffer drains
    held: Any = None  # the limit stage's in-flight counts to give back, once (``_release``)
    _kept = False  # the books are kept (``_count``)

    def __init__(self, proto: HttpProtocol, req: DataRequest, st: State, p: Prepared, conn: _Conn,
                 started: float, sent_at: float, access_log: AccessLog):
        self.proto, self.req, self.st, self.p, self.conn = proto, req, st, p, conn
        self.started, self.sent_at, self.log = started, sent_at, access_log
        lim = p.limits
        if lim is not None and lim.rows:
            self.held = lim
        # handler.handle's bookkeeping, in its order (its access-log entry is made at the end: ``_entry``)
        st.in_flight += 1
        if st.in_flight == 1:  # (set only when it dropped to 0)
            st.idle.clear()
        st.cache.record_use(p.decision.ident.token.id)
        TALLY.begun(p.m.route.backend, time.perf_counter() - started)  # (in flight, and the added latency)

    def _entry(self) -> dict[str, object]:
        """The access-log entry ``handler.handle`` and ``_serve`` make, up to the answer's fields."""
        req, p = self.req, self.p
        d = p.decision
        ident = d.ident
        entry: dict[str, object] = {"method": req.method, "path": req.rel_url.raw_path, "token_id": ident.token.id,
                                    "policy": ident.policy.name, "tenant": d.tenant, "client_ip": d.client_ip()}
        if p.lbac is not None:
            entry["lbac"] = p.lbac
        return entry

    # ---- a streamed request body (the body's sink: gateway.dataplane.body) ---------------------------

    def piece(self, data: bytes) -> None:
        """A piece of the client's body, as it arrives: upstream at once, the head with the first piece.
        Answered (or failed) before the body is all sent: the rest is not sent (``forward`` stops reading it
        then), and the connection is not reused. Called from the client's parser: nothing is answered here
        (a failed write fails the upstream connection; its callback answers, outside the parser)."""
        conn = self.conn
        if self._done or conn.waiter is None:
            self.req.content.sink = None
            return
        if self.pending:
            data, self.pending = self.pending + data, b""
        try:
            conn.send(data)
        except Exception as exc:  # (a closed upstream connection: ServerDisconnected)
            self.req.content.sink = None
            conn._fail(exc if isinstance(exc, FastClientError) else FastClientError(repr(exc)))
            return
        if conn.writing_paused and not self.paused:  # flow control: wait for the upstream to take it
            self.paused = True
            conn.on_writable = self._writable
            self.proto._pause()

    def _writable(self) -> None:
        if self.paused:
            self.paused = False
            self.proto._resume()

    def failed(self, exc: BaseException) -> None:
        """The client's body broke (its deadline, a parse error) while the client is still connected: the
        upstream connection is failed with it, and answered as ``forward`` answers (502). A client that went
        away cancels the exchange instead (``cancel``)."""
        self.req.content.sink = None
        if not self._done and not self.proto.closed and self.conn.waiter is not None:
            self.conn._fail(exc)

    def _unhook(self) -> None:
        """The answer is here (or the exchange ends): stop sending the body; a body not all sent spends the
        upstream connection."""
        req = self.req
        req.content.sink = None
        self.conn.on_writable = None
        if not req.content.is_eof():
            self.conn.broken = True
        if self.paused:
            self.paused = False
            self.proto._resume()

    # ---- what the connection asks of its handler task ----------------------------------------------

    def done(self) -> bool:
        return self._done

    def cancel(self) -> bool:
        """The client went away: close the upstream connection (its answer is not wanted)."""
        if self._done:
            return False
        self._done = True
        if self.req.body_exists:
            self._unhook()
        self.conn.close()
        self._books(500, None)
        self.proto._task = None
        return True

    # ---- the answer --------------------------------------------------------------------------------

    def _relayed(self, status: int, head: bytes, body: bytes, fields: list[tuple[bytes, bytes]], keep: bool
                 ) -> None:
        """A whole small answer read by the relay (its raw head and its body): the connection back to the
        pool, the answer written.

        The end of most requests, so ``_end``, ``_answered_books``, ``_count`` and ``_after`` are written
        out here for the common case (a JSON access log, a decision that knows its client address): the
        same books in the same order, in fewer calls (the interpreter is most of a request's cost)."""
        if self._done:
            return
        req = self.req
        if req.body_exists:
            self._unhook()
        conn = self.conn
        conn.relayed_done(keep)
        try:
            req.respond_raw(head, fields, body)
            length = len(body)
            self._done = True  # (_end)
            p = self.p
            # The access-log line up to its answer's fields, kept on ``p`` (one decision, plan and method)
            # for the path it was made for: a connection that repeats its request formats only the rest.
            method, path = req.method, req.rel_url.raw_path
            line = p.log_head
            if line is None or line[1] != path or line[0] != method:
                who = p.decision.log_fields()
                line = p.log_head = None if who is None else (
                    method, path, f'{_ACCESS_JSON}"method":{_str(method)},"path":{_str(path)},{who}'
                                  f'{_LBAC_FIELD.get(p.lbac, "")}')
            access_log = self.log
            if line is None or not access_log.templated():
                self._answered_books(status, length, conn.headers_at - self.sent_at)
            else:
                upstream_seconds = conn.headers_at - self.sent_at
                self._kept = True  # (_count)
                held = self.held
                if held is not None:
                    self.held = None
                    held.release()
                route = p.m.route
                TALLY.answered(route.backend, route.scope, status, upstream_seconds)
                self.st.request_done()
                access_log.write_json(
                    f'{line[2]},"upstream_ms":{round(upstream_seconds * 1000, 3)!r},"bytes":{length},'
                    f'"status":{status},"duration_ms":{round((time.perf_counter() - self.started) * 1000, 3)!r}')
            proto = self.proto  # (_after)
            if proto._task is self:
                proto._task = None
            proto._after(req)
        except Exception:
            self._crashed()

    def _answered(self, fut: asyncio.Future[None]) -> None:
        exc = fut.exception() if not fut.cancelled() else asyncio.CancelledError()
        if self._done:
            return
        req = self.req
        if req.body_exists:
            self._unhook()
        try:
            if exc is not None:
                self.conn.close()
                if (isinstance(exc, FastClientError) and req.method in IDEMPOTENT and self.conn.got == 0
                        and not req.body_exists):  # (a body cannot be sent twice)
                    # The upstream had closed the pooled connection: once more, as the lean client does.
                    p = self.p
                    self._continue(_forward_fast(cast(web.Request, req), p.fast, p.url, p.headers, None))
                elif isinstance(exc, OSError):
                    self._refused(self._upstream_error(_failure(exc)))
                else:
                    raise exc
                return
            up = FastResponse(self.conn, self.sent_at)
            body = whole_body(up, req.method)
            if body is not None:
                req.respond(up.status, up.reason, up.headers, body)
                self._end(up.status, len(body), up.upstream_seconds)
            else:
                self._continue(answer_fast(cast(web.Request, req), up))
        except Exception:
            self._crashed()

    def _upstream_error(self, exc: ProxyError) -> ProxyError:
        """``handler.execute``'s mapping: name the backend; the URL stays in the log."""
        return upstream_error(exc, self.p.m.route.backend, self.p.upstream_base)

    def _end(self, status: int, bytes_out: int, upstream_seconds: float) -> None:
        """An answer written by callbacks: its books, then the connection's next request."""
        self._done = True
        self._answered_books(status, bytes_out, upstream_seconds)
        self._after()

    def _answered_books(self, status: int, bytes_out: int, upstream_seconds: float) -> None:
        """``_serve``'s and ``handle``'s books of an answer, with the access-log line from its template when
        it is JSON."""
        TALLY.upstream(self.p.m.route.backend, upstream_seconds)
        upstream_ms = round(upstream_seconds * 1000, 3)
        who = self.p.decision.log_fields()
        if who is None or not self.log.templated():
            entry = self._entry()
            entry.update(upstream_ms=upstream_ms, bytes=bytes_out)
            self._books(status, None, entry)
        else:
            self._count(status)
            req, p = self.req, self.p
            self.log.write_json(
                f'{_ACCESS_JSON}"method":{_str(req.method)},"path":{_str(req.rel_url.raw_path)},'
                f'{who}{_LBAC_FIELD.get(p.lbac, "")},"upstream_ms":{upstream_ms!r},'
                f'"bytes":{bytes_out},"status":{status},"duration_ms":'
                f'{round((time.perf_counter() - self.started) * 1000, 3)!r}')

    def _refused(self, exc: ProxyError) -> None:
        self._done = True
        self._books(exc.status, exc)
        req, proto = self.req, self.proto
        if not req.started and proto._refusal is not None and req.content.exception() is not None:
            proto._close_with_refusal()  # its own body did not parse: that is the answer (as HttpProtocol._run)
        elif not req.started:
            req.write_whole(error_response(exc.status, exc.message, exc.headers))
        self._after()

    def _crashed(self) -> None:
        log.exception("data path: unhandled error for %s %s", self.req.method, self.req.rel_url.raw_path)
        if not self._done:
            self._done = True
            self._books(500, None)
        req, proto = self.req, self.proto
        if not req.started and not proto.closed:
            req.keep_alive = False
            req.write_whole(internal_error())
        proto._close()
        self._release()  # (if the books broke off before it)
        self._after()

    def _after(self) -> None:
        proto = self.proto
        if proto._task is self:
            proto._task = None
        proto._after(self.req)

    def _release(self) -> None:
        """The limit stage's in-flight counts back (``handler.handle``'s ``release``), once however the
        exchange ends."""
        held = self.held
        if held is not None:
            self.held = None
            held.release()

    def _count(self, status: int) -> None:
        """``handler.handle``'s ``finally``, but for the access-log line."""
        self._kept = True
        held = self.held
        if held is not None:  # (``_release``, inline: it runs per request under a concurrency limit)
            self.held = None
            held.release()
        route = self.p.m.route
        TALLY.in_flight -= 1
        self.st.request_done()
        TALLY.request(route.backend, route.scope, status)  # (see _relayed, which does this inline)

    def _books(self, status: int, refusal: ProxyError | None, entry: dict[str, object] | None = None) -> None:
        """``handler.handle``'s ``except ProxyError`` and ``finally``."""
        if entry is None:
            entry = self._entry()
        if refusal is not None:
            TALLY.refusal(refusal.reason)
            entry["refusal"] = refusal.reason
            entry["error"] = refusal.message
        self._count(status)
        entry.update(status=status, duration_ms=round((time.perf_counter() - self.started) * 1000, 3),
                     client_ip=entry.get("client_ip") or self.req.remote)
        self.log.write(entry)

    # ---- the rest in a task ---------------------------------------------------------------------------

    def _continue(self, step: Coroutine[Any, Any, tuple[web.StreamResponse, Outcome]]) -> None:
        """Finish in a task that stands for the exchange on the connection from now on."""
        self._done = True  # cancel() now reaches the task
        self.proto._task = task = self.proto.loop.create_task(self._rest(step))
        task.add_done_callback(self._rest_done)

    def _rest_done(self, task: asyncio.Task[None]) -> None:
        """A task cancelled before it ran (the client left in the same loop turn) never entered ``_rest``:
        its books, and the limits' counts, are kept here."""
        if not self._kept:
            self._books(500, None)
            if self.proto._task is task:
                self.proto._task = None
        self._release()

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
            self._answered_books(outcome.status, outcome.bytes_out, outcome.upstream_seconds)
            if not req.started:
                req.write_whole(resp)
        proto._task = None
        proto._after(req)
