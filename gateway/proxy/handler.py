"""The data-path handler: identify → classify → authorize → restrict → forward.

Every step before ``forward`` is a plain function of the request, the policy snapshot and the
config snapshot, with no I/O; a refusal is a ProxyError answered in the Prometheus error shape.
"""

from __future__ import annotations

import logging
import time

from aiohttp import web

from gateway.accesslog import AccessLog
from gateway.clientip import client_ip
from gateway.lbac import RewriteError, headermode
from gateway.lbac import fanout as lbac_fanout
from gateway.lbac import restrict as lbac
from gateway.lbac.limits_context import HEADER as LIMITS_CONTEXT
from gateway.lbac.limits_context import limits_context
from gateway.lbac.pool import check_nesting, enforce_bounded, plan_bounded
from gateway.lbac.probe import effective_mode
from gateway.lbac.remote_read import MAX_READ_BODY, restrict_read_request
from gateway.limits import lokiquery
from gateway.limits.stage import admit, release
from gateway.policy.datasource import user_policies
from gateway.proxy import filtered
from gateway.proxy.decide import decide
from gateway.proxy.errors import ProxyError, error_response
from gateway.proxy.fanout import execute as execute_fanout
from gateway.proxy.forward import Upstreams, forward, relay_websocket
from gateway.proxy.headers import upstream_headers
from gateway.proxy.rules import MAX_RULE_BODY, check_source_tenants
from gateway.routes import Kind, RouteMatch, allowed_methods, match, not_found
from gateway.state import State, get_state
from gateway.tally import TALLY

log = logging.getLogger("gateway.proxy")
UPSTREAMS = web.AppKey("upstreams", Upstreams)
ACCESS_LOG = web.AppKey("access_log", AccessLog)


async def _read_bounded(request: web.Request, limit: int) -> bytes:
    """Read a body the gateway must inspect, refusing it past ``limit`` bytes."""
    if request.content_length is not None and request.content_length > limit:
        raise ProxyError(413, f"request body exceeds {limit} bytes", "body_too_large")
    buf = bytearray()
    while chunk := await request.content.read(limit + 1 - len(buf)):  # a chunked body arrives in pieces
        buf += chunk
        if len(buf) > limit:
            raise ProxyError(413, f"request body exceeds {limit} bytes", "body_too_large")
    return bytes(buf)


async def _read_form(request: web.Request) -> bytes | None:
    if not request.body_exists:
        return None
    ctype = request.headers.get("Content-Type", "").split(";", 1)[0].strip().lower()
    if ctype != lbac.FORM:
        # Prometheus also parses multipart bodies: anything but a plain form could smuggle a parameter.
        raise ProxyError(415, "label-restricted queries must send parameters in the URL or as "
                         f"{lbac.FORM}", "bad_form")
    return await _read_bounded(request, lbac.MAX_FORM_BODY)


async def handle(request: web.Request) -> web.StreamResponse:
    st = get_state(request)
    started = time.perf_counter()
    entry: dict[str, object] = {"method": request.method, "path": request.rel_url.raw_path}
    status = 500
    backend, scope = "none", "none"
    TALLY.in_flight += 1
    st.in_flight += 1
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
    cfg = st.config
    route = m.route
    upstream = cfg.upstreams.get(route.backend)
    if upstream is None:
        raise ProxyError(404, f"no {route.backend} upstream is configured on this gateway", "no_upstream")
    ip = client_ip(request.remote, request.headers.getall("X-Forwarded-For", []), cfg.trusted_proxies)
    decision, policies = await decide(st, cfg, route, request.headers, ip, entry)
    limits = admit(cfg, route, decision, request.content_length, entry)  # blocks, rates, concurrency
    ident, tenant = decision.ident, decision.tenant
    reads = route.kind in lbac.RESTRICTED_KINDS
    filter_answer = bool(policies) and route.kind in filtered.KINDS  # rules, alerts, silences: filtered

    raw_query = request.rel_url.raw_query_string
    body: bytes | None = None
    label_headers: tuple[str, ...] = ()
    rewritten = False  # True when the body was re-encoded (its length and type change)
    content_type = ""
    fan: lbac_fanout.Plan | None = None  # several selectors: one restricted request each, answers merged
    if route.scope == "rules:write":
        if policies:
            # A recording rule evaluates without label policies and its results are queryable: refuse.
            raise ProxyError(403, "label-restricted tokens cannot write rules: rule results would bypass the "
                             "label policies", "lbac_unfilterable")
        if route.backend == "metrics" and request.method in ("POST", "PUT") and request.body_exists:
            body = await _read_bounded(request, MAX_RULE_BODY)
            user = request.headers.get(cfg.grafana_user_header)
            check_source_tenants(body, cfg, ident, lambda t: user_policies(st.cache, ident.policy.id, "metrics",
                                                                           t, user))
    if policies and reads and not filter_answer:
        if route.kind is Kind.TENANT_WIDE and (fan := lbac_fanout.plan(
                route.kind, m.upstream_path, request.method, raw_query, None, policies)) is None:
            raise ProxyError(403, "this endpoint cannot be filtered by label policies, and your token has some",
                             "lbac_unfilterable")
        mode = entry["lbac"] = effective_mode(st.extras, upstream)  # 503 for an unverified header mode
        label_headers = decision.label_headers() if policies is decision.policies \
            else lbac.headers_for(tenant, policies)
        if fan is not None:
            rewritten = True
            label_headers = () if mode == "enforce" else label_headers
        elif mode == "enforce" or route.kind is Kind.LOGQL_DELETE:
            if route.kind is Kind.REMOTE_READ:
                raw = await _read_bounded(request, MAX_READ_BODY)
                try:
                    fan = lbac_fanout.plan_remote_read(raw, policies) if mode == "enforce" else None
                    body = restrict_read_request(raw, policies) if fan is None else None
                except RewriteError as exc:
                    raise ProxyError(400, f"remote read refused by label-based access control: {exc}",
                                     "lbac_refused") from None
                content_type = request.headers.get("Content-Type", "application/x-protobuf")
            else:
                form = await _read_form(request)
                if mode == "enforce":
                    fan = await plan_bounded(route.kind, m.upstream_path, request.method, raw_query, form,
                                             policies)
                r = await enforce_bounded(route.kind, request.method, raw_query, form, policies) if fan is None \
                    else lbac.Restriction()
                raw_query = r.query if r.query is not None else raw_query
                body = r.body
                content_type = lbac.FORM
            rewritten = True
            if mode == "enforce":
                label_headers = ()
        elif route.kind is not Kind.REMOTE_READ:  # header mode: the backend filters what it runs
            form = await _read_form(request)
            check_nesting(route.kind, raw_query, form)  # the parse bound holds in both modes
            fan = lbac_fanout.plan_header_mode(route.kind, m.upstream_path, request.method, raw_query, form,
                                               policies)
            if fan is None:
                r = headermode.normalize(raw_query, form)
                raw_query, body, rewritten = r.query or "", r.body, r.body is not None
            else:
                rewritten = True

    loki = limits.loki if limits is not None and route.backend == "logs" else None
    if loki is not None:  # the policy's lokiQueryPolicy: checked here, and sent for Loki to apply too
        raw_query, empty = lokiquery.apply(loki, m.upstream_path, raw_query)
        if empty is not None:
            return web.json_response(empty), 200
    base = upstream.url_for(route.role.value)
    url = f"{base}{m.upstream_path}" + (f"?{raw_query}" if raw_query else "")
    headers = upstream_headers(request.headers, tenant, request.remote or "unknown", label_headers,
                               drop_body_headers=rewritten, limits_context=limits_context(
                                   request.headers.getall(LIMITS_CONTEXT, ()), route.backend, route.kind, policies))
    if loki is not None:
        headers[lokiquery.HEADER] = loki.header
    if rewritten and body:
        headers["Content-Type"] = content_type
    limit = cfg.limits.max_request_body
    if request.content_length is not None and request.content_length > limit:
        raise ProxyError(413, f"request body exceeds {limit} bytes", "body_too_large")
    session = request.app[UPSTREAMS].session(upstream)
    TALLY.added(route.backend, time.perf_counter() - started)
    resp: web.StreamResponse
    try:
        if filter_answer:
            entry["lbac"] = "filtered"
            resp, outcome = await filtered.serve(request, session, base, m, headers, policies, limit)
        elif fan is not None:
            entry["fanout"] = len(fan.legs)
            resp, outcome = await execute_fanout(request, session, base, m.upstream_path, headers, fan, limit,
                                                  cfg.limits.fanout_memory)
        elif route.websocket and request.headers.get("Upgrade", "").lower() == "websocket":
            resp, outcome = await relay_websocket(request, session, url, headers)
        else:
            resp, outcome = await forward(request, session, url, headers, body, limit)
    except ProxyError as exc:
        if exc.status in (502, 504):  # say which backend; the URL stays in the log, not in the answer
            log.warning("%s upstream %s: %s", route.backend, base, exc.message)
            raise ProxyError(exc.status, f"{route.backend} {exc.message}", exc.reason) from None
        raise
    TALLY.upstream(route.backend, outcome.upstream_seconds)
    entry.update(upstream_ms=round(outcome.upstream_seconds * 1000, 3), bytes=outcome.bytes_out)
    return resp, outcome.status
