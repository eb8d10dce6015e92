"""What each parameter of a label-restricted read means: read once, the way the Go backends read it.

Loki, Mimir and Prometheus read a request's parameters from ``r.Form`` after ``ParseForm`` (Go's
net/http): the form body's values first (POST, PUT, PATCH with an ``application/x-www-form-urlencoded``
body), then the URL's. A handler reads each parameter in one of two ways, and :data:`ENDPOINTS` records
which for every parameter of every label-restricted read, written from the handler named in ``source``:

* :attr:`Reads.ONE`: ``r.Form.Get(name)`` / ``r.FormValue(name)``: the first value, ``""`` when there is
  none. So an empty value *is* an absent one: Loki reads ``query=`` exactly as no ``query``.
* :attr:`Reads.LIST`: ``r.Form[name]``: every value; an empty value is a value (a selector that does
  not parse, so the backend answers 400).

:func:`pairs` is the one reader of a restricted read's parameters, for both modes and every planner:

    ps = pairs(raw_query, form_body)   # [(name, value)], body first, then URL, as r.Form holds them
    one(ps, "query", required=False)   # None when absent *or empty*

A ONE parameter given twice (twice in the URL, or in the URL and the body) is refused with 400: the
backend would take the first copy, and which one a client meant is not the gateway's to guess. An empty
ONE parameter is dropped, so no rewrite can take ``""`` for a given value: it means absent to the backend,
and so it does here (a query-optional read then gets the policy as its query, in both modes). The
gateway re-encodes what it read (``urlencode``), so the backend reads back exactly these pairs.

Tempo has no entry: its handlers read ``r.URL.Query()`` only (``gateway.lbac.tracereads`` reads it so).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Final
from urllib.parse import parse_qsl

from gateway.errors import ProxyError
from gateway.routes import Kind

MAX_FIELDS: Final = 1000  # parameters in the URL and a form body together; past it a 400


class Reads(enum.Enum):
    """How the backend's handler reads a parameter."""

    ONE = "one"  # r.Form.Get: the first value; empty is the same as absent
    LIST = "list"  # r.Form[name]: every value


class Role(enum.Enum):
    """What a parameter does to the data a read returns."""

    SELECTOR = "selector"  # selects series or streams: restricted (enforce) or filtered by the backend (header)
    NARROWS = "narrows"  # can only narrow what the selector selects (a line filter, shards, target labels)
    SHAPE = "shape"  # time range, limits, step, direction, options: never widens what is visible


@dataclass(frozen=True, slots=True)
class Param:
    name: str
    reads: Reads
    role: Role = Role.SHAPE


@dataclass(frozen=True, slots=True)
class Endpoint:
    """The parameters one restricted read of a backend reads, and where (file, function) it reads them."""

    backend: str
    kind: Kind
    paths: tuple[str, ...]  # route patterns of gateway.routes (aliases such as /api/prom/... included)
    params: tuple[Param, ...]
    source: str
    empty: str = ""  # what the read answers when its selector parameter is absent or empty


def _one(*names: str, role: Role = Role.SHAPE) -> tuple[Param, ...]:
    return tuple(Param(n, Reads.ONE, role) for n in names)


_QUERY = Param("query", Reads.ONE, Role.SELECTOR)
_SHARDS = Param("shards", Reads.LIST, Role.NARROWS)  # Loki's shards(): r.Form["shards"]
_BOUNDS = _one("start", "end", "since")  # Loki's bounds()
_RANGE = (_QUERY, *_BOUNDS, *_one("limit", "direction", "step", "interval"), _SHARDS)  # ParseRangeQuery
_INSTANT = (_QUERY, *_one("limit", "time", "direction"), _SHARDS)  # ParseInstantQuery
_MATCH = Param("match[]", Reads.LIST, Role.SELECTOR)
_PROM_RANGE = _one("start", "end")
_PROM_QUERY = _one("timeout", "limit", "stats", "lookback_delta")
_LOKI = "pkg/loghttp/"
_PROM = "web/api/v1/api.go "
_REQUIRED = "400: the backend needs one"
_OPTIONAL = "every visible stream: the policy is sent as the query"

ENDPOINTS: Final[tuple[Endpoint, ...]] = (
    # ------------------------------------------------------------------ Loki (each handler after ParseForm)
    Endpoint("logs", Kind.LOGQL, ("/loki/api/v1/query",), _INSTANT,
             _LOKI + "query.go ParseInstantQuery", _REQUIRED),
    Endpoint("logs", Kind.LOGQL, ("/loki/api/v1/query_range", "/api/prom/query"),
             (*_RANGE, Param("regexp", Reads.ONE, Role.NARROWS)),  # legacy path: AddFilterExpr on the AST
             _LOKI + "query.go ParseRangeQuery, params.go parseRegexQuery", _REQUIRED),
    Endpoint("logs", Kind.LOGQL_OPTIONAL, ("/loki/api/v1/labels", "/loki/api/v1/label", "/api/prom/label"),
             (_QUERY, *_BOUNDS), _LOKI + "labels.go ParseLabelQuery", _OPTIONAL),
    Endpoint("logs", Kind.LOGQL_OPTIONAL, ("/loki/api/v1/label/{name}/values", "/api/prom/label/{name}/values"),
             (_QUERY, *_BOUNDS), _LOKI + "labels.go ParseLabelQuery", _OPTIONAL),
    Endpoint("logs", Kind.LOGQL_SERIES, ("/loki/api/v1/series", "/api/prom/series"),
             (Param("match", Reads.LIST, Role.SELECTOR), _MATCH, *_BOUNDS, _SHARDS),
             _LOKI + "series.go ParseSeriesQuery (a lone `{}` is no match at all)", "every visible stream"),
    Endpoint("logs", Kind.LOGQL, ("/loki/api/v1/index/stats",), _RANGE,
             _LOKI + "query.go ParseIndexStatsQuery", _REQUIRED),
    Endpoint("logs", Kind.LOGQL, ("/loki/api/v1/index/volume",),
             (*_INSTANT, *_BOUNDS, Param("targetLabels", Reads.ONE, Role.NARROWS), *_one("aggregateBy")),
             _LOKI + "query.go ParseVolumeInstantQuery", _REQUIRED),
    Endpoint("logs", Kind.LOGQL, ("/loki/api/v1/index/volume_range",),
             (*_RANGE, Param("targetLabels", Reads.ONE, Role.NARROWS), *_one("aggregateBy")),
             _LOKI + "query.go ParseVolumeRangeQuery", _REQUIRED),
    Endpoint("logs", Kind.LOGQL, ("/loki/api/v1/patterns",), (_QUERY, *_BOUNDS, *_one("step")),
             _LOKI + "patterns.go ParsePatternsQuery", _REQUIRED),
    Endpoint("logs", Kind.LOGQL, ("/loki/api/v1/detected_labels",), (_QUERY, *_BOUNDS),
             _LOKI + "labels.go ParseDetectedLabelsQuery; pkg/querier/querier.go DetectedLabels "
             "(`req.Query != \"\"`)", _OPTIONAL),
    Endpoint("logs", Kind.LOGQL, ("/loki/api/v1/detected_fields", "/loki/api/v1/detected_field/{name}/values"),
             (_QUERY, *_BOUNDS, *_one("line_limit", "limit", "field_limit", "step")),
             _LOKI + "query.go ParseDetectedFieldsQuery", "values: " + _OPTIONAL + "; fields: " + _REQUIRED),
    Endpoint("logs", Kind.LOGQL_TAIL, ("/loki/api/v1/tail", "/api/prom/tail"),
             (_QUERY, Param("regexp", Reads.ONE, Role.NARROWS), *_one("limit", "delay_for"), *_BOUNDS),
             _LOKI + "tail.go ParseTailQuery", _REQUIRED),
    Endpoint("logs", Kind.LOGQL_DELETE, ("/loki/api/v1/delete",), (_QUERY, *_one("start", "end")),
             "pkg/compactor/deletion/request_handler.go (r.URL.Query() only)", "403: a delete needs a query"),
    # ------------------------------------------------------------------ Prometheus API (Mimir's is the same)
    Endpoint("metrics", Kind.PROMQL, ("/prometheus/api/v1/query",), (_QUERY, *_one("time"), *_PROM_QUERY),
             _PROM + "query", _REQUIRED),
    Endpoint("metrics", Kind.PROMQL, ("/prometheus/api/v1/query_range",),
             (_QUERY, *_PROM_RANGE, *_one("step"), *_PROM_QUERY), _PROM + "queryRange", _REQUIRED),
    Endpoint("metrics", Kind.PROMQL, ("/prometheus/api/v1/query_exemplars",), (_QUERY, *_PROM_RANGE),
             _PROM + "queryExemplars", _REQUIRED),
    Endpoint("metrics", Kind.MATCH, ("/prometheus/api/v1/series",), (_MATCH, *_PROM_RANGE, *_one("limit")),
             _PROM + "series", "400: `no match[] parameter provided`; every visible series when restricted"),
    Endpoint("metrics", Kind.MATCH, ("/prometheus/api/v1/labels", "/prometheus/api/v1/label/{name}/values"),
             (_MATCH, *_PROM_RANGE, *_one("limit")), _PROM + "labelNames, labelValues", "every visible series"),
    Endpoint("metrics", Kind.MATCH, ("/prometheus/federate", "/federate"), (_MATCH,),
             "web/federate.go", "every visible series"),
    Endpoint("metrics", Kind.TENANT_WIDE, ("/prometheus/api/v1/metadata",),
             _one("limit", "limit_per_metric", "metric"), _PROM + "metricMetadata", "the visible metrics' metadata"),
)


def _lists() -> frozenset[str]:
    lists = {p.name for e in ENDPOINTS for p in e.params if p.reads is Reads.LIST}
    ones = {p.name for e in ENDPOINTS for p in e.params if p.reads is Reads.ONE}
    if lists & ones:  # one reader serves every endpoint only while no name is read both ways
        raise ValueError(f"parameters read as a list by one endpoint and as one value by another: {lists & ones}")
    return frozenset(lists)


#: Parameters some restricted read takes as a list (r.Form[name]); every other one is read as one value.
LISTS: Final = _lists()
#: The parameters each kind restricts (enforce mode rewrites them; nothing else selects data).
SELECTORS: Final[dict[Kind, tuple[str, ...]]] = {
    k: tuple(dict.fromkeys(p.name for e in ENDPOINTS if e.kind is k for p in e.params if p.role is Role.SELECTOR))
    for k in dict.fromkeys(e.kind for e in ENDPOINTS)
}


def _parse(text: str, room: int) -> list[tuple[str, str]]:
    try:
        return parse_qsl(text, keep_blank_values=True, max_num_fields=room)
    except ValueError:
        raise ProxyError(400, f"more than {MAX_FIELDS} parameters in the URL and form body together",
                         "bad_query") from None


#: The last parameters read, by (raw query, body): an enforce-mode rewrite reads a new query twice (weighed,
#: then rewritten), and unquoting is pure Python. Only short requests are kept (no large body held).
_LAST: list[tuple[str, bytes | None, tuple[tuple[str, str], ...]]] = []
_MAX_KEPT: Final = 16 * 1024


def pairs(raw_query: str, body: bytes | None) -> list[tuple[str, str]]:
    """The parameters as ``r.Form`` holds them (body first, then URL), each ONE parameter at most once and
    never empty; a repeated ONE parameter is a 400. A new list each call (callers may change theirs)."""
    if _LAST:
        q, b, kept = _LAST[0]
        if q == raw_query and b == body:
            return list(kept)
    out = _pairs(raw_query, body)
    if len(raw_query) + len(body or b"") <= _MAX_KEPT:
        _LAST[:] = [(raw_query, body, tuple(out))]
    return out


def _pairs(raw_query: str, body: bytes | None) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    if body:
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError:
            raise ProxyError(400, "form body is not valid UTF-8 form data", "bad_form") from None
        out = _parse(text, MAX_FIELDS)
    if raw_query:
        out += _parse(raw_query, MAX_FIELDS - len(out))
    seen: set[str] = set()
    kept: list[tuple[str, str]] = []
    for name, value in out:
        if name not in LISTS:
            if name in seen:
                raise ProxyError(400, f"parameter {name!r} given more than once (URL and body are merged)",
                                 "bad_query")
            seen.add(name)
            if not value:
                continue  # r.Form.Get reads "" as absent: so does every rewrite
        kept.append((name, value))
    return kept


_SAFE: Final = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.-~")
#: Each byte as ``urllib.parse.quote_plus`` writes it (safe=""): unreserved as is, space as '+', else %XX.
#: (A list: map() calls list.__getitem__ directly, a tuple's through a slot wrapper, three times slower.)
_QUOTED: Final = ["+" if b == 0x20 else chr(b) if b in _SAFE else f"%{b:02X}" for b in range(256)]


def quote_plus(text: str) -> str:
    """``urllib.parse.quote_plus(text)``, the bytes looked up in C (urllib quotes text with anything to
    escape one byte at a time in Python: ~2,500 bytecodes for a 200-character PromQL query)."""
    return "".join(map(_QUOTED.__getitem__, text.encode("utf-8")))


def urlencode(ps: list[tuple[str, str]]) -> str:
    """``urllib.parse.urlencode(ps)`` for pairs of strings (what :func:`pairs` gives and rewrites make)."""
    return "&".join([f"{quote_plus(k)}={quote_plus(v)}" for k, v in ps])


def one(ps: list[tuple[str, str]], name: str, required: bool) -> str | None:
    """The value of a ONE parameter of :func:`pairs`, None when absent (or empty); 400 when required."""
    for k, v in ps:
        if k == name:
            return v
    if required:
        raise ProxyError(400, f"parameter {name!r} is required", "bad_query")
    return None


def loki_series_matches(ps: list[tuple[str, str]]) -> list[str]:
    """The selectors Loki's series reads: ``match`` and ``match[]`` together, and none for a lone ``{}``.

    ``ParseSeriesQuery`` takes the union of both lists, and when exactly one distinct value remains
    that is ``{}`` with its spaces removed, reads it as no ``match`` at all (every stream).
    """
    values = [v for k, v in ps if k in ("match", "match[]")]
    distinct = set(values)
    if len(distinct) == 1 and next(iter(distinct)).replace(" ", "") == "{}":
        return []
    return values
