"""Every request Grafana's data sources make, sent through the real gateway: where it lands, with which
tenant, and what a label-restricted token gets (in both LBAC modes).

The table was written from Grafana's code (grafana/grafana): the Prometheus data source
(packages/grafana-prometheus/src/resource_clients.ts, language_provider.ts, datasource.ts and
pkg/promlib's health check: buildinfo, then a `1+1` query), Loki (pkg/tsdb/loki/api.go: query and
query_range with `X-Loki-Response-Encoding-Flags: categorize-labels` and `X-Query-Tags`,
healthcheck.go: `vector(1)+vector(1)`; LanguageProvider.ts, LogContextProvider.ts, the logs volume,
live tail and Logs Drilldown resources), Tempo (datasource.ts, language_provider.ts: tag values of an
`encodeURIComponent`-ed name; pkg/tsdb/tempo/grpc.go: streaming is gRPC at the URL's host), the
Alertmanager data source (DataSource.ts testDatasource, alerting/unified/api/buildInfo.ts) and
Alerting's rule discovery and ruler (pkg/services/ngalert/api/lotex_prom.go, lotex_ruler.go,
lotex_am.go). Each row is sent under the data source URL the README gives (the pinned prefix) and,
where it works, under the older unprefixed URL.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, unquote_plus, urlencode

import pytest

from tests.recorder import Recorder
from tests.test_proxy import _env, basic

TRACE = "2f3e0cee77ae5dc9c17ade3689eb2e54"
SEL = '{app="api"}'
T0, T1 = "1790871720000000000", "1790875320000000000"  # Loki takes nanoseconds
S0, S1 = "1790871720", "1790875320"
# What a label-restricted token's realm holds, and how enforce mode shows it in a rewritten query.
POLICY = '{env="dev"}'
TRACE_POLICY = '{resource.env="dev"}'
ENFORCED = 'env="dev"'
TRACE_ENFORCED = '(resource.env = "dev")'

# The stack whose per-signal tenant IDs all differ, so a request sent to the wrong backend is refused.
STACK = "101"
TENANTS = {"metrics": "101", "logs": "l101", "traces": "t101"}


def q(**params: str) -> str:
    return "?" + urlencode(params)


@dataclass(frozen=True)
class Call:
    """One request a data source makes: ``path`` is relative to the data-source URL."""

    feature: str
    method: str
    path: str
    lands: str  # the upstream that must receive it: "<backend>" or "<backend>-<role>", or "404"
    upstream: str  # the path that upstream must see
    scope: str
    # What a label-restricted token gets: "filter" (label-policy header, or a query rewritten to hold
    # the policy), "filter-noselector" (a query that reads no series: forwarded, nothing to rewrite),
    # "pass" (holds no label data: forwarded untouched), "refuse" (403: cannot be filtered, or a rule
    # write whose results would bypass the policy), "traceql" (Tempo: `q` rewritten to hold the trace policy in
    # every mode), "refuse-400" (a query the gateway cannot restrict exactly: 400, nothing forwarded).
    lbac: str = "pass"
    headers: dict[str, str] = field(default_factory=dict)
    body: str | None = None
    bases: tuple[str, ...] | None = None  # instead of the data source's (some work only pinned)
    # Another issue changes what a restricted token gets here: sent with the unrestricted token only.
    pending: str = ""


@dataclass(frozen=True)
class DataSource:
    name: str
    backend: str  # whose tenant is the Basic-auth username
    bases: tuple[str, ...]  # the README's URL path first, then older ones that still work
    calls: tuple[Call, ...]


P = "/prometheus"  # Mimir's Prometheus API, what the data-source URL path ends in
FORM = {"Content-Type": "application/x-www-form-urlencoded"}

PROMETHEUS = DataSource("prometheus", "metrics", ("/mimir/prometheus", "/prometheus"), (
    Call("Save & test: build info (Mimir detection)", "GET", "/api/v1/status/buildinfo", "metrics",
         f"{P}/api/v1/status/buildinfo", "metrics:read"),
    Call("Save & test: 1+1", "GET", "/api/v1/query" + q(query="1+1", time=S1), "metrics", f"{P}/api/v1/query",
         "metrics:read", "filter-noselector"),
    Call("Explore: range query (POST form)", "POST", "/api/v1/query_range", "metrics", f"{P}/api/v1/query_range",
         "metrics:read", "filter", FORM, f"query=rate(http_requests_total{SEL}[5m])&start={S0}&end={S1}&step=15"),
    Call("Explore: instant query", "POST", "/api/v1/query", "metrics", f"{P}/api/v1/query", "metrics:read",
         "filter", FORM, f"query=up{SEL}&time={S1}"),
    Call("Exemplars", "GET", "/api/v1/query_exemplars" + q(query=f"histogram{SEL}", start=S0, end=S1), "metrics",
         f"{P}/api/v1/query_exemplars", "metrics:read", "filter"),
    Call("Metric browser: metric names", "GET", "/api/v1/label/__name__/values" + q(start=S0, end=S1, limit="40000"),
         "metrics", f"{P}/api/v1/label/__name__/values", "metrics:read", "filter"),
    Call("Query builder: label names", "GET", "/api/v1/labels" + q(**{"match[]": "up", "start": S0, "end": S1}),
         "metrics", f"{P}/api/v1/labels", "metrics:read", "filter"),
    Call("Query builder: label values", "GET", "/api/v1/label/job/values" + q(**{"match[]": "up", "start": S0}),
         "metrics", f"{P}/api/v1/label/job/values", "metrics:read", "filter"),
    Call("Series (SeriesApiClient, native histograms)", "GET",
         "/api/v1/series" + q(**{"match[]": '{__name__!=""}', "start": S0, "end": S1, "limit": "40000"}),
         "metrics", f"{P}/api/v1/series", "metrics:read", "filter"),
    Call("Metadata for autocomplete", "GET", "/api/v1/metadata", "metrics", f"{P}/api/v1/metadata",
         "metrics:read", "refuse", pending="restricted: fanned out, see test_lbac_fanout.py"),
    Call("Format query", "GET", "/api/v1/format_query" + q(query="sum(up)"), "metrics", f"{P}/api/v1/format_query",
         "metrics:read"),
    Call("Alerting: build info fallback", "GET", "/api/v1/query" + q(query="prometheus_build_info"), "metrics",
         f"{P}/api/v1/query", "metrics:read", "filter"),
    Call("Alerting: Thanos flags probe (404 expected)", "GET", "/api/v1/status/flags", "404", "", "metrics:read"),
    Call("Alerting: rule state", "GET", "/api/v1/rules", "metrics-rules", f"{P}/api/v1/rules", "rules:read"),
    Call("Alerting: alert state", "GET", "/api/v1/alerts", "metrics-rules", f"{P}/api/v1/alerts", "rules:read"),
    Call("Ruler (Mimir): list", "GET", "/config/v1/rules", "metrics-rules", f"{P}/config/v1/rules", "rules:read"),
    Call("Ruler (Mimir): test group", "GET", "/config/v1/rules/test/test", "metrics-rules",
         f"{P}/config/v1/rules/test/test", "rules:read"),
    Call("Ruler (Mimir): save group", "POST", "/config/v1/rules/ns1", "metrics-rules", f"{P}/config/v1/rules/ns1",
         "rules:write", "refuse", {"Content-Type": "application/yaml"}, "name: g\nrules: []\n"),
    Call("Ruler (Mimir): delete group", "DELETE", "/config/v1/rules/ns1/g", "metrics-rules",
         f"{P}/config/v1/rules/ns1/g", "rules:write", "refuse"),
    Call("Ruler (Prometheus/Cortex subtype)", "GET", "/rules", "metrics-rules", f"{P}/config/v1/rules",
         "rules:read"),
    Call("Tempo service graph (served by this data source)", "POST", "/api/v1/query", "metrics",
         f"{P}/api/v1/query", "metrics:read", "filter", FORM,
         "query=sum by (client, server) (rate(traces_service_graph_request_total[1h]))"),
))

# A Prometheus data source at Grafana Cloud's URL form, .../api/prom: queries work unprefixed too,
# but Grafana taking it for Cortex manages rules at <url>/rules, which only the pinned URL gives Mimir.
PROMETHEUS_API_PROM = DataSource("prometheus-api-prom", "metrics", ("/mimir/api/prom", "/api/prom"), (
    Call("Explore: range query", "GET", "/api/v1/query_range" + q(query=f"up{SEL}", start=S0, end=S1, step="15"),
         "metrics", f"{P}/api/v1/query_range", "metrics:read", "filter"),
    Call("Save & test: build info", "GET", "/api/v1/status/buildinfo", "metrics", f"{P}/api/v1/status/buildinfo",
         "metrics:read"),
    Call("Ruler (Cortex subtype): list", "GET", "/rules", "metrics-rules", f"{P}/config/v1/rules", "rules:read",
         bases=("/mimir/api/prom",)),
    Call("Ruler (Cortex subtype): save group", "POST", "/rules/ns1", "metrics-rules", f"{P}/config/v1/rules/ns1",
         "rules:write", "refuse", {"Content-Type": "application/yaml"}, "name: g\nrules: []\n",
         bases=("/mimir/api/prom",)),
    Call("Ruler (Mimir subtype)", "GET", "/config/v1/rules", "metrics-rules", f"{P}/config/v1/rules",
         "rules:read"),
))

L = "/loki/api/v1"
CATEGORIZE = {"X-Loki-Response-Encoding-Flags": "categorize-labels"}

LOKI = DataSource("loki", "logs", ("/loki", ""), (
    Call("Save & test: vector(1)+vector(1)", "GET", f"{L}/query" + q(query="vector(1)+vector(1)", time="4000000000",
         direction="backward"), "logs", f"{L}/query", "logs:read", "filter-noselector", CATEGORIZE),
    Call("Explore: logs", "GET", f"{L}/query_range" + q(query=SEL, start=T0, end=T1, step="2000ms", limit="1000",
         direction="backward"), "logs", f"{L}/query_range", "logs:read", "filter", CATEGORIZE),
    Call("Logs volume", "GET", f"{L}/query_range" + q(query=f"sum by (level) (count_over_time({SEL}[1m]))",
         start=T0, end=T1, step="60000ms"), "logs", f"{L}/query_range", "logs:read", "filter",
         {**CATEGORIZE, "X-Query-Tags": "Source=logvolhist"}),
    Call("Log context", "GET", f"{L}/query_range" + q(query=SEL, start=T0, end=T1, limit="10", direction="forward"),
         "logs", f"{L}/query_range", "logs:read", "filter", {**CATEGORIZE, "X-Query-Tags": "Source=logsample"}),
    Call("Label browser: names", "GET", f"{L}/labels" + q(start=T0, end=T1), "logs", f"{L}/labels", "logs:read",
         "filter"),
    Call("Label browser: values", "GET", f"{L}/label/app/values" + q(start=T0, end=T1, query=SEL), "logs",
         f"{L}/label/app/values", "logs:read", "filter"),
    Call("Query builder: series", "GET", f"{L}/series" + q(**{"match[]": SEL, "start": T0, "end": T1}), "logs",
         f"{L}/series", "logs:read", "filter"),
    Call("Query stats", "GET", f"{L}/index/stats" + q(query=SEL, start=T0, end=T1), "logs", f"{L}/index/stats",
         "logs:read", "filter"),
    Call("Drilldown: volume", "GET", f"{L}/index/volume" + q(query=SEL, start=T0, end=T1, limit="100"), "logs",
         f"{L}/index/volume", "logs:read", "filter"),
    Call("Drilldown: volume range", "GET", f"{L}/index/volume_range" + q(query=SEL, start=T0, end=T1, step="60s"),
         "logs", f"{L}/index/volume_range", "logs:read", "filter"),
    Call("Drilldown: patterns", "GET", f"{L}/patterns" + q(query=SEL, start=T0, end=T1), "logs", f"{L}/patterns",
         "logs:read", "filter"),
    Call("Drilldown: detected labels", "GET", f"{L}/detected_labels" + q(query=SEL, start=T0, end=T1), "logs",
         f"{L}/detected_labels", "logs:read", "filter"),
    Call("Drilldown start-up: detected labels without a query", "GET", f"{L}/detected_labels" + q(start=T0, end=T1),
         "logs", f"{L}/detected_labels", "logs:read", "filter"),
    Call("Detected fields", "GET", f"{L}/detected_fields" + q(query=SEL, start=T0, end=T1, limit="1000"), "logs",
         f"{L}/detected_fields", "logs:read", "filter"),
    Call("Detected field values", "GET", f"{L}/detected_field/level/values" + q(query=SEL, start=T0, end=T1),
         "logs", f"{L}/detected_field/level/values", "logs:read", "filter"),
    Call("Drilldown: limits", "GET", f"{L}/drilldown-limits", "logs", f"{L}/drilldown-limits", "logs:read"),
    Call("Build info", "GET", f"{L}/status/buildinfo", "logs", f"{L}/status/buildinfo", "logs:read"),
    Call("Format query", "GET", f"{L}/format_query" + q(query=SEL), "logs", f"{L}/format_query", "logs:read"),
    Call("Live tail (as a plain GET)", "GET", f"{L}/tail" + q(query=SEL, limit="100"), "logs", f"{L}/tail",
         "logs:read", "filter"),
    Call("Alerting: rule state", "GET", "/prometheus/api/v1/rules", "logs-rules", "/prometheus/api/v1/rules",
         "rules:read", bases=("/loki",)),
    Call("Alerting: alert state", "GET", "/prometheus/api/v1/alerts", "logs-rules", "/prometheus/api/v1/alerts",
         "rules:read", bases=("/loki",)),
    Call("Ruler: list", "GET", "/api/prom/rules", "logs-rules", "/api/prom/rules", "rules:read"),
    Call("Ruler: test group", "GET", "/api/prom/rules/test/test", "logs-rules", "/api/prom/rules/test/test",
         "rules:read"),
    Call("Ruler: save group", "POST", "/api/prom/rules/ns1", "logs-rules", "/api/prom/rules/ns1", "rules:write",
         "refuse", {"Content-Type": "application/yaml"}, "name: g\nrules: []\n"),
    Call("Ruler: delete namespace", "DELETE", "/api/prom/rules/ns1", "logs-rules", "/api/prom/rules/ns1",
         "rules:write", "refuse"),
))

TRACE_FILTERED = "restricted: the answer is filtered (a recorder's is not a trace), see test_lbac_traces.py"
TEMPO = DataSource("tempo", "traces", ("/tempo", ""), (
    Call("Save & test: echo", "GET", "/api/echo", "traces", "/api/echo", "traces:read"),
    Call("Build info (feature detection)", "GET", "/api/status/buildinfo", "traces", "/api/status/buildinfo",
         "traces:read"),
    Call("Trace by ID", "GET", f"/api/v2/traces/{TRACE}" + q(start=S0, end=S1), "traces", f"/api/v2/traces/{TRACE}",
         "traces:read", headers={"Accept": "application/protobuf"}, pending=TRACE_FILTERED),
    Call("Trace by ID (v1)", "GET", f"/api/traces/{TRACE}", "traces", f"/api/traces/{TRACE}", "traces:read",
         pending=TRACE_FILTERED),
    Call("TraceQL search", "GET", "/api/search" + q(q='{resource.service.name="api"}', limit="20", spss="3",
         start=S0, end=S1), "traces", "/api/search", "traces:read", "traceql"),
    Call("Tag names", "GET", "/api/v2/search/tags" + q(scope="resource", start=S0, end=S1), "traces",
         "/api/v2/search/tags", "traces:read", "traceql"),
    Call("Tag names (v1)", "GET", "/api/search/tags", "traces", "/api/search/tags", "traces:read", "refuse"),
    Call("Tag values", "GET", "/api/v2/search/tag/resource.service.name/values" + q(q="{}"), "traces",
         "/api/v2/search/tag/resource.service.name/values", "traces:read", "traceql"),
    Call("Tag values of a name with a slash (encodeURIComponent)", "GET",
         "/api/v2/search/tag/resource.k8s.io%2Fname/values" + q(q="{}", start=S0), "traces",
         "/api/v2/search/tag/resource.k8s.io%2Fname/values", "traces:read", "traceql"),
    Call("Tag values (v1) of a name with a slash", "GET", "/api/search/tag/k8s.io%2Fname/values", "traces",
         "/api/search/tag/k8s.io%2Fname/values", "traces:read", "refuse"),
    Call("Tag values of a name with a slash, Grafana 11.0-12.2 (encodeTag: encoded twice)", "GET",
         "/api/v2/search/tag/resource.k8s.io%252Fname/values" + q(q="{}", start=S0), "traces",
         "/api/v2/search/tag/resource.k8s.io%252Fname/values", "traces:read", "traceql"),
    Call("Tag values filtered by a TraceQL value holding %, \\ and /", "GET",
         "/api/v2/search/tag/resource.service.name/values" + q(q='{span.path="/a/100% \\ b"}', limit="1000"),
         "traces", "/api/v2/search/tag/resource.service.name/values", "traces:read",
         "refuse-400"),  # (`\ ` is no Go escape: Tempo would read q as match-all)
    Call("Tag values of names with % and \\, Grafana 12.3+ (encoded once)", "GET",
         "/api/v2/search/tag/span.attr%25percent%5Cback/values" + q(q="{}"), "traces",
         "/api/v2/search/tag/span.attr%25percent%5Cback/values", "traces:read", "traceql"),
    Call("TraceQL metrics: range", "GET", "/api/metrics/query_range" + q(q="{} | rate()", start=S0, end=S1,
         step="60s"), "traces", "/api/metrics/query_range", "traces:read", "traceql"),
    Call("TraceQL metrics: instant", "GET", "/api/metrics/query" + q(q="{} | rate()", start=S0, end=S1), "traces",
         "/api/metrics/query", "traces:read", "traceql"),
    Call("Span metrics summary (older Grafana)", "GET", "/api/metrics/summary" + q(q="{}"), "traces",
         "/api/metrics/summary", "traces:read", "refuse"),
    # gRPC goes to the URL's host and port whatever the URL's path: the refusal says what to do.
    Call("Streaming search (gRPC): a clear 404", "POST", "/tempopb.StreamingQuerier/Search", "404", "",
         "traces:read", headers={"Content-Type": "application/grpc"}, bases=("",)),
    Call("Streaming metrics (gRPC): a clear 404", "POST", "/tempopb.StreamingQuerier/MetricsQueryRange", "404", "",
         "traces:read", headers={"Content-Type": "application/grpc"}, bases=("",)),
    Call("Streaming instant metrics (gRPC): a clear 404", "POST", "/tempopb.StreamingQuerier/MetricsQueryInstant",
         "404", "", "traces:read", headers={"Content-Type": "application/grpc"}, bases=("",)),
))

AM = "/alertmanager/api/v2"
SILENCE = '{"matchers":[{"name":"a","value":"b","isRegex":false}],"startsAt":"2026-01-01T00:00:00Z",' \
          '"endsAt":"2026-01-02T00:00:00Z","createdBy":"x","comment":"y"}'

ALERTMANAGER = DataSource("alertmanager", "metrics", ("/mimir", ""), (
    Call("Save & test: build info (Mimir detection)", "GET", "/api/v1/status/buildinfo", "metrics-alertmanager",
         "/api/v1/status/buildinfo", "alerts:read"),
    Call("Save & test: Prometheus Alertmanager probe (404 expected)", "GET", "/api/v2/status", "404", "",
         "alerts:read"),
    Call("Save & test: status", "GET", f"{AM}/status", "metrics-alertmanager", f"{AM}/status", "alerts:read",
         "refuse"),  # (Alertmanager's status holds the whole configuration)
    Call("Alert groups", "GET", f"{AM}/alerts/groups", "metrics-alertmanager", f"{AM}/alerts/groups", "alerts:read"),
    Call("Alerts", "GET", f"{AM}/alerts", "metrics-alertmanager", f"{AM}/alerts", "alerts:read"),
    Call("Post alerts", "POST", f"{AM}/alerts", "metrics-alertmanager", f"{AM}/alerts", "alerts:write",
         headers={"Content-Type": "application/json"}, body="[]"),
    Call("Silences", "GET", f"{AM}/silences", "metrics-alertmanager", f"{AM}/silences", "alerts:read"),
    Call("Create silence", "POST", f"{AM}/silences", "metrics-alertmanager", f"{AM}/silences", "alerts:write",
         "refuse", headers={"Content-Type": "application/json"}, body=SILENCE),  # (a=b implies no policy)
    Call("Silence", "GET", f"{AM}/silence/0b1c", "metrics-alertmanager", f"{AM}/silence/0b1c", "alerts:read"),
    Call("Expire silence", "DELETE", f"{AM}/silence/0b1c", "metrics-alertmanager", f"{AM}/silence/0b1c",
         "alerts:write", pending="the gateway reads the silence first: tests/test_lbac_rules_alerts.py"),
    Call("Configuration", "GET", "/api/v1/alerts", "metrics-alertmanager", "/api/v1/alerts", "alerts:read",
         "refuse"),
    Call("Save configuration", "POST", "/api/v1/alerts", "metrics-alertmanager", "/api/v1/alerts", "alerts:write",
         "refuse", headers={"Content-Type": "application/yaml"}, body="alertmanager_config: ''\n"),
    Call("Reset configuration", "DELETE", "/api/v1/alerts", "metrics-alertmanager", "/api/v1/alerts",
         "alerts:write", "refuse"),
))

DATA_SOURCES = (PROMETHEUS, PROMETHEUS_API_PROM, LOKI, TEMPO, ALERTMANAGER)
SCOPES = sorted({c.scope for ds in DATA_SOURCES for c in ds.calls})
UPSTREAMS = ("metrics", "metrics-rules", "metrics-alertmanager", "logs", "logs-rules", "traces")
MODES = ("unrestricted", "restricted-header", "restricted-enforce")


#: What a ruler answers where the gateway reads the answer to filter it (Prometheus' and Mimir's formats):
#: rule state, alert state, and the rule configuration API (YAML: namespaces to groups, or one group).
AM_SHAPES = (  # Alertmanager's v2 API: lists of alerts, alert groups and silences (one silence by id)
    ("/api/v2/alerts/groups", b"[]", "application/json"),
    ("/api/v2/alerts", b"[]", "application/json"),
    ("/api/v2/silences", b"[]", "application/json"),
    ("/api/v2/silence/0b1c", b'{"id":"0b1c","status":{"state":"active"},"matchers":[{"name":"env","value":"dev",'
     b'"isRegex":false,"isEqual":true}],"startsAt":"2026-01-01T00:00:00Z","endsAt":"2026-01-02T00:00:00Z",'
     b'"createdBy":"x","comment":"y"}', "application/json"),
)
RULER_SHAPES = (
    ("/api/v1/rules", b'{"status":"success","data":{"groups":[]}}', "application/json"),
    ("/api/v1/alerts", b'{"status":"success","data":{"alerts":[]}}', "application/json"),
    ("/rules/test/test", b"name: test\nrules: []\n", "application/yaml"),
    ("/rules", b"{}\n", "application/yaml"),
)


@dataclass
class Bench:
    gw: Any
    recorders: dict[str, Recorder]
    token: str


@contextlib.asynccontextmanager
async def bench(db_dsn: str, aiohttp_client: Any, aiohttp_server: Any, mode: str) -> AsyncIterator[Bench]:
    """A gateway with one recording upstream per backend and role, and a token of every scope Grafana
    needs on stack 101: without label policies, or with ``POLICY`` (in the LBAC mode of ``mode``)."""
    recorders: dict[str, Recorder] = {}
    urls: dict[str, str] = {}
    lbac = "enforce" if mode.endswith("enforce") else "header"
    for name in UPSTREAMS:
        # In header mode the backends enforce X-Prom-Label-Policy as Loki does, so the gateway's probe passes.
        shaped = RULER_SHAPES if name.endswith("-rules") else AM_SHAPES if name.endswith("-alertmanager") else ()
        recorders[name] = Recorder(lbac=lbac == "header", shaped=shaped)
        urls[name] = f"http://127.0.0.1:{(await aiohttp_server(recorders[name].app())).port}"
    ups = {"metrics": {"url": urls["metrics"], "rules_url": urls["metrics-rules"],
                       "alertmanager_url": urls["metrics-alertmanager"], "lbac": lbac},
           "logs": {"url": urls["logs"], "rules_url": urls["logs-rules"], "lbac": lbac},
           "traces": {"url": urls["traces"]}}
    async with _env(db_dsn, aiohttp_client, aiohttp_server, upstreams=ups) as env:
        for rec in recorders.values():
            rec.seen.clear()  # the start-up LBAC probe
        realm: dict[str, Any] = {"type": "stack", "identifier": STACK}
        if mode != "unrestricted":
            # (a trace selector too: label selectors alone cannot restrict traces, which are then refused)
            realm["labelPolicies"] = [{"selector": POLICY}, {"selector": TRACE_POLICY}]
        token = await env.token(SCOPES, [realm])
        yield Bench(env.gw, recorders, token)


def _cases(ds: DataSource, mode: str) -> list[tuple[str, Call]]:
    return [(base, c) for c in ds.calls if not (c.pending and mode != "unrestricted")
            for base in (c.bases if c.bases is not None else ds.bases)]


def _sent_query(call: Call) -> str:
    return call.path.partition("?")[2]


async def _check(b: Bench, ds: DataSource, base: str, call: Call, mode: str) -> list[str]:
    """Send ``call`` under ``base``; the list of what went wrong (empty when it landed as it must)."""
    where = f"{ds.name} {call.feature}: {call.method} {base}{call.path}"
    for rec in b.recorders.values():
        rec.seen.clear()
    tenant = TENANTS[ds.backend]
    headers = {**basic(tenant, b.token), **call.headers}
    r = await b.gw.client.request(call.method, base + call.path, headers=headers,
                                  data=call.body.encode() if call.body is not None else None)
    text = await r.text()
    got = {name: rec.seen for name, rec in b.recorders.items() if rec.seen}
    if call.lands == "404":
        body = json.loads(text)
        problems = [] if r.status == 404 and body.get("status") == "error" and not got else [
            f"{where}: expected a 404 without forwarding, got {r.status} {text[:200]} and {list(got)}"]
        if call.path.startswith("/tempopb.") and "Streaming" not in body.get("error", ""):
            problems.append(f"{where}: the 404 must say to turn streaming off: {text}")
        return problems
    restricted = mode != "unrestricted"
    if restricted and call.lbac == "refuse-400":
        if r.status != 400 or got or json.loads(text).get("status") != "error":
            return [f"{where}: a restricted token must get a 400 and nothing forwarded, got {r.status} {list(got)}"]
        return []
    if restricted and call.lbac == "refuse":
        if r.status != 403 or got or json.loads(text).get("status") != "error":
            return [f"{where}: a restricted token must get a 403 and nothing forwarded, got {r.status} {list(got)}"]
        return []
    if r.status != 200 or list(got) != [call.lands] or len(got[call.lands]) != 1:
        return [f"{where}: expected 200 from {call.lands}, got {r.status} {text[:200]} reaching {list(got)}"]
    seen = got[call.lands][0]
    problems = []
    if seen.raw_path != call.upstream:
        problems.append(f"{where}: upstream path {seen.raw_path!r}, expected {call.upstream!r}")
    backend = call.lands.split("-")[0]
    if seen.headers.getall("X-Scope-OrgID", []) != [TENANTS[backend]]:
        problems.append(f"{where}: tenant {seen.headers.getall('X-Scope-OrgID', [])}, expected {TENANTS[backend]}")
    for name, value in call.headers.items():
        if name.lower() != "content-type" and seen.headers.get(name) != value:
            problems.append(f"{where}: header {name} was not passed through")
    label_headers = seen.headers.getall("X-Prom-Label-Policy", [])
    if restricted and call.lbac == "traceql":  # Tempo filters nothing: the gateway rewrites in every mode
        q_sent = dict(seen.query).get("q", "")
        if TRACE_ENFORCED not in q_sent or label_headers:
            problems.append(f"{where}: q must hold {TRACE_ENFORCED} and no label-policy header go: {seen.query}")
        return problems
    forwarded = unquote_plus(seen.body.decode() + "&" + "&".join(f"{k}={v}" for k, v in seen.query))
    filtered = restricted and call.lbac.startswith("filter")
    if filtered and mode.endswith("header"):
        if len(label_headers) != 1 or not label_headers[0].startswith(f"{TENANTS[backend]}:"):
            problems.append(f"{where}: header mode must send the tenant's label policy, sent {label_headers}")
    elif filtered and call.lbac == "filter" and ENFORCED not in forwarded:
        problems.append(f"{where}: enforce mode must rewrite the query to hold {ENFORCED}: {forwarded}")
    elif not filtered and label_headers:
        problems.append(f"{where}: no label policy belongs on this request, sent {label_headers}")
    if filtered and mode.endswith("header"):
        # Header mode moves a restricted read's form into the URL (the backend filters what it runs).
        sent = parse_qsl(_sent_query(call), keep_blank_values=True) + parse_qsl(call.body or "",
                                                                                 keep_blank_values=True)
        if "/detected_" in call.upstream and not any(k == "query" for k, _ in sent):
            sent.append(("query", POLICY))  # Loki's LBAC leaves a query-less detected_* unfiltered
        if backend == "logs" and call.upstream.endswith(("/labels", "/label")):  # Loki: names without the policy
            own = next((v for k, v in sent if k == "query"), None)
            sent = [(k, v) for k, v in sent if k != "query"]
            sent.append(("query", POLICY if own is None else f"{own[:-1]}, {POLICY[1:]}"))
        if sorted(sent) != sorted(seen.query) or seen.body:
            problems.append(f"{where}: header mode must forward the merged parameters in the URL, sent "
                            f"{seen.query} and {seen.body[:200]!r}")
    elif not (filtered and mode.endswith("enforce")):
        if not _same_query(call, seen.query):
            problems.append(f"{where}: the query must pass untouched, sent {seen.query}")
        if (call.body or "").encode() != seen.body:
            problems.append(f"{where}: the body must pass untouched, sent {seen.body[:200]!r}")
    if filtered and mode.endswith("enforce") and label_headers:
        problems.append(f"{where}: enforce mode sends no label-policy header, sent {label_headers}")
    return problems


def _same_query(call: Call, seen: list[tuple[str, str]]) -> bool:
    return parse_qsl(_sent_query(call), keep_blank_values=True) == seen


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("ds", DATA_SOURCES, ids=lambda ds: ds.name)
async def test_every_request_of_the_data_source_lands_where_it_must(
        db_dsn: str, aiohttp_client: Any, aiohttp_server: Any, ds: DataSource, mode: str) -> None:
    async with bench(db_dsn, aiohttp_client, aiohttp_server, mode) as b:
        problems = [p for base, call in _cases(ds, mode) for p in await _check(b, ds, base, call, mode)]
    assert problems == []


def test_the_table_covers_every_kind_of_handling() -> None:
    calls = [c for ds in DATA_SOURCES for c in ds.calls]
    assert {c.lbac for c in calls} == {"filter", "filter-noselector", "pass", "refuse", "traceql", "refuse-400"}
    assert {c.lands for c in calls} == {*UPSTREAMS, "404"}
    assert {ds.bases[0] for ds in DATA_SOURCES} == {"/mimir/prometheus", "/mimir/api/prom", "/loki", "/tempo",
                                                   "/mimir"}


@pytest.mark.parametrize("base", ["", "/loki"])
async def test_loki_categorize_labels_reaches_loki_and_control_headers_do_not(
        db_dsn: str, aiohttp_client: Any, aiohttp_server: Any, base: str) -> None:
    async with bench(db_dsn, aiohttp_client, aiohttp_server, "unrestricted") as b:
        r = await b.gw.client.get(f"{base}{L}/query_range" + q(query=SEL), headers={
            **basic(TENANTS["logs"], b.token), **CATEGORIZE, "X-Loki-Query-Limits": '{"maxQueryLength":"999d"}',
            "X-Loki-Disable-Pipeline-Wrappers": "true",
            "X-Loki-Actor-Path": "a|b", "X-Loki-Anything": "1", "X-Query-Tags": "Source=grafana"})
        assert r.status == 200, await r.text()
        seen = b.recorders["logs"].seen[-1].headers
    assert seen.getall("X-Loki-Response-Encoding-Flags") == ["categorize-labels"]
    assert seen["X-Query-Tags"] == "Source=grafana"
    assert [h for h in seen if h.lower().startswith("x-loki-") and h.lower() != "x-loki-response-encoding-flags"] \
        == []


# As Grafana's pkg/tsdb/loki/api.go sends it (json.Marshal of LimitsContext{Expr, From, To}).
LIMITS_CONTEXT = json.dumps({"expr": '{app="api"} |= "x"', "from": "2026-06-01T00:00:00Z",
                             "to": "2026-06-02T00:00:00Z"}, separators=(",", ":"))


@pytest.mark.parametrize("mode", MODES)
async def test_loki_query_limits_context_reaches_loki_restricted_as_the_query(
        db_dsn: str, aiohttp_client: Any, aiohttp_server: Any, mode: str) -> None:
    """Loki checks max_query_bytes_read on the whole query Grafana names (and says how many bytes): as
    sent for a token that reads the whole tenant; for a label-restricted one its expr restricted like the
    query, and dropped where it cannot be (not Loki's JSON, or an endpoint that is no query)."""
    def sent(path: str, value: str) -> Any:
        return b.gw.client.get(f"/loki{L}/{path}" + q(query=SEL, start=S0, end=S1), headers={
            **basic(TENANTS["logs"], b.token), "X-Loki-Query-Limits-Context": value})

    async with bench(db_dsn, aiohttp_client, aiohttp_server, mode) as b:
        seen = []
        for path, value in (("query_range", LIMITS_CONTEXT), ("query_range", "{not json"),
                            ("labels", LIMITS_CONTEXT), ("query", LIMITS_CONTEXT)):
            r = await sent(path, value)
            assert r.status == 200, await r.text()
            seen.append(b.recorders["logs"].seen[-1].headers.getall("X-Loki-Query-Limits-Context", []))
    if mode == "unrestricted":
        assert seen == [[LIMITS_CONTEXT], ["{not json"], [LIMITS_CONTEXT], [LIMITS_CONTEXT]]
        return
    restricted = {"expr": '{app="api", env="dev"} |= "x"', "from": "2026-06-01T00:00:00Z",
                  "to": "2026-06-02T00:00:00Z"}
    assert [[json.loads(v) for v in vs] for vs in seen] == [[restricted], [], [], [restricted]]


@pytest.mark.parametrize("mode", ["unrestricted", "restricted-enforce"])
async def test_live_tail_over_websocket_under_the_pinned_loki_url(
        db_dsn: str, aiohttp_client: Any, aiohttp_server: Any, mode: str) -> None:
    async with bench(db_dsn, aiohttp_client, aiohttp_server, mode) as b:
        async with b.gw.client.ws_connect(f"/loki{L}/tail" + q(query=SEL), headers={
                **basic(TENANTS["logs"], b.token), **CATEGORIZE}) as ws:
            assert "hello" in await ws.receive_str(timeout=5)
        seen = b.recorders["logs"].seen[-1]
    assert (seen.method, seen.raw_path) == ("WS", f"{L}/tail")
    assert seen.headers["X-Scope-OrgID"] == TENANTS["logs"]
    assert seen.headers["X-Loki-Response-Encoding-Flags"] == "categorize-labels"
    query = dict(seen.query)["query"]
    assert (ENFORCED in query) is (mode != "unrestricted")
