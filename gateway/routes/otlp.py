"""The unified OTLP/HTTP endpoints: one base URL `<gateway>/otlp` for an OpenTelemetry exporter.

An `otlphttp` exporter appends `/v1/metrics`, `/v1/logs` and `/v1/traces` to its endpoint, so all
three signals arrive under `/otlp` and each goes to its own backend. Mimir and Loki serve these
paths themselves; Tempo's receiver wants `/v1/traces`.
"""

from __future__ import annotations

from gateway.routes import POST, Role, Route

ROUTES: tuple[Route, ...] = (
    Route("metrics", POST, "/otlp/v1/metrics", "metrics:write", role=Role.WRITE),
    Route("logs", POST, "/otlp/v1/logs", "logs:write", role=Role.WRITE),
    Route("traces", POST, "/otlp/v1/traces", "traces:write", role=Role.WRITE, upstream_path="/v1/traces"),
)
