"""Mimir's allowlist (REFERENCE.md section 4), one table per role, checked against grafana/mimir pkg/api.

Mimir itself serves the Prometheus API only under `-http.prometheus-http-prefix` (default
`/prometheus`); it dropped Cortex's legacy `/api/prom` routes in 2.0. Grafana Cloud's URLs still
use `/api/prom`, so those forms are accepted here and rewritten to `/prometheus` (as Grafana's own
db-auth-gateway does). Mimir's OTLP endpoint, `/otlp/v1/metrics`, is in `otlp.py`.
"""

from __future__ import annotations

import dataclasses

from gateway.routes import DELETE, GET, GET_POST, POST, POST_DELETE, POST_PUT_DELETE, Kind, Role, Route

M = "metrics"
READ = "metrics:read"
WRITE_SCOPE = "metrics:write"
_CLOUD = "Grafana Cloud's URL form; Mimir dropped Cortex's /api/prom routes"
_PROM_ONLY = "Prometheus upstreams only: Mimir has no federate"
_AM_CONFIG = "the tenant's Alertmanager configuration, not Prometheus's alert list"


def _alias(old: str, new: str, routes: tuple[Route, ...], note: str) -> tuple[Route, ...]:
    """The same routes served with the path prefix ``new`` instead of ``old``, rewritten back upstream."""
    if not all(r.pattern.startswith(old) and r.upstream_path is None for r in routes):
        raise ValueError(f"an alias of {old!r} must start with it and not rewrite already")
    return tuple(
        dataclasses.replace(r, pattern=new + r.pattern.removeprefix(old), upstream_path=r.pattern, note=note)
        for r in routes
    )


WRITE: tuple[Route, ...] = (
    Route(M, POST, "/api/v1/push", WRITE_SCOPE, role=Role.WRITE),
    # Experimental in Mimir, served with -distributor.influx-endpoint-enabled.
    Route(M, POST, "/api/v1/push/influx/write", WRITE_SCOPE, role=Role.WRITE, note="experimental in Mimir"),
    # Prometheus's own remote-write receiver (--web.enable-remote-write-receiver), for users whose
    # metrics backend is a plain Prometheus run with --web.route-prefix=/prometheus; Mimir answers 404.
    Route(M, POST, "/prometheus/api/v1/write", WRITE_SCOPE, role=Role.WRITE, note="Prometheus receiver"),
    # Grafana Cloud's remote_write URL ends in /api/prom/push and Mimir no longer serves it, so it
    # is rewritten. Loki also accepts /api/prom/push, but only as a push deprecated since Loki 1.0
    # (clients use /loki/api/v1/push): one path cannot go to both, and metrics wins.
    Route(M, POST, "/api/prom/push", WRITE_SCOPE, role=Role.WRITE, upstream_path="/api/v1/push", note=_CLOUD),
)

# The Prometheus HTTP API as registered by Mimir's RegisterQueryAPI (methods included).
_PROMETHEUS_API: tuple[Route, ...] = (
    Route(M, GET_POST, "/prometheus/api/v1/query", READ, Kind.PROMQL),
    Route(M, GET_POST, "/prometheus/api/v1/query_range", READ, Kind.PROMQL),
    Route(M, GET_POST, "/prometheus/api/v1/query_exemplars", READ, Kind.PROMQL),
    Route(M, POST, "/prometheus/api/v1/read", READ, Kind.REMOTE_READ),
    # series also takes DELETE upstream: series deletion is an admin API, never exposed.
    Route(M, GET_POST, "/prometheus/api/v1/series", READ, Kind.MATCH),
    Route(M, GET_POST, "/prometheus/api/v1/labels", READ, Kind.MATCH),
    Route(M, GET, "/prometheus/api/v1/label/{name}/values", READ, Kind.MATCH),
    Route(M, GET, "/prometheus/api/v1/metadata", READ, Kind.TENANT_WIDE),
    Route(M, GET_POST, "/prometheus/api/v1/cardinality/label_names", READ, Kind.TENANT_WIDE),
    Route(M, GET_POST, "/prometheus/api/v1/cardinality/label_values", READ, Kind.TENANT_WIDE),
    Route(M, GET_POST, "/prometheus/api/v1/cardinality/active_series", READ, Kind.TENANT_WIDE),
    Route(M, GET_POST, "/prometheus/api/v1/cardinality/active_native_histogram_metrics", READ, Kind.TENANT_WIDE),
    Route(M, GET_POST, "/prometheus/api/v1/format_query", READ, note="echoes the query back, reads no data"),
    # The only status/* Mimir serves under the prefix (status/config and status/flags are empty
    # stubs at the root; a real Prometheus would reveal its whole config there): no tenant data,
    # and Grafana probes it to detect Mimir, so label-restricted tokens may call it too.
    Route(M, GET, "/prometheus/api/v1/status/buildinfo", READ, note="Grafana probes it to detect Mimir"),
)

QUERY: tuple[Route, ...] = (
    _PROMETHEUS_API
    + _alias("/prometheus", "/api/prom", _PROMETHEUS_API, _CLOUD)
    + (
        # Mimir has no federate; a Prometheus upstream serves it under its route prefix.
        Route(M, GET, "/prometheus/federate", READ, Kind.MATCH, note=_PROM_ONLY),
        Route(M, GET, "/federate", READ, Kind.MATCH, upstream_path="/prometheus/federate", note=_PROM_ONLY),
        Route(M, GET, "/api/v1/user_stats", READ, Kind.TENANT_WIDE),
        Route(M, GET, "/api/v1/user_limits", READ, Kind.TENANT_WIDE),
    )
)

# Mimir's RegisterRulerAPI. Rule namespaces are single path segments here: one containing `/`
# arrives as %2F, which the matcher refuses (see `_UNCLEAN` in gateway.routes).
_RULER_API: tuple[Route, ...] = (
    Route(M, GET, "/prometheus/api/v1/rules", "rules:read", Kind.RULE_STATE, role=Role.RULES),
    Route(M, GET, "/prometheus/api/v1/alerts", "rules:read", Kind.ALERT_STATE, role=Role.RULES),
    Route(M, GET, "/prometheus/config/v1/rules", "rules:read", Kind.RULE_CONFIG, role=Role.RULES),
    Route(M, GET, "/prometheus/config/v1/rules/{namespace}", "rules:read", Kind.RULE_CONFIG, role=Role.RULES),
    Route(M, POST_DELETE, "/prometheus/config/v1/rules/{namespace}", "rules:write", role=Role.RULES),
    Route(M, GET, "/prometheus/config/v1/rules/{namespace}/{groupName}", "rules:read", Kind.RULE_CONFIG,
          role=Role.RULES),
    Route(M, DELETE, "/prometheus/config/v1/rules/{namespace}/{groupName}", "rules:write", role=Role.RULES),
)
_CONFIG = "/prometheus/config/v1/rules"
_CONFIG_API = tuple(r for r in _RULER_API if r.pattern.startswith(_CONFIG))

RULER: tuple[Route, ...] = (
    _RULER_API
    # Grafana adds /config/v1 when it detects Mimir, after the data source URL, which may be /api/prom.
    + _alias("/prometheus", "/api/prom", _RULER_API, "Grafana on a Mimir data source URL ending in /api/prom")
    # Grafana uses <url>/rules instead when it takes Mimir for Prometheus or Cortex.
    + _alias(_CONFIG, "/prometheus/rules", _CONFIG_API, "Grafana on a Mimir data source it took for Cortex")
    + _alias(_CONFIG, "/api/v1/rules", _CONFIG_API, "Cortex's rules path: mimirtool --use-legacy-routes")
    # Not here: /api/prom/rules/... is Loki's (Grafana's Loki data source manages rules there),
    # and Loki's own /prometheus/api/v1/rules|alerts lose to Mimir's above.
)

ALERTMANAGER: tuple[Route, ...] = (
    # Mimir serves its Alertmanager API and UI under a path prefix.
    Route(M, GET, "/alertmanager", "alerts:read", Kind.ALERTMANAGER, role=Role.ALERTMANAGER),
    Route(M, POST_PUT_DELETE, "/alertmanager", "alerts:write", Kind.ALERTMANAGER, role=Role.ALERTMANAGER),
    Route(M, GET, "/alertmanager/{rest:.*}", "alerts:read", Kind.ALERTMANAGER, role=Role.ALERTMANAGER),
    Route(M, POST_PUT_DELETE, "/alertmanager/{rest:.*}", "alerts:write", Kind.ALERTMANAGER, role=Role.ALERTMANAGER),
    # Not Prometheus's alert list: in Mimir this is the tenant's Alertmanager configuration.
    Route(M, GET, "/api/v1/alerts", "alerts:read", Kind.ALERTMANAGER, role=Role.ALERTMANAGER, note=_AM_CONFIG),
    Route(M, POST_DELETE, "/api/v1/alerts", "alerts:write", Kind.ALERTMANAGER, role=Role.ALERTMANAGER, note=_AM_CONFIG),
    # Grafana's Alertmanager data source asks <url>/api/v1/status/buildinfo to tell Mimir from
    # Prometheus's Alertmanager (public/app/features/alerting/unified/api/buildInfo.ts); no tenant data.
    Route(M, GET, "/api/v1/status/buildinfo", "alerts:read", role=Role.ALERTMANAGER, note="no tenant data"),
)

ROUTES: tuple[Route, ...] = WRITE + QUERY + RULER + ALERTMANAGER

# Unprefixed, /api/prom/rules is Loki's (see RULER); under the Mimir-pinned base URL (`pinned.py`) it
# is where Grafana manages rules of a Prometheus data source at <url> = .../api/prom that it takes for
# Prometheus or Cortex: <url>/rules (grafana pkg/services/ngalert/api/lotex_ruler.go).
PINNED_ONLY: tuple[Route, ...] = _alias(_CONFIG, "/api/prom/rules", _CONFIG_API, "Grafana on /api/prom, as Cortex")
