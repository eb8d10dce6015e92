"""Walks every line of the unified OTLP table."""

from __future__ import annotations

import pytest

from gateway.routes import ALL_ROUTES, Kind, Role, allowed_methods, match, otlp

# path, backend, scope, path sent upstream
CASES: list[tuple[str, str, str, str]] = [
    ("/otlp/v1/metrics", "metrics", "metrics:write", "/otlp/v1/metrics"),
    ("/otlp/v1/logs", "logs", "logs:write", "/otlp/v1/logs"),
    ("/otlp/v1/traces", "traces", "traces:write", "/v1/traces"),
]


@pytest.mark.parametrize(("path", "backend", "scope", "upstream"), CASES)
def test_route(path: str, backend: str, scope: str, upstream: str) -> None:
    m = match("POST", path)
    assert m is not None
    assert any(r is m.route for r in otlp.ROUTES)
    assert (m.route.backend, m.route.scope, m.route.kind, m.route.role) == (backend, scope, Kind.NONE, Role.WRITE)
    assert m.upstream_path == upstream
    assert allowed_methods(path) == {"POST"}
    assert match("GET", path) is None


def test_every_line_of_the_table_is_walked() -> None:
    walked = {id(m.route) for path, *_ in CASES if (m := match("POST", path)) is not None}
    assert [r.pattern for r in otlp.ROUTES if id(r) not in walked] == []


def test_otlp_paths_live_in_this_table_only() -> None:
    otlp_paths = [r for r in ALL_ROUTES if r.pattern.startswith("/otlp/")]
    assert all(any(r is o for o in otlp.ROUTES) for r in otlp_paths)


@pytest.mark.parametrize("path", ["/otlp/v1/profiles", "/otlp", "/otlp/v1", "/otlp/v1/metrics/"])
def test_not_served(path: str) -> None:
    assert allowed_methods(path) == frozenset()
