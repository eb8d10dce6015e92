"""Pyroscope's allowlist, checked against grafana/pyroscope pkg/api/api.go (RegisterDistributor,
RegisterQuerierServiceHandler, RegisterPyroscopeHandlers) and the generated Connect handlers.

Connect unary procedures are POST only (the querier's methods declare no idempotency level, so
Connect offers no GET form); the paths are the procedure names. Grafana's Pyroscope data source
calls querier procedures on its URL, the bare gateway (pkg/tsdb/grafana-pyroscope-datasource/
pyroscopeClient.go: ProfileTypes, LabelNames, LabelValues, SelectSeries, SelectMergeStacktraces,
SelectMergeSpanProfile; newer versions more), so every procedure of the querier service is routed,
and nothing of Pyroscope's internal services. Profiles have no label policies yet, so every read is
``Kind.TENANT_WIDE``: a label-restricted token gets 403, as on the endpoints that cannot be filtered.
"""

from __future__ import annotations

from gateway.routes import GET, POST, Kind, Role, Route

P = "profiles"
READ = "profiles:read"
WRITE_SCOPE = "profiles:write"
_QUERIER = "/querier.v1.QuerierService/"
_UNFILTERED = Kind.TENANT_WIDE  # no label policies for profiles: restricted tokens are refused

WRITE: tuple[Route, ...] = (
    Route(P, POST, "/ingest", WRITE_SCOPE, role=Role.WRITE, note="Pyroscope's ingest API (SDKs, Alloy)"),
    Route(P, POST, "/pyroscope/ingest", WRITE_SCOPE, role=Role.WRITE, note="the same handler"),
    Route(P, POST, "/push.v1.PusherService/Push", WRITE_SCOPE, role=Role.WRITE, note="Connect; Alloy's write"),
    Route(P, POST, "/opentelemetry.proto.collector.profiles.v1development.ProfilesService/Export", WRITE_SCOPE,
          role=Role.WRITE, note="OTLP profiles over Connect/gRPC-web"),
    Route(P, POST, "/v1development/profiles", WRITE_SCOPE, role=Role.WRITE, note="OTLP/HTTP profiles"),
)

QUERY: tuple[Route, ...] = (
    Route(P, POST, _QUERIER + "ProfileTypes", READ, _UNFILTERED, note="Grafana's health check"),
    Route(P, POST, _QUERIER + "LabelNames", READ, _UNFILTERED),
    Route(P, POST, _QUERIER + "LabelValues", READ, _UNFILTERED),
    Route(P, POST, _QUERIER + "Series", READ, _UNFILTERED),
    Route(P, POST, _QUERIER + "SelectMergeStacktraces", READ, _UNFILTERED, note="Grafana's flame graph"),
    Route(P, POST, _QUERIER + "SelectMergeSpanProfile", READ, _UNFILTERED, note="Grafana's span profiles"),
    Route(P, POST, _QUERIER + "SelectMergeProfile", READ, _UNFILTERED),
    Route(P, POST, _QUERIER + "SelectSeries", READ, _UNFILTERED, note="Grafana's time series"),
    Route(P, POST, _QUERIER + "SelectHeatmap", READ, _UNFILTERED),
    Route(P, POST, _QUERIER + "Diff", READ, _UNFILTERED),
    Route(P, POST, _QUERIER + "GetProfileStats", READ, _UNFILTERED),
    Route(P, POST, _QUERIER + "AnalyzeQuery", READ, _UNFILTERED),
    # Pyroscope's own HTTP API (the older UI and clients), answered from the same querier.
    Route(P, GET, "/pyroscope/render", READ, _UNFILTERED),
    Route(P, GET, "/pyroscope/render-diff", READ, _UNFILTERED),
    Route(P, GET, "/pyroscope/label-values", READ, _UNFILTERED),
)

ROUTES: tuple[Route, ...] = WRITE + QUERY
