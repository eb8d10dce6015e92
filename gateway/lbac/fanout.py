"""Fan-out plans: answer a read under several label policies with one restricted request per selector.

Label policies are OR-ed selectors. Where one rewritten request cannot express the OR (a LogQL log
query has no ``or`` for streams, a PromQL range vector cannot be a union, a remote-read query ANDs
its matchers), the gateway sends one request per selector, each exactly today's single-selector
rewrite, and merges the answers (``gateway.proxy.fanout``). This module only decides and builds:

    p = plan(kind, upstream_path, method, raw_query, form_body, policies)
    if p is None:
        ...  # today's path: lbac.restrict.enforce (a single rewrite, or its refusal)
    else:
        ...  # p.legs are the restricted requests, p.merge says how to merge their answers

A plan is made only where the merge gives exactly the answer of a tenant holding only the visible
series or streams; what cannot be merged exactly is refused with a 400 that says why. Log lines (log
queries, tail) go to disjoint pieces of the selectors instead (``_pieces``), so no stream is read twice. Counting
endpoints (``index/stats``, ``index/volume``, ``index/volume_range``) are answered by
inclusion-exclusion (:mod:`gateway.lbac.overlap`, :mod:`gateway.lbac.counts`: one leg per
intersection of selectors, summed with signs; volumes grouped as the original query would group
them). ``patterns`` under several selectors is refused: Loki drops the patterns a request sees
fewer than 30 times and keeps its top 300 (``pkg/pattern/ingester_querier.go`` ``prunePatterns``),
so a pattern seen 20 times under each of two selectors is missing from both answers but present in
their union's: no sum of per-selector answers is exact, not even for disjoint selectors. At most
:data:`MAX_FANOUT` selectors are fanned out.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Final
from urllib.parse import urlencode

import promql_parser as pp

from gateway.errors import ProxyError
from gateway.lbac import RewriteError, metric_fanout
from gateway.lbac import restrict as lbac
from gateway.lbac.counts import Counts, volume_params, with_leg_limit
from gateway.lbac.logql import is_log_query, restrict_logql, restrict_logql_matchers, simplify
from gateway.lbac.overlap import Term, TooManyTerms, disjoint_pieces, signed_intersections
from gateway.lbac.promql import effective_policies, restrict_match, restrict_promql
from gateway.lbac.remote_read import (
    SAMPLES_CONTENT_TYPE,
    decode_read_request,
    prefer_samples,
    read_policy,
    restrict_read_request,
)
from gateway.policy.selector import LabelMatcher, Selector, SelectorError, parse_selector
from gateway.routes import Kind

#: Most selectors one request is fanned out to; beyond, the request is refused.
MAX_FANOUT: Final = 16
#: Loki's defaults (pkg/loghttp/params.go: defaultQueryLimit, and BACKWARD).
LOKI_DEFAULT_LIMIT: Final = 100


class Merge(enum.Enum):
    """How the answers of the legs become one answer."""

    SINGLE = "single"  # one leg: its answer is passed through unchanged
    STREAMS = "streams"  # Loki log query: disjoint legs, streams by label set, direction, limit
    VALUES = "values"  # Loki labels / label values: union of the value lists
    DETECTED_LABELS = "detected_labels"
    DETECTED_FROM_SERIES = "detected_from_series"  # detected_labels computed from one series leg
    DETECTED_FIELDS = "detected_fields"
    DETECTED_VALUES = "detected_values"
    PATTERNS = "patterns"  # the endpoint only: several selectors are refused (Loki prunes per request)
    INDEX_STATS = "index_stats"  # inclusion-exclusion: counts summed with the terms' signs (Plan.counts)
    VOLUME = "volume"  # inclusion-exclusion: volumes per name and bucket, then Loki's top `limit`
    MATRIX = "matrix"  # Prometheus range vector: series by label set, samples deduplicated
    METADATA = "metadata"  # legs: visible metric names, then the tenant's metadata (filtered)
    REMOTE_READ = "remote_read"  # series merged by label set per query
    TAIL = "tail"  # one WebSocket per selector, frames merged
    SIGNED = "signed"  # Loki metric query that sums over streams: legs added with Plan.counts' signs
    ABSENT = "absent"  # Loki absent_over_time: the steps every leg answers, labelled with Plan.labels
    MAX = "max"  # Loki max_over_time (in max aggregations): the largest of the legs per series and step
    MIN = "min"  # the same for min_over_time
    TEMPO_TAGS = "tempo_tags"  # Tempo v2 tag names, one leg per trace selector: union per scope
    TEMPO_TAG_VALUES = "tempo_tag_values"  # Tempo v2 tag values: union by (type, value), cut to `limit`


@dataclass(frozen=True, slots=True)
class Leg:
    """One restricted upstream request: raw query string and form body (None: no body)."""

    query: str
    body: bytes | None = None
    method: str = "GET"
    path: str | None = None  # None: the request's own upstream path
    content_type: str = lbac.FORM


@dataclass(frozen=True, slots=True)
class Plan:
    merge: Merge
    legs: tuple[Leg, ...]
    limit: int = LOKI_DEFAULT_LIMIT  # entries (streams) or metrics (metadata); < 0: none
    forward: bool = False  # Loki direction
    labels: tuple[tuple[str, str], ...] = ()  # Merge.ABSENT: the result's labels
    counts: Counts | None = None  # Merge.SIGNED, INDEX_STATS, VOLUME: signs (and limits for volumes)


# Loki endpoint (the upstream path's tail) -> merge; endpoints missing here are never fanned out.
_LOKI_ENDPOINTS: Final[tuple[tuple[re.Pattern[str], Merge], ...]] = tuple(
    (re.compile(p), m) for p, m in (
        (r"/loki/api/v1/query_range\Z", Merge.STREAMS),
        (r"/loki/api/v1/query\Z", Merge.STREAMS),
        (r"/(?:loki/api/v1|api/prom)/(?:labels?|label/[^/]+/values)\Z", Merge.VALUES),
        (r"/loki/api/v1/detected_labels\Z", Merge.DETECTED_LABELS),
        (r"/loki/api/v1/detected_fields\Z", Merge.DETECTED_FIELDS),
        (r"/loki/api/v1/detected_field/[^/]+/values\Z", Merge.DETECTED_VALUES),
        (r"/loki/api/v1/patterns\Z", Merge.PATTERNS),
        (r"/loki/api/v1/index/stats\Z", Merge.INDEX_STATS),
        (r"/loki/api/v1/index/volume(?:_range)?\Z", Merge.VOLUME),
    )
)  # fmt: skip
#: Endpoints Grafana calls without ``query``: the policy selectors become the query (Loki's labels too).
_QUERY_OPTIONAL: Final = frozenset({Merge.DETECTED_LABELS, Merge.DETECTED_VALUES})
_PLANNED: Final = frozenset({Kind.LOGQL, Kind.LOGQL_OPTIONAL, Kind.LOGQL_TAIL, Kind.PROMQL})
#: Planned even under a single selector (or a union rewrite): volumes must group as the original query.
_SINGLE_PLANNED: Final = _QUERY_OPTIONAL | {Merge.VOLUME}
_METADATA: Final = re.compile(r"/api/v1/metadata\Z")
_LABEL_NAMES: Final = re.compile(r"/(?:loki/api/v1|api/prom)/labels?\Z")
_PROM_QUERY: Final = re.compile(r"/api/v1/query(?:_range)?\Z")
_LITERALS: Final = re.compile(r"[A-Za-z0-9_\-]+(?:\|[A-Za-z0-9_\-]+)*\Z")


@lru_cache(maxsize=256)
def _loki_merge(path: str) -> Merge | None:
    for pattern, merge in _LOKI_ENDPOINTS:
        if pattern.search(path):
            return merge
    return None


def _conflict(x: LabelMatcher, y: LabelMatcher) -> bool:
    """True when no value of the label satisfies both matchers (checked for equality only)."""
    if x.op != "=":
        x, y = y, x
    if x.op != "=":
        return False
    if y.op == "=":
        return x.value != y.value
    if y.op == "!=":
        return x.value == y.value
    if _LITERALS.match(y.value):  # a plain alternation of literals: no regex engine needed
        hit = x.value in y.value.split("|")
        return not hit if y.op == "=~" else hit
    return False


def disjoint(a: Selector, b: Selector) -> bool:
    """Whether no label set can match both selectors (a sound, incomplete check)."""
    return any(x.name == y.name and _conflict(x, y) for x in a.matchers for y in b.matchers)


def _check_size(pols: tuple[Selector, ...]) -> None:
    if len(pols) > MAX_FANOUT:
        raise ProxyError(400, f"query refused by label-based access control: {len(pols)} label policies apply, "
                         f"and the gateway fans a query out to at most {MAX_FANOUT}", "lbac_refused")


def _encode(method: str, pairs: list[tuple[str, str]]) -> Leg:
    """Parameters re-encoded in one place, as ``enforce`` does: the body for POST, the URL otherwise."""
    encoded = urlencode(pairs)
    if method == "POST":
        return Leg("", encoded.encode(), "POST")
    return Leg(encoded, None, method)


def _single(kind: Kind, method: str, raw_query: str, body: bytes | None, policy: Selector) -> Leg:
    """One leg: exactly today's rewrite for a token holding only ``policy``."""
    r = lbac.enforce(kind, method, raw_query, body, (policy,))
    return Leg(r.query if r.query is not None else raw_query, r.body or None, method)


def _limit_direction(pairs: list[tuple[str, str]]) -> tuple[int, bool]:
    limit = LOKI_DEFAULT_LIMIT
    raw = next((v for k, v in pairs if k == "limit"), "")
    if raw.strip():
        try:
            limit = int(raw)
        except ValueError:
            limit = LOKI_DEFAULT_LIMIT  # Loki answers 400 on every leg; that answer is passed on
    direction = next((v for k, v in pairs if k == "direction"), "backward")
    return limit, direction.strip().upper() == "FORWARD"


def _is_bare_range(query: str) -> bool:
    try:
        node = pp.parse(query)
    except BaseException as exc:  # pyo3 panics are BaseException
        if isinstance(exc, KeyboardInterrupt | SystemExit):
            raise
        return False
    while isinstance(node, pp.ParenExpr):
        node = node.expr
    return isinstance(node, pp.MatrixSelector)


def plan(kind: Kind, path: str, method: str, raw_query: str, body: bytes | None,
         policies: tuple[Selector, ...]) -> Plan | None:
    """The fan-out for this read, or None when today's single rewrite (or its refusal) applies.

    ``path`` is the upstream path; ``body`` the form body (None without one). Single-selector
    policies only ever get a plan where today's code refused for want of a query (Loki's
    ``detected_labels`` and ``detected_field/{name}/values``, which Grafana sends without one).
    """
    if not policies:
        return None
    if kind is Kind.TENANT_WIDE:
        return _metadata_plan(path, method, raw_query, policies) if _METADATA.search(path) else None
    if kind not in _PLANNED:
        return None
    pols = policies if len(policies) == 1 else _selectors(policies, kind is Kind.PROMQL)
    if len(pols) == 1 and not (kind is Kind.LOGQL and (_loki_merge(path) in _SINGLE_PLANNED
                                                       or _mentions_absent(raw_query, body))):
        return None  # the hot path of single-selector policies: today's rewrite, nothing parsed here
    if kind is Kind.PROMQL:
        return _promql_plan(path, method, raw_query, body, policies, pols)
    merge = Merge.TAIL if kind is Kind.LOGQL_TAIL else _loki_merge(path)
    if merge is None:
        return None
    pairs = lbac._pairs(raw_query, body)
    query = lbac._one(pairs, "query", required=False)
    if merge is Merge.DETECTED_LABELS and len(pols) > 1:
        return _detected_from_series(path, pairs, query, pols)
    if query is None:
        if not (kind is Kind.LOGQL_OPTIONAL or merge in _QUERY_OPTIONAL):
            return None  # enforce: "parameter 'query' is required", or the policy itself as query
        if len(pols) == 1 and kind is Kind.LOGQL_OPTIONAL:
            return None  # today's path already sends the policy as the query
        return _policy_as_query(method, pairs, pols, merge)
    if merge is Merge.VOLUME:
        return _volume_plan(kind, method, pairs, policies, pols)
    if len(pols) == 1:  # absent_over_time: labelled from the client's selector, not the rewritten one
        return _metric_plan(kind, method, raw_query, body, query, pols, True) if merge is Merge.STREAMS else None
    union_ok = _union_works(query, policies)
    if not _safe_log_query(query):  # a metric query: the union, its refusal, or a fan-out
        return _metric_plan(kind, method, raw_query, body, query, pols, union_ok) if merge is Merge.STREAMS else None
    if union_ok:
        return None  # one selector merged from several: the single rewrite is exact
    if merge is Merge.PATTERNS:
        raise ProxyError(400, "query refused by label-based access control: patterns cannot be restricted by "
                         "several label policies (Loki drops the patterns one request sees fewer than 30 times "
                         "and keeps its top 300, so per-policy answers cannot be added up exactly); ask your "
                         "admin for a single selector", "lbac_refused")
    _check_size(pols)
    if merge is Merge.INDEX_STATS:
        terms = _terms(pols)
        return Plan(merge, tuple(_single(kind, method, raw_query, body, t.selector) for t in terms),
                    counts=Counts(tuple(t.sign for t in terms)))
    # Log lines: one leg per disjoint piece, so each stream is read once (see _pieces).
    legs = tuple(_single(kind, method, raw_query, body, p)
                 for p in (_pieces(pols) if merge in _BY_STREAM else pols))
    if merge is Merge.STREAMS:
        limit, forward = _limit_direction(pairs)
        return Plan(merge, legs, limit, forward)
    return Plan(merge, legs)


def plan_header_mode(kind: Kind, path: str, method: str, raw_query: str, body: bytes | None,
                     policies: tuple[Selector, ...]) -> Plan | None:
    """Header mode's one fan-out: Loki ``detected_labels`` / ``detected_field/{name}/values`` and label names
    without a query (absent or empty: Loki reads both as none).

    Seen on a real Loki main with ``-lbac.enabled``: ``detected_labels`` without ``query`` answers with the
    labels of every stream of the tenant whatever X-Prom-Label-Policy says, and with a query it filters.
    Label names come from the index without the policy too (``pkg/querier/querier.go`` ``Label`` calls
    ``store.LabelNamesForMetricName``, which ``labelaccess.StoreWrapper`` does not wrap), once older than
    the ingesters' window, whatever the query. So, as in enforce mode, each policy selector becomes the
    query, and a label-names query of the client's own is restricted (the header still travels with each leg).
    """
    if not policies or kind not in (Kind.LOGQL, Kind.LOGQL_OPTIONAL):
        return None
    merge = _loki_merge(path)
    names = merge is Merge.VALUES and _LABEL_NAMES.search(path) is not None
    if merge is None or (merge not in _QUERY_OPTIONAL and not names):
        return None
    pairs = lbac._pairs(raw_query, body)
    query = lbac._one(pairs, "query", required=False)
    pols = policies if len(policies) == 1 else _selectors(policies, False)
    if query is not None:
        return _names_of(method, pairs, query, pols) if names else None  # else the backend filters
    if merge is Merge.DETECTED_LABELS and len(pols) > 1:
        return _detected_from_series(path, pairs, None, pols)
    return _policy_as_query(method, pairs, pols, merge)


def _names_of(method: str, pairs: list[tuple[str, str]], query: str, pols: tuple[Selector, ...]) -> Plan:
    """Label names of a query of the client's own, in header mode: each policy selector AND-ed to it.

    Loki reads that query as matchers only (``querier.Label``: ``syntax.ParseMatchers``), so anything but
    a plain selector is refused here, by the bounded selector parser, before any LogQL parser sees it.
    """
    try:
        own = parse_selector(query)
    except SelectorError as exc:
        raise ProxyError(400, f"label names take a stream selector as their query: {exc}", "bad_query") from None
    rest = [(k, v) for k, v in pairs if k != "query"]
    return _policy_as_query(method, rest, lbac.intersect((own,), pols), Merge.VALUES)


def _detected_from_series(path: str, pairs: list[tuple[str, str]], query: str | None,
                          pols: tuple[Selector, ...]) -> Plan:
    """``detected_labels`` under several selectors, from one ``series`` request (its ``match[]`` are OR-ed).

    Each leg's answer would count a value seen under two selectors twice or, if the largest leg is kept,
    miss the values only another leg sees; and Loki drops a label whose values all look like IDs, which
    depends on all the values. The visible streams' label sets give the values exactly, and
    ``gateway.proxy.detected`` applies Loki's rules to them.
    """
    _check_size(pols)
    try:
        matches = restrict_logql_matchers([query] if query is not None else [], pols)
    except RewriteError as exc:
        raise ProxyError(400, f"invalid query: {exc}", "bad_query") from None
    keep = [(k, v) for k, v in pairs if k in ("start", "end", "since")]
    series_path = path[: -len("detected_labels")] + "series"
    leg = Leg(urlencode([*keep, *(("match[]", m) for m in matches)]), None, "GET", series_path)
    return Plan(Merge.DETECTED_FROM_SERIES, (leg,))


def _policy_as_query(method: str, pairs: list[tuple[str, str]], pols: tuple[Selector, ...], merge: Merge) -> Plan:
    """One leg per selector, each sending the selector itself as the request's missing ``query``."""
    _check_size(pols)
    legs = tuple(_encode(method, [*pairs, ("query", str(p))]) for p in pols)
    return Plan(Merge.SINGLE if len(legs) == 1 else merge, legs)


#: Merges of log entries: their legs must not overlap (``_pieces``).
_BY_STREAM: Final = frozenset({Merge.STREAMS, Merge.TAIL})


@lru_cache(maxsize=256)
def _pieces(pols: tuple[Selector, ...]) -> tuple[Selector, ...]:
    """``pols`` as disjoint selectors (:func:`gateway.lbac.overlap.disjoint_pieces`), or a 400 beyond MAX_FANOUT.

    Loki deduplicates entries by the stream they come from (its identity before the pipeline:
    ``pkg/iter/entry_iterator.go`` compares the stream hash), but answers with the labels after it: two
    streams that ``keep``, ``drop`` or ``label_format`` make alike, holding the same line at the same
    time, are two entries under one label set. No merge can tell them from one stream read by two
    overlapping legs, so no stream is read by two: the legs are disjoint and nothing is deduplicated.
    """
    try:
        return disjoint_pieces(pols, disjoint, MAX_FANOUT)
    except TooManyTerms as exc:
        raise ProxyError(400, f"query refused by label-based access control: {exc}; ask your admin for fewer "
                         "or non-overlapping label policies", "lbac_refused") from None


@lru_cache(maxsize=256)
def _terms(pols: tuple[Selector, ...]) -> tuple[Term, ...]:
    """The inclusion-exclusion terms for ``pols``, or the 400 that says there would be too many."""
    try:
        return signed_intersections(pols, disjoint)
    except TooManyTerms as exc:
        raise ProxyError(400, f"query refused by label-based access control: {exc}; ask your admin for fewer "
                         "or non-overlapping label policies", "lbac_refused") from None


def _volume_plan(kind: Kind, method: str, pairs: list[tuple[str, str]], policies: tuple[Selector, ...],
                 pols: tuple[Selector, ...]) -> Plan | None:
    """Volumes grouped as the original query groups them: one leg (single selector or union), or one per term."""
    params = volume_params(pairs)
    if params is None:
        return None  # not a plain selector: today's rewrite, and Loki's own refusal
    query = lbac._one(params.pairs, "query", required=True) or ""
    if len(pols) == 1 or _union_works(query, policies):
        return Plan(Merge.SINGLE, (_union(kind, method, _encode(method, params.pairs), policies),))
    _check_size(pols)
    terms = _terms(pols)
    leg_pairs, leg_limit = with_leg_limit(params)
    leg = _encode(method, leg_pairs)
    return Plan(Merge.VOLUME, tuple(_single(kind, method, leg.query, leg.body, t.selector) for t in terms),
                counts=Counts(tuple(t.sign for t in terms), params.limit or 0, leg_limit, params.by_labels))


def _union(kind: Kind, method: str, leg: Leg, policies: tuple[Selector, ...]) -> Leg:
    """Today's rewrite of ``leg`` under all of ``policies`` (one selector, or their union as one)."""
    r = lbac.enforce(kind, method, leg.query, leg.body, policies)
    return Leg(r.query if r.query is not None else leg.query, r.body or None, method)


@lru_cache(maxsize=1024)
def _selectors(policies: tuple[Selector, ...], promql: bool) -> tuple[Selector, ...]:
    """The OR of ``policies`` as few selectors as exact identities allow (what each rewrite starts from)."""
    return effective_policies(policies) if promql else simplify(policies)


def _union_works(query: str, policies: tuple[Selector, ...]) -> bool:
    try:
        restrict_logql(query, policies)
    except RewriteError:
        return False
    return True


def _safe_log_query(query: str) -> bool:
    try:
        return is_log_query(query)
    except RewriteError:
        return False  # enforce refuses with the lexer's message


def _metric_plan(kind: Kind, method: str, raw_query: str, body: bytes | None, query: str,
                 pols: tuple[Selector, ...], union_ok: bool) -> Plan | None:
    """A LogQL metric query under several selectors: sums over streams or absence (``metric_fanout``).

    Used where the union rewrite refuses, and for sums over streams whose pipeline parses labels out of
    lines (a parsed label can make two streams one series, which ``or`` would count once). Under one
    selector only for ``absent_over_time``: Loki labels its answer with the selector's ``=`` matchers,
    so the rewritten query's answer would carry the policy's labels (seen on a real Loki).
    """
    try:
        found = metric_fanout.shape(query)
    except RewriteError:
        return None
    if found is None or (union_ok and found.kind != "absent" and (len(pols) == 1 or not found.parser)):
        return None  # the rewrite (one selector, or the union) is exact
    if found.kind in _PER_SELECTOR:
        _check_size(pols)
        legs = tuple(_single(kind, method, raw_query, body, p) for p in pols)
        labels = tuple(metric_fanout.absent_labels(found.matchers).items()) if found.kind == "absent" else ()
        return Plan(_PER_SELECTOR[found.kind], legs, labels=labels)
    terms = _terms(pols)
    legs = tuple(_single(kind, method, raw_query, body, t.selector) for t in terms)
    return Plan(Merge.SIGNED, legs, counts=Counts(tuple(t.sign for t in terms)))


_PER_SELECTOR: Final = {"absent": Merge.ABSENT, "max": Merge.MAX, "min": Merge.MIN}
_ABSENT: Final = re.compile(r"absent_over_time", re.IGNORECASE)
_ABSENT_BYTES: Final = re.compile(rb"absent_over_time", re.IGNORECASE)


def _mentions_absent(raw_query: str, body: bytes | None) -> bool:
    """A cheap look for ``absent_over_time`` (URL and form encoding leave the name as it is)."""
    return _ABSENT.search(raw_query) is not None or (body is not None and _ABSENT_BYTES.search(body) is not None)


def _promql_plan(path: str, method: str, raw_query: str, body: bytes | None, policies: tuple[Selector, ...],
                 pols: tuple[Selector, ...]) -> Plan | None:
    """Bare range vectors (``v[5m]``) under several selectors: one query per selector, series merged."""
    if len(pols) == 1 or not _PROM_QUERY.search(path):
        return None
    query = lbac._one(lbac._pairs(raw_query, body), "query", required=False)
    if query is None or not _is_bare_range(query):
        return None
    try:
        restrict_promql(query, policies)
        return None
    except RewriteError:
        pass
    _check_size(pols)
    return Plan(Merge.MATRIX, tuple(_single(Kind.PROMQL, method, raw_query, body, p) for p in pols))


def _metadata_plan(path: str, method: str, raw_query: str, policies: tuple[Selector, ...]) -> Plan:
    """Metadata of the visible metric names only: their names first (restricted), then the metadata."""
    pairs = lbac._pairs(raw_query, None)
    limit = -1
    for k, v in pairs:
        if k == "limit" and v.strip():
            try:
                limit = int(v)
            except ValueError:
                raise ProxyError(400, "parameter 'limit' must be an integer", "bad_query") from None
    names_path = _METADATA.sub("/api/v1/label/__name__/values", path)
    names = Leg(urlencode([("match[]", m) for m in restrict_match([], policies)]), None, "GET", names_path)
    meta = Leg(urlencode([(k, v) for k, v in pairs if k != "limit"]), None, method)
    return Plan(Merge.METADATA, (names, meta), limit)


@lru_cache(maxsize=1024)
def _read_pols(policies: tuple[Selector, ...]) -> tuple[Selector, ...]:
    return simplify(policies)


def plan_remote_read(body: bytes, policies: tuple[Selector, ...]) -> Plan | None:
    """Remote read under several selectors: one ReadRequest per selector, or None for today's rewrite.

    Raises :class:`RewriteError` for a body that does not decode (as the single rewrite does).
    """
    try:
        read_policy(policies)
        return None
    except RewriteError:
        pass
    decode_read_request(body)  # malformed bodies are refused here, with the single rewrite's message
    pols = _read_pols(policies)
    _check_size(pols)
    legs = tuple(Leg("", prefer_samples(restrict_read_request(body, (p,))), "POST", None, SAMPLES_CONTENT_TYPE)
                 for p in pols)
    return Plan(Merge.REMOTE_READ, legs)
