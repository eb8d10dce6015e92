"""Walks every line of the Loki table: each case is a request and what the gateway must decide."""

from __future__ import annotations

import pytest

from gateway.routes import Kind, Role, allowed_methods, loki, match

L = "/loki/api/v1"
R = "logs:read"
LOGQL, OPT, SERIES, NONE = Kind.LOGQL, Kind.LOGQL_OPTIONAL, Kind.LOGQL_SERIES, Kind.NONE

# method, path, scope, kind, role, websocket
CASES: list[tuple[str, str, str, Kind, Role, bool]] = [
    ("POST", f"{L}/push", "logs:write", NONE, Role.WRITE, False),
    ("GET", f"{L}/query", R, LOGQL, Role.READ, False),
    ("POST", f"{L}/query", R, LOGQL, Role.READ, False),
    ("GET", f"{L}/query_range", R, LOGQL, Role.READ, False),
    ("POST", f"{L}/query_range", R, LOGQL, Role.READ, False),
    ("GET", f"{L}/index/stats", R, LOGQL, Role.READ, False),
    ("GET", f"{L}/index/volume", R, LOGQL, Role.READ, False),
    ("POST", f"{L}/index/volume_range", R, LOGQL, Role.READ, False),
    ("GET", f"{L}/patterns", R, LOGQL, Role.READ, False),
    ("GET", f"{L}/detected_labels", R, LOGQL, Role.READ, False),
    ("GET", f"{L}/detected_fields", R, LOGQL, Role.READ, False),
    ("GET", f"{L}/detected_field/level/values", R, LOGQL, Role.READ, False),
    ("GET", f"{L}/labels", R, OPT, Role.READ, False),
    ("POST", f"{L}/labels", R, OPT, Role.READ, False),
    ("GET", f"{L}/label", R, OPT, Role.READ, False),
    ("GET", f"{L}/label/app/values", R, OPT, Role.READ, False),
    ("GET", f"{L}/series", R, SERIES, Role.READ, False),
    ("POST", f"{L}/series", R, SERIES, Role.READ, False),
    ("GET", f"{L}/tail", R, Kind.LOGQL_TAIL, Role.READ, True),
    ("GET", f"{L}/format_query", R, NONE, Role.READ, False),
    ("GET", f"{L}/status/buildinfo", R, NONE, Role.READ, False),
    ("GET", f"{L}/drilldown-limits", R, NONE, Role.READ, False),  # Logs Drilldown start-up: limits only
    # deprecated forms Loki still serves
    ("GET", "/api/prom/query", R, LOGQL, Role.READ, False),
    ("GET", "/api/prom/label", R, OPT, Role.READ, False),
    ("GET", "/api/prom/label/app/values", R, OPT, Role.READ, False),
    ("GET", "/api/prom/series", R, SERIES, Role.READ, False),
    ("GET", "/api/prom/tail", R, Kind.LOGQL_TAIL, Role.READ, True),
    # deletion: creating carries LogQL, listing and cancelling span the tenant
    ("POST", f"{L}/delete", "logs:delete", Kind.LOGQL_DELETE, Role.READ, False),
    ("PUT", f"{L}/delete", "logs:delete", Kind.LOGQL_DELETE, Role.READ, False),
    ("GET", f"{L}/delete", "logs:delete", Kind.TENANT_WIDE, Role.READ, False),
    ("DELETE", f"{L}/delete", "logs:delete", Kind.TENANT_WIDE, Role.READ, False),
    # ruler
    ("GET", f"{L}/rules", "rules:read", Kind.RULE_CONFIG, Role.RULES, False),
    ("GET", f"{L}/rules/ns1", "rules:read", Kind.RULE_CONFIG, Role.RULES, False),
    ("POST", f"{L}/rules/ns1", "rules:write", NONE, Role.RULES, False),
    ("DELETE", f"{L}/rules/ns1", "rules:write", NONE, Role.RULES, False),
    ("GET", f"{L}/rules/ns1/g", "rules:read", Kind.RULE_CONFIG, Role.RULES, False),
    ("DELETE", f"{L}/rules/ns1/g", "rules:write", NONE, Role.RULES, False),
    ("GET", "/api/prom/rules", "rules:read", Kind.RULE_CONFIG, Role.RULES, False),
    ("GET", "/api/prom/rules/ns1", "rules:read", Kind.RULE_CONFIG, Role.RULES, False),
    ("POST", "/api/prom/rules/ns1", "rules:write", NONE, Role.RULES, False),
    ("DELETE", "/api/prom/rules/ns1", "rules:write", NONE, Role.RULES, False),
    ("GET", "/api/prom/rules/ns1/g", "rules:read", Kind.RULE_CONFIG, Role.RULES, False),
    ("DELETE", "/api/prom/rules/ns1/g", "rules:write", NONE, Role.RULES, False),
]


@pytest.mark.parametrize(("method", "path", "scope", "kind", "role", "websocket"), CASES)
def test_route(method: str, path: str, scope: str, kind: Kind, role: Role, websocket: bool) -> None:
    m = match(method, path)
    assert m is not None, f"{method} {path} is not routed"
    assert any(r is m.route for r in loki.ROUTES)
    assert (m.route.backend, m.route.scope, m.route.kind, m.route.role) == ("logs", scope, kind, role)
    assert m.route.websocket is websocket
    assert m.upstream_path == path  # Loki serves every path of its table itself


def test_every_line_of_the_table_is_walked() -> None:
    walked = {id(m.route) for method, path, *_ in CASES if (m := match(method, path)) is not None}
    missing = [f"{sorted(r.methods)} {r.pattern}" for r in loki.ROUTES if id(r) not in walked]
    assert missing == []


@pytest.mark.parametrize(("method", "path"), [(c[0], c[1]) for c in CASES if c[0] == "GET"])
def test_head_is_accepted_wherever_get_is(method: str, path: str) -> None:
    assert match("HEAD", path) == match(method, path)


@pytest.mark.parametrize(
    ("path", "backend", "why"),
    [
        ("/api/prom/push", "metrics", "Grafana Cloud's remote_write URL beats Loki's deprecated push"),
        ("/prometheus/api/v1/rules", "metrics", "Loki serves it too; one path, one backend: Mimir's"),
        ("/prometheus/api/v1/alerts", "metrics", "same"),
        ("/loki/prometheus/api/v1/rules", "logs", "under the Loki-pinned URL they are Loki's"),
        ("/loki/prometheus/api/v1/alerts", "logs", "same"),
        ("/loki/api/prom/push", "logs", "same"),
    ],
)
def test_paths_loki_shares_with_mimir_go_to_mimir(path: str, backend: str, why: str) -> None:
    method = "POST" if path.endswith("push") else "GET"
    m = match(method, path)
    assert m is not None and m.route.backend == backend, why


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("POST", f"{L}/tail", {"GET", "HEAD"}),
        ("GET", f"{L}/push", {"POST"}),
        ("PATCH", f"{L}/delete", {"GET", "HEAD", "POST", "PUT", "DELETE"}),
        ("PUT", f"{L}/rules/ns1", {"GET", "HEAD", "POST", "DELETE"}),
        ("POST", f"{L}/rules/ns1/g", {"GET", "HEAD", "DELETE"}),
        ("DELETE", f"{L}/query", {"GET", "HEAD", "POST"}),
    ],
)
def test_known_path_with_another_method(method: str, path: str, allowed: set[str]) -> None:
    assert match(method, path) is None
    assert allowed_methods(path) == allowed


@pytest.mark.parametrize(
    "path",
    [
        "/flush",
        "/ring",
        "/distributor/ring",
        "/ingester/ring",
        "/ingester/prepare_shutdown",
        "/ingester/shutdown",
        "/indexgateway/ring",
        "/scheduler/ring",
        "/compactor/ring",
        "/ruler/ring",
        "/pattern/ring",
        "/config",
        "/services",
        "/log_level",
        "/ready",
        f"{L}/cache/generation_numbers",
        f"{L}/index/shards",
        f"{L}/label/app",
        f"{L}/detected_field/level",
    ],
)
def test_not_served(path: str) -> None:
    assert allowed_methods(path) == frozenset()
