"""Count how many ordinary Grafana reads enforce mode refuses under label policies with several selectors.

``python -m bench.lbac_refusals`` walks a fixed set of reads (what Grafana's Explore, dashboards,
autocomplete and Logs/Metrics Drilldown send to Loki and Mimir) through the gateway's own decision
functions, without a network, for a few policy sets, and prints refused/answered per set. It runs
on any revision of the gateway: where the fan-out planner (``gateway.lbac.fanout``) does not exist
yet, it reports what the single rewrite alone decides, so the numbers before and after a change come
from the same query set. It asserts nothing.
"""

from __future__ import annotations

import importlib
from collections import Counter
from typing import Any
from urllib.parse import urlencode

from gateway.errors import ProxyError
from gateway.lbac import RewriteError
from gateway.lbac import restrict as lbac
from gateway.lbac.remote_read import ReadRequest, restrict_read_request, snappy_encode
from gateway.policy.selector import Selector, parse_selector
from gateway.routes import Kind, match

POLICY_SETS: dict[str, tuple[str, ...]] = {
    "issue": ('{env="dev"}', '{team="a", env!="prod"}'),
    "two-labels": ('{ns="a"}', '{team="b"}'),
    "three": ('{env="prod", team="a"}', '{env="dev", team!="a"}', '{cluster="eu"}'),
}

_R = {"start": "1700000000000000000", "end": "1700003600000000000"}
# (method, path, params); "READ" marks a remote read, whose body is built below.
READS: list[tuple[str, str, dict[str, str]]] = [
    # Loki: Explore and dashboards
    ("GET", "/loki/api/v1/query_range", {"query": '{app="a"}', "limit": "1000", "direction": "backward", **_R}),
    ("GET", "/loki/api/v1/query_range", {"query": '{app=~".+"} |= "x"', "limit": "100", **_R}),
    ("GET", "/loki/api/v1/query_range", {"query": '{app="a"} | json', "limit": "100", **_R}),
    ("GET", "/loki/api/v1/query_range", {"query": '{app="a"} | logfmt | level="error"', **_R}),
    ("GET", "/loki/api/v1/query_range", {"query": '{app="a"} | line_format "{{.msg}}"', **_R}),
    ("POST", "/loki/api/v1/query_range", {"query": '{app="a"} !~ "debug|trace"', "direction": "forward", **_R}),
    ("GET", "/loki/api/v1/query_range", {"query": 'sum by (level) (count_over_time({app="a"}[1m]))', "step": "60",
                                         **_R}),
    ("GET", "/loki/api/v1/query_range", {"query": 'rate({app="a"} |= "error" [5m])', "step": "60", **_R}),
    ("GET", "/loki/api/v1/query_range", {"query": 'sum(count_over_time({app="a"}[1m]))', "step": "60", **_R}),
    ("GET", "/loki/api/v1/query_range", {"query": 'absent_over_time({app="a"}[5m])', "step": "60", **_R}),
    ("GET", "/loki/api/v1/query", {"query": 'sum(rate({app="a"}[5m]))', "time": "1700003600"}),
    ("GET", "/loki/api/v1/query", {"query": 'count_over_time({app="a"}[5m])', "time": "1700003600"}),
    ("GET", "/loki/api/v1/query_range", {"query": 'sum by (level) (count_over_time({app="a"} | logfmt | drop env, '
                                         'team, ns [1m]))', "step": "60", **_R}),
    ("GET", "/loki/api/v1/query_range", {"query": 'count_over_time({app="a"} | drop env, team, ns [5m])', "step": "60",
                                         **_R}),
    ("GET", "/loki/api/v1/query", {"query": 'sum(rate({app="a"} | unpack [5m]))', "time": "1700003600"}),
    ("GET", "/loki/api/v1/query_range", {"query": 'avg_over_time({app="a"} | logfmt | unwrap latency [5m]) by (level)',
                                         "step": "60", **_R}),
    ("GET", "/loki/api/v1/query_range", {"query": 'max_over_time({app="a"} | logfmt | unwrap latency [5m]) by (level)',
                                         "step": "60", **_R}),
    ("GET", "/loki/api/v1/query_range", {"query": 'quantile_over_time(0.99, {app="a"} | logfmt | unwrap latency [5m]) '
                                         'by (level)', "step": "60", **_R}),
    # Loki: labels, values, series (autocomplete, label browser, Save & test)
    ("GET", "/loki/api/v1/labels", {**_R}),
    ("GET", "/loki/api/v1/labels", {"query": '{app="a"}', **_R}),
    ("GET", "/loki/api/v1/label/app/values", {**_R}),
    ("GET", "/loki/api/v1/label/level/values", {"query": '{app="a"}', **_R}),
    ("GET", "/loki/api/v1/series", {"match[]": '{app="a"}', **_R}),
    ("GET", "/loki/api/v1/series", {**_R}),
    # Loki: volume, stats, Logs Drilldown
    ("GET", "/loki/api/v1/index/stats", {"query": '{app="a"}', **_R}),
    ("GET", "/loki/api/v1/index/volume", {"query": '{app="a"}', "limit": "100", **_R}),
    ("GET", "/loki/api/v1/index/volume_range", {"query": '{app=~".+"}', "step": "60", **_R}),
    ("GET", "/loki/api/v1/detected_labels", {**_R}),
    ("GET", "/loki/api/v1/detected_labels", {"query": '{app="a"}', **_R}),
    ("GET", "/loki/api/v1/detected_fields", {"query": '{app="a"}', **_R}),
    ("GET", "/loki/api/v1/detected_field/level/values", {**_R}),
    ("GET", "/loki/api/v1/detected_field/level/values", {"query": '{app="a"}', **_R}),
    ("GET", "/loki/api/v1/patterns", {"query": '{app="a"}', "step": "60", **_R}),
    ("GET", "/loki/api/v1/tail", {"query": '{app="a"}', "limit": "10"}),
    # Mimir / Prometheus
    ("GET", "/prometheus/api/v1/query", {"query": "up", "time": "1700003600"}),
    ("GET", "/prometheus/api/v1/query", {"query": "sum by (job) (rate(http_requests_total[5m]))"}),
    ("GET", "/prometheus/api/v1/query", {"query": "http_requests_total[5m]"}),
    ("GET", "/prometheus/api/v1/query", {"query": 'up{job="x"}[10m] offset 5m'}),
    ("GET", "/prometheus/api/v1/query_range", {"query": "rate(up[5m])", "start": "1", "end": "100", "step": "10"}),
    ("GET", "/prometheus/api/v1/query", {"query": "absent(up)"}),
    ("GET", "/prometheus/api/v1/series", {"match[]": "up"}),
    ("GET", "/prometheus/api/v1/labels", {}),
    ("GET", "/prometheus/api/v1/label/__name__/values", {}),
    ("GET", "/prometheus/api/v1/label/job/values", {"match[]": "up"}),
    ("GET", "/prometheus/api/v1/metadata", {}),
    ("GET", "/prometheus/api/v1/metadata", {"metric": "up"}),
    ("GET", "/prometheus/api/v1/query_exemplars", {"query": "http_requests_total", "start": "1", "end": "2"}),
    ("POST", "/prometheus/api/v1/read", {"READ": "1"}),
    ("POST", "/prometheus/api/v1/read", {"READ": "2"}),
]


def _read_body(queries: int) -> bytes:
    req = ReadRequest()
    for i in range(queries):
        q = req.queries.add(start_timestamp_ms=0, end_timestamp_ms=1000 * (i + 1))
        q.matchers.add(type=0, name="__name__", value="up")
    return snappy_encode(req.SerializeToString())


def decide(method: str, path: str, params: dict[str, str], policies: tuple[Selector, ...],
           fanout: Any) -> str:
    """'answered' or the refusal reason, as the handler would decide in enforce mode."""
    m = match(method, path)
    assert m is not None, path
    kind = m.route.kind
    raw_query, body = (urlencode(params), None) if method == "GET" else ("", urlencode(params).encode())
    try:
        if kind is Kind.REMOTE_READ:
            raw = _read_body(int(params["READ"]))
            if fanout is not None and fanout.plan_remote_read(raw, policies) is not None:
                return "answered"
            restrict_read_request(raw, policies)
            return "answered"
        if fanout is not None and fanout.plan(kind, m.upstream_path, method, raw_query, body, policies) is not None:
            return "answered"
        if kind is Kind.TENANT_WIDE:
            return "refused: tenant-wide"
        lbac.enforce(kind, method, raw_query, body, policies)
        return "answered"
    except (ProxyError, RewriteError) as exc:
        return f"refused: {str(exc)[:60]}"


def main() -> None:
    try:
        fanout = importlib.import_module("gateway.lbac.fanout")
    except ImportError:
        fanout = None
    print(f"fan-out planner: {'present' if fanout else 'absent'}; {len(READS)} reads per policy set")
    total: Counter[str] = Counter()
    for name, texts in POLICY_SETS.items():
        pols = tuple(parse_selector(t) for t in texts)
        counts: Counter[str] = Counter()
        for method, path, params in READS:
            verdict = decide(method, path, params, pols, fanout)
            counts["answered" if verdict == "answered" else "refused"] += 1
            if verdict != "answered":
                print(f"  {name:10s} {method:4s} {path} {params.get('query', '')[:40]!r}: {verdict}")
        total.update(counts)
        print(f"{name:10s} answered {counts['answered']:3d}  refused {counts['refused']:3d}")
    print(f"{'all':10s} answered {total['answered']:3d}  refused {total['refused']:3d}")


if __name__ == "__main__":
    main()
