"""The matcher: an allowlist that matches one route or none, and refuses paths an upstream could
read differently from the gateway."""

from __future__ import annotations

import random
import re
from urllib.parse import unquote

import pytest

from gateway.policy.scopes import ALL_SCOPES
from gateway.routes import (
    ALL_ROUTES,
    BACKENDS,
    GET,
    KNOWN_METHODS,
    POST,
    Kind,
    Role,
    Route,
    Router,
    allowed_methods,
    loki,
    match,
    mimir,
    otlp,
    pinned,
    pyroscope,
    tempo,
)

METHODS = sorted(KNOWN_METHODS | {"OPTIONS", "TRACE", "CONNECT", "PROPFIND"})

# Admin and internal endpoints of Mimir, Loki and Tempo: no method may reach them.
NEVER_EXPOSE = (
    "/distributor/ring",
    "/distributor/all_user_stats",
    "/distributor/ha_tracker",
    "/ingester/flush",
    "/ingester/shutdown",
    "/ingester/prepare-shutdown",
    "/ingester/ring",
    "/ingester/tenants",
    "/ingester/tsdb/tenant1",
    "/ruler/ring",
    "/ruler/rule_groups",
    "/ruler/tenants",
    "/ruler/tenant/tenant1/rule_groups",
    "/ruler/delete_tenant_config",
    "/multitenant_alertmanager/status",
    "/multitenant_alertmanager/configs",
    "/multitenant_alertmanager/ring",
    "/multitenant_alertmanager/delete_tenant_config",
    "/compactor/ring",
    "/compactor/delete_tenant",
    "/compactor/tenants",
    "/store-gateway/ring",
    "/store-gateway/tenants",
    "/store-gateway/tenant/tenant1/blocks",
    "/query-scheduler/ring",
    "/overrides-exporter/ring",
    "/config",
    "/runtime_config",
    "/services",
    "/memberlist",
    "/debug/pprof/heap",
    "/debug/fgprof",
    "/metrics",
    "/ready",
    "/",
    "/static/x.css",
    # Loki
    "/flush",
    "/ring",
    "/indexgateway/ring",
    "/scheduler/ring",
    "/pattern/ring",
    "/log_level",
    "/ingester/prepare_shutdown",
    # Tempo
    "/status",
    "/status/config",
    "/status/runtime_config",
    "/status/endpoints",
    "/querier/api/search",
    "/querier/api/traces/abc",
    "/generator/api/metrics/summary",
)

# Each would reach something else if an upstream (or a proxy in front of it) normalised or
# decoded the path: the gateway must refuse them rather than guess.
TRICKS = (
    "/prometheus/api/v1/../../distributor/all_user_stats",
    "/prometheus/api/v1/label/../../../../distributor/all_user_stats/values",
    "/alertmanager/../distributor/all_user_stats",
    "/alertmanager/../multitenant_alertmanager/configs",
    "/alertmanager/%2e%2e/distributor/all_user_stats",
    "/alertmanager/%2E%2E/multitenant_alertmanager/configs",
    "/alertmanager/.%2e/distributor/ring",
    "/alertmanager/..%2fdistributor/ring",
    "/alertmanager/x%2F..%2Fdistributor",
    "/alertmanager/%252e%252e/distributor/ring",
    "/alertmanager/%252F",
    "/alertmanager//distributor/ring",
    "/alertmanager/./x",
    "/alertmanager/.",
    "/alertmanager/a\\..\\distributor",
    "/alertmanager/%5c..%5cdistributor",
    "/alertmanager/%00",
    "/alertmanager/a\x00b",
    "/prometheus/api/v1/query\x00",
    "/prometheus/api/v1/label/a%2Fb/values",
    "/prometheus/api/v1/label/a%2fb/values",
    "/prometheus/config/v1/rules/ns%2F..%2F..%2Fruler",
    "/api/search/tag/../../distributor/ring/values",
    "/api/v2/search/tag/%2e%2e/values",
    "/api/traces/%2e%2e",
    # Escapes pass only inside a Tempo tag name, and only where no decoding of it (once, twice...)
    # makes a dot or empty segment (at / or \\), a control character, or needs a fourth decoding.
    "/api/v2/search/tag/a%2F..%2Fb/values",
    "/api/v2/search/tag/%2F/values",
    "/api/v2/search/tag/a%2F%2Fb/values",
    "/api/v2/search/tag/.%2Fa/values",
    "/api/v2/search/tag/a%2F./values",
    "/api/v2/search/tag/a%2F%2e%2e/values",
    "/api/v2/search/tag/a%2Fb/values%2F",
    "/api/v2/search/tag/a%252F..%252Fb/values",
    "/api/v2/search/tag/%252e%252e/values",
    "/api/v2/search/tag/a%252F%252e%252e/values",
    "/api/v2/search/tag/a%25252F..%25252Fb/values",
    "/api/v2/search/tag/a%2525252Fb/values",
    "/api/v2/search/tag/a%5C..%5Cb/values",
    "/api/v2/search/tag/a%255C..%255Cb/values",
    "/api/v2/search/tag/a%2500b/values",
    "/api/v2/search/tag/a%250Ab/values",
    "/api/v2/search/tag/a%00b/values",
    "/api/v2/search/tag/a%252F%252Fb/values",
    "/api/v2/search/tag/a%252F/values",
    "/api/v2/search/tag/%25/values%2F..",
    "/api/v2/search/tag/a%25/values/..",
    "/api/search/tag/%252E%252E%252F%252E%252E%252Fdistributor/values",
    "/tempo/api/v2/search/tag/a%252F..%252F..%252Fb/values",
    "/api/traces/a%252Fb",
    "/prometheus/api/v1/label/a%252Fb/values",
    "/loki/loki/api/v1/label/a%25/values",
    "/api/traces/a%2Fb",
    "/tempo/api/traces/a%2Fb",
    "/loki/loki/api/v1/label/a%2Fb/values",
    "/mimir/prometheus/api/v1/label/a%2Fb/values",
    "/mimir/alertmanager/%2e%2e/multitenant_alertmanager/configs",
    "/loki/../distributor/ring",
    "/mimir/../config",
    "//prometheus/api/v1/query",
    "/prometheus//api/v1/query",
    "/prometheus/./api/v1/query",
    "/prometheus/api/v1/query/",
    "/prometheus/api/v1/query/.",
    "/prometheus/api/v1/query?query=up",
    "/alertmanager/x?y=1",
    "/alertmanager/x#fragment",
    "/alertmanager/a b",
    "/alertmanager/%zz",
    "/alertmanager/%2",
    "/alertmanager/\u00e9",
    "/alertmanager/\t",
    "prometheus/api/v1/query",
    "",
    "/PROMETHEUS/api/v1/query",
    "/Prometheus/api/v1/query",
)


@pytest.mark.parametrize("path", NEVER_EXPOSE)
def test_never_exposed(path: str) -> None:
    assert allowed_methods(path) == frozenset()
    for method in METHODS:
        assert match(method, path) is None, f"{method} {path}"


@pytest.mark.parametrize("path", TRICKS)
def test_tricks_match_nothing(path: str) -> None:
    assert allowed_methods(path) == frozenset()
    for method in METHODS:
        assert match(method, path) is None, f"{method} {path!r}"


def test_the_tricks_would_match_without_the_cleanliness_check() -> None:
    # Guards the test above against passing for the wrong reason: these reach a pattern.
    assert match("GET", "/alertmanager/x") is not None
    assert match("GET", "/prometheus/api/v1/label/ab/values") is not None
    assert match("GET", "/api/traces/abc") is not None


@pytest.mark.parametrize("method", ["OPTIONS", "TRACE", "CONNECT", "PROPFIND", "get", "Post", "", "GET "])
@pytest.mark.parametrize("path", ["/prometheus/api/v1/query", "/alertmanager/api/v2/alerts", "/api/search"])
def test_unknown_methods_match_nothing(method: str, path: str) -> None:
    assert match(method, path) is None
    assert method not in allowed_methods(path)


def _reference_regex(pattern: str) -> re.Pattern[str]:
    """An independent reading of the pattern syntax, for the brute-force check below."""
    out, pos = [], 0
    for m in re.finditer(r"\{(\w+)(?::([^{}]+))?\}", pattern):
        out += [re.escape(pattern[pos : m.start()]), f"(?:{m.group(2) or '[^/]+'})"]
        pos = m.end()
    return re.compile("".join([*out, re.escape(pattern[pos:])]))


def _example(pattern: str) -> str:
    return re.sub(r"\{(\w+)(?::[^{}]+)?\}", "x1", pattern)


@pytest.mark.parametrize("route", ALL_ROUTES, ids=lambda r: f"{'|'.join(sorted(r.methods))} {r.pattern}")
def test_exactly_one_route_matches(route: Route) -> None:
    path = _example(route.pattern)
    for method in route.methods:
        candidates = [r for r in ALL_ROUTES if method in r.methods and _reference_regex(r.pattern).fullmatch(path)]
        assert candidates == [route]
        m = match(method, path)
        assert m is not None and m.route is route


def test_tables_are_valid() -> None:
    assert ALL_ROUTES == mimir.ROUTES + loki.ROUTES + tempo.ROUTES + otlp.ROUTES + pinned.ROUTES + pyroscope.ROUTES
    for route in ALL_ROUTES:
        assert route.scope in ALL_SCOPES
        assert route.backend in BACKENDS
        assert route.methods <= KNOWN_METHODS
        assert ("GET" in route.methods) == ("HEAD" in route.methods)
        # (Alertmanager writes are checked by the silences' matchers and the alerts' labels they carry)
        assert route.kind in (Kind.NONE, Kind.ALERTMANAGER) or route.scope.endswith((":read", ":delete")), \
            "writes carry no query"
        assert route.scope.split(":")[0] in ("metrics", "logs", "traces", "profiles", "rules", "alerts")
    assert {r.backend for r in mimir.ROUTES} == {"metrics"}
    assert {r.backend for r in loki.ROUTES} == {"logs"}
    assert {r.backend for r in tempo.ROUTES} == {"traces"}
    assert {r.backend for r in pyroscope.ROUTES} == {"profiles"}
    tails = [r for r in loki.ROUTES if r.kind is Kind.LOGQL_TAIL]
    assert [r for r in ALL_ROUTES if r.websocket] == tails + [r for r in pinned.ROUTES if r.kind is Kind.LOGQL_TAIL]


def test_label_kinds_only_on_their_backend() -> None:
    promql = {Kind.PROMQL, Kind.MATCH, Kind.REMOTE_READ}
    logql = {Kind.LOGQL, Kind.LOGQL_OPTIONAL, Kind.LOGQL_SERIES, Kind.LOGQL_TAIL, Kind.LOGQL_DELETE}
    for route in ALL_ROUTES:
        if route.kind in promql:
            assert route.backend == "metrics"
        if route.kind in logql:
            assert route.backend == "logs"


def test_head_is_added_where_get_is() -> None:
    route = Route("metrics", frozenset({"GET"}), "/a", "metrics:read")
    assert route.methods == {"GET", "HEAD"}
    assert Route("metrics", POST, "/a", "metrics:write").methods == {"POST"}


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"scope": "metrics:admin"}, "unknown scope"),
        ({"scope": "metrics"}, "unknown scope"),
        ({"backend": "continuous-profiling"}, "unknown backend"),
        ({"methods": frozenset({"TRACE"})}, "methods"),
        ({"methods": frozenset({"get"})}, "methods"),
        ({"methods": frozenset()}, "methods"),
        ({"methods": POST, "websocket": True}, "WebSocket"),
        ({"pattern": "a/b"}, "clean"),
        ({"pattern": "/a/../b"}, "clean"),
        ({"pattern": "/a//b"}, "clean"),
        ({"pattern": "/a/{b"}, "clean"),
        ({"pattern": "/a/{x}/{x}"}, "repeats"),
        ({"pattern": "/a/{x}", "upstream_path": "/b/{y}"}, "may only use"),
        ({"pattern": "/a/{x}", "upstream_path": "/b/{x:.*}"}, "may only use"),
        ({"upstream_path": "/b/../c"}, "clean"),
    ],
)
def test_route_validation(kwargs: dict[str, object], error: str) -> None:
    fields: dict[str, object] = {"backend": "metrics", "methods": GET, "pattern": "/a", "scope": "metrics:read"}
    with pytest.raises(ValueError, match=error):
        Route(**(fields | kwargs))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("routes", "error"),
    [
        ((Route("metrics", GET, "/a", "metrics:read"), Route("logs", GET, "/a", "logs:read")), "twice"),
        (
            (Route("metrics", GET, "/a/{x}", "metrics:read"), Route("logs", POST, "/a/{y}", "logs:write")),
            "renamed",
        ),
        (
            (Route("metrics", GET, "/a/{x}/b", "metrics:read"), Route("logs", GET, "/a/{y:.*}", "logs:read")),
            "also matches",
        ),
        ((Route("metrics", GET, "/a/{x}", "metrics:read"), Route("logs", GET, "/a/{x}", "logs:read")), "twice"),
        ((Route("metrics", GET, "/a/b", "metrics:read"), Route("logs", POST, "/a/{y}", "logs:write")), "also"),
        ((Route("metrics", GET, "/{x}/b", "metrics:read"),), "literal"),
    ],
)
def test_router_refuses_ambiguous_tables(routes: tuple[Route, ...], error: str) -> None:
    with pytest.raises(ValueError, match=error):
        Router(routes)


def test_router_splits_a_path_by_method() -> None:
    read = Route("metrics", GET, "/a/{x}", "alerts:read", role=Role.ALERTMANAGER)
    write = Route("metrics", POST, "/a/{x}", "alerts:write", role=Role.ALERTMANAGER, upstream_path="/b/{x}")
    router = Router((read, write))
    assert router.allowed_methods("/a/1") == {"GET", "HEAD", "POST"}
    got, posted = router.match("GET", "/a/1"), router.match("POST", "/a/1")
    assert got is not None and got.route is read and got.upstream_path == "/a/1"
    assert posted is not None and posted.route is write and posted.upstream_path == "/b/1"
    assert posted.path_params == {"x": "1"}
    assert router.match("PUT", "/a/1") is None
    assert router.match("GET", "/a/1/2") is None


def test_a_match_does_not_share_state_between_requests() -> None:
    first = match("GET", "/prometheus/api/v1/query")
    assert first is not None
    first.path_params["injected"] = "x"
    second = match("GET", "/prometheus/api/v1/query")
    assert second is not None and second.path_params == {}


@pytest.mark.parametrize("path", [
    "/api/search/tag/resource.k8s.io%2Fname/values",
    "/api/v2/search/tag/resource.k8s.io%2Fname/values",
    "/api/v2/search/tag/span.a%2fb%2Fc/values",
    "/tempo/api/v2/search/tag/resource.k8s.io%2Fname/values",
    "/tempo/api/search/tag/resource.k8s.io%2Fname/values",
    # Grafana 11.0-12.2 (language_provider.ts encodeTag: encodeURIComponent twice, forwarded as escaped)
    "/api/v2/search/tag/resource.k8s.io%252Fname/values",
    "/tempo/api/v2/search/tag/span.attr%2525percent/values",
    "/api/v2/search/tag/span.attr%255Cback/values",
    "/api/v2/search/tag/span.attr%252520valid_escape_code/values",
    "/api/v2/search/tag/span.%F0%9F%90%B7%252F%25F0%259F%2590%25B7/values",
    # Grafana 12.3+ (the name encoded once): %, \\ and the rest of Tempo's special-character names
    "/api/v2/search/tag/span.attr%25percent/values",
    "/api/v2/search/tag/span.attr%5Cback/values",
    "/api/v2/search/tag/span.attr%2520valid_escape_code/values",
    "/api/v2/search/tag/span.attr%20%22'%3C%3E%23%25%7B%7D%7C%5C*/values",
    "/api/search/tag/span.attr%5Bbracket/values",
])
def test_encoded_slash_passes_in_a_tempo_tag_name_byte_for_byte(path: str) -> None:
    m = match("GET", path)
    assert m is not None and m.route.backend == "traces" and m.route.encoded_slash == "tag"
    assert m.upstream_path == path.removeprefix("/tempo")
    assert allowed_methods(path) == GET


def _normalised(path: str, decodings: int) -> str:
    """What an upstream (or proxies in front of it) may make of ``path``: percent-decoded ``decodings``
    times, ``\\`` read as ``/``, dot segments resolved and repeated slashes merged (RFC 3986 5.2.4, nginx's
    merge_slashes)."""
    for _ in range(decodings):
        path = unquote(path, errors="surrogateescape")
    path = re.sub("/+", "/", path.replace("\\", "/"))
    out: list[str] = []
    for seg in path.split("/")[1:]:
        if seg == "..":
            if out:
                out.pop()
        elif seg != ".":
            out.append(seg)
    return "/" + "/".join(out)


def test_no_decoding_of_an_accepted_tag_name_reaches_another_route() -> None:
    """Path normalisation, brute-forced: every tag-values path the matcher accepts, decoded 0 to 4 times
    and normalised, still names the tag-values route (the tenant is a header the gateway sets, never in
    the path). Names are drawn from the characters that make escapes, separators and dots."""
    rng = random.Random(29)
    alphabet = ["%", "2", "5", "F", "f", "E", "e", "C", "c", "0", "/", ".", "a", "%25", "%2F", "%2E", "%5C", "%252F"]
    accepted = 0
    for _ in range(20000):
        tag = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 9)))
        for prefix in ("/api/v2/search/tag/", "/tempo/api/search/tag/"):
            path = f"{prefix}{tag}/values"
            m = match("GET", path)
            if m is None:
                continue
            accepted += 1
            assert m.route.encoded_slash == "tag" and m.upstream_path == path.removeprefix("/tempo")
            for decodings in range(5):
                seen = _normalised(path, decodings)
                assert seen.startswith(prefix) and seen.endswith("/values") and len(seen) > len(prefix) + 6, \
                    (path, decodings, seen)
    assert accepted > 2000  # the property is not vacuous


def test_encoded_slash_is_refused_in_every_other_route() -> None:
    slashy = [r for r in ALL_ROUTES if r.encoded_slash]
    assert {r.pattern.removeprefix("/tempo") for r in slashy} == {
        "/api/search/tag/{tag:.+}/values", "/api/v2/search/tag/{tag:.+}/values"}
    for route in ALL_ROUTES:
        if route.encoded_slash or "{" not in route.pattern:
            continue
        path = _PARAM_RE.sub("a%2Fb", route.pattern)
        assert match(sorted(route.methods)[0], path) is None, path


def test_router_refuses_a_path_whose_methods_disagree_on_encoded_slash() -> None:
    routes = (Route("traces", GET, "/t/{x}", "traces:read", encoded_slash="x"), Route("traces", POST, "/t/{y}",
                                                                                      "traces:read"))
    with pytest.raises(ValueError, match="renamed"):
        Router(routes)
    routes = (Route("traces", GET, "/t/{x}", "traces:read", encoded_slash="x"),
              Route("traces", POST, "/t/{x}", "traces:read"))
    with pytest.raises(ValueError, match="encoded_slash"):
        Router(routes)
    with pytest.raises(ValueError, match="encoded_slash names no parameter"):
        Route("traces", GET, "/t/{x}", "traces:read", encoded_slash="y")


_PARAM_RE = re.compile(r"\{[^{}]+\}")


@pytest.mark.parametrize(("backend", "prefix"), sorted(pinned.PREFIXES.items()))
def test_every_path_under_a_pinned_prefix_reaches_its_backend(backend: str, prefix: str) -> None:
    under = [r for r in ALL_ROUTES if r.pattern.startswith(prefix + "/")]
    assert len(under) > 10 and {r.backend for r in under} == {backend}


def test_pinned_routes_forward_what_the_unprefixed_route_forwards() -> None:
    for route in (*mimir.ROUTES, *loki.ROUTES, *tempo.ROUTES):
        prefix = pinned.PREFIXES[route.backend]
        for method in sorted(route.methods):
            path = _PARAM_RE.sub("x1", route.pattern)
            plain, pin = match(method, path), match(method, prefix + path)
            assert plain is not None and pin is not None, path
            assert (pin.route.scope, pin.route.kind, pin.route.role, pin.upstream_path) == (
                plain.route.scope, plain.route.kind, plain.route.role, plain.upstream_path), path


@pytest.mark.parametrize(("path", "backend", "upstream"), [
    # The paths that unprefixed belong to the other backend.
    ("/loki/prometheus/api/v1/rules", "logs", "/prometheus/api/v1/rules"),
    ("/loki/prometheus/api/v1/alerts", "logs", "/prometheus/api/v1/alerts"),
    ("/prometheus/api/v1/rules", "metrics", "/prometheus/api/v1/rules"),
    ("/mimir/api/prom/rules", "metrics", "/prometheus/config/v1/rules"),
    ("/mimir/api/prom/rules/ns/grp", "metrics", "/prometheus/config/v1/rules/ns/grp"),
    ("/api/prom/rules", "logs", "/api/prom/rules"),
    ("/loki/api/prom/rules/ns", "logs", "/api/prom/rules/ns"),
])
def test_pinned_prefix_settles_paths_two_backends_serve(path: str, backend: str, upstream: str) -> None:
    m = match("GET", path)
    assert m is not None and (m.route.backend, m.upstream_path) == (backend, upstream)


def test_tempo_grpc_streaming_paths_get_an_explaining_404() -> None:
    from gateway.routes import not_found
    for method in ("Search", "MetricsQueryRange", "MetricsQueryInstant"):
        path = f"/tempopb.StreamingQuerier/{method}"
        assert match("POST", path) is None and not allowed_methods(path)
        message, reason = not_found(path)
        assert reason == "grpc_unsupported" and "Streaming" in message
    assert not_found("/nope")[1] == "unknown_path"
