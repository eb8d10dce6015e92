"""Tempo's allowlist (REFERENCE.md section 4), checked against grafana/tempo pkg/api/http.go paths.

Trace selectors (``{resource.env="dev"}``) restrict reads: trace by ID is answered filtered
(Kind.TRACE_BY_ID, gateway.lbac.traces); TraceQL search and metrics are rewritten (Kind.TRACEQL), v2 tag
look-ups get the policy as ``q`` (Kind.TRACE_TAGS), and what Tempo cannot filter is refused
(Kind.TRACE_UNFILTERABLE; gateway.lbac.tracereads). OTLP/HTTP `/v1/traces` is
what Tempo's distributor receives; `/otlp/v1/traces`, the unified form, is in `otlp.py`.
"""

from __future__ import annotations

from gateway.routes import GET, POST, Kind, Role, Route

T = "traces"
READ = "traces:read"

WRITE: tuple[Route, ...] = (
    Route(T, POST, "/v1/traces", "traces:write", role=Role.WRITE, note="OTLP/HTTP, Tempo's receiver port"),
)

QUERY: tuple[Route, ...] = (
    Route(T, GET, "/api/traces/{traceID}", READ, kind=Kind.TRACE_BY_ID),
    Route(T, GET, "/api/v2/traces/{traceID}", READ, kind=Kind.TRACE_BY_ID),
    Route(T, GET, "/api/search", READ, kind=Kind.TRACEQL),
    Route(T, GET, "/api/search/tags", READ, kind=Kind.TRACE_UNFILTERABLE),
    Route(T, GET, "/api/v2/search/tags", READ, kind=Kind.TRACE_TAGS),
    # Attribute names may hold a `/` (resource.k8s.io/name): raw, so the tag spans segments, or as
    # %2F (Grafana encodes the name), the one place an encoded slash passes, forwarded as sent.
    Route(T, GET, "/api/search/tag/{tag:.+}/values", READ, encoded_slash="tag", kind=Kind.TRACE_UNFILTERABLE),
    Route(T, GET, "/api/v2/search/tag/{tag:.+}/values", READ, encoded_slash="tag", kind=Kind.TRACE_TAGS),
    Route(T, GET, "/api/metrics/query", READ, kind=Kind.TRACEQL),
    Route(T, GET, "/api/metrics/query_range", READ, kind=Kind.TRACEQL),
    Route(T, GET, "/api/metrics/summary", READ, kind=Kind.TRACE_UNFILTERABLE,
          note="span metrics summary, older Grafana versions"),
    Route(T, GET, "/api/echo", READ, note="Grafana's connection test"),
    Route(T, GET, "/api/status/buildinfo", READ, note="no tenant data; Grafana probes it"),
)

ROUTES: tuple[Route, ...] = WRITE + QUERY

# Not routes: what Grafana's Tempo data source tries and the gateway cannot carry, as (path prefix,
# message, reason) for a 404 that says what to do. Streaming is gRPC over HTTP/2 to the URL's host
# and port, whatever the URL's path (grafana pkg/tsdb/tempo/grpc.go); the gateway speaks HTTP/1.1.
UNSERVED: tuple[tuple[str, str, str], ...] = (
    ("/tempopb.", "Tempo streaming (gRPC over HTTP/2) does not pass through this gateway: turn off "
     "'Streaming' (search and metrics queries) in the Tempo data source settings", "grpc_unsupported"),
)
