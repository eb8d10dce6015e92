"""The plan stage: what the gateway sends upstream for a decided request, as one value.

Takes the decision and effective label policies (``gateway.proxy.decide``), the matched route, its
upstream, the request's facts (method, raw query, headers, client address, body length; the body only
once a plan asked for it) and the policy and probe snapshots; gives one of

* :class:`Forward` — one upstream request (URL, headers, and a body, or the client's streamed through),
* :class:`FanOut` — several restricted requests (``gateway.lbac.fanout.Plan``) and the merge of their answers,
* :class:`Filter` — one upstream request whose answer is filtered by the policies (rules, alerts, silences),
* :class:`Stream` — a WebSocket relay (Loki tail),
* :class:`NeedsBody` — read the body (at most ``limit`` bytes), then plan again with it,
* :class:`Offload` — a rewrite too heavy for the event loop: run it in the rewrite pool, then plan again,
* :class:`Refuse` — the status, reason and message to answer instead,
* :class:`Respond` — the backend's own answer without asking it (an empty Loki result).

Pure and synchronous: no I/O, no await, nothing kept (the per-connection memo ``gateway.proxy.fastpath``
keeps plans). Every data-path decision after *decide* (and the limit stage, ``gateway.limits.stage.admit``)
is taken here (LBAC mode, header or rewrite, fan-out, rule writes, the Loki query policy, the request body
limit; what a filtered answer's transport sends and refuses: ``gateway.proxy.filterplan``), by small
planners run in order over one draft (``_PLANNERS``; a narrowed request's by route kind: ``_RESTRICTERS``;
the plan's shape last: ``_SHAPES``), so the transports (``forward``, ``fanout.execute``, ``filtered.serve``,
``relay_websocket``, the callback exchange) only carry the plan out::

    p = plan(st, cfg, m, upstream, decision, policies, request)
    while isinstance(p, NeedsBody | Offload): ...  # read, or rewrite off the loop, then plan again
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

from multidict import CIMultiDict, CIMultiDictProxy

from gateway.config import Config, Upstream
from gateway.decision_cache import Decision
from gateway.errors import ProxyError, check_body_length
from gateway.lbac import RewriteError, headermode, tracereads
from gateway.lbac import fanout as lbac_fanout
from gateway.lbac import restrict as lbac
from gateway.lbac.limits_context import HEADER as LIMITS_CONTEXT
from gateway.lbac.limits_context import limits_context
from gateway.lbac.pool import RewriteArgs, Rewritten, check_nesting, rewrite_inline
from gateway.lbac.probe import effective_mode
from gateway.lbac.remote_read import MAX_READ_BODY, restrict_read_request
from gateway.limits import lokiquery
from gateway.limits.stage import policy_limits
from gateway.policy.datasource import user_policies
from gateway.policy.selector import Selector
from gateway.proxy.filterplan import KINDS as FILTERED_KINDS
from gateway.proxy.filterplan import Task, body_limit, plan_task
from gateway.proxy.headers import upstream_headers
from gateway.proxy.rules import MAX_RULE_BODY, check_source_tenants
from gateway.routes import Kind, Route, RouteMatch
from gateway.state import State

Policies = tuple[Selector, ...]


class RelURL(Protocol):
    @property
    def raw_query_string(self) -> str: ...


class Facts(Protocol):
    """What the plan reads of a request (aiohttp's request and the protocol server's both have it)."""

    @property
    def method(self) -> str: ...
    @property
    def headers(self) -> CIMultiDictProxy[str]: ...
    @property
    def rel_url(self) -> RelURL: ...
    @property
    def remote(self) -> str | None: ...
    @property
    def body_exists(self) -> bool: ...
    @property
    def content_length(self) -> int | None: ...


@dataclass(frozen=True, slots=True)
class Forward:
    """One upstream request: ``body`` replaces the client's body, None streams the client's (at most
    ``body_limit`` bytes)."""

    url: str
    headers: CIMultiDict[str] = field(compare=False)
    body: bytes | None
    body_limit: int
    base: str  # the upstream's base URL (named in the log when it fails)
    lbac: str | None = None  # the LBAC mode of a label-restricted read (the access log's "lbac")


@dataclass(frozen=True, slots=True)
class FanOut:
    """Several restricted requests, one per leg of ``legs``, and the merge of their answers."""

    base: str
    path: str
    headers: CIMultiDict[str] = field(compare=False)
    legs: lbac_fanout.Plan
    body_limit: int
    memory: int  # the worker's fan-out memory budget (``limits.fanout_memory``), shared by every fan-out
    lbac: str | None = None


@dataclass(frozen=True, slots=True)
class Filter:
    """One upstream request whose answer is read whole and filtered to what the policies let the token see
    (rules, alerts, silences: ``gateway.proxy.filtered``; the ruler and the Alertmanager apply no policies)."""

    base: str
    headers: CIMultiDict[str] = field(compare=False)
    policies: Policies
    body_limit: int
    task: Task  # what the transport sends, keeps and checks (``gateway.proxy.filterplan``)
    lbac: str | None = "filtered"


@dataclass(frozen=True, slots=True)
class Stream:
    """A WebSocket relayed both ways (Loki tail)."""

    url: str
    headers: CIMultiDict[str] = field(compare=False)
    base: str
    lbac: str | None = None


@dataclass(frozen=True, slots=True)
class NeedsBody:
    """Read the request body, refusing it past ``limit`` bytes, then plan again with it."""

    limit: int
    lbac: str | None = None


@dataclass(frozen=True, slots=True)
class Offload:
    """An enforce-mode rewrite heavy enough for the rewrite pool: ``gateway.lbac.pool.rewrite_off_loop(args)``,
    then plan again with its result."""

    args: RewriteArgs
    lbac: str | None = None


@dataclass(frozen=True, slots=True)
class Refuse:
    """The answer instead of an upstream request."""

    status: int
    reason: str
    message: str
    headers: dict[str, str] | None = field(default=None, compare=False)
    lbac: str | None = None

    def error(self) -> ProxyError:
        return ProxyError(self.status, self.message, self.reason, self.headers)


@dataclass(frozen=True, slots=True)
class Respond:
    """The backend's own answer, given without asking it (Loki's empty result for a query the policy's
    lokiQueryPolicy leaves nothing of)."""

    doc: dict[str, Any] = field(compare=False)
    lbac: str | None = None


Plan = Forward | FanOut | Filter | Stream | NeedsBody | Offload | Refuse | Respond

_NO_HEADERS: Final[tuple[str, ...]] = ()


def upstream_of(cfg: Config, route: Route) -> Upstream:
    """The route's configured upstream; 404 without one (checked before *decide*: no backend, no question)."""
    upstream = cfg.upstreams.get(route.backend)
    if upstream is None:
        raise ProxyError(404, f"no {route.backend} upstream is configured on this gateway", "no_upstream")
    return upstream


def _form(req: Facts, body: bytes | None, mode: str | None) -> bytes | None | NeedsBody:
    """The form body a query may carry: None without one, NeedsBody until read; 415 for any other type."""
    if not req.body_exists:
        return None
    if body is not None:
        return body
    ctype = req.headers.get("Content-Type", "").split(";", 1)[0].strip().lower()
    if ctype != lbac.FORM:
        # Prometheus also parses multipart bodies: anything but a plain form could smuggle a parameter.
        raise ProxyError(415, "label-restricted queries must send parameters in the URL or as "
                         f"{lbac.FORM}", "bad_form")
    return NeedsBody(lbac.MAX_FORM_BODY, mode)


def _trace_mode(upstream: Upstream) -> str:
    """Enforce, always: no probe shows that a Tempo applies label policies itself, so header mode is refused."""
    if upstream.lbac == "header":
        raise ProxyError(503, "the traces backend does not (verifiably) enforce trace label policies, so "
                         "label-restricted trace reads are refused in header mode; set upstreams.traces.lbac to "
                         "enforce (or auto) in the gateway config", "lbac_unverified")
    return "enforce"


#: A caller's store of the upstream headers (and base URL) :func:`plan` built, for requests that share all
#: they are built from but the query: see ``plan``'s ``shared``.
SharedHeaders = dict[tuple[object, ...], tuple[CIMultiDict[str], str]]
_MAX_SHARED: Final = 8


def plan(st: State, cfg: Config, m: RouteMatch, upstream: Upstream, decision: Decision, policies: Policies,
         req: Facts, body: bytes | None = None, rewritten: Rewritten | None = None,
         shared: SharedHeaders | None = None) -> Plan:
    """The request's plan (see the module docstring); ``body`` once read, ``rewritten`` once offloaded.

    ``shared``: the caller's store for requests with the same header set, client address, method, route,
    body or not, config, decision and policies (the fast path's memo entry, ``gateway.proxy.fastpath``):
    their upstream headers differ only by what the planners set (kept by it), so a new query of a
    dashboard's does not build them again; the headers of a plan made with it are shared: never changed."""
    try:
        return _plan(st, cfg, m, upstream, decision, policies, req, body, rewritten, shared)
    except ProxyError as exc:
        return Refuse(exc.status, exc.reason, exc.message, exc.headers or None, exc.lbac)


@dataclass(slots=True)
class _Draft:
    """The request as the planners see it, and what they have decided so far (one per ``plan`` call)."""

    st: State
    cfg: Config
    m: RouteMatch
    upstream: Upstream
    d: Decision
    policies: Policies
    req: Facts
    body: bytes | None  # the client's body, once read
    done: Rewritten | None  # the rewrite pool's result, once offloaded
    raw_query: str
    sent: bytes | None = None  # the body sent instead of the client's
    label_headers: tuple[str, ...] = _NO_HEADERS
    rewritten: bool = False  # True when the body was re-encoded (its length and type change)
    content_type: str = ""
    mode: str | None = None  # the LBAC mode of a narrowed read (the access log's "lbac")
    fan: lbac_fanout.Plan | None = None  # several selectors: one restricted request each, answers merged
    shape: str = "forward"  # the key of _SHAPES: what the plan is once every planner ran
    tempo_json: bool = False  # a restricted Tempo read whose answer the gateway reads (JSON, not protobuf)
    loki: Any = None  # the policy's lokiQueryPolicy (gateway.limits.lokiquery), on Loki routes
    shared: SharedHeaders | None = None  # the caller's store of upstream headers (``plan``'s ``shared``)

    def fan_out(self, fan: lbac_fanout.Plan | None) -> None:
        if fan is not None:
            self.fan, self.shape = fan, "fanout"


Planner = Callable[[_Draft], Plan | None]  # None: go on to the next planner; a plan: answer it


def check_rule_write(route: Route, policies: Policies) -> None:
    """A label-restricted token cannot write rules (the data path's and forward-auth's one refusal)."""
    if route.scope == "rules:write" and policies:
        # A recording rule evaluates without label policies and its results are queryable: refuse.
        raise ProxyError(403, "label-restricted tokens cannot write rules: rule results would bypass the "
                         "label policies", "lbac_unfilterable")


def _rule_writes(x: _Draft) -> Plan | None:
    """Rule writes: refused to narrowed tokens; a Mimir rule group's source tenants checked (its body read)."""
    route, req = x.m.route, x.req
    if route.scope != "rules:write":
        return None
    check_rule_write(route, x.policies)
    if route.backend == "metrics" and req.method in ("POST", "PUT") and req.body_exists:
        if x.body is None:
            return NeedsBody(MAX_RULE_BODY)
        user = req.headers.get(x.cfg.grafana_user_header)
        ident, st = x.d.ident, x.st
        check_source_tenants(x.body, x.cfg, ident, lambda t: user_policies(st.cache, ident.policy.id, "metrics",
                                                                             t, user))
        x.sent = x.body
    return None


def _restrict(x: _Draft) -> Plan | None:
    """A narrowed request: the planner of its route kind (``_RESTRICTERS``); others go as sent."""
    planner = _RESTRICTERS.get(x.m.route.kind) if x.policies else None
    return planner(x) if planner is not None else None


def _restrict_trace(x: _Draft) -> Plan | None:
    """Tempo: TraceQL, tags and metrics rewritten (enforce), never header mode; tag look-ups fanned out."""
    route, req = x.m.route, x.req
    x.mode = _trace_mode(x.upstream)
    targs: RewriteArgs = (route.kind, x.m.upstream_path, req.method, x.raw_query, None, x.policies, False)
    r = x.done if x.done is not None else rewrite_inline(targs)
    if r is None:
        return Offload(targs, x.mode)
    x.tempo_json = True
    if isinstance(r, lbac_fanout.Plan):  # tag look-ups: merged (scan totals dropped)
        x.fan_out(r)
        x.rewritten = True
    elif r.query is None:  # pragma: no cover - rewrite's contract
        raise ProxyError(500, "the trace query could not be restricted", "internal")
    else:
        x.raw_query, x.shape = r.query, "search"
        x.sent, x.rewritten = (b"", True) if req.body_exists else (None, False)  # (Tempo reads no body)
    return None


def _filter_answer(x: _Draft) -> Plan | None:
    """Rules, alerts, silences and trace by ID: the answer filtered, in every mode (``gateway.proxy.filtered``)."""
    x.shape = "filter"
    return None


def _narrow(x: _Draft) -> None:
    """The LBAC mode (the probe's verdict: 503 for an unverified header mode) and the label-policy headers."""
    x.mode = effective_mode(x.st.extras, x.upstream)
    x.label_headers = label_headers(x.d, x.policies)


def label_headers(d: Decision, policies: Policies) -> tuple[str, ...]:
    """The X-Prom-Label-Policy values of the effective policies (the decision's own are kept encoded)."""
    return d.label_headers() if policies is d.policies else lbac.headers_for(d.tenant, policies)


def _enforced(x: _Draft) -> None:
    """A restricted request goes without the label-policy header in enforce mode (it would filter twice)."""
    x.rewritten = True
    if x.mode == "enforce":
        x.label_headers = _NO_HEADERS


def _fan_tenant_wide(x: _Draft) -> Plan | None:
    """A tenant-wide endpoint (metadata): fanned out over the visible names, or refused."""
    route, req = x.m.route, x.req
    fan = lbac_fanout.plan(route.kind, x.m.upstream_path, req.method, x.raw_query, None, x.policies)
    if fan is None:
        raise ProxyError(403, "this endpoint cannot be filtered by label policies, and your token has some",
                         "lbac_unfilterable")
    _narrow(x)
    x.fan_out(fan)
    _enforced(x)
    return None


def _restrict_remote_read(x: _Draft) -> Plan | None:
    """Remote read: its protobuf body restricted (or fanned out) in enforce mode; sent as is in header mode."""
    _narrow(x)
    if x.mode != "enforce":
        return None
    if x.body is None:
        return NeedsBody(MAX_READ_BODY, x.mode)
    try:
        x.fan_out(lbac_fanout.plan_remote_read(x.body, x.policies))
        x.sent = restrict_read_request(x.body, x.policies) if x.fan is None else None
    except RewriteError as exc:
        raise ProxyError(400, f"remote read refused by label-based access control: {exc}",
                         "lbac_refused") from None
    x.content_type = x.req.headers.get("Content-Type", "application/x-protobuf")
    _enforced(x)
    return None


def _rewrite(x: _Draft) -> Plan | None:
    """PromQL and LogQL rewritten to the policies (inline, or in the rewrite pool when heavy)."""
    route, req = x.m.route, x.req
    form = _form(req, x.body, x.mode)
    if isinstance(form, NeedsBody):
        return form
    args = (route.kind, x.m.upstream_path, req.method, x.raw_query, form, x.policies, x.mode == "enforce")
    r = x.done if x.done is not None else rewrite_inline(args)
    if r is None:
        return Offload(args, x.mode)
    if isinstance(r, lbac_fanout.Plan):
        x.fan_out(r)
    else:
        x.raw_query = r.query if r.query is not None else x.raw_query
        x.sent = r.body
    x.content_type = lbac.FORM
    _enforced(x)
    return None


def _header_mode(x: _Draft) -> Plan | None:
    """Header mode: the backend filters what it runs; the query normalised, or fanned out when it needs one."""
    route, req = x.m.route, x.req
    form = _form(req, x.body, x.mode)
    if isinstance(form, NeedsBody):
        return form
    check_nesting(route.kind, x.raw_query, form)  # the parse bound holds in both modes
    fan = lbac_fanout.plan_header_mode(route.kind, x.m.upstream_path, req.method, x.raw_query, form, x.policies)
    if fan is None:
        n = headermode.normalize(x.raw_query, form)
        x.raw_query, x.sent, x.rewritten = n.query or "", n.body, n.body is not None
    else:
        x.fan_out(fan)
        x.rewritten = True
    return None


#: A narrowed query's planner by LBAC mode.
_BY_MODE: Final[dict[str, Planner]] = {"enforce": _rewrite, "header": _header_mode}


def _restrict_query(x: _Draft) -> Plan | None:
    """A narrowed PromQL or LogQL read: rewritten in enforce mode, the header's in header mode."""
    _narrow(x)
    return _BY_MODE.get(x.mode or "", _header_mode)(x)  # (a mode but enforce: the backend filters)


def _restrict_delete(x: _Draft) -> Plan | None:
    """A Loki delete request: its query restricted in every mode (the compactor applies no header)."""
    _narrow(x)
    return _rewrite(x)


#: The planner of a narrowed request by route kind (kinds not here go as sent).
_RESTRICTERS: Final[dict[Kind, Planner]] = {
    **dict.fromkeys(lbac.RESTRICTED_KINDS, _restrict_query),
    **dict.fromkeys(tracereads.KINDS, _restrict_trace),
    **dict.fromkeys(FILTERED_KINDS, _filter_answer),
    Kind.TENANT_WIDE: _fan_tenant_wide,
    Kind.REMOTE_READ: _restrict_remote_read,
    Kind.LOGQL_DELETE: _restrict_delete,
}
#: Narrowed kinds the data path never sends as they came with the label-policy header, whatever the mode
#: (rewritten, fanned out or filtered): forward-auth, which can only pass a header, refuses them.
NEVER_HEADER_MODE: Final = frozenset(k for k, p in _RESTRICTERS.items() if p not in (_restrict_query,
                                                                                       _restrict_remote_read))


def _loki_policy(x: _Draft) -> Plan | None:
    """The policy's lokiQueryPolicy: checked here, and sent for Loki to apply too (Loki routes only)."""
    if x.m.route.backend != "logs":
        return None
    x.loki = policy_limits(x.d.ident.policy.attributes_json).loki
    if x.loki is None:
        return None
    x.raw_query, empty = lokiquery.apply(x.loki, x.m.upstream_path, x.raw_query)
    return Respond(empty, x.mode) if empty is not None else None


def _task(x: _Draft, base: str, out: CIMultiDict[str], query: str) -> Task:
    req, m = x.req, x.m
    return plan_task(m.route.kind, m.route.backend, base, m.upstream_path, req.method, query, out,
                     req.headers.get("Accept", ""), m.path_params, x.policies, x.body)


def _filter(x: _Draft, base: str, out: CIMultiDict[str], limit: int) -> Plan:
    """Rules, alerts, silences, trace by ID: what the filter does, from the request as sent (a write: its body)."""
    x.mode = "filtered"  # (a refusal here is logged as the filter's, as the answer would be)
    m, req = x.m, x.req
    need = body_limit(m.route.kind, m.upstream_path, req.method)
    if need is not None and x.body is None:
        return NeedsBody(need, x.mode)
    return Filter(base, out, x.policies, limit, _task(x, base, out, req.rel_url.raw_query_string))


def _search(x: _Draft, base: str, out: CIMultiDict[str], limit: int) -> Plan:
    """A rewritten TraceQL search or metrics query: its answer filtered too."""
    return Filter(base, out, x.policies, limit, _task(x, base, out, x.raw_query), x.mode)


def _fanout(x: _Draft, base: str, out: CIMultiDict[str], limit: int) -> Plan:
    assert x.fan is not None  # (set with the shape: _Draft.fan_out)
    return FanOut(base, x.m.upstream_path, out, x.fan, limit, x.cfg.limits.fanout_memory, x.mode)


def _forward(x: _Draft, base: str, out: CIMultiDict[str], limit: int) -> Plan:
    url = f"{base}{x.m.upstream_path}" + (f"?{x.raw_query}" if x.raw_query else "")
    if x.m.route.websocket and x.req.headers.get("Upgrade", "").lower() == "websocket":
        return Stream(url, out, base, x.mode)
    return Forward(url, out, x.sent, limit, base, x.mode)


#: The plan each shape gives, from the upstream's base URL, the headers sent and the body limit.
_SHAPES: Final[dict[str, Callable[[_Draft, str, CIMultiDict[str], int], Plan]]] = {
    "filter": _filter, "search": _search, "fanout": _fanout, "forward": _forward,
}


def _shape(x: _Draft) -> Plan:
    """The upstream request's headers and the body limit, then the plan of the shape the planners chose."""
    limit = x.cfg.limits.max_request_body
    check_body_length(x.req.content_length, limit)
    # (only a forward's: a filter's task and a WebSocket relay set headers of their own)
    shared = x.shared if x.shape == "forward" and not x.m.route.websocket else None
    if shared is None:
        out, base = _headers(x)
    else:  # what the headers depend on that the planners set (the rest is the same for every request here)
        key = (x.label_headers, x.rewritten, x.content_type if x.rewritten and x.sent else None, x.tempo_json,
               None if x.loki is None else x.loki.header)
        got = shared.get(key)
        if got is None:
            got = _headers(x)
            if len(shared) < _MAX_SHARED:
                shared[key] = got
        out, base = got
    return _SHAPES[x.shape](x, base, out, limit)


def _headers(x: _Draft) -> tuple[CIMultiDict[str], str]:
    """The upstream request's headers, and the upstream's base URL."""
    route, req = x.m.route, x.req
    headers = req.headers
    out = upstream_headers(headers, x.d.tenant, req.remote or "unknown", x.label_headers,
                           drop_body_headers=x.rewritten,
                           limits_context=limits_context(headers.getall(LIMITS_CONTEXT, ()), route.backend,
                                                         route.kind, x.policies))
    if x.loki is not None:
        out[lokiquery.HEADER] = x.loki.header
    if x.rewritten and x.sent:
        out["Content-Type"] = x.content_type
    if x.tempo_json:
        out["Accept"] = "application/json"  # (the answer filter and the merge read JSON)
    return out, x.upstream.url_for(route.role.value)


#: The planners, in order: each reads the draft, adds to it, and may answer instead (a refusal is raised).
_PLANNERS: Final[tuple[Planner, ...]] = (_restrict, _loki_policy)


def _plan(st: State, cfg: Config, m: RouteMatch, upstream: Upstream, d: Decision, policies: Policies,
          req: Facts, body: bytes | None, done: Rewritten | None, shared: SharedHeaders | None) -> Plan:
    x = _Draft(st, cfg, m, upstream, d, policies, req, body, done, req.rel_url.raw_query_string, shared=shared)
    if (early := _rule_writes(x)) is not None:
        return early
    try:
        for planner in _PLANNERS:
            if (p := planner(x)) is not None:
                return p
        return _shape(x)
    except ProxyError as exc:
        exc.lbac = x.mode  # (the access log names the mode of a narrowed read however it ends)
        raise
