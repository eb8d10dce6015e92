"""The forward-auth endpoints: the data path's decision, answered to another proxy's sub-request.

    POST /forward-auth/db-auth-gateway     GET|... /forward-auth/nginx     /forward-auth/ingress-nginx
    /forward-auth/traefik                  /forward-auth/envoy/<original path>

The original method and path (``callers``) map through the gateway's route table to a route and scope
(an unknown route is 403; db-auth-gateway's ``requiredScope`` must be the route's), then
``gateway.proxy.decide.decide`` takes the same decision as the data path: token, scope, realm and tenant,
IP ranges (X-Forwarded-For believed only from ``trusted_proxies``), expiry, stale snapshot, token use.
What the data path would do with a label-restricted request the proxy cannot do (rewrite a query, read a
form body, fan out) is refused here, and label policies pass only to a verified enforcing backend
(``enforcement``). A 200 carries ``X-Scope-OrgID``, the label policies, and ``Cache-Control: max-age``.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Final

from aiohttp import web

from gateway.clientip import client_ip
from gateway.config import Config
from gateway.decision_cache import Decision
from gateway.forwardauth import enforcement
from gateway.forwardauth.callers import CALLERS, ENVOY_PREFIX, Caller, Original
from gateway.lbac import fanout as lbac_fanout
from gateway.lbac import headermode
from gateway.lbac import restrict as lbac
from gateway.limits.stage import admit
from gateway.metrics import FORWARD_AUTH
from gateway.policy.selector import Selector
from gateway.proxy.decide import decide
from gateway.proxy.errors import ProxyError, error_response
from gateway.proxy.handler import ACCESS_LOG
from gateway.proxy.plan import NEVER_HEADER_MODE, check_rule_write, label_headers
from gateway.routes import Kind, Route, RouteMatch, Router, match
from gateway.state import State, get_state

log = logging.getLogger("gateway.forwardauth")

#: Paths db-auth-gateway carries that the gateway's own data path does not (gRPC over HTTP/2), from
#: db-auth-gateway's pkg/router/routes_tempo.go: the same scopes, so OTLP gRPC and Tempo's streaming
#: search get the same policies through it.
GRPC_ROUTES: Final = Router([
    *(Route("traces", frozenset({"POST"}), f"/tempopb.StreamingQuerier/{name}", "traces:read")
      for name in ("Search", "SearchTags", "SearchTagsV2", "SearchTagValues", "SearchTagValuesV2",
                   "MetricsQueryRange", "MetricsQueryInstant")),
    Route("traces", frozenset({"POST"}), "/opentelemetry.proto.collector.trace.v1.TraceService/Export",
          "traces:write"),
])
_FORM_METHODS: Final = frozenset({"POST", "PUT", "PATCH"})  # Go's ParseForm reads these bodies
_TRACES_READ: Final = "traces:read"
#: Tempo reads that hold no tenant data (Grafana's connection test, the version probe): any token may pass.
_NO_TENANT_DATA: Final = frozenset({"/api/echo", "/api/status/buildinfo"})
LABEL_POLICY: Final = "X-Prom-Label-Policy"
_COUNTED: dict[tuple[str, str], Any] = {}  # the counter's children by (caller, outcome): labels() costs a lock


def _count(caller: str, outcome: str) -> None:
    child = _COUNTED.get((caller, outcome))
    if child is None:
        child = _COUNTED[(caller, outcome)] = FORWARD_AUTH.labels(caller, outcome)
    child.inc()


def _route(orig: Original) -> RouteMatch:
    m = match(orig.method, orig.path) or GRPC_ROUTES.match(orig.method, orig.path)
    if m is None:
        raise ProxyError(403, f"no route of the gateway serves {orig.method} {orig.path[:200]}: requests it "
                         "cannot classify are refused", "unknown_route")
    if orig.required_scope is not None and orig.required_scope != m.route.scope:
        raise ProxyError(403, f"requiredScope {orig.required_scope[:40]!r} disagrees with the gateway's route "
                         f"table, which gives {orig.method} {orig.path[:200]} the {m.route.scope} scope",
                         "scope_mismatch")
    return m


def _label_policies(st: State, cfg: Config, m: RouteMatch, orig: Original, decision: Decision,
                    policies: tuple[Selector, ...]) -> tuple[str, ...]:
    """The X-Prom-Label-Policy values to return, or the refusal for what only the data path could do."""
    route = m.route
    check_rule_write(route, policies)  # the data path's refusal: a rule's results would bypass the policies
    if route.scope == "rules:write":
        if route.backend == "metrics" and orig.method in ("POST", "PUT") and cfg.forward_auth.ruler_tenant_federation:
            raise ProxyError(403, "rule-group writes through forward-auth are refused: the auth service cannot see "
                             "the group's source_tenants; write rules through the gateway's data path, or set "
                             "forward_auth.ruler_tenant_federation: false if the Mimir ruler runs without tenant "
                             "federation", "source_tenants_unchecked")
    if policies and route.scope == _TRACES_READ and m.upstream_path not in _NO_TENANT_DATA:
        # Tempo applies no label policies, whatever header it gets: only the data path filters traces
        # (trace by ID's answer, and search, tags and metrics once rewritten), and none of it is a header.
        raise ProxyError(403, "trace reads under trace selectors are filtered by the gateway's own data path only "
                         "(Tempo applies no label policies): point the Tempo data source at the gateway",
                         "lbac_unfilterable")
    if not policies or route.kind not in lbac.RESTRICTED_KINDS:
        return ()
    enforcement.check(st.extras, cfg, route.backend)
    if route.kind in NEVER_HEADER_MODE:  # the plan rewrites, fans out or filters these in every mode
        raise ProxyError(403, "this endpoint cannot be filtered by the backend's label policies; with a "
                         "label-restricted token use the gateway's own data path", "lbac_unfilterable")
    if orig.method in _FORM_METHODS and route.kind is not Kind.REMOTE_READ:
        raise ProxyError(403, "label-restricted reads through this proxy must use GET: the backend filters the "
                         "URL's query, and a form body is not visible to the auth service (set the data source's "
                         "HTTP method to GET)", "lbac_form_body")
    raw_query = orig.query or ""
    if lbac_fanout.plan_header_mode(route.kind, m.upstream_path, orig.method, raw_query, None, policies):
        raise ProxyError(403, "this read needs a query for the backend to filter by label policies (the gateway's "
                         "data path adds one); send a query, or use the gateway's own data path",
                         "lbac_unfilterable")
    if orig.query:
        headermode.normalize(orig.query, None)  # a parameter given twice: 400, as on the data path
    return label_headers(decision, policies)


def _answer(caller: Caller, cfg: Config, tenant: str, label_headers: tuple[str, ...]) -> web.Response:
    max_age = cfg.forward_auth.max_age
    headers: list[tuple[str, str]] = [("X-Scope-OrgID", tenant),
                                      ("Cache-Control", f"max-age={max_age}" if max_age else "no-store")]
    if label_headers:
        if caller.joined_policies:
            headers.append((LABEL_POLICY, ",".join(label_headers)))
        else:
            headers += [(LABEL_POLICY, v) for v in label_headers]
    if caller.strip_headers:  # the credential never reaches the backend; nor a client's own label policy
        headers.append(("x-envoy-auth-headers-to-remove",
                        "authorization" if label_headers else "authorization, x-prom-label-policy"))
    return web.Response(status=200, headers=headers)


def _refusal(caller: Caller, exc: ProxyError) -> web.Response:
    status = exc.status
    if caller.deny_only and status != 401:
        status = 403  # nginx and db-auth-gateway read anything else as an error of the auth service
    headers = {**exc.headers, "Cache-Control": "no-store"}
    return error_response(status, exc.message, headers)


async def handle(request: web.Request) -> web.StreamResponse:
    """One forward-auth sub-request: 200 with the tenant and label policies, or 401/403 (never forwards)."""
    kind = request.match_info.get("caller", "")
    caller = CALLERS["envoy"] if request.path.startswith(ENVOY_PREFIX + "/") else CALLERS.get(kind)
    if caller is None:
        return error_response(404, f"unknown forward-auth caller {kind[:40]!r} (known: {', '.join(CALLERS)})")
    st = get_state(request)
    cfg = st.config
    started = time.perf_counter()
    entry: dict[str, object] = {"forward_auth": caller.kind}
    outcome, status = "error", 500  # until answered
    try:
        orig = await caller.read(request)
        entry.update(method=orig.method, path=orig.path[:1024])
        m = _route(orig)
        ip = client_ip(request.remote, request.headers.getall("X-Forwarded-For", []), cfg.trusted_proxies)
        decision, policies = await decide(st, cfg, m.route, request.headers, ip, entry)
        admit(cfg, m.route, decision, None, entry, forward_auth=True)  # tenant blocks, request rates
        resp = _answer(caller, cfg, decision.tenant, _label_policies(st, cfg, m, orig, decision, policies))
        outcome, status = "allowed", 200
    except ProxyError as exc:
        outcome = exc.reason
        entry.update(refusal=exc.reason, error=exc.message)
        if exc.reason == "bad_forward_auth_request":
            log.warning("forward-auth (%s) from %s: %s", caller.kind, request.remote, exc.message)
        resp = _refusal(caller, exc)
        status = resp.status
    finally:
        _count(caller.kind, outcome)
        entry.update(status=status, duration_ms=round((time.perf_counter() - started) * 1000, 3),
                     client_ip=entry.get("client_ip") or request.remote)
        request.app[ACCESS_LOG].write(entry)
    return resp


def add_routes(app: web.Application) -> None:
    """Before the data path's catch-all; any method (Envoy's check request keeps the original one)."""
    app.router.add_route("*", ENVOY_PREFIX + "/{tail:.*}", handle)
    app.router.add_route("*", "/forward-auth/{caller}", handle)
