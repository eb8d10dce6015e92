"""Tempo reads of a token restricted by trace selectors: the URL Tempo gets, or the refusal.

Tempo reads every parameter of these endpoints from ``r.URL.Query()`` (grafana/tempo ``pkg/api/http.go``
``ParseSearchRequest``, ``ParseQueryRangeRequest``, ``ParseQueryInstantRequest``; ``search_tags.go``
``ParseSearchTagsRequest``, ``parseSearchTagValuesRequest``), one value each (``vals.Get``: the first,
``""`` meaning absent), never a body. So the gateway reads the URL the same way, refuses a repeated or
unknown parameter (Tempo's internal ones such as ``dc``, the dedicated-column map, could re-point an
attribute the policy names), rewrites the query (:mod:`gateway.lbac.traceql`) and sends the URL it
re-encoded, so Tempo reads back exactly what was checked:

==============================  ====================================================================
``/api/search``                 ``q`` restricted (absent: ``{ C }``); legacy ``tags=`` search refused
``/api/metrics/query[_range]``  ``q``, else ``query`` (Tempo's order), restricted and sent as ``q``
``/api/v2/search/tags``,        ``q`` (optional) AND-ed with the policy (``traceql.tags_query``); under
``/api/v2/search/tag/…/values``  several selectors one request per selector, the answers' union
``/api/search/tags``, v1 tag    403: Tempo's v1 tag handlers ignore ``q`` (the live store's
values, ``/api/metrics/summary``  ``SearchTags`` calls ``SearchTagsV2`` with the scope only)
==============================  ====================================================================
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any, Final
from urllib.parse import parse_qsl, unquote, urlencode

from gateway.errors import ProxyError
from gateway.lbac import RewriteError, traceql
from gateway.lbac.fanout import MAX_FANOUT, Leg, Merge, Plan
from gateway.policy.selector import Selector
from gateway.policy.trace_selector import TraceSelector, traceql_condition
from gateway.routes import Kind

MAX_FIELDS: Final = 100
#: Longer raw query strings are rewritten in the rewrite pool (gateway.lbac.pool): the rewrite takes ~1-3 µs
#: per character (measured: 16 KiB, the most a query may have, took 17-48 ms), so inline stays under ~2 ms.
INLINE_CHARS: Final = 768
_SEARCH: Final = frozenset({"q", "tags", "minDuration", "maxDuration", "limit", "spss", "start", "end"})
_METRICS: Final = frozenset({"q", "query", "start", "end", "since", "step", "exemplars"})
_TAGS: Final = frozenset({"q", "scope", "start", "end", "limit", "maxStaleValues"})
_TAG_VALUES: Final = frozenset({"q", "start", "end", "limit", "maxStaleValues"})
#: Kinds this module plans (gateway.routes.tempo marks the routes).
KINDS: Final = frozenset({Kind.TRACEQL, Kind.TRACE_TAGS, Kind.TRACE_UNFILTERABLE})
SEARCH_PATH: Final = "/api/search"
_TAG_VALUES_PREFIX: Final = "/api/v2/search/tag/"
_DECODINGS: Final = 3  # as gateway.routes accepts the name: encoded at most three times


def _refused(exc: RewriteError) -> ProxyError:
    return ProxyError(400, f"query refused by label-based access control: {exc}", "lbac_refused")


def selectors_of(policies: tuple[Selector, ...]) -> tuple[TraceSelector, ...]:
    """The trace selectors; 403 when some policy is not one (a trace read restricted otherwise fails closed)."""
    out = tuple(p for p in policies if isinstance(p, TraceSelector))
    if len(out) != len(policies):
        raise ProxyError(403, "traces can only be restricted by trace selectors ({resource.env=\"dev\"}), and "
                         "your token has other label policies", "lbac_unfilterable")
    return out


def _params(raw_query: str, allowed: frozenset[str]) -> dict[str, str]:
    """``r.URL.Query()`` as Tempo's handlers read it, each parameter at most once; 400 otherwise."""
    try:
        pairs = parse_qsl(raw_query, keep_blank_values=True, max_num_fields=MAX_FIELDS)
    except ValueError:
        raise ProxyError(400, f"more than {MAX_FIELDS} parameters", "bad_query") from None
    out: dict[str, str] = {}
    for k, v in pairs:
        if k not in allowed:
            raise ProxyError(400, f"parameter {k[:64]!r} cannot be used under label-based access control; "
                             f"allowed here: {', '.join(sorted(allowed))}", "lbac_refused")
        if k in out:
            raise ProxyError(400, f"parameter {k!r} given more than once", "bad_query")
        if v:  # vals.Get: "" is absent
            out[k] = v
    return out


def _check_tag_name(raw: str) -> None:
    """The tag name as sent and as every decoding the router allows leaves it (Grafana encodes it once or twice;
    Tempo's router decodes once, older Tempo twice): none may name what hidden spans hold."""
    for _ in range(_DECODINGS + 1):
        traceql.check_tag_name(raw)
        decoded = unquote(raw)
        if decoded == raw:
            return
        raw = decoded


@lru_cache(maxsize=1024)  # (dashboards repeat their queries; a refusal is not kept)
def restrict_url(kind: Kind, path: str, raw_query: str, policies: tuple[Selector, ...]) -> str | Plan:
    """The raw query string to send Tempo for a restricted read, or for tag look-ups under several selectors
    the fan-out plan (see the module docstring)."""
    if kind is Kind.TRACE_UNFILTERABLE:
        hint = " (use /api/metrics/query_range)" if "summary" in path else \
            " (use the v2 form, /api/v2/search/tags or /api/v2/search/tag/{name}/values, as Grafana does)"
        raise ProxyError(403, "this endpoint cannot be restricted by trace selectors: Tempo ignores its query "
                         "filter" + hint, "lbac_unfilterable")
    selectors = selectors_of(policies)
    condition = traceql_condition(selectors)
    try:
        if kind is Kind.TRACE_TAGS:
            values = path.endswith("/values")
            if values:
                _check_tag_name(path.removeprefix(_TAG_VALUES_PREFIX).removesuffix("/values"))
            ps = _params(raw_query, _TAG_VALUES if values else _TAGS)
            if len(selectors) > 1:
                return _tags_fanout(ps, selectors, values)
            ps["q"] = traceql.tags_query(ps.get("q"), condition)
        elif path == SEARCH_PATH:
            ps = _params(raw_query, _SEARCH)
            if "tags" in ps:
                raise ProxyError(400, "search by tags (tags=) cannot be restricted by trace selectors; send the "
                                 'search as TraceQL in q, e.g. q={ span.http.method = "GET" }', "lbac_refused")
            ps["q"] = traceql.restrict(ps.get("q", "{}"), condition)
        else:
            ps = _params(raw_query, _METRICS)
            q = ps.pop("q", None) or ps.pop("query", None)
            ps.pop("query", None)
            if q is None:
                raise ProxyError(400, "a TraceQL metrics query needs q", "bad_query")
            ps["q"] = traceql.restrict(q, condition)
    except RewriteError as exc:
        raise _refused(exc) from None
    return urlencode(ps)


def _tags_fanout(ps: dict[str, str], selectors: tuple[TraceSelector, ...], values: bool) -> Plan:
    """One tag look-up per selector (each ``q`` a plain conjunction every Tempo extracts exactly), merged: the
    tags of spans visible under any selector are the union of each selector's."""
    if len(selectors) > MAX_FANOUT:
        raise RewriteError(f"tag look-ups are fanned out to at most {MAX_FANOUT} trace selectors")
    legs = tuple(Leg(urlencode({**ps, "q": traceql.tags_query(ps.get("q"), s.condition())})) for s in selectors)
    try:
        limit = int(ps.get("limit", "0"))
    except ValueError:
        raise ProxyError(400, "invalid limit", "bad_query") from None
    return Plan(Merge.TEMPO_TAG_VALUES if values else Merge.TEMPO_TAGS, legs, limit=limit if limit > 0 else -1)


def _answer(doc: Any, key: str) -> list[Any]:
    if not isinstance(doc, dict) or not isinstance(doc.get(key, []), list):
        raise ValueError(f"not a Tempo tag answer ({key})")
    return list(doc.get(key, []))


def merge_tags(docs: list[Any], plan: Plan) -> dict[str, Any]:
    """Tempo v2 tag names (``{"scopes": [{"name", "tags"}]}``): the union per scope, sorted, at most ``limit``
    per scope (Tempo's ``maxTagsPerScope``); the first leg's ``metrics``."""
    scopes: dict[str, set[str]] = {}
    for doc in docs:
        for scope in _answer(doc, "scopes"):
            tags = scope.get("tags") or []
            if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
                raise ValueError("tags is not a list of names")
            scopes.setdefault(str(scope["name"]), set()).update(tags)
    cut = plan.limit if plan.limit > 0 else None
    return {"scopes": [{"name": n, "tags": sorted(t)[:cut]} for n, t in scopes.items()],
            "metrics": docs[0].get("metrics", {})}


def merge_tag_values(docs: list[Any], plan: Plan) -> dict[str, Any]:
    """Tempo v2 tag values (``{"tagValues": [{"type", "value"}]}``): the union, in first-seen order, at most
    ``limit`` (each leg honoured it: any ``limit`` of the union is an answer Tempo could give)."""
    seen: dict[tuple[str, str], dict[str, Any]] = {}
    for doc in docs:
        for v in _answer(doc, "tagValues"):
            seen.setdefault((str(v.get("type", "")), str(v.get("value", ""))), v)
    out = list(seen.values())
    return {"tagValues": out[:plan.limit] if plan.limit > 0 else out, "metrics": docs[0].get("metrics", {})}
