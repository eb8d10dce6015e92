"""The allowlist: which (method, path) the gateway forwards, to which backend, under which scope.

Each backend has one declarative table (``mimir``, ``loki``, ``tempo``, ``pyroscope``, ``otlp``); this module
holds the types they are written in and the matcher built from them at import time::

    m = match("GET", "/prometheus/api/v1/query")
    if m is None:
        ...  # 404 (or 405 when allowed_methods(path) is not empty): never a passthrough
    m.route.scope, m.route.kind, m.upstream_path  # -> "metrics:read", Kind.PROMQL, the same path

``path`` is the raw request path as received (still percent-encoded, without the query string),
and ``upstream_path`` is exactly what must be sent upstream: what was checked is what is forwarded.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final
from urllib.parse import unquote_to_bytes

from gateway.policy.scopes import ALL_SCOPES


class Kind(enum.Enum):
    """How a request carries what label policies must restrict (the ``lbac`` part acts on it)."""

    NONE = "none"  # nothing to restrict (writes, traces, build info)
    PROMQL = "promql"  # PromQL in `query` (URL or form body): query, query_range, query_exemplars
    MATCH = "match"  # PromQL selectors in `match[]`: series, labels, label values, federate
    REMOTE_READ = "remote_read"  # snappy protobuf ReadRequest body
    TENANT_WIDE = "tenant_wide"  # cannot be label-filtered: metadata, cardinality, stats, limits, profiles
    LOGQL = "logql"  # LogQL in `query`: query, query_range, index/*, patterns, detected_*
    LOGQL_OPTIONAL = "logql_optional"  # labels, label values: optional `query`
    LOGQL_SERIES = "logql_series"  # Loki series: `match` AND `match[]` (OR-ed)
    LOGQL_TAIL = "logql_tail"  # WebSocket tail, `query` in the URL
    LOGQL_DELETE = "logql_delete"  # Loki delete requests: `query` is LogQL
    # Answers the gateway filters (gateway.lbac.visibility, gateway.proxy.filtered): never rewritten requests.
    RULE_STATE = "rule_state"  # Prometheus-format /api/v1/rules: groups whose queries are visible
    ALERT_STATE = "alert_state"  # Prometheus-format /api/v1/alerts: alerts whose labels are visible
    RULE_CONFIG = "rule_config"  # the ruler's configuration API (YAML): visible groups
    ALERTMANAGER = "alertmanager"  # Alertmanager API v2: alerts, groups, silences; silence writes checked
    # Tempo (issue 27): answers filtered by trace selectors (gateway.lbac.traces, gateway.proxy.filtered).
    TRACE_BY_ID = "trace_by_id"  # /api/traces/{id}, /api/v2/traces/{id}: spans outside the policy keep intrinsics
    # Tempo reads rewritten under trace selectors (gateway.lbac.tracereads, gateway.lbac.traceql).
    TRACEQL = "traceql"  # TraceQL in `q`: search (answer's root fields filtered too), metrics query/query_range
    TRACE_TAGS = "trace_tags"  # v2 tag names and values: `q` AND-ed with the policy
    TRACE_UNFILTERABLE = "trace_unfilterable"  # v1 tag endpoints, metrics summary: Tempo ignores their `q`


class Role(enum.Enum):
    """Which upstream URL of a backend serves the route (operators may split them)."""

    WRITE = "write"
    READ = "read"
    RULES = "rules"
    ALERTMANAGER = "alertmanager"


#: The keys of the config's `upstreams` and of a stack's tenants.
BACKENDS: Final[frozenset[str]] = frozenset({"metrics", "logs", "traces", "profiles"})
#: Methods a table may name; anything else (TRACE, CONNECT, OPTIONS, lower case...) never matches.
KNOWN_METHODS: Final[frozenset[str]] = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"})

# Method sets the tables are written with. HEAD rides along with GET (see Route.__post_init__).
GET: Final[frozenset[str]] = frozenset({"GET", "HEAD"})
POST: Final[frozenset[str]] = frozenset({"POST"})
PUT: Final[frozenset[str]] = frozenset({"PUT"})
DELETE: Final[frozenset[str]] = frozenset({"DELETE"})
GET_POST: Final[frozenset[str]] = GET | POST
POST_PUT: Final[frozenset[str]] = POST | PUT
POST_DELETE: Final[frozenset[str]] = POST | DELETE
POST_PUT_DELETE: Final[frozenset[str]] = POST | PUT | DELETE

# `{name}` is one path segment; `{name:regex}` takes a regex of its own (`{rest:.*}`).
_PARAM: Final = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)(?::([^{}]+))?\}")
_SEGMENT: Final = "[^/]+"
# What makes a path unclean, in one scan: a character outside RFC 3986 pchar, "/" and "%" (space,
# backslash, NUL, `?`, `#`, non-ASCII...); an empty or dot segment; a malformed escape; or an escape
# that an upstream (or a proxy in front of it) may decode into a separator or a dot: %2F, %2E, %5C,
# %00, and %25 so that a double-encoded %252F cannot become one after a second decoding.
_UNCLEAN: Final = re.compile(
    r"[^A-Za-z0-9\-._~!$&'()*+,;=:@/%]|//|\.\.|/\.(?:/|$)|%(?![0-9A-Fa-f]{2})|%(?:2[FfEe5]|5[Cc]|00)"
)
# What `_opaque_name` reads: a Tempo attribute name as sent and as each decoding leaves it.
_RAW_UNCLEAN: Final = re.compile(r"[^A-Za-z0-9\-._~!$&'()*+,;=:@/%]|%(?![0-9A-Fa-f]{2})")
_ESCAPE: Final = re.compile(rb"%[0-9A-Fa-f]{2}")
_CONTROL: Final = re.compile(rb"[\x00-\x1f\x7f]")
_SEPARATORS: Final = re.compile(rb"[/\\]")
_DOT_SEGMENTS: Final = frozenset({b"", b".", b".."})
_MAX_DECODINGS: Final = 3  # Grafana encodes twice; a third level is allowed, a fourth is refused


@dataclass(frozen=True, slots=True)
class Route:
    """One line of a table: requests with one of ``methods`` on ``pattern`` need ``scope``.

    ``upstream_path`` rewrites the path sent upstream; it may use the pattern's parameters,
    e.g. ``"/prometheus/config/v1/rules/{namespace}"``. Validated when the table is imported,
    so a typo in a scope or a pattern fails at start-up rather than on a request.
    """

    backend: str
    methods: frozenset[str]
    pattern: str
    scope: str
    kind: Kind = Kind.NONE
    role: Role = Role.READ
    upstream_path: str | None = None
    websocket: bool = False
    #: The one parameter that may hold escapes an upstream decodes into separators (%2F, %5C, %25...),
    #: e.g. a Tempo attribute name; accepted only where no decoding makes it more than a name.
    encoded_slash: str = ""
    note: str = ""

    def __post_init__(self) -> None:
        methods = frozenset(self.methods)
        if "GET" in methods:
            methods |= {"HEAD"}  # HEAD is accepted wherever GET is
        object.__setattr__(self, "methods", methods)
        where = f"route {sorted(methods)} {self.pattern!r}"
        if self.backend not in BACKENDS:
            raise ValueError(f"{where}: unknown backend {self.backend!r}")
        if self.scope not in ALL_SCOPES:
            raise ValueError(f"{where}: unknown scope {self.scope!r}")
        if not methods or not methods <= KNOWN_METHODS:
            raise ValueError(f"{where}: methods must be a non-empty subset of {sorted(KNOWN_METHODS)}")
        if self.websocket and methods != GET:
            raise ValueError(f"{where}: a WebSocket upgrade is a GET")
        names = _compile(self.pattern)[1]
        if self.upstream_path is not None:
            _check_template(self.upstream_path, names, where)
        if self.encoded_slash and self.encoded_slash not in names:
            raise ValueError(f"{where}: encoded_slash names no parameter of the pattern")


@dataclass(frozen=True, slots=True)
class RouteMatch:
    """The route a request matched, its path parameters (still percent-encoded) and where to send it."""

    route: Route
    path_params: dict[str, str]
    upstream_path: str


def _compile(pattern: str) -> tuple[re.Pattern[str] | None, tuple[str, ...]]:
    """Compile a pattern; (None, ()) for a static one, which the matcher finds by dict lookup."""
    # A stray brace survives the substitution and fails the check, as does any unclean literal.
    if not _is_clean(_PARAM.sub("x", pattern)):
        raise ValueError(f"pattern {pattern!r} is not a clean absolute path")
    parts: list[str] = []
    names: list[str] = []
    pos = 0
    for m in _PARAM.finditer(pattern):
        name, regex = m.group(1), m.group(2) or _SEGMENT
        if name in names:
            raise ValueError(f"pattern {pattern!r} repeats parameter {name!r}")
        names.append(name)
        parts.append(re.escape(pattern[pos : m.start()]))
        parts.append(f"(?P<{name}>{regex})")
        pos = m.end()
    if not names:
        return None, ()
    parts.append(re.escape(pattern[pos:]))
    return re.compile("".join(parts)), tuple(names)


def _check_template(template: str, names: tuple[str, ...], where: str) -> None:
    used = [m.group(1) for m in _PARAM.finditer(template)]
    if any(m.group(2) for m in _PARAM.finditer(template)) or not set(used) <= set(names):
        raise ValueError(f"{where}: upstream_path {template!r} may only use {{{'}, {'.join(names)}}}")
    if not _is_clean(_PARAM.sub("x", template)):
        raise ValueError(f"{where}: upstream_path {template!r} is not a clean absolute path")


def _is_clean(path: str) -> bool:
    """True if no upstream could read ``path`` as another path (dot segments, encoded slashes...)."""
    return path.startswith("/") and _UNCLEAN.search(path) is None


def _match_encoded_slash(regex: re.Pattern[str], name: str, path: str) -> re.Match[str] | None:
    """The match of ``path`` if everything but parameter ``name`` is clean and ``name`` stays one opaque
    name however often it is percent-decoded (see `_opaque_name`), so no decoding reaches another route."""
    m = regex.fullmatch(path)
    if m is None:
        return None
    start, end = m.span(name)
    if not _is_clean(path[:start] + "x" + path[end:]) or not _opaque_name(m.group(name)):
        return None
    return m


def _opaque_name(value: str) -> bool:
    """True if ``value`` (a Tempo attribute name as sent) is pchar and well-formed escapes, and neither it
    nor any of its percent-decodings holds a control character or, split at ``/`` or ``\\``, an empty,
    ``.`` or ``..`` segment; and it is plain after at most `_MAX_DECODINGS` decodings.

    Grafana encodes the name once (12.3+, or typed by hand) or twice (11.0-12.2's ``encodeTag``, which
    its data-source proxy forwards as escaped: ``k8s.io%252Fname``); Tempo's router decodes once and
    Tempo before 2.10 decoded the name again (``url.QueryUnescape``). Whatever a chain of decoders
    does, the name can then only become a name: the route and the tenant stay what was checked.
    """
    if _RAW_UNCLEAN.search(value) is not None:
        return False
    cur = value.encode("ascii")
    for _ in range(_MAX_DECODINGS + 1):
        if _CONTROL.search(cur) is not None or any(seg in _DOT_SEGMENTS for seg in _SEPARATORS.split(cur)):
            return False
        if _ESCAPE.search(cur) is None:
            return True
        cur = unquote_to_bytes(cur)
    return False


def _first_segment(path: str) -> str:
    end = path.find("/", 1)
    return path[1:] if end == -1 else path[1:end]


# The combined regex, and for each alternative's group index: its routes by method and its
# parameters as (group name in the combined regex, parameter name).
_Bucket = tuple[re.Pattern[str], dict[int, tuple[dict[str, Route], tuple[tuple[str, str], ...]]]]


def _combine(entries: Iterable[tuple[re.Pattern[str], dict[str, Route]]]) -> _Bucket:
    """One regex for a bucket's patterns, tried in one C-level scan instead of a Python loop.

    Alternative i is the group ``_i`` (the outermost, so ``Match.lastgroup`` names it) and its
    parameter ``name`` the group ``_i_name``.
    """
    alternatives: list[str] = []
    params: list[tuple[dict[str, Route], tuple[tuple[str, str], ...]]] = []
    for i, (regex, by_method) in enumerate(entries):
        alternatives.append(f"(?P<_{i}>{regex.pattern.replace('(?P<', f'(?P<_{i}_')})")
        params.append((by_method, tuple((f"_{i}_{name}", name) for name in regex.groupindex)))
    combined = re.compile("|".join(alternatives))
    return combined, {combined.groupindex[f"_{i}"]: entry for i, entry in enumerate(params)}


class Router:
    """An immutable matcher over a set of routes; refuses at construction any table in which
    one (method, path) could match two routes.

    Static patterns sit in a dict (one lookup); parametrised ones are grouped by their first path
    segment into one combined regex each, tried only for paths that passed the cleanliness check.
    Nothing is cached per request.
    """

    __slots__ = ("_dynamic", "_slashy", "_static")

    def __init__(self, routes: Iterable[Route]) -> None:
        static: dict[str, dict[str, Route]] = {}
        # first segment -> path shape (the pattern with its parameter names erased) -> entry
        dynamic: dict[str, dict[str, tuple[re.Pattern[str], dict[str, Route]]]] = {}
        examples: dict[str, str] = {}  # shape -> a path only that shape should match
        # first segment -> the routes whose one parameter may hold escapes, tried only for unclean paths
        slashy: dict[str, dict[str, tuple[re.Pattern[str], dict[str, Route], str]]] = {}
        for route in routes:
            regex, _ = _compile(route.pattern)
            if regex is None:
                by_method = static.setdefault(route.pattern, {})
            else:
                first = _first_segment(route.pattern)
                if "{" in first:
                    raise ValueError(f"pattern {route.pattern!r}: the first segment must be literal")
                shape = _PARAM.sub(lambda m: "{:" + (m.group(2) or _SEGMENT) + "}", route.pattern)
                entry = dynamic.setdefault(first, {}).setdefault(shape, (regex, {}))
                if entry[0].pattern != regex.pattern:
                    raise ValueError(f"{route.pattern!r} is the same path as {entry[0].pattern!r}, renamed")
                by_method = entry[1]
                examples[shape] = _PARAM.sub("x1", route.pattern)
                if route.encoded_slash:
                    slashy.setdefault(first, {})[shape] = (entry[0], by_method, route.encoded_slash)
            for method in route.methods:
                if method in by_method:
                    raise ValueError(f"{method} {route.pattern!r} is in the tables twice")
                by_method[method] = route
            if len({r.encoded_slash for r in by_method.values()}) > 1:
                raise ValueError(f"{route.pattern!r}: every method of one path must agree on encoded_slash")
        # One path, one entry: otherwise the first pattern tried would hide the other's methods.
        # (A check on examples, not a proof; tests/test_routes.py brute-forces every route.)
        for path in [*static, *examples.values()]:
            hits = [rx.pattern for rx, _ in dynamic.get(_first_segment(path), {}).values() if rx.fullmatch(path)]
            if len(hits) > (0 if path in static else 1):
                raise ValueError(f"path {path!r} also matches pattern {hits[-1]!r}")
        self._static = static
        self._dynamic = {first: _combine(bucket.values()) for first, bucket in dynamic.items()}
        self._slashy = {first: tuple(bucket.values()) for first, bucket in slashy.items()}

    def _lookup(self, path: str) -> tuple[dict[str, Route], dict[str, str]] | None:
        by_method = self._static.get(path)
        if by_method is not None:
            return by_method, {}  # static keys were checked clean when the table was built
        first = _first_segment(path)
        bucket = self._dynamic.get(first)
        if bucket is None:
            return None
        if not _is_clean(path):
            for regex, by_method, name in self._slashy.get(first, ()):
                if (m := _match_encoded_slash(regex, name, path)) is not None:
                    return by_method, m.groupdict()
            return None
        combined, entries = bucket
        m = combined.fullmatch(path)
        if m is None or m.lastindex is None:
            return None
        by_method, params = entries[m.lastindex]
        return by_method, {name: m.group(group) for group, name in params}

    def match(self, method: str, path: str) -> RouteMatch | None:
        """The route for (method, path), or None: unknown path, wrong method or an unclean path."""
        found = self._lookup(path)
        if found is None:
            return None
        by_method, params = found
        route = by_method.get(method)
        if route is None:
            return None
        if route.upstream_path is None:
            upstream = path
        elif params:
            upstream = route.upstream_path.format_map(params)
        else:
            upstream = route.upstream_path
        return RouteMatch(route, params, upstream)

    def allowed_methods(self, path: str) -> frozenset[str]:
        """The methods some route accepts on ``path``: empty means 404, otherwise a miss is a 405."""
        found = self._lookup(path)
        return frozenset(found[0]) if found is not None else frozenset()


# The tables import the types above, so they are imported only now.
from gateway.routes import loki, mimir, otlp, pinned, pyroscope, tempo  # noqa: E402

ALL_ROUTES: Final[tuple[Route, ...]] = (mimir.ROUTES + loki.ROUTES + tempo.ROUTES + otlp.ROUTES + pinned.ROUTES
                                        + pyroscope.ROUTES)
_ROUTER: Final = Router(ALL_ROUTES)
_UNKNOWN: Final = ("no such endpoint on this gateway", "unknown_path")


def match(method: str, path: str) -> RouteMatch | None:
    """Match against every table; None means the caller answers 404 (or 405, see allowed_methods)."""
    return _ROUTER.match(method, path)


def allowed_methods(path: str) -> frozenset[str]:
    """Methods accepted on ``path`` across all tables; empty for an unknown or unclean path."""
    return _ROUTER.allowed_methods(path)


def not_found(path: str) -> tuple[str, str]:
    """The (message, reason) of a 404 for ``path``: what to do instead where the path is one a client
    is known to try (Tempo's gRPC streaming), else the plain unknown-path answer."""
    for prefix, message, reason in tempo.UNSERVED:
        if path.startswith(prefix):
            return message, reason
    return _UNKNOWN


__all__ = [
    "ALL_ROUTES",
    "BACKENDS",
    "DELETE",
    "GET",
    "GET_POST",
    "KNOWN_METHODS",
    "POST",
    "POST_DELETE",
    "POST_PUT",
    "POST_PUT_DELETE",
    "PUT",
    "Kind",
    "Role",
    "Route",
    "RouteMatch",
    "Router",
    "allowed_methods",
    "match",
    "not_found",
]
