"""Loki's allowlist (REFERENCE.md section 4), checked against grafana/loki pkg/loki/modules.go.

Query endpoints take GET and form-encoded POST alike. Loki's OTLP endpoint, `/otlp/v1/logs`, is
in `otlp.py`. Two paths Loki serves are routed elsewhere, because one path has one backend:
`/api/prom/push` (Loki's deprecated legacy push) goes to Mimir as Grafana Cloud's remote_write
URL, and `/prometheus/api/v1/rules|alerts` (Loki's Prometheus-format rule state) go to Mimir.
Under the Loki-pinned base URL `/loki` (`pinned.py`) both are Loki's.
"""

from __future__ import annotations

from gateway.routes import DELETE, GET, GET_POST, POST, POST_DELETE, POST_PUT, Kind, Role, Route

L = "logs"
READ = "logs:read"
_DEPRECATED = "deprecated Loki form, still served"

WRITE: tuple[Route, ...] = (Route(L, POST, "/loki/api/v1/push", "logs:write", role=Role.WRITE),)

QUERY: tuple[Route, ...] = (
    Route(L, GET_POST, "/loki/api/v1/query", READ, Kind.LOGQL),
    Route(L, GET_POST, "/loki/api/v1/query_range", READ, Kind.LOGQL),
    Route(L, GET_POST, "/loki/api/v1/labels", READ, Kind.LOGQL_OPTIONAL),
    Route(L, GET_POST, "/loki/api/v1/label", READ, Kind.LOGQL_OPTIONAL, note="Loki's alias of /labels"),
    Route(L, GET_POST, "/loki/api/v1/label/{name}/values", READ, Kind.LOGQL_OPTIONAL),
    Route(L, GET_POST, "/loki/api/v1/series", READ, Kind.LOGQL_SERIES),
    Route(L, GET_POST, "/loki/api/v1/index/stats", READ, Kind.LOGQL),
    Route(L, GET_POST, "/loki/api/v1/index/volume", READ, Kind.LOGQL),
    Route(L, GET_POST, "/loki/api/v1/index/volume_range", READ, Kind.LOGQL),
    Route(L, GET_POST, "/loki/api/v1/patterns", READ, Kind.LOGQL),
    Route(L, GET_POST, "/loki/api/v1/detected_labels", READ, Kind.LOGQL),
    Route(L, GET_POST, "/loki/api/v1/detected_fields", READ, Kind.LOGQL),
    Route(L, GET_POST, "/loki/api/v1/detected_field/{name}/values", READ, Kind.LOGQL),
    Route(L, GET, "/loki/api/v1/tail", READ, Kind.LOGQL_TAIL, websocket=True),
    Route(L, GET_POST, "/loki/api/v1/format_query", READ, note="echoes the query back, reads no data"),
    Route(L, GET, "/loki/api/v1/status/buildinfo", READ, note="no tenant data; Grafana probes it"),
    Route(L, GET, "/loki/api/v1/drilldown-limits", READ, note="the tenant's limits, no log data; Logs Drilldown"),
    # Deprecated forms Loki still serves (the push among them is Mimir's, see the module docstring).
    Route(L, GET_POST, "/api/prom/query", READ, Kind.LOGQL, note="deprecated Loki form of query_range"),
    Route(L, GET_POST, "/api/prom/label", READ, Kind.LOGQL_OPTIONAL, note=_DEPRECATED),
    Route(L, GET_POST, "/api/prom/label/{name}/values", READ, Kind.LOGQL_OPTIONAL, note=_DEPRECATED),
    Route(L, GET_POST, "/api/prom/series", READ, Kind.LOGQL_SERIES, note=_DEPRECATED),
    Route(L, GET, "/api/prom/tail", READ, Kind.LOGQL_TAIL, websocket=True, note=_DEPRECATED),
)

# Served by the compactor. Creating a request (POST, PUT) carries LogQL that label policies can
# check; listing (GET) and cancelling by id (DELETE) span every stream of the tenant.
DELETION: tuple[Route, ...] = (
    Route(L, POST_PUT, "/loki/api/v1/delete", "logs:delete", Kind.LOGQL_DELETE),
    Route(L, GET, "/loki/api/v1/delete", "logs:delete", Kind.TENANT_WIDE, note="lists every delete request"),
    Route(L, DELETE, "/loki/api/v1/delete", "logs:delete", Kind.TENANT_WIDE, note="cancels by request id"),
)

RULER: tuple[Route, ...] = (
    Route(L, GET, "/loki/api/v1/rules", "rules:read", Kind.RULE_CONFIG, role=Role.RULES),
    Route(L, GET, "/loki/api/v1/rules/{namespace}", "rules:read", Kind.RULE_CONFIG, role=Role.RULES),
    Route(L, POST_DELETE, "/loki/api/v1/rules/{namespace}", "rules:write", role=Role.RULES),
    Route(L, GET, "/loki/api/v1/rules/{namespace}/{groupName}", "rules:read", Kind.RULE_CONFIG, role=Role.RULES),
    Route(L, DELETE, "/loki/api/v1/rules/{namespace}/{groupName}", "rules:write", role=Role.RULES),
    # Grafana's Loki data source manages rules at <url>/api/prom/rules (lotex_ruler.go: lokiPrefix);
    # Mimir no longer serves this path, so it is Loki's.
    Route(L, GET, "/api/prom/rules", "rules:read", Kind.RULE_CONFIG, role=Role.RULES,
          note="Grafana's path for Loki rules"),
    Route(L, GET, "/api/prom/rules/{namespace}", "rules:read", Kind.RULE_CONFIG, role=Role.RULES),
    Route(L, POST_DELETE, "/api/prom/rules/{namespace}", "rules:write", role=Role.RULES),
    Route(L, GET, "/api/prom/rules/{namespace}/{groupName}", "rules:read", Kind.RULE_CONFIG, role=Role.RULES),
    Route(L, DELETE, "/api/prom/rules/{namespace}/{groupName}", "rules:write", role=Role.RULES),
)

ROUTES: tuple[Route, ...] = WRITE + QUERY + DELETION + RULER

# Loki serves these too, but unprefixed they are Mimir's (see the module docstring); under the
# Loki-pinned base URL (`pinned.py`) they are Loki's. Grafana asks a Loki data source for rule state
# at <url>/prometheus/api/v1/rules|alerts (grafana pkg/services/ngalert/api/lotex_prom.go).
PINNED_ONLY: tuple[Route, ...] = (
    Route(L, GET, "/prometheus/api/v1/rules", "rules:read", Kind.RULE_STATE, role=Role.RULES,
          note="Grafana's Loki rule state"),
    Route(L, GET, "/prometheus/api/v1/alerts", "rules:read", Kind.ALERT_STATE, role=Role.RULES,
          note="Grafana's Loki alert state"),
    Route(L, POST, "/api/prom/push", "logs:write", role=Role.WRITE, note=_DEPRECATED),
)
