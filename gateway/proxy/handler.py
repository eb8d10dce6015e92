"""The data-path handler: route → decide → plan → execute, with the books (metrics, access log).

*decide* (``gateway.proxy.decide``) and *plan* (``gateway.proxy.plan``) are plain functions of the request, the
policy snapshot and the config snapshot, with no I/O (but a decision-cache miss); *execute* hands the plan to
its transport. A refusal is a ProxyError answered in the Prometheus error shape.
"""

from __future__ import annotations

import logging
import time

import aiohttp
from aiohttp import web

from gateway.accesslog import AccessLog
from gateway.clientip import client_ip
from gateway.errors import check_body_length
from gateway.lbac.pool import Rewritten, rewrite_off_loop
from gateway.limits.stage import admit, release
from gateway.proxy import filtered
from gateway.proxy.decide import decide
from gateway.proxy.errors import ProxyError, error_response
from gateway.proxy.fanout import execute as execute_fanout
from gateway.proxy.forward import Upstreams, forward, relay_websocket
from gateway.proxy.plan import FanOut, Filter, Forward, NeedsBody, Offload, Refuse, Respond, Stream, plan, upstream_of
from gateway.routes import RouteMatch, allowed_methods, match, not_found
from gateway.state import State, get_state
from gateway.tally import TALLY

log = logging.getLogger("gateway.proxy")
UPSTREAMS = web.AppKey("upstreams", Upstreams)
ACCESS_LOG = web.AppKey("access_log", AccessLog)


async def read_bounded(request: web.Request, limit: int) -> bytes:
    """Read a body the plan must see (``NeedsBody``), refusing it past ``limit`` bytes."""
    check_body_length(request.content_length, limit)
    buf = bytearray()
    while chunk := await request.content.read(limit + 1 - len(buf)):  # a chunked body arrives in pieces
        buf += chunk
        check_body_length(len(buf), limit)
    return bytes(buf)


async def handle(request: web.Request) -> web.StreamResponse:
    st = get_state(request)
    started = time.perf_counter()
    entry: dict[str, object] = {"method": request.method, "path": request.rel_url.raw_path}
    status = 500
    backend, scope = "none", "none"
    TALLY.in_flight += 1
    st.in_flight += 1
    if st.in_flight == 1:  # (set only when it dropped to 0)
        st.idle.clear()
    try:
        m = match(request.method, request.rel_url.raw_path)
        if m is None:
            allowed = allowed_methods(request.rel_url.raw_path)
            if allowed:
                names = ", ".join(sorted(allowed))
                raise ProxyError(405, f"method {request.method} not allowed here (allowed: {names})",
                                 "method_not_allowed", {"Allow": names})
            raise ProxyError(404, *not_found(request.rel_url.raw_path))
        backend, scope = m.route.backend, m.route.scope
        resp, status = await _serve(request, st, m, entry, started)
        return resp
    except ProxyError as exc:
        status = exc.status
        TALLY.refusal(exc.reason)
        entry["refusal"] = exc.reason
        entry["error"] = exc.message
        return error_response(exc.status, exc.message, exc.headers)
    finally:
        release(entry)  # the limit stage's in-flight counts
        TALLY.in_flight -= 1
        st.request_done()
        TALLY.request(backend, scope, status)
        entry.update(status=status, duration_ms=round((time.perf_counter() - started) * 1000, 3),
                     client_ip=entry.get("client_ip") or request.remote)
        request.app[ACCESS_LOG].write(entry)


async def _serve(request: web.Request, st: State, m: RouteMatch, entry: dict[str, object], started: float
                 ) -> tuple[web.StreamResponse, int]:
    """decide → limits → plan (→ read the body or rewrite off the loop, plan again) → execute."""
    cfg = st.config
    upstream = upstream_of(cfg, m.route)
    ip = client_ip(request.remote, request.headers.getall("X-Forwarded-For", []), cfg.trusted_proxies)
    decision, policies = await decide(st, cfg, m.route, request.headers, ip, entry)
    admit(cfg, m.route, decision, request.content_length, entry)  # limits: blocks, rates, concurrency
    body: bytes | None = None
    rewritten: Rewritten | None = None
    p = plan(st, cfg, m, upstream, decision, policies, request)
    for _ in range(2):  # at most one body and one rewrite
        if p.lbac is not None:
            entry["lbac"] = p.lbac
        if isinstance(p, NeedsBody):
            body = await read_bounded(request, p.limit)
        elif isinstance(p, Offload):
            rewritten = await rewrite_off_loop(p.args)
        else:
            break
        p = plan(st, cfg, m, upstream, decision, policies, request, body, rewritten)
    if p.lbac is not None:
        entry["lbac"] = p.lbac
    if isinstance(p, Refuse):
        raise p.error()
    if isinstance(p, NeedsBody | Offload):  # (a plan asks for each once: never reached)
        raise ProxyError(500, "the request could not be planned", "internal")
    if isinstance(p, Respond):
        return web.json_response(p.doc), 200
    TALLY.added(m.route.backend, time.perf_counter() - started)
    return await execute(request, request.app[UPSTREAMS].session(upstream), p, m, entry)


async def execute(request: web.Request, session: aiohttp.ClientSession, p: Forward | FanOut | Filter | Stream,
                  m: RouteMatch, entry: dict[str, object]) -> tuple[web.StreamResponse, int]:
    """Carry the plan out on a transport; the answer and its status (the transports decide nothing)."""
    route = m.route
    resp: web.StreamResponse
    try:
        if isinstance(p, FanOut):
            entry["fanout"] = len(p.legs.legs)
            resp, outcome = await execute_fanout(request, session, p.base, p.path, p.headers, p.legs, p.body_limit,
                                                  p.memory)
        elif isinstance(p, Filter):
            resp, outcome = await filtered.serve(request, session, p.task, p.headers, p.policies, p.body_limit)
        elif isinstance(p, Stream):
            resp, outcome = await relay_websocket(request, session, p.url, p.headers)
        else:
            resp, outcome = await forward(request, session, p.url, p.headers, p.body, p.body_limit)
    except ProxyError as exc:
        raise upstream_error(exc, route.backend, p.base) from None
    TALLY.upstream(route.backend, outcome.upstream_seconds)
    entry.update(upstream_ms=round(outcome.upstream_seconds * 1000, 3), bytes=outcome.bytes_out)
    return resp, outcome.status


def upstream_error(exc: ProxyError, backend: str, base: str) -> ProxyError:
    """A transport's 502/504 names the backend; the URL stays in the log, not in the answer."""
    if exc.status in (502, 504):
        log.warning("%s upstream %s: %s", backend, base, exc.message)
        return ProxyError(exc.status, f"{backend} {exc.message}", exc.reason)
    return exc
