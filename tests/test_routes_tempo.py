"""Walks every line of the Tempo table: each case is a request and what the gateway must decide."""

from __future__ import annotations

import pytest

from gateway.routes import Kind, Role, allowed_methods, match, tempo

TRACE_ID = "2f3e0cee77ae5dc9c17ade3689eb2e54"

# method, path, scope, role
CASES: list[tuple[str, str, str, Role]] = [
    ("POST", "/v1/traces", "traces:write", Role.WRITE),
    ("GET", f"/api/traces/{TRACE_ID}", "traces:read", Role.READ),
    ("GET", f"/api/v2/traces/{TRACE_ID}", "traces:read", Role.READ),
    ("GET", "/api/search", "traces:read", Role.READ),
    ("GET", "/api/search/tags", "traces:read", Role.READ),
    ("GET", "/api/v2/search/tags", "traces:read", Role.READ),
    ("GET", "/api/search/tag/service.name/values", "traces:read", Role.READ),
    ("GET", "/api/v2/search/tag/resource.service.name/values", "traces:read", Role.READ),
    ("GET", "/api/v2/search/tag/span.app.kubernetes.io/name/values", "traces:read", Role.READ),
    ("GET", "/api/v2/search/tag/resource.k8s.io%2Fname/values", "traces:read", Role.READ),  # Grafana's form
    ("GET", "/api/search/tag/k8s.io%2Fname/values", "traces:read", Role.READ),
    ("GET", "/api/metrics/query", "traces:read", Role.READ),
    ("GET", "/api/metrics/query_range", "traces:read", Role.READ),
    ("GET", "/api/metrics/summary", "traces:read", Role.READ),
    ("GET", "/api/echo", "traces:read", Role.READ),
    ("GET", "/api/status/buildinfo", "traces:read", Role.READ),
]


def _traceql_kind(path: str) -> Kind | None:
    """TraceQL reads (rewritten), v2 tag look-ups (policy as q), and what Tempo cannot filter (refused)."""
    if path in ("/api/search", "/api/metrics/query", "/api/metrics/query_range"):
        return Kind.TRACEQL
    if path.startswith("/api/v2/search/tag"):
        return Kind.TRACE_TAGS
    if path.startswith("/api/search/tag") or path == "/api/metrics/summary":
        return Kind.TRACE_UNFILTERABLE
    return None


@pytest.mark.parametrize(("method", "path", "scope", "role"), CASES)
def test_route(method: str, path: str, scope: str, role: Role) -> None:
    m = match(method, path)
    assert m is not None, f"{method} {path} is not routed"
    assert any(r is m.route for r in tempo.ROUTES)
    kind = Kind.TRACE_BY_ID if path.startswith(("/api/traces/", "/api/v2/traces/")) else Kind.NONE
    kind = _traceql_kind(path) or kind
    assert (m.route.backend, m.route.scope, m.route.kind, m.route.role) == ("traces", scope, kind, role)
    assert m.upstream_path == path


def test_every_line_of_the_table_is_walked() -> None:
    walked = {id(m.route) for method, path, *_ in CASES if (m := match(method, path)) is not None}
    missing = [f"{sorted(r.methods)} {r.pattern}" for r in tempo.ROUTES if id(r) not in walked]
    assert missing == []


def test_path_parameters() -> None:
    m = match("GET", f"/api/traces/{TRACE_ID}")
    assert m is not None and m.path_params == {"traceID": TRACE_ID}
    m = match("GET", "/api/v2/search/tag/span.app.kubernetes.io/name/values")
    assert m is not None and m.path_params == {"tag": "span.app.kubernetes.io/name"}


@pytest.mark.parametrize(("method", "path"), [(c[0], c[1]) for c in CASES if c[0] == "GET"])
def test_head_is_accepted_wherever_get_is(method: str, path: str) -> None:
    assert match("HEAD", path) == match(method, path)


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("GET", "/v1/traces", {"POST"}),
        ("POST", "/api/search", {"GET", "HEAD"}),
        ("DELETE", f"/api/traces/{TRACE_ID}", {"GET", "HEAD"}),
    ],
)
def test_known_path_with_another_method(method: str, path: str, allowed: set[str]) -> None:
    assert match(method, path) is None
    assert allowed_methods(path) == allowed


@pytest.mark.parametrize(
    "path",
    [
        "/status",
        "/status/config",
        "/status/runtime_config",
        "/status/usage-stats",
        "/status/buildinfo",
        "/querier/api/search",
        f"/querier/api/traces/{TRACE_ID}",
        "/distributor/ring",
        "/memberlist",
        "/api/overrides",
        "/api/traces",
        "/api/search/tag//values",
        "/api/v2/search/tag/values",
        "/tempopb.StreamingQuerier/Search",
        "/opentelemetry.proto.collector.trace.v1.TraceService/Export",
    ],
)
def test_not_served(path: str) -> None:
    assert allowed_methods(path) == frozenset()
