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
limit) so the transports (``forward``, ``fanout.execute``, ``relay_websocket``, the callback exchange) only
carry the plan out::

    p = plan(st, cfg, m, upstream, decision, policies, request)
    while isinstance(p, NeedsBody | Offload): ...  # read, or rewrite off the loop, then plan again
"""

from __future__ import annotations

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
from gateway.proxy.filtered import KINDS as FILTERED_KINDS
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
    lbac: str | None = "filtered"
    query: str | None = None  # the raw query string sent instead of the client's (a rewritten Tempo search)


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


def plan(st: State, cfg: Config, m: RouteMatch, upstream: Upstream, decision: Decision, policies: Policies,
         req: Facts, body: bytes | None = None, rewritten: Rewritten | None = None) -> Plan:
    """The request's plan (see the module docstring); ``body`` once read, ``rewritten`` once offloaded."""
    try:
        return _plan(st, cfg, m, upstream, decision, policies, req, body, rewritten)
    except ProxyError as exc:
        return Refuse(exc.status, exc.reason, exc.message, exc.headers or None, exc.lbac)


def _plan(st: State, cfg: Config, m: RouteMatch, upstream: Upstream, d: Decision, policies: Policies,
          req: Facts, body: bytes | None, done: Rewritten | None) -> Plan:
    route, path, method = m.route, m.upstream_path, req.method
    kind = route.kind
    raw_query = req.rel_url.raw_query_string
    sent: bytes | None = None  # the body sent instead of the client's
    label_headers = _NO_HEADERS
    rewritten = False  # True when the body was re-encoded (its length and type change)
    content_type = ""
    mode: str | None = None
    fan: lbac_fanout.Plan | None = None  # several selectors: one restricted request each, answers merged
    if route.scope == "rules:write":
        if policies:
            # A recording rule evaluates without label policies and its results are queryable: refuse.
            raise ProxyError(403, "label-restricted tokens cannot write rules: rule results would bypass the "
                             "label policies", "lbac_unfilterable")
        if route.backend == "metrics" and method in ("POST", "PUT") and req.body_exists:
            if body is None:
                return NeedsBody(MAX_RULE_BODY)
            user = req.headers.get(cfg.grafana_user_header)
            ident = d.ident
            check_source_tenants(body, cfg, ident, lambda t: user_policies(st.cache, ident.policy.id, "metrics",
                                                                           t, user))
            sent = body
    filter_answer = bool(policies) and kind in FILTERED_KINDS  # rules, alerts, silences: filtered
    search_answer = False  # a restricted Tempo search: rewritten, and its answer's root fields filtered
    try:
        if policies and kind in tracereads.KINDS:  # Tempo: TraceQL rewritten (enforce), never header mode
            mode = _trace_mode(upstream)
            targs: RewriteArgs = (kind, path, method, raw_query, None, policies, False)
            r = done if done is not None else rewrite_inline(targs)
            if r is None:
                return Offload(targs, mode)
            if isinstance(r, lbac_fanout.Plan):  # tag look-ups under several selectors
                fan, rewritten = r, True
            elif r.query is None:  # pragma: no cover - rewrite's contract
                raise ProxyError(500, "the trace query could not be restricted", "internal")
            else:
                raw_query, search_answer = r.query, path == tracereads.SEARCH_PATH
                sent, rewritten = (b"", True) if req.body_exists else (None, False)  # (Tempo reads no body)
        elif policies and kind in lbac.RESTRICTED_KINDS and not filter_answer:
            if kind is Kind.TENANT_WIDE and (fan := lbac_fanout.plan(kind, path, method, raw_query, None, policies)
                                             ) is None:
                raise ProxyError(403, "this endpoint cannot be filtered by label policies, and your token has some",
                                 "lbac_unfilterable")
            mode = effective_mode(st.extras, upstream)  # the probe's verdict: 503 for an unverified header mode
            label_headers = d.label_headers() if policies is d.policies else lbac.headers_for(d.tenant, policies)
            if fan is not None:
                rewritten = True
                label_headers = _NO_HEADERS if mode == "enforce" else label_headers
            elif mode == "enforce" or kind is Kind.LOGQL_DELETE:
                if kind is Kind.REMOTE_READ:
                    if body is None:
                        return NeedsBody(MAX_READ_BODY, mode)
                    try:
                        fan = lbac_fanout.plan_remote_read(body, policies) if mode == "enforce" else None
                        sent = restrict_read_request(body, policies) if fan is None else None
                    except RewriteError as exc:
                        raise ProxyError(400, f"remote read refused by label-based access control: {exc}",
                                         "lbac_refused") from None
                    content_type = req.headers.get("Content-Type", "application/x-protobuf")
                else:
                    form = _form(req, body, mode)
                    if isinstance(form, NeedsBody):
                        return form
                    args = (kind, path, method, raw_query, form, policies, mode == "enforce")
                    r = done if done is not None else rewrite_inline(args)
                    if r is None:
                        return Offload(args, mode)
                    if isinstance(r, lbac_fanout.Plan):
                        fan = r
                    else:
                        raw_query = r.query if r.query is not None else raw_query
                        sent = r.body
                    content_type = lbac.FORM
                rewritten = True
                if mode == "enforce":
                    label_headers = _NO_HEADERS
            elif kind is not Kind.REMOTE_READ:  # header mode: the backend filters what it runs
                form = _form(req, body, mode)
                if isinstance(form, NeedsBody):
                    return form
                check_nesting(kind, raw_query, form)  # the parse bound holds in both modes
                fan = lbac_fanout.plan_header_mode(kind, path, method, raw_query, form, policies)
                if fan is None:
                    n = headermode.normalize(raw_query, form)
                    raw_query, sent, rewritten = n.query or "", n.body, n.body is not None
                else:
                    rewritten = True

        loki = policy_limits(d.ident.policy.attributes_json).loki if route.backend == "logs" else None
        if loki is not None:  # the policy's lokiQueryPolicy: checked here, and sent for Loki to apply too
            raw_query, empty = lokiquery.apply(loki, path, raw_query)
            if empty is not None:
                return Respond(empty, mode)
        base = upstream.url_for(route.role.value)
        headers = req.headers
        out = upstream_headers(headers, d.tenant, req.remote or "unknown", label_headers, drop_body_headers=rewritten,
                               limits_context=limits_context(headers.getall(LIMITS_CONTEXT, ()), route.backend, kind,
                                                             policies))
        if loki is not None:
            out[lokiquery.HEADER] = loki.header
        if rewritten and sent:
            out["Content-Type"] = content_type
        limit = cfg.limits.max_request_body
        check_body_length(req.content_length, limit)
        if filter_answer:
            return Filter(base, out, policies, limit)
        if search_answer:
            out["Accept"] = "application/json"  # (the answer filter reads JSON, not Tempo's protobuf)
            return Filter(base, out, policies, limit, mode, raw_query)
        if fan is not None:
            return FanOut(base, path, out, fan, limit, cfg.limits.fanout_memory, mode)
        url = f"{base}{path}" + (f"?{raw_query}" if raw_query else "")
        if route.websocket and headers.get("Upgrade", "").lower() == "websocket":
            return Stream(url, out, base, mode)
        return Forward(url, out, sent, limit, base, mode)
    except ProxyError as exc:
        exc.lbac = mode  # (the access log names the mode of a narrowed read however it ends)
        raise

