"""The handler's decision for the common case, taken without awaiting anything: a bodiless request whose
decision is cached, forwarded as it is (no policies), with the label-policy header (header mode), or with
its query rewritten inline (enforce mode, no fan-out).

``prepare`` mirrors ``handler._serve`` step for step for that case and returns the upstream request it
would send, or None whenever anything else would happen (a decision-cache miss, team rules, a fan-out, a
refusal, a rewrite heavy enough for the pool, a body to read, an https upstream...): the caller then
serves the request through ``handler.handle``, which decides again from scratch. So ``prepare`` has no
side effect, and a request it declines behaves exactly as before.

    p = prepare(request, st, m)
    if p is None:
        ...  # await handle(request)
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Final, cast

from multidict import CIMultiDict
from yarl import URL

from gateway.clientip import client_ip
from gateway.lbac import RewriteError, bounds, headermode
from gateway.lbac import fanout as lbac_fanout
from gateway.lbac import restrict as lbac
from gateway.lbac.limits_context import HEADER as LIMITS_CONTEXT
from gateway.lbac.limits_context import limits_context
from gateway.lbac.pool import _LOGQL, _MATCHES, _PROMQL, check_nesting, weigh
from gateway.lbac.probe import effective_mode, probe_of
from gateway.limits.stage import fast_plan as limits_plan
from gateway.limits.stage import fast_refund as limits_refund
from gateway.limits.stage import fast_take as limits_take
from gateway.policy.datasource import user_policies
from gateway.policy.decision import Denied, IPAddress
from gateway.proxy.decision_cache import Decision
from gateway.proxy.errors import ProxyError
from gateway.proxy.fastclient import FastClient, request_head
from gateway.proxy.forward import _FAST, Upstreams
from gateway.proxy.headers import upstream_headers
from gateway.routes import Kind, RouteMatch

if TYPE_CHECKING:
    from gateway.config import Upstream
    from gateway.dataplane.request import DataRequest
    from gateway.policy.selector import Selector
    from gateway.state import State

#: Route kinds whose requests ``prepare`` never takes: a body to read, a WebSocket, an answer to filter.
_DECLINED_KINDS: Final = frozenset({Kind.REMOTE_READ, Kind.LOGQL_DELETE, Kind.LOGQL_TAIL, Kind.TENANT_WIDE,
                                    Kind.RULE_STATE, Kind.ALERT_STATE, Kind.RULE_CONFIG, Kind.ALERTMANAGER})
_POOLED_KINDS: Final = _PROMQL | _LOGQL | frozenset(_MATCHES)
_FANOUT_KINDS: Final = frozenset({Kind.LOGQL, Kind.LOGQL_OPTIONAL})  # plan_header_mode may fan these out
#: Header mode's query normalization (a pure function of the query string) for kinds that never fan out.
_NORMALIZED: Final[bounds.SizedLRU[tuple[Kind, str, str], str]] = bounds.SizedLRU(1024)
_UNSEEN: Final = object()
_MAX_MEMO: Final = 16  # facts kept per connection and header set (one per method and route), queries per facts


class Prepared:
    """The upstream request of a prepared request, and what the access log and metrics need of it."""

    __slots__ = ("m", "decision", "lbac", "url", "fast", "headers", "head", "upstream_base", "limits")

    def __init__(self, m: RouteMatch, decision: Decision, lbac_mode: str | None, url: URL, fast: FastClient,
                 headers: CIMultiDict[str], head: bytes, upstream_base: str):
        self.m, self.decision, self.lbac, self.url, self.fast = m, decision, lbac_mode, url, fast
        self.headers, self.head, self.upstream_base = headers, head, upstream_base
        self.limits: tuple[tuple[str, float, float], ...] = ()  # request-rate buckets (gateway.limits.stage)


def _enforce_inline(kind: Kind, path: str, method: str, raw_query: str,
                    policies: tuple[Selector, ...]) -> lbac.Restriction | None:
    """``plan_bounded`` then ``enforce_bounded`` for a bodiless request, when both run inline and no
    fan-out is planned; None otherwise (refusals included)."""
    try:
        if kind in _POOLED_KINDS and bounds.INLINE_WEIGHT < weigh(kind, raw_query, None, len(policies)):
            return None
        if lbac_fanout.plan(kind, path, method, raw_query, None, policies) is not None:
            return None
        return lbac.enforce(kind, method, raw_query, None, policies)
    except (ProxyError, RewriteError):
        return None


class _Facts:
    """What ``prepare`` derives from one header set, one method and one route: fixed while the config
    object and the policy cache's generation stay the ones it was derived under (the decision cache's own
    rule; the token's expiry is checked per request), and for a label-restricted read while the LBAC probe
    keeps the verdict its mode came from, so a keep-alive client's next request reuses it."""

    __slots__ = ("cfg", "gen", "decision", "upstream", "fast", "base", "mode", "verdict", "block", "queries",
                 "limits")

    def __init__(self, cfg: object, gen: int, decision: Decision, upstream: Upstream, fast: FastClient, base: str,
                 mode: str | None, verdict: object):
        self.cfg, self.gen, self.decision, self.upstream, self.fast = cfg, gen, decision, upstream, fast
        self.base, self.mode, self.verdict = base, mode, verdict
        # the upstream headers and the head after its request line (one per facts: the mode is fixed)
        self.block: tuple[CIMultiDict[str], bytes] | None = None
        # (upstream path, query) -> the query sent upstream under ``mode``, or None: declined
        self.queries: dict[tuple[str, str], str | None] = {}
        self.limits: tuple[tuple[str, float, float], ...] = ()  # request-rate buckets (gateway.limits.stage)


def _facts(request: DataRequest, st: State, m: RouteMatch, upstreams: Upstreams) -> _Facts | None:
    """``handler._serve``'s steps up to the query, for a route ``prepare`` may take; None declines."""
    route = m.route
    if route.websocket or route.scope == "rules:write" or route.kind in _DECLINED_KINDS:
        return None
    cfg = st.config
    upstream = cfg.upstreams.get(route.backend)
    if upstream is None:
        return None
    headers = request.headers
    memo = request.memo  # what was derived from these same headers on this connection (and peer)
    facts = cast(tuple[object, IPAddress | None, str | None, str | None] | None, memo.get("facts"))
    if facts is None or facts[0] is not cfg:  # (a reload may change the trusted proxies)
        ip = client_ip(request.remote, headers.getall("X-Forwarded-For", ()), cfg.trusted_proxies)
        facts = (cfg, ip, headers.get("Authorization"), headers.get("X-Scope-OrgID"))
        memo["facts"] = facts
    _, ip, auth, org = facts
    gen = st.cache.generation
    decision = st.decisions.get((auth, org, route.backend, route.scope, ip), gen, cfg, time.time())
    if decision is None or (limits := limits_plan(cfg, route, decision)) is None:  # None: the handler's stage
        return None
    reads = route.kind in lbac.RESTRICTED_KINDS
    mode: str | None = None
    verdict: object = None
    if reads and not decision.policies:
        if "X-Prom-Label-Policy" in headers:
            return None
        try:
            if user_policies(st.cache, decision.ident.policy.id, route.backend, decision.tenant,
                             headers.get(cfg.grafana_user_header)):
                return None  # team rules narrow this token: the handler applies them
        except Denied:
            return None
    elif reads:
        verdict = probe_of(st.extras).verdicts.get(upstream.signal)  # (the mode is a function of it)
        try:
            mode = effective_mode(st.extras, upstream)
        except ProxyError:
            return None
    fast = _FAST.get(upstreams.session(upstream))
    if fast is None or fast.closed:
        return None
    f = _Facts(cfg, gen, decision, upstream, fast, upstream.url_for(route.role.value), mode, verdict)
    f.limits = limits
    return f


def _restricted_query(f: _Facts, m: RouteMatch, method: str, raw_query: str) -> str | None:
    """The query a label-restricted read sends upstream in ``f.mode``, or None where the handler must serve
    it (a fan-out, a refusal, a body); a pure function of the query, the method and the decision's policies."""
    kind, path, policies = m.route.kind, m.upstream_path, f.decision.policies
    if f.mode == "enforce":
        r = _enforce_inline(kind, path, method, raw_query, policies)
        return None if r is None or r.body is not None else r.query if r.query is not None else raw_query
    normalized = _NORMALIZED.get((kind, path, raw_query))
    if normalized is None:
        try:
            check_nesting(kind, raw_query, None)
            if lbac_fanout.plan_header_mode(kind, path, method, raw_query, None, policies) is not None:
                return None
            n = headermode.normalize(raw_query, None)
        except (ProxyError, RewriteError):
            return None
        if n.body is not None:
            return None
        normalized = n.query or ""
        if kind not in _FANOUT_KINDS:  # (else the plan depends on the policies too)
            _NORMALIZED.put((kind, path, raw_query), normalized, len(normalized))
    return normalized


def prepare(request: DataRequest, st: State, m: RouteMatch, upstreams: Upstreams) -> Prepared | None:
    """The upstream request ``handler._serve`` would send for ``request``, if it is the common case."""
    memo = request.memo
    key = (request.method, id(m.route))  # (routes are module-level objects: their ids are stable)
    f = cast(_Facts | None, memo.get(key))
    cache = st.cache
    if f is None or f.cfg is not st.config or f.gen != cache.generation or f.fast.closed or (
            f.mode is not None and probe_of(st.extras).verdicts.get(f.upstream.signal) is not f.verdict):
        f = _facts(request, st, m, upstreams)
        if f is None:
            return None
        if len(memo) >= _MAX_MEMO:
            memo.clear()
        memo[key] = f
    decision = f.decision
    if cache.stale or time.time() >= decision.expires:  # (identify refuses at expires_at <= now)
        return None
    raw_query = request.rel_url.raw_query_string
    label_headers: tuple[str, ...] = ()
    rewritten = False
    mode = f.mode
    if mode is not None:
        qkey = (m.upstream_path, raw_query)
        got = f.queries.get(qkey, _UNSEEN)
        if got is _UNSEEN:
            if len(f.queries) >= _MAX_MEMO:
                f.queries.clear()
            got = f.queries[qkey] = _restricted_query(f, m, request.method, raw_query)
        sent = cast(str | None, got)
        if sent is None:
            return None
        raw_query = sent
        if mode == "enforce":
            rewritten = True
        else:
            label_headers = decision.label_headers()
    fast = f.fast
    try:
        url = URL(f"{f.base}{m.upstream_path}" + (f"?{raw_query}" if raw_query else ""))
    except ValueError:
        return None
    if not fast.accepts(url):
        return None
    hit = f.block
    if hit is None:
        out: CIMultiDict[str] = upstream_headers(
            request.headers, decision.tenant, request.remote or "unknown", label_headers,
            drop_body_headers=rewritten, limits_context=limits_context(
                request.headers.getall(LIMITS_CONTEXT, ()), m.route.backend, m.route.kind,
                decision.policies))
        try:
            head = request_head(request.method, url, out, None)
        except ValueError:
            return None
        f.block = (out, head[head.index(b"\r\n"):])
    else:
        out, block = hit
        line = f"{request.method} {url.raw_path_qs} HTTP/1.1"
        if "\r" in line or "\n" in line or "\x00" in line:  # (as request_head refuses them)
            return None
        head = line.encode("utf-8") + block
    p = Prepared(m, decision, mode, url, fast, out, head, f.base)
    p.limits = f.limits  # taken by the exchange (take_limits), given back if it leaves it to the handler
    return p


def take_limits(p: Prepared) -> bool:
    """Take the request's tokens (False: a limit is reached; the handler then refuses it and counts it)."""
    return not p.limits or limits_take(p.limits)


def refund_limits(p: Prepared) -> None:
    """Give them back: the request goes to the handler after all (which takes them again)."""
    if p.limits:
        limits_refund(p.limits)
