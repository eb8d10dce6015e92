"""The per-connection memo in front of *decide* and *plan*, for the callback exchange
(``gateway.dataplane.exchange``): a request whose decision is cached gets the upstream request its plan
(``gateway.proxy.plan``) says, without awaiting anything (its body, if any, is the client's, streamed).

It decides nothing itself: on a miss it asks the decision cache (``decide.decided``) and the plan stage
(``plan.plan``) exactly as ``handler._serve`` does, and keeps their answer while what they were computed from
holds: the config object, the policy cache's generation, the LBAC probe's verdict for the upstream (when the
plan depends on it), the lean client, and per request the snapshot's freshness and the token's expiry
(``decide.holds``). The limit stage's request rates and a read's concurrent queries are taken by the exchange
(``Prepared.limits``, resolved once per memo entry); anything else of that stage (a tenant block, the Loki
query policy, a body under a write-byte rate) leaves the request to the handler.
Any plan but a :class:`~gateway.proxy.plan.Forward` of the client's request on a plain-http upstream
(a refusal, a fan-out, a body to read, an offloaded rewrite, a WebSocket) returns None: the connection's
task serves the request through ``handler.handle``, which decides and plans again from scratch. So
``prepare`` has no side effect, and a request it declines behaves exactly as before.

    p = prepare(request, st, m, upstreams)
    if p is None:
        ...  # await handle(request)
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Final, Protocol, cast

from multidict import CIMultiDict
from yarl import URL

from gateway.clientip import client_ip
from gateway.decision_cache import Decision
from gateway.errors import ProxyError
from gateway.lbac import RewriteError
from gateway.lbac import restrict as lbac
from gateway.lbac.probe import probe_of
from gateway.limits.stage import UNLIMITED, FastLimits, fast_plan
from gateway.policy.decision import IPAddress
from gateway.proxy.decide import Policies, decided, holds
from gateway.proxy.fastclient import FastClient, request_head
from gateway.proxy.forward import _FAST, Upstreams
from gateway.proxy.plan import Facts, Forward, SharedHeaders, plan
from gateway.routes import RouteMatch

if TYPE_CHECKING:
    from gateway.config import Config, Upstream
    from gateway.state import State


class DataRequest(Facts, Protocol):
    """The protocol server's request (``gateway.dataplane.request``): its facts and its connection's memo."""

    @property
    def memo(self) -> dict[object, object]: ...

_MAX_MEMO: Final = 16  # facts kept per connection and header set (one per method and route), plans per facts


class Prepared:
    """The upstream request of a prepared request, and what the access log and metrics need of it. Never
    changed once made (``prepare`` gives the same one to a connection that repeats its request), but for
    ``log_head``, which the exchange keeps for its access-log line."""

    __slots__ = ("m", "decision", "lbac", "url", "fast", "headers", "head", "upstream_base", "limits", "log_head")

    def __init__(self, m: RouteMatch, decision: Decision, lbac_mode: str | None, url: URL, fast: FastClient,
                 headers: CIMultiDict[str], head: bytes, upstream_base: str, limits: FastLimits | None = None):
        self.m, self.decision, self.lbac, self.url, self.fast = m, decision, lbac_mode, url, fast
        self.headers, self.head, self.upstream_base = headers, head, upstream_base
        self.limits = limits  # the limit stage's share (gateway.limits.stage), taken by the exchange; None: none
        self.log_head: tuple[str, str, str] | None = None  # (method, path, the line's head): gateway.dataplane.exchange


class _Sent:
    """A memoised forward plan as the lean client sends it, and the last ``Prepared`` made of it (the same
    for every request of its facts with the same route match: a connection that repeats its request)."""

    __slots__ = ("url", "headers", "head", "lbac", "base", "prepared")

    def __init__(self, url: URL, headers: CIMultiDict[str], head: bytes, lbac_mode: str | None, base: str):
        self.url, self.headers, self.head, self.lbac, self.base = url, headers, head, lbac_mode, base
        self.prepared: Prepared | None = None


class _Facts:
    """*decide*'s answer for one header set, one method and one route, and the plans made under it (by
    upstream path and query)."""

    __slots__ = ("cfg", "gen", "decision", "policies", "upstream", "fast", "verdict", "limits", "plans", "shared",
                 "block")

    def __init__(self, cfg: Config, gen: int, decision: Decision, policies: Policies, upstream: Upstream,
                 fast: FastClient, verdict: object, limits: FastLimits | None):
        self.cfg, self.gen, self.decision, self.policies = cfg, gen, decision, policies
        self.upstream, self.fast, self.verdict, self.limits = upstream, fast, verdict, limits
        self.plans: dict[tuple[str, str], _Sent | None] = {}
        self.shared: SharedHeaders = {}  # the upstream headers plan built for these facts (plan's ``shared``)
        self.block: tuple[CIMultiDict[str], bytes] | None = None  # headers, and their head after the request line


_UNSEEN: Final = object()
_NO_VERDICT: Final = object()  # the plan does not depend on the probe (no label policies, or not a read)


def _verdict(st: State, upstream: Upstream) -> object:
    return probe_of(st.extras).verdicts.get(upstream.signal)


def _facts(request: DataRequest, st: State, m: RouteMatch, upstreams: Upstreams) -> _Facts | None:
    """*decide* from the caches for this request's header set; None declines (a miss or a refusal)."""
    route = m.route
    cfg = st.config
    upstream = cfg.upstreams.get(route.backend)
    if upstream is None:
        return None
    headers = request.headers
    memo = request.memo  # what was derived from these same headers on this connection (and peer)
    facts = cast(tuple[object, IPAddress | None] | None, memo.get("ip"))
    if facts is None or facts[0] is not cfg:  # (a reload may change the trusted proxies)
        facts = (cfg, client_ip(request.remote, headers.getall("X-Forwarded-For", ()), cfg.trusted_proxies))
        memo["ip"] = facts
    gen = st.cache.generation
    try:
        got = decided(st, cfg, route, headers, facts[1])
    except ProxyError:
        return None
    if got is None:
        return None
    decision, policies = got
    # the limit stage's part the exchange takes: request rates, a read's concurrent queries
    limits = fast_plan(cfg, route, decision, request.body_exists)
    if limits is None:
        return None  # (a tenant block, the Loki query policy, a body under a write-byte rate: the handler's)
    fast = _FAST.get(upstreams.session(upstream))
    if fast is None or fast.closed:
        return None
    verdict = _verdict(st, upstream) if policies and route.kind in lbac.RESTRICTED_KINDS else _NO_VERDICT
    return _Facts(cfg, gen, decision, policies, upstream, fast, verdict, None if limits is UNLIMITED else limits)


def _sent(request: DataRequest, st: State, m: RouteMatch, f: _Facts) -> _Sent | None:
    """*plan* for this request; None unless it is a forward the lean client can send: bodiless, or the
    client's body streamed as it is with its Content-Length (a chunked one stays with the handler)."""
    try:
        p = plan(st, f.cfg, m, f.upstream, f.decision, f.policies, request, shared=f.shared)
    except RewriteError:  # (the planners turn theirs into refusals; a stray one leaves it to the handler)
        return None
    if not isinstance(p, Forward) or p.body is not None:
        return None
    streamed = request.body_exists
    if streamed and "Content-Length" not in p.headers:
        return None
    try:
        url = URL(p.url)
        if not f.fast.accepts(url):
            return None
        block = f.block
        if block is not None and block[0] is p.headers:  # (shared: a new query of these facts) the same head
            line = f"{request.method} {url.raw_path_qs} HTTP/1.1"
            if "\r" in line or "\n" in line or "\x00" in line:  # (as request_head refuses them)
                return None
            head = line.encode("utf-8") + block[1]
        else:
            head = request_head(request.method, url, p.headers, None, streamed)
            f.block = (p.headers, head[head.index(b"\r\n"):])
    except ValueError:
        return None
    return _Sent(url, p.headers, head, p.lbac, p.base)


def prepare(request: DataRequest, st: State, m: RouteMatch, upstreams: Upstreams) -> Prepared | None:
    """The upstream request ``handler._serve`` would send for ``request``, if it is a plain forward (the
    client's body, if any, streamed after ``head``: see ``_sent``)."""
    memo = request.memo
    # (routes are module-level objects: their ids are stable; a body changes the limits and the head)
    key = (request.method, id(m.route), request.body_exists)
    f = cast(_Facts | None, memo.get(key))
    if f is None or f.cfg is not st.config or f.gen != st.cache.generation or f.fast.closed or (
            f.verdict is not _NO_VERDICT and _verdict(st, f.upstream) is not f.verdict):
        f = _facts(request, st, m, upstreams)
        if f is None:
            return None
        if len(memo) >= _MAX_MEMO:
            memo.clear()
        memo[key] = f
    decision = f.decision
    if not holds(st, decision, time.time()):
        return None
    qkey = (m.upstream_path, request.rel_url.raw_query_string)
    got = f.plans.get(qkey, _UNSEEN)
    if got is _UNSEEN:
        if len(f.plans) >= _MAX_MEMO:
            f.plans.clear()
        got = f.plans[qkey] = _sent(request, st, m, f)
    s = cast(_Sent | None, got)
    if s is None:
        return None
    p = s.prepared
    if p is None or p.m is not m:  # (the rest is fixed for ``s``: its facts' decision, client and limits)
        p = s.prepared = Prepared(m, decision, s.lbac, s.url, f.fast, s.headers, s.head, s.base, f.limits)
    return p

