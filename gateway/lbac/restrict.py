"""Apply label policies to one request, per route kind and upstream mode (header or enforce).

Both modes fail closed: a restricted read either carries exactly the restriction, or is refused.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Final
from urllib.parse import quote, unquote

from gateway.errors import ProxyError
from gateway.lbac import RewriteError, params
from gateway.lbac.bounds import SizedLRU
from gateway.lbac.logql import restrict_logql, restrict_logql_matchers, simplify
from gateway.lbac.promql import restrict_match, restrict_promql
from gateway.policy.selector import Selector, SelectorError
from gateway.policy.trace_selector import parse_label_policy
from gateway.routes import Kind

FORM: Final = "application/x-www-form-urlencoded"
MAX_FORM_BODY: Final = 1024 * 1024
# Go's url.PathEscape (encodePathSegment) leaves letters, digits, "-_.~" and these alone; it escapes
# "/ ; , ?" and everything else. Python's quote never escapes letters, digits and "-_.~".
_PATH_SAFE: Final = "$&+:=@"
MAX_CLIENT_POLICIES: Final = 16  # selectors a client (Grafana team rules) may send in X-Prom-Label-Policy
MAX_CLIENT_HEADER: Final = 16 * 1024  # bytes of X-Prom-Label-Policy values, before any parsing
_TENANT_START: Final = re.compile(r",\s*(?=[A-Za-z0-9!\-_.*'()]+:)")

#: Kinds that read label-filterable data; everything else passes untouched (writes, traces). Rules, alerts
#: and silences are restricted by filtering the answer (gateway.proxy.filtered), not by ``enforce``.
RESTRICTED_KINDS: Final = frozenset({Kind.PROMQL, Kind.MATCH, Kind.REMOTE_READ, Kind.TENANT_WIDE, Kind.LOGQL,
                                     Kind.LOGQL_OPTIONAL, Kind.LOGQL_SERIES, Kind.LOGQL_TAIL, Kind.LOGQL_DELETE,
                                     Kind.RULE_STATE, Kind.ALERT_STATE, Kind.RULE_CONFIG, Kind.ALERTMANAGER,
                                     Kind.TRACE_BY_ID, Kind.TRACEQL, Kind.TRACE_TAGS, Kind.TRACE_UNFILTERABLE})


@dataclass(frozen=True, slots=True)
class Restriction:
    """How the request leaves the gateway: a new query string and/or body, plus label-policy headers."""

    query: str | None = None  # the new raw query string; None = unchanged
    body: bytes | None = None  # the new body (form-encoded); None = unchanged
    headers: tuple[str, ...] = ()


def path_escape(text: str) -> str:
    """Go's ``url.PathEscape``: UTF-8 bytes percent-encoded, upper-case hex."""
    return quote(text, safe=_PATH_SAFE)


def label_policy_header(tenant: str, selector: Selector) -> str:
    """``<tenant>:<PathEscape(selector)>``, as Mimir, Loki, GEM and GEL read it.

    Loki's ``pkg/labelaccess`` splits every header value on ``,`` before it unescapes, so a
    raw ``,`` between matchers (or in ``{1,3}``) would break the policy: PathEscape sends it as %2C.
    """
    return f"{tenant}:{path_escape(str(selector))}"


def parse_client_policies(values: Sequence[str], tenant: str) -> tuple[Selector, ...]:
    """Grafana team LBAC headers; each must name the queried tenant and parse (else 400).

    Bounded before parsing: at most MAX_CLIENT_HEADER bytes and MAX_CLIENT_POLICIES selectors,
    since any plain read token may send the header and every selector multiplies the rewrite.
    """
    if sum(len(v) for v in values) > MAX_CLIENT_HEADER:
        raise ProxyError(400, f"X-Prom-Label-Policy is longer than {MAX_CLIENT_HEADER} bytes", "bad_label_policy")
    out: list[Selector] = []
    for value in values:
        for part in _TENANT_START.split(value):
            part = part.strip()
            if not part:
                continue
            who, sep, encoded = part.partition(":")
            if not sep or not encoded:
                raise ProxyError(400, "X-Prom-Label-Policy must be <tenant>:<selector>", "bad_label_policy")
            if who != tenant:
                raise ProxyError(400, f"X-Prom-Label-Policy names tenant {who!r}, but the query is for {tenant!r}",
                                 "bad_label_policy")
            try:
                sel = parse_label_policy(unquote(encoded))
            except SelectorError as exc:
                raise ProxyError(400, f"X-Prom-Label-Policy selector {exc}", "bad_label_policy") from None
            if sel not in out:
                if len(out) >= MAX_CLIENT_POLICIES:
                    raise ProxyError(400, f"X-Prom-Label-Policy carries more than {MAX_CLIENT_POLICIES} "
                                     "selectors", "bad_label_policy")
                out.append(sel)
    return tuple(out)


def intersect(a: tuple[Selector, ...], b: tuple[Selector, ...]) -> tuple[Selector, ...]:
    """Visible under both OR-sets: every pairing of a selector of ``a`` with one of ``b``, AND-ed."""
    out: dict[Selector, None] = {}
    for x in a:
        for y in b:
            out.setdefault(type(x)(tuple(dict.fromkeys(x.matchers + y.matchers))), None)  # (one kind: for_signal)
    return tuple(out)


def _pairs(raw_query: str, body: bytes | None) -> list[tuple[str, str]]:
    """The request's parameters as the backend reads them (:func:`gateway.lbac.params.pairs`)."""
    return params.pairs(raw_query, body)


def _one(pairs: list[tuple[str, str]], name: str, required: bool) -> str | None:
    """A single-valued parameter of :func:`_pairs`: None when absent or empty, as the backend reads it."""
    return params.one(pairs, name, required)


def _rewrite(fn: Callable[[], object]) -> object:
    try:
        return fn()
    except RewriteError as exc:
        raise ProxyError(400, f"query refused by label-based access control: {exc}", "lbac_refused") from None


_CACHEABLE_BODY: Final = 4096


def enforce(kind: Kind, method: str, raw_query: str, body: bytes | None, policies: tuple[Selector, ...]
            ) -> Restriction:
    """Rewrite the request so the backend can only return series/streams matching ``policies``.

    URL and form body are merged (as Prometheus and Loki do) and re-encoded in one place: the
    body for POST, the URL otherwise, so no copy of a parameter escapes the rewrite. Dashboards
    repeat the same requests, so whole results are cached (parsing and re-encoding the parameters
    costs far more than the cached rewrite itself); large bodies are not kept as cache keys.
    """
    if len(raw_query) <= _CACHEABLE_BODY and (body is None or len(body) <= _CACHEABLE_BODY):
        return _enforce_cached(kind, method, raw_query, body, policies)
    return _enforce(kind, method, raw_query, body, policies)


_RESULTS: Final[SizedLRU[tuple[Kind, str, str, bytes | None, tuple[Selector, ...]], Restriction]] = SizedLRU(4096)


def _enforce_cached(kind: Kind, method: str, raw_query: str, body: bytes | None, policies: tuple[Selector, ...]
                    ) -> Restriction:
    key = (kind, method, raw_query, body, policies)
    hit = _RESULTS.get(key)
    if hit is None:
        hit = _enforce(kind, method, raw_query, body, policies)
        _RESULTS.put(key, hit, len(hit.query or "") + len(hit.body or b""))  # a long result is never kept
    return hit


def _enforce(kind: Kind, method: str, raw_query: str, body: bytes | None, policies: tuple[Selector, ...]
             ) -> Restriction:
    pairs = _pairs(raw_query, body)
    if kind is Kind.PROMQL:
        q = _one(pairs, "query", required=True)
        new = [("query", str(_rewrite(lambda: restrict_promql(q or "", policies))))]
    elif kind is Kind.MATCH:
        matches = [v for k, v in pairs if k == "match[]"]
        new = [("match[]", m) for m in _rewrite(lambda: restrict_match(matches, policies))]  # type: ignore[attr-defined]
    elif kind in (Kind.LOGQL, Kind.LOGQL_TAIL, Kind.LOGQL_DELETE):
        q = _one(pairs, "query", required=kind is not Kind.LOGQL_DELETE or method in ("POST", "PUT"))
        if q is None:
            raise ProxyError(403, "label-restricted tokens may only create delete requests with a query",
                             "lbac_unfilterable")
        lq: str = q
        new = [("query", str(_rewrite(lambda: restrict_logql(lq, policies))))]
    elif kind is Kind.LOGQL_OPTIONAL:
        q = _one(pairs, "query", required=False)
        if q is not None:
            oq: str = q
            new = [("query", str(_rewrite(lambda: restrict_logql(oq, policies))))]
        else:
            merged = simplify(policies)  # exact identities only: a single selector or a refusal
            if len(merged) != 1:
                raise ProxyError(400, "label names and values need a query when several label policies apply; "
                                 "add ?query={...}", "lbac_refused")
            new = [("query", str(merged[0]))]
    elif kind is Kind.LOGQL_SERIES:
        matches = params.loki_series_matches(pairs)
        new = [("match[]", m) for m in _rewrite(lambda: restrict_logql_matchers(matches, policies))]  # type: ignore[attr-defined]
    else:
        raise ProxyError(403, "this endpoint cannot be filtered by label policies, and your token has some",
                         "lbac_unfilterable")
    names = params.SELECTORS[kind]  # every copy of what selects data is replaced by the rewrite
    rest = [(k, v) for k, v in pairs if k not in names] + new
    encoded = params.urlencode(rest)
    # Loki's delete handler reads only the URL (r.URL.Query()); every other reader merges URL and form.
    if method == "POST" and kind is not Kind.LOGQL_DELETE:
        return Restriction(query="", body=encoded.encode())
    return Restriction(query=encoded, body=b"" if body else None)


@lru_cache(maxsize=4096)
def headers_for(tenant: str, policies: tuple[Selector, ...]) -> tuple[str, ...]:
    """The X-Prom-Label-Policy values of ``policies`` (pure, so kept: a token's first use often repeats a
    policy's)."""
    return tuple(label_policy_header(tenant, s) for s in policies)
