"""Tempo's allowlist (REFERENCE.md section 4), checked against grafana/tempo pkg/api/http.go paths.

Label policies do not apply to traces, so every route is Kind.NONE. OTLP/HTTP `/v1/traces` is
what Tempo's distributor receives; `/otlp/v1/traces`, the unified form, is in `otlp.py`.
"""

from __future__ import annotations

from gateway.routes import GET, POST, Role, Route

T = "traces"
READ = "traces:read"

WRITE: tuple[Route, ...] = (
    Route(T, POST, "/v1/traces", "traces:write", role=Role.WRITE, note="OTLP/HTTP, Tempo's receiver port"),
)

QUERY: tuple[Route, ...] = (
    Route(T, GET, "/api/traces/{traceID}", READ),
    Route(T, GET, "/api/v2/traces/{traceID}", READ),
    Route(T, GET, "/api/search", READ),
    Route(T, GET, "/api/search/tags", READ),
    Route(T, GET, "/api/v2/search/tags", READ),
    # Attribute names may hold a raw `/` (e.g. app.kubernetes.io/name), so the tag spans segments.
    Route(T, GET, "/api/search/tag/{tag:.+}/values", READ),
    Route(T, GET, "/api/v2/search/tag/{tag:.+}/values", READ),
    Route(T, GET, "/api/metrics/query", READ),
    Route(T, GET, "/api/metrics/query_range", READ),
    Route(T, GET, "/api/metrics/summary", READ, note="span metrics summary, older Grafana versions"),
    Route(T, GET, "/api/echo", READ, note="Grafana's connection test"),
    Route(T, GET, "/api/status/buildinfo", READ, note="no tenant data; Grafana probes it"),
)

ROUTES: tuple[Route, ...] = WRITE + QUERY
