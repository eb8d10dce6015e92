"""Walks every line of the Mimir table: each case is a request and what the gateway must decide."""

from __future__ import annotations

import pytest

from gateway.routes import Kind, Role, allowed_methods, match, mimir

P, AP = "/prometheus/api/v1", "/api/prom/api/v1"
CFG = "/prometheus/config/v1/rules"
R, W = "metrics:read", "metrics:write"
NONE, PROMQL, MATCH, WIDE = Kind.NONE, Kind.PROMQL, Kind.MATCH, Kind.TENANT_WIDE
AM = Kind.ALERTMANAGER

# method, path, scope, kind, role, path sent upstream (None: unchanged)
CASES: list[tuple[str, str, str, Kind, Role, str | None]] = [
    # writes
    ("POST", "/api/v1/push", W, NONE, Role.WRITE, None),
    ("POST", "/api/v1/push/influx/write", W, NONE, Role.WRITE, None),
    ("POST", "/prometheus/api/v1/write", W, NONE, Role.WRITE, None),
    ("POST", "/api/prom/push", W, NONE, Role.WRITE, "/api/v1/push"),
    # queries
    ("GET", f"{P}/query", R, PROMQL, Role.READ, None),
    ("POST", f"{P}/query", R, PROMQL, Role.READ, None),
    ("GET", f"{P}/query_range", R, PROMQL, Role.READ, None),
    ("POST", f"{P}/query_range", R, PROMQL, Role.READ, None),
    ("GET", f"{P}/query_exemplars", R, PROMQL, Role.READ, None),
    ("POST", f"{P}/query_exemplars", R, PROMQL, Role.READ, None),
    ("POST", f"{P}/read", R, Kind.REMOTE_READ, Role.READ, None),
    ("GET", f"{P}/series", R, MATCH, Role.READ, None),
    ("POST", f"{P}/series", R, MATCH, Role.READ, None),
    ("GET", f"{P}/labels", R, MATCH, Role.READ, None),
    ("POST", f"{P}/labels", R, MATCH, Role.READ, None),
    ("GET", f"{P}/label/job/values", R, MATCH, Role.READ, None),
    ("GET", f"{P}/label/__name__/values", R, MATCH, Role.READ, None),
    ("GET", f"{P}/metadata", R, WIDE, Role.READ, None),
    ("GET", f"{P}/cardinality/label_names", R, WIDE, Role.READ, None),
    ("POST", f"{P}/cardinality/label_values", R, WIDE, Role.READ, None),
    ("GET", f"{P}/cardinality/active_series", R, WIDE, Role.READ, None),
    ("GET", f"{P}/cardinality/active_native_histogram_metrics", R, WIDE, Role.READ, None),
    ("GET", f"{P}/format_query", R, NONE, Role.READ, None),
    ("GET", f"{P}/status/buildinfo", R, NONE, Role.READ, None),
    ("GET", "/prometheus/federate", R, MATCH, Role.READ, None),
    ("GET", "/federate", R, MATCH, Role.READ, "/prometheus/federate"),
    ("GET", "/api/v1/user_stats", R, WIDE, Role.READ, None),
    ("GET", "/api/v1/user_limits", R, WIDE, Role.READ, None),
    # the same API under Grafana Cloud's /api/prom, rewritten to /prometheus
    ("GET", f"{AP}/query", R, PROMQL, Role.READ, f"{P}/query"),
    ("POST", f"{AP}/query_range", R, PROMQL, Role.READ, f"{P}/query_range"),
    ("GET", f"{AP}/query_exemplars", R, PROMQL, Role.READ, f"{P}/query_exemplars"),
    ("POST", f"{AP}/read", R, Kind.REMOTE_READ, Role.READ, f"{P}/read"),
    ("GET", f"{AP}/series", R, MATCH, Role.READ, f"{P}/series"),
    ("POST", f"{AP}/labels", R, MATCH, Role.READ, f"{P}/labels"),
    ("GET", f"{AP}/label/job/values", R, MATCH, Role.READ, f"{P}/label/job/values"),
    ("GET", f"{AP}/metadata", R, WIDE, Role.READ, f"{P}/metadata"),
    ("GET", f"{AP}/cardinality/label_names", R, WIDE, Role.READ, f"{P}/cardinality/label_names"),
    ("GET", f"{AP}/cardinality/label_values", R, WIDE, Role.READ, f"{P}/cardinality/label_values"),
    ("GET", f"{AP}/cardinality/active_series", R, WIDE, Role.READ, f"{P}/cardinality/active_series"),
    (
        "POST",
        f"{AP}/cardinality/active_native_histogram_metrics",
        R,
        WIDE,
        Role.READ,
        f"{P}/cardinality/active_native_histogram_metrics",
    ),
    ("POST", f"{AP}/format_query", R, NONE, Role.READ, f"{P}/format_query"),
    ("GET", f"{AP}/status/buildinfo", R, NONE, Role.READ, f"{P}/status/buildinfo"),
    # ruler
    ("GET", f"{P}/rules", "rules:read", Kind.RULE_STATE, Role.RULES, None),
    ("GET", f"{P}/alerts", "rules:read", Kind.ALERT_STATE, Role.RULES, None),
    ("GET", CFG, "rules:read", Kind.RULE_CONFIG, Role.RULES, None),
    ("GET", f"{CFG}/ns1", "rules:read", Kind.RULE_CONFIG, Role.RULES, None),
    ("POST", f"{CFG}/ns1", "rules:write", NONE, Role.RULES, None),
    ("DELETE", f"{CFG}/ns1", "rules:write", NONE, Role.RULES, None),
    ("GET", f"{CFG}/ns1/group1", "rules:read", Kind.RULE_CONFIG, Role.RULES, None),
    ("DELETE", f"{CFG}/ns1/group1", "rules:write", NONE, Role.RULES, None),
    ("GET", f"{AP}/rules", "rules:read", Kind.RULE_STATE, Role.RULES, f"{P}/rules"),
    ("GET", f"{AP}/alerts", "rules:read", Kind.ALERT_STATE, Role.RULES, f"{P}/alerts"),
    ("GET", "/api/prom/config/v1/rules", "rules:read", Kind.RULE_CONFIG, Role.RULES, CFG),
    ("GET", "/api/prom/config/v1/rules/ns1", "rules:read", Kind.RULE_CONFIG, Role.RULES, f"{CFG}/ns1"),
    ("POST", "/api/prom/config/v1/rules/ns1", "rules:write", NONE, Role.RULES, f"{CFG}/ns1"),
    ("GET", "/api/prom/config/v1/rules/ns1/g", "rules:read", Kind.RULE_CONFIG, Role.RULES, f"{CFG}/ns1/g"),
    ("DELETE", "/api/prom/config/v1/rules/ns1/g", "rules:write", NONE, Role.RULES, f"{CFG}/ns1/g"),
    ("GET", "/prometheus/rules", "rules:read", Kind.RULE_CONFIG, Role.RULES, CFG),
    ("GET", "/prometheus/rules/ns1", "rules:read", Kind.RULE_CONFIG, Role.RULES, f"{CFG}/ns1"),
    ("DELETE", "/prometheus/rules/ns1", "rules:write", NONE, Role.RULES, f"{CFG}/ns1"),
    ("GET", "/prometheus/rules/ns1/g", "rules:read", Kind.RULE_CONFIG, Role.RULES, f"{CFG}/ns1/g"),
    ("DELETE", "/prometheus/rules/ns1/g", "rules:write", NONE, Role.RULES, f"{CFG}/ns1/g"),
    ("GET", "/api/v1/rules", "rules:read", Kind.RULE_CONFIG, Role.RULES, CFG),
    ("GET", "/api/v1/rules/ns1", "rules:read", Kind.RULE_CONFIG, Role.RULES, f"{CFG}/ns1"),
    ("POST", "/api/v1/rules/ns1", "rules:write", NONE, Role.RULES, f"{CFG}/ns1"),
    ("GET", "/api/v1/rules/ns1/g", "rules:read", Kind.RULE_CONFIG, Role.RULES, f"{CFG}/ns1/g"),
    ("DELETE", "/api/v1/rules/ns1/g", "rules:write", NONE, Role.RULES, f"{CFG}/ns1/g"),
    # alertmanager
    ("GET", "/alertmanager", "alerts:read", AM, Role.ALERTMANAGER, None),
    ("POST", "/alertmanager", "alerts:write", AM, Role.ALERTMANAGER, None),
    ("GET", "/alertmanager/", "alerts:read", AM, Role.ALERTMANAGER, None),
    ("GET", "/alertmanager/api/v2/silences", "alerts:read", AM, Role.ALERTMANAGER, None),
    ("POST", "/alertmanager/api/v2/silences", "alerts:write", AM, Role.ALERTMANAGER, None),
    ("DELETE", "/alertmanager/api/v2/silence/0b1c", "alerts:write", AM, Role.ALERTMANAGER, None),
    ("PUT", "/alertmanager/api/v2/x", "alerts:write", AM, Role.ALERTMANAGER, None),
    ("POST", "/alertmanager/api/v2/alerts", "alerts:write", AM, Role.ALERTMANAGER, None),
    ("GET", "/api/v1/alerts", "alerts:read", AM, Role.ALERTMANAGER, None),
    ("POST", "/api/v1/alerts", "alerts:write", AM, Role.ALERTMANAGER, None),
    ("DELETE", "/api/v1/alerts", "alerts:write", AM, Role.ALERTMANAGER, None),
    # Grafana's Alertmanager data source: Save & test and Mimir detection (no tenant data)
    ("GET", "/api/v1/status/buildinfo", "alerts:read", NONE, Role.ALERTMANAGER, None),
    ("GET", "/alertmanager/api/v1/status/buildinfo", "alerts:read", AM, Role.ALERTMANAGER, None),
    ("GET", "/alertmanager/api/v2/status", "alerts:read", AM, Role.ALERTMANAGER, None),
    ("GET", "/alertmanager/api/v2/alerts/groups", "alerts:read", AM, Role.ALERTMANAGER, None),
    ("GET", "/alertmanager/api/v2/silence/0b1c", "alerts:read", AM, Role.ALERTMANAGER, None),
]


@pytest.mark.parametrize(("method", "path", "scope", "kind", "role", "upstream"), CASES)
def test_route(method: str, path: str, scope: str, kind: Kind, role: Role, upstream: str | None) -> None:
    m = match(method, path)
    assert m is not None, f"{method} {path} is not routed"
    assert any(r is m.route for r in mimir.ROUTES)
    assert (m.route.backend, m.route.scope, m.route.kind, m.route.role) == ("metrics", scope, kind, role)
    assert m.upstream_path == (upstream or path)
    assert not m.route.websocket


def test_every_line_of_the_table_is_walked() -> None:
    walked = {id(m.route) for method, path, *_ in CASES if (m := match(method, path)) is not None}
    missing = [f"{sorted(r.methods)} {r.pattern}" for r in mimir.ROUTES if id(r) not in walked]
    assert missing == []


@pytest.mark.parametrize(("method", "path"), [(c[0], c[1]) for c in CASES if c[0] == "GET"])
def test_head_is_accepted_wherever_get_is(method: str, path: str) -> None:
    assert match("HEAD", path) == match(method, path)


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("DELETE", f"{P}/series", {"GET", "HEAD", "POST"}),  # series deletion is an admin API
        ("GET", f"{P}/read", {"POST"}),
        ("POST", f"{P}/label/job/values", {"GET", "HEAD"}),
        ("POST", f"{P}/metadata", {"GET", "HEAD"}),
        ("GET", "/api/v1/push", {"POST"}),
        ("PUT", "/api/v1/push", {"POST"}),
        ("POST", f"{P}/rules", {"GET", "HEAD"}),
        ("PUT", f"{CFG}/ns1", {"GET", "HEAD", "POST", "DELETE"}),
        ("POST", f"{CFG}/ns1/g", {"GET", "HEAD", "DELETE"}),  # Mimir creates groups on the namespace
        ("PATCH", "/alertmanager/api/v2/silences", {"GET", "HEAD", "POST", "PUT", "DELETE"}),
        ("PUT", "/api/v1/alerts", {"GET", "HEAD", "POST", "DELETE"}),
    ],
)
def test_known_path_with_another_method(method: str, path: str, allowed: set[str]) -> None:
    assert match(method, path) is None
    assert allowed_methods(path) == allowed


def test_path_parameters_are_passed_as_received() -> None:
    m = match("GET", "/api/prom/config/v1/rules/my%20ns/g%3A1")
    assert m is not None
    assert m.path_params == {"namespace": "my%20ns", "groupName": "g%3A1"}
    assert m.upstream_path == f"{CFG}/my%20ns/g%3A1"
    m = match("GET", f"{P}/label/job/values")
    assert m is not None and m.path_params == {"name": "job"}


@pytest.mark.parametrize(
    "path",
    [
        f"{P}/status/config",  # empty stub in Mimir, the whole config in Prometheus
        f"{P}/status/flags",
        f"{P}/status/tsdb",
        f"{P}/status/runtimeinfo",
        "/api/v1/status/config",  # root stubs: no client needs them
        "/api/v2/status",  # Prometheus's Alertmanager: Grafana expects a Mimir URL to refuse it
        "/api/v1/status/flags",
        f"{P}/admin/tsdb/delete_series",
        "/api/v1/upload/block/01H/start",
        "/api/v1/analyze",
        f"{P}/targets",
        "/prometheus",
        "/prometheus/",
        f"{P}/label/job",
        f"{CFG}/ns1/g/extra",
    ],
)
def test_not_served(path: str) -> None:
    assert allowed_methods(path) == frozenset()
    assert match("GET", path) is None
    assert match("POST", path) is None
