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
``/api/v2/search/tags``,        ``q`` (optional) AND-ed with the policy (``traceql.tags_query``)
``/api/v2/search/tag/…/values``
``/api/search/tags``, v1 tag    403: Tempo's v1 tag handlers ignore ``q`` (the live store's
values, ``/api/metrics/summary``  ``SearchTags`` calls ``SearchTagsV2`` with the scope only)
==============================  ====================================================================
"""

from __future__ import annotations

from functools import lru_cache
from typing import Final
from urllib.parse import parse_qsl, urlencode

from gateway.errors import ProxyError
from gateway.lbac import RewriteError, traceql
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


@lru_cache(maxsize=1024)  # (dashboards repeat their queries; a refusal is not kept)
def restrict_url(kind: Kind, path: str, raw_query: str, policies: tuple[Selector, ...]) -> str:
    """The raw query string to send Tempo for a restricted read (see the module docstring)."""
    if kind is Kind.TRACE_UNFILTERABLE:
        hint = " (use /api/metrics/query_range)" if "summary" in path else \
            " (use the v2 form, /api/v2/search/tags or /api/v2/search/tag/{name}/values, as Grafana does)"
        raise ProxyError(403, "this endpoint cannot be restricted by trace selectors: Tempo ignores its query "
                         "filter" + hint, "lbac_unfilterable")
    condition = traceql_condition(selectors_of(policies))
    try:
        if kind is Kind.TRACE_TAGS:
            ps = _params(raw_query, _TAG_VALUES if path.endswith("/values") else _TAGS)
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
