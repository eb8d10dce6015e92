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
``/api/v2/search/tags``,        ``q`` (optional) AND-ed with the policy (``traceql.tags_query``), one
``/api/v2/search/tag/…/values``  request per selector (and per scope for all scopes), answers merged
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
from gateway.policy.selector import LabelMatcher, Selector
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
#: The scopes Tempo's unfiltered tag-name search reads (``SearchTags``), asked one by one; and the frontend's.
_DATA_SCOPES: Final = ("resource", "span", "event", "link", "instrumentation")
INTRINSIC: Final = "intrinsic"
#: What a restricted token's tag answer keeps of Tempo's ``metrics`` (progress; the rest counts hidden spans).
_KEPT_METRICS: Final = ("totalJobs", "completedJobs", "totalBlocks")


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
    try:
        if kind is Kind.TRACE_TAGS:
            values = path.endswith("/values")
            if values:
                _check_tag_name(path.removeprefix(_TAG_VALUES_PREFIX).removesuffix("/values"))
            return _tags_plan(_params(raw_query, _TAG_VALUES if values else _TAGS), selectors, path)
        if path == SEARCH_PATH:
            ps = _params(raw_query, _SEARCH)
            if "tags" in ps:
                raise ProxyError(400, "search by tags (tags=) cannot be restricted by trace selectors; send the "
                                 'search as TraceQL in q, e.g. q={ span.http.method = "GET" }', "lbac_refused")
            ps["q"] = traceql.restrict(ps.get("q", "{}"), traceql_condition(selectors))
        else:
            ps = _params(raw_query, _METRICS)
            q = ps.pop("q", None) or ps.pop("query", None)
            ps.pop("query", None)
            if q is None:
                raise ProxyError(400, "a TraceQL metrics query needs q", "bad_query")
            ps["q"] = traceql.restrict(q, traceql_condition(selectors))
    except RewriteError as exc:
        raise _refused(exc) from None
    return urlencode(ps)


def _attribute_name(text: str) -> str:
    """An ATTR token's name as Tempo's ``parseAttribute`` reads it: ``"..."`` parts unquoted (``\\"``, ``\\\\``)."""
    out: list[str] = []
    i, quoted = 0, False
    while i < len(text):
        c = text[i]
        if c == '"':
            quoted = not quoted
        elif c == "\\" and quoted:
            i += 1
            out.append(text[i])
        else:
            out.append(c)
        i += 1
    return "".join(out)


def _identity(name: str) -> tuple[str, str] | None:
    """``("resource" or "", attribute name)`` of a tag name in the resource scope or unscoped (the tags a
    policy's ``resource.`` condition can be the same attribute as), else None."""
    body = traceql.tokenize("{" + name + "}")[1:-1]
    if len(body) == 2 and body[1].kind == traceql.ATTR and (body[0].text == "resource." or body[0].text == "."):
        return body[0].text.removesuffix("."), _attribute_name(body[1].text)
    return None


def _tag_identity(raw: str, names: frozenset[str]) -> tuple[str, str] | None:
    """:func:`_identity` of the requested tag as each URL decoding leaves it (Go's router decodes the path
    once, an older Tempo twice) when one of them is an attribute in ``names``, else None; they must agree."""
    seen: set[tuple[str, str] | None] = set()
    for _ in range(_DECODINGS):
        decoded = unquote(raw)
        seen.add(_identity(decoded))
        if decoded == raw:
            break
        raw = decoded
    if not any(i is not None and i[1] in names for i in seen):
        return None
    if len(seen) > 1:
        raise RewriteError("the tag name names a different attribute once URL-decoded; send it encoded once")
    return seen.pop()


def _values_legs(ps: dict[str, str], s: TraceSelector, path: str, tag: str, ident: tuple[str, str] | None
                 ) -> list[tuple[Leg, tuple[LabelMatcher, ...]]]:
    """One selector's tag-values look-ups, each with the matchers its values must satisfy (``()``: none).

    A condition on the requested attribute itself is not sent: Tempo's ``Engine.ExecuteTagValues``
    (``pkg/traceql/engine.go``) answers ``tag = literal`` with the literal, reading no data, and the
    vParquet iterators (``createDistinctAttributeIterator``, ``block_autocomplete.go``) select the attribute's
    *key* as a value for any other comparison of it. The policy's other matchers stay in ``q`` and the
    answer's values are checked against the matchers on the tag: a span is visible exactly when its other
    attributes match and this value does (``limit`` is applied after the check). An unscoped tag (``.a``) is
    asked as ``resource.a`` and ``span.a``, the two Tempo reads for it (``SearchTagValuesV2``,
    ``ExecuteTagValues``): only the resource attribute is the policy's.
    """
    on_tag = tuple(m for m in s.matchers if ident is not None and m.name == ident[1])
    if not on_tag:
        return [(Leg(urlencode({**ps, "q": traceql.tags_query(ps.get("q"), s.condition())})), ())]
    assert ident is not None
    rest = tuple(m for m in s.matchers if m.name != ident[1])
    checked = {k: v for k, v in ps.items() if k != "limit"}
    checked["q"] = traceql.tags_query(ps.get("q"), TraceSelector(rest).condition() if rest else None)
    if not checked["q"]:
        del checked["q"]
    if ident[0] == "resource":
        return [(Leg(urlencode(checked)), on_tag)]
    if not tag.startswith("."):
        raise RewriteError("an unscoped tag name must start with '.' as sent")
    head = path.removesuffix("/values").removesuffix(tag)
    return [(Leg(urlencode(checked), path=f"{head}resource{tag}/values"), on_tag),
            (Leg(urlencode({**ps, "q": traceql.tags_query(ps.get("q"), s.condition())}),
                 path=f"{head}span{tag}/values"), ())]


def _tags_plan(ps: dict[str, str], selectors: tuple[TraceSelector, ...], path: str) -> Plan:
    """Tag look-ups as fan-out legs, merged (always a plan: the merge also drops Tempo's scan totals).

    One leg per selector (each ``q`` a plain conjunction every Tempo extracts exactly): the tags of spans
    visible under any selector are the union of each selector's. Tag names asked of every scope (no
    ``scope``, or ``none``) with no condition of the client's are asked scope by scope: with a condition in
    ``q``, Tempo's filtered look-up of all scopes leaves out event and link attributes (measured against
    Tempo main), while a tenant holding only the visible spans, asked without a condition, answers from
    every scope Tempo's unfiltered ``SearchTags`` reads (``vparquet5/block_search_tags.go``: resource,
    instrumentation, span, event, link), plus the intrinsics Tempo's frontend adds (``tag_handlers.go``).
    Tag values: :func:`_values_legs`.
    """
    if len(selectors) > MAX_FANOUT:
        raise RewriteError(f"tag look-ups are fanned out to at most {MAX_FANOUT} trace selectors")
    try:
        limit = int(ps.get("limit", "0"))
    except ValueError:
        raise ProxyError(400, "invalid limit", "bad_query") from None
    limit = limit if limit > 0 else -1
    q = ps.get("q")
    if path.endswith("/values"):
        tag = path.removeprefix(_TAG_VALUES_PREFIX).removesuffix("/values")
        ident = _tag_identity(tag, frozenset(m.name for s in selectors for m in s.matchers))
        legs = [leg for s in selectors for leg in _values_legs(ps, s, path, tag, ident)]
        return Plan(Merge.TEMPO_TAG_VALUES, tuple(leg for leg, _ in legs), limit=limit,
                    checks=tuple(c for _, c in legs))
    per_scope = ps.get("scope", "none") == "none" and traceql.matches_all(q)
    scopes: tuple[dict[str, str], ...] = tuple({"scope": sc} for sc in _DATA_SCOPES) if per_scope else ({},)
    tag_legs = [Leg(urlencode({**ps, **sc, "q": traceql.tags_query(q, s.condition())}))
                for s in selectors for sc in scopes]
    if per_scope:  # the intrinsics: Tempo's frontend lists them for a scope-less request
        first = traceql.tags_query(q, selectors[0].condition())
        tag_legs.append(Leg(urlencode({**ps, "scope": INTRINSIC, "q": first})))
    return Plan(Merge.TEMPO_TAGS, tuple(tag_legs), limit=limit)


def _answer(doc: Any, key: str) -> list[Any]:
    if not isinstance(doc, dict) or not isinstance(doc.get(key, []), list):
        raise ValueError(f"not a Tempo tag answer ({key})")
    return list(doc.get(key, []))


def merge_tags(docs: list[Any], plan: Plan) -> dict[str, Any]:
    """Tempo v2 tag names (``{"scopes": [{"name", "tags"}]}``): the union per scope, sorted, at most ``limit``
    per scope (Tempo's ``maxTagsPerScope``); of ``metrics`` the job and block counts only."""
    scopes: dict[str, set[str]] = {}
    for doc in docs:
        for scope in _answer(doc, "scopes"):
            tags = scope.get("tags") or []
            if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
                raise ValueError("tags is not a list of names")
            scopes.setdefault(str(scope["name"]), set()).update(tags)
    cut = plan.limit if plan.limit > 0 else None
    return {"scopes": [{"name": n, "tags": sorted(t)[:cut]} for n, t in scopes.items()],
            "metrics": progress(docs)}


def merge_tag_values(docs: list[Any], plan: Plan) -> dict[str, Any]:
    """Tempo v2 tag values (``{"tagValues": [{"type", "value"}]}``): the union, in first-seen order, at most
    ``limit`` (each leg honoured it: any ``limit`` of the union is an answer Tempo could give); ``metrics`` as
    :func:`progress` keeps them."""
    seen: dict[tuple[str, str], dict[str, Any]] = {}
    for i, doc in enumerate(docs):
        check = TraceSelector(plan.checks[i]) if plan.checks and plan.checks[i] else None
        for v in _answer(doc, "tagValues"):
            if check is not None:  # the policy's matchers on the tag itself (a non-string value matches none)
                if not isinstance(v, dict) or v.get("type") != "string" or not isinstance(v.get("value"), str) \
                        or not check.matches({m.name: v["value"] for m in check.matchers}):
                    continue
            seen.setdefault((str(v.get("type", "")), str(v.get("value", ""))), v)
    out = list(seen.values())
    return {"tagValues": out[:plan.limit] if plan.limit > 0 else out, "metrics": progress(docs)}


def progress(docs: list[Any]) -> dict[str, int]:
    """The legs' ``metrics`` summed, of :data:`_KEPT_METRICS` only: ``inspectedBytes``, ``totalBlockBytes``,
    ``backendBytes`` and the open-ended ``additionalMetrics`` count what Tempo read, hidden spans included."""
    out: dict[str, int] = {}
    for doc in docs:
        m = doc.get("metrics") if isinstance(doc, dict) else None
        if isinstance(m, dict):
            for k in _KEPT_METRICS:
                v = m.get(k)
                if isinstance(v, int) and not isinstance(v, bool):
                    out[k] = out.get(k, 0) + v
    return out
