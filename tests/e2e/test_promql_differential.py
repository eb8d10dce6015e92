"""Differential test of PromQL restriction against real Prometheus (Debian's 2.42).

One Prometheus holds all series; per label-policy set, a second one holds only the series
visible under it. For random PromQL, ``restrict_promql(q)`` on the full instance must give
exactly what ``q`` gives on the visible-only instance (instant and range queries), or be
refused with RewriteError (rare, and never for one-selector policies). No returned series
that still carries ``__name__`` may fall outside the policy.

Under several selectors, what one rewrite cannot express is fanned out (``gateway.lbac.fanout``):
bare range selectors and remote read run one restricted request per selector on the full
instance, the gateway's merge folds the answers, and the result must equal the visible-only
instance's answer to the client's own request (remote read in both response types).

``GATEWAY_HYPOTHESIS_EXAMPLES`` sets the number of generated queries per policy set.
"""

from __future__ import annotations

import math
import os
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.lbac import RewriteError
from gateway.lbac import remote_read as rr
from gateway.lbac.fanout import Merge, plan, plan_remote_read
from gateway.lbac.promql import effective_policies, restrict_match, restrict_promql
from gateway.policy.selector import Selector, parse_selector
from gateway.proxy.fanout import merge_matrix
from gateway.routes import Kind
from tests.e2e.prom import (
    PrometheusError,
    PrometheusProcess,
    build_tsdb,
    data_window,
    openmetrics_text,
    require_prometheus,
)

EXAMPLES = int(os.environ.get("GATEWAY_HYPOTHESIS_EXAMPLES", "300"))
STEP = 60
START, END = data_window(hours=2, step_s=STEP)
# off the 60 s sample grid, so that sample timestamps differ from evaluation times
EVAL_INSTANT = START + 80 * 60 + 17
RANGE = (START + 30 * 60 + 23, END, 300)
AT_TIMES = (START + 40 * 60 + 7, END - 10 * 60)

ENVS = ("dev", "prod", "stage")
TEAMS = ("a", "b", "c")
# cpu_usage, mem_usage and up share label sets: series that differ only in __name__
METRICS = ("http_requests_total", "cpu_usage", "mem_usage", "up")

POLICY_SETS: dict[str, tuple[Selector, ...]] = {
    "eq": (parse_selector('{env="dev"}'),),
    "neq": (parse_selector('{env!="prod", team=~".+"}'),),
    "re_or_eq": (parse_selector('{team=~"a|b"}'), parse_selector('{env="prod"}')),
    "nre": (parse_selector('{env="dev", team!~"c"}'), parse_selector('{env="stage", team!="a"}')),
    "name": (parse_selector('{__name__=~"up|cpu_.*"}'), parse_selector('{team="c"}')),
    "merge": (parse_selector('{env="dev"}'), parse_selector('{env="stage"}')),
    "three": (
        parse_selector('{env="prod", team="a"}'),
        parse_selector('{env="dev", team!="a"}'),
        parse_selector('{__name__="http_requests_total", env!~"dev|prod"}'),
    ),
}

STATS: dict[str, dict[str, int]] = {}


# --------------------------------------------------------------------------- data


def make_series() -> list[tuple[dict[str, str], list[tuple[int, float]]]]:
    """Counters and gauges over env x team; some series lack env or team; fixed seed."""
    rng = random.Random(4242)
    out: list[tuple[dict[str, str], list[tuple[int, float]]]] = []
    combos: list[dict[str, str]] = [{"env": e, "team": t} for e in ENVS for t in TEAMS]
    combos += [{"env": "dev"}, {"team": "b"}, {"instance": "lonely"}]
    for labels in combos:
        for name in METRICS:
            if name == "http_requests_total":
                for code in ("200", "500"):
                    total = rng.uniform(0, 100)
                    samples = []
                    for ts in range(START, END + 1, STEP):
                        total = 0.0 if rng.random() < 0.01 else total + rng.uniform(0, 10)
                        samples.append((ts, round(total, 3)))
                    out.append(({"__name__": name, "code": code, **labels}, samples))
            elif name in ("cpu_usage", "mem_usage"):
                samples = [(ts, round(rng.uniform(0, 1), 6)) for ts in range(START, END + 1, STEP)]
                out.append(({"__name__": name, **labels}, samples))
            else:
                # 'up' has gaps so that absent_over_time and lookback matter
                samples = [(ts, float(rng.random() < 0.8)) for ts in range(START, END + 1, STEP) if rng.random() < 0.9]
                out.append(({"__name__": name, **labels}, samples))
    return out


def visible(labels: dict[str, str], policies: tuple[Selector, ...]) -> bool:
    return any(p.matches(labels) for p in policies)


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, PrometheusProcess]]:
    bins = require_prometheus()
    series = make_series()
    procs: dict[str, PrometheusProcess] = {}
    try:
        for key, pols in [("__full__", ()), *POLICY_SETS.items()]:
            chosen = [s for s in series if not pols or visible(s[0], pols)]
            tsdb: Path = tmp_path_factory.mktemp(f"tsdb-{key}")
            build_tsdb(openmetrics_text(chosen), tsdb, promtool=bins.promtool)
            procs[key] = PrometheusProcess(tsdb, binary=bins.prometheus).start()
        yield procs
    finally:
        for p in procs.values():
            p.stop()


# --------------------------------------------------------------------------- query generator

OFFSETS = st.sampled_from(["", "", "", " offset 1m", " offset 10m", " offset -5m"])
ATS = st.sampled_from(["", "", "", "", f" @ {AT_TIMES[0]}", f" @ {AT_TIMES[1]}", " @ start()", " @ end()"])
RANGES = st.sampled_from(["2m", "5m", "10m"])


@st.composite
def matcher(draw: st.DrawFn) -> str:
    name = draw(st.sampled_from(["env", "team"]))
    vals = ENVS if name == "env" else TEAMS
    op = draw(st.sampled_from(["=", "!=", "=~", "!~"]))
    if op in ("=", "!="):
        value = draw(st.sampled_from([*vals, ""]))
    else:
        value = draw(st.sampled_from([f"{vals[0]}|{vals[1]}", ".+", ".*", vals[2][0] + ".*", ""]))
    return f'{name}{op}"{value}"'


@st.composite
def selector(draw: st.DrawFn, absent_ok: bool = False) -> str:
    kind = draw(st.sampled_from(["name", "name", "name", "regex_name", "labels"]))
    ms = draw(st.lists(matcher(), max_size=2))
    if kind == "name":
        names = [*METRICS, "nope"] if absent_ok else list(METRICS)
        head = draw(st.sampled_from(names))
    elif kind == "regex_name":
        names = draw(st.sampled_from(["cpu_usage|up", "cpu_usage|mem_usage", ".+_usage", "mem_usage|up"]))
        head, ms = "", [f'__name__=~"{names}"', *ms]
    else:
        head, ms = "", [draw(st.sampled_from(['env=~".+"', 'team="a"', 'env="prod"', 'code="500"'])), *ms]
    return head + ("{" + ", ".join(ms) + "}" if ms else "")


@st.composite
def instant_selector(draw: st.DrawFn) -> str:
    return draw(selector()) + draw(ATS) + draw(OFFSETS)


@st.composite
def range_selector(draw: st.DrawFn, absent_ok: bool = False) -> str:
    return f"{draw(selector(absent_ok))}[{draw(RANGES)}]{draw(ATS)}{draw(OFFSETS)}"


RANGE_FUNCS = [
    "rate", "irate", "increase", "delta", "idelta", "deriv", "changes", "resets", "avg_over_time",
    "min_over_time", "max_over_time", "sum_over_time", "count_over_time", "last_over_time",
    "present_over_time", "stddev_over_time",
]  # fmt: skip


@st.composite
def range_call(draw: st.DrawFn) -> str:
    rs = draw(range_selector())
    kind = draw(st.integers(0, 9))
    if kind == 0:
        return f"quantile_over_time(0.5, {rs})"
    if kind == 1:
        return f"predict_linear({rs}, 60)"
    if kind == 2:
        return f"holt_winters({rs}, 0.5, 0.5)"
    return f"{draw(st.sampled_from(RANGE_FUNCS))}({rs})"


def vector_expr(depth: int) -> st.SearchStrategy[str]:
    leaves = st.one_of(instant_selector(), range_call())
    if depth <= 0:
        return leaves
    sub = vector_expr(depth - 1)
    grouping = st.sampled_from(["", " by (env)", " by (team)", " without (team)", " by (env, team)", " by ()"])
    matching = st.sampled_from(["", " on (env, team)", " ignoring (code)", " on (env)", " on ()"])

    agg = st.builds(
        lambda op, g, e: f"{op}{g} ({e})",
        st.sampled_from(["sum", "avg", "count", "min", "max", "group", "stddev"]),
        grouping,
        sub,
    )
    topk = st.builds(
        lambda op, g, s: f"{op}{g} (2, {s})", st.sampled_from(["topk", "bottomk"]), grouping,
        st.sampled_from(['cpu_usage{env="dev"}', "cpu_usage", 'cpu_usage{team!="a"}']),
    )  # fmt: skip
    arith = st.builds(
        lambda a, op, m, b: f"({a}) {op}{m} ({b})", sub, st.sampled_from(["+", "-", "*", "/"]), matching, sub
    )
    group_left = st.builds(
        lambda a, b: f"({a}) * on (env, team) group_left () ({b})",
        sub,
        st.builds(lambda e: f"sum by (env, team) ({e})", sub),
    )
    scalar_op = st.builds(
        lambda a, op, k, flip: f"{k} {op} ({a})" if flip else f"({a}) {op} {k}",
        sub, st.sampled_from(["+", "*", "-", "/", "^"]), st.sampled_from(["2", "0.5", "-1"]), st.booleans(),
    )  # fmt: skip
    compare = st.builds(
        lambda a, op, b, k: f"({a}) {op}{b} {k}",
        sub, st.sampled_from([">", "<", ">=", "==", "!="]), st.sampled_from(["", " bool"]),
        st.sampled_from(["0", "0.5", "50"]),
    )  # fmt: skip
    setop = st.builds(
        lambda a, op, m, b: f"({a}) {op}{m} ({b})",
        sub, st.sampled_from(["or", "and", "unless"]), st.sampled_from(["", " on (env)", " ignoring (code)"]), sub,
    )  # fmt: skip
    fn1 = st.builds(
        lambda f, a: f.format(a),
        st.sampled_from(["abs({})", "ceil({})", "clamp_min({}, 0.3)", "-({})", "sgn({})", "sort_desc({})"]),
        sub,
    )
    subquery = st.builds(
        lambda f, a, r, s, at, off: f"{f}(({a})[{r}:{s}]{at}{off})",
        st.sampled_from(["max_over_time", "avg_over_time", "rate", "count_over_time", "last_over_time"]),
        sub, st.sampled_from(["10m", "30m"]), st.sampled_from(["", "1m", "5m"]), ATS, OFFSETS,
    )  # fmt: skip
    absent = st.one_of(
        st.builds(lambda s: f"absent({s})", selector(absent_ok=True)),
        st.builds(lambda s: f"absent_over_time({s})", range_selector(absent_ok=True)),
        st.builds(lambda e: f"absent({e})", sub),
    )
    special = st.one_of(
        st.builds(lambda s: f"timestamp({s})", instant_selector()),
        st.builds(lambda e: f'label_replace({e}, "x", "$1", "env", "(.*)")', sub),
        st.builds(lambda e: f"({e})", sub),
    )
    return st.one_of(leaves, agg, topk, arith, group_left, scalar_op, compare, setop, fn1, subquery, absent, special)


QUERIES = st.one_of(
    vector_expr(2),
    vector_expr(2),
    vector_expr(2),
    range_selector(),  # a bare range vector (instant query only)
    st.builds(lambda e: f"scalar(sum({e}))", vector_expr(1)),
)


# --------------------------------------------------------------------------- comparison


def run(p: PrometheusProcess, query: str, kind: str) -> tuple[str, Any]:
    try:
        if kind == "instant":
            return "ok", p.query(query, EVAL_INSTANT)
        return "ok", p.query_range(query, *RANGE)
    except PrometheusError as exc:
        return "error", f"{exc.error_type}: {exc.error}"


def _f(v: str) -> float:
    return float(v)


def normalize(data: dict[str, Any]) -> tuple[str, Any]:
    rt, res = data["resultType"], data["result"]
    if rt == "vector":
        return rt, sorted((tuple(sorted(s["metric"].items())), s["value"][0], _f(s["value"][1])) for s in res)
    if rt == "matrix":
        return rt, sorted((tuple(sorted(s["metric"].items())), tuple((t, _f(v)) for t, v in s["values"])) for s in res)
    return rt, (res[0], _f(res[1])) if rt == "scalar" else res


def close(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        if math.isnan(a) or math.isnan(b):
            return math.isnan(a) and math.isnan(b)
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9)
    if isinstance(a, tuple | list) and isinstance(b, tuple | list):
        return len(a) == len(b) and all(close(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def returned_labels(data: dict[str, Any]) -> list[dict[str, str]]:
    if data["resultType"] in ("vector", "matrix"):
        return [s["metric"] for s in data["result"]]
    return []


def check_query(servers: dict[str, PrometheusProcess], key: str, query: str) -> None:
    pols = POLICY_SETS[key]
    stats = STATS.setdefault(
        key, {"examples": 0, "compared": 0, "both_error": 0, "original_error": 0, "refused": 0, "nonempty": 0}
    )
    stats["examples"] += 1
    try:
        rewritten = restrict_promql(query, pols)
    except RewriteError as exc:
        stats["refused"] += 1
        assert len(effective_policies(pols)) > 1, f"one-selector policy refused {query!r}: {exc}"
        return
    for kind in ("instant", "range"):
        want = run(servers[key], query, kind)
        got = run(servers["__full__"], rewritten, kind)
        if got[0] == "ok":
            for labels in returned_labels(got[1]):
                if "__name__" in labels:
                    assert visible(labels, pols), f"LEAK {labels} for {query!r} -> {rewritten!r}"
        if want[0] == "error":
            # e.g. duplicate label sets: the rewrite may fail the same way or return a subset
            stats["both_error" if got[0] == "error" else "original_error"] += 1
            continue
        assert got[0] == "ok", f"{kind} {query!r} -> {rewritten!r} failed: {got[1]}"
        stats["compared"] += 1
        w, g = normalize(want[1]), normalize(got[1])
        assert w[0] == g[0], f"{kind} {query!r} -> {rewritten!r}: type {w[0]} != {g[0]}"
        assert close(w[1], g[1]), f"{kind} {query!r} -> {rewritten!r}:\nwant {w[1]}\ngot  {g[1]}"
        if w[1]:
            stats["nonempty"] += 1


# --------------------------------------------------------------------------- tests


@pytest.mark.parametrize("key", list(POLICY_SETS))
def test_differential(servers: dict[str, PrometheusProcess], key: str) -> None:
    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    )
    @given(QUERIES)
    def prop(query: str) -> None:
        check_query(servers, key, query)

    prop()
    s = STATS[key]
    assert s["refused"] <= max(3, s["examples"] // 5), f"too many refusals for {key}: {s}"


FIXED = [
    'cpu_usage{env="dev"}',
    '{__name__=~"cpu_usage|up", env=~".+"}',
    '{env="prod"}',
    '{__name__=~".+_usage", team!="a"}',
    'last_over_time({env="prod"}[5m])',
    'count by (env, team) ({team="a"})',
    "absent(nope)",
    'absent(nope{env="dev", env!="x"})',
    'absent(up{env="prod", team="a"} @ end())',
    "absent_over_time(up[1m] offset 3m)",
    "timestamp(up)",
    "timestamp((up))",
    'last_over_time({env="dev"}[5m])',
    'rate({__name__=~"http_requests_total|cpu_usage", code="500"}[5m])',
    "topk by (env) (1, cpu_usage)",
    "sum(rate(http_requests_total[5m])) by (env) / on (env) group_left () sum(up) by (env)",
    "max_over_time((sum by (team) (cpu_usage))[30m:1m] @ start())",
]


@pytest.mark.parametrize("key", list(POLICY_SETS))
@pytest.mark.parametrize("query", FIXED)
def test_fixed_queries(servers: dict[str, PrometheusProcess], key: str, query: str) -> None:
    """Hand-picked cases for the rules in gateway/lbac/promql.py's docstring, run every time."""
    check_query(servers, key, query)


MATCHES = [
    [],
    ["up"],
    ['{env="dev"}', "cpu_usage"],
    ['{__name__=~"cpu_usage|up", team!="b"}'],
    ['http_requests_total{code="500", env=~"p.*"}', '{instance="lonely"}'],
]


@pytest.mark.parametrize("key", list(POLICY_SETS))
@pytest.mark.parametrize("matches", MATCHES)
def test_series_endpoint(servers: dict[str, PrometheusProcess], key: str, matches: list[str]) -> None:
    pols = POLICY_SETS[key]
    restricted = restrict_match(matches, pols)
    assert len(restricted) == len(pols) * max(1, len(matches))
    got = servers["__full__"].series(restricted, START, END)
    want = servers[key].series(matches or ['{__name__=~".+"}'], START, END)
    as_set = lambda rows: sorted(tuple(sorted(r.items())) for r in rows)  # noqa: E731
    assert as_set(got) == as_set(want)
    assert all(visible(labels, pols) for labels in got)


# --------------------------------------------------------------------------- fan-out: bare ranges, remote read

MULTI = [k for k, pols in POLICY_SETS.items() if len(effective_policies(pols)) > 1]


def _leg_query(raw: str) -> str:
    from urllib.parse import parse_qsl

    return dict(parse_qsl(raw))["query"]


def check_bare_range(servers: dict[str, PrometheusProcess], key: str, query: str) -> None:
    from urllib.parse import urlencode

    pols = POLICY_SETS[key]
    p = plan(Kind.PROMQL, "/prometheus/api/v1/query", "GET", urlencode({"query": query}), None, pols)
    stats = STATS.setdefault(f"range/{key}", {"examples": 0, "compared": 0, "nonempty": 0, "both_error": 0,
                                              "original_error": 0, "refused": 0})
    stats["examples"] += 1
    assert p is not None and p.merge is Merge.MATRIX and len(p.legs) == len(effective_policies(pols)), query
    want = run(servers[key], query, "instant")
    legs = [run(servers["__full__"], _leg_query(leg.query), "instant") for leg in p.legs]
    if want[0] == "error":
        stats["both_error" if all(g[0] == "error" for g in legs) else "original_error"] += 1
        return
    assert all(g[0] == "ok" for g in legs), (query, legs)
    merged = merge_matrix([{"status": "success", "data": g[1]} for g in legs])
    for s in merged["data"]["result"]:
        assert visible(s["metric"], pols), f"LEAK {s['metric']} for {query!r}"
    w, g = normalize(want[1]), normalize(merged["data"])
    assert w[0] == g[0] == "matrix" and close(w[1], g[1]), f"{query!r}:\nwant {w[1]}\ngot  {g[1]}"
    stats["compared"] += 1
    stats["nonempty"] += bool(w[1])


@pytest.mark.parametrize("key", MULTI)
def test_bare_range_selectors_fan_out(servers: dict[str, PrometheusProcess], key: str) -> None:
    @settings(max_examples=max(20, EXAMPLES // 5), deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(range_selector())
    def prop(query: str) -> None:
        check_bare_range(servers, key, query)

    prop()
    for query in ('{env="prod"}[5m]', "(up[10m])", 'cpu_usage{team!="a"}[2m] offset 1m', "mem_usage[5m] @ end()"):
        check_bare_range(servers, key, query)
    assert STATS[f"range/{key}"]["nonempty"] > 0


READ_MATCHERS: list[list[tuple[int, str, str]]] = [
    [(rr.EQ, "__name__", "up")],
    [(rr.RE, "__name__", "cpu_usage|mem_usage"), (rr.NEQ, "env", "prod")],
    [(rr.RE, "__name__", ".+"), (rr.EQ, "team", "b")],
    [(rr.EQ, "__name__", "http_requests_total"), (rr.RE, "code", "5.."), (rr.NRE, "env", "dev")],
    [(rr.RE, "env", ".+")],
]


def _read_body(queries: list[list[tuple[int, str, str]]], types: tuple[int, ...], lo: int, hi: int) -> bytes:
    req = rr.ReadRequest()
    for ms in queries:
        q = req.queries.add(start_timestamp_ms=lo * 1000, end_timestamp_ms=hi * 1000)
        for t, n, v in ms:
            q.matchers.add(type=t, name=n, value=v)
    req.accepted_response_types.extend(types)
    return rr.snappy_encode(req.SerializeToString())


def _decoded(ctype: str, body: bytes) -> dict[int, list[tuple[Any, ...]]]:
    """Per query index that has series: sorted (labels, samples or chunks)."""
    if ctype.startswith(rr.SAMPLES_CONTENT_TYPE):
        resp = rr.ReadResponse()
        resp.ParseFromString(rr.snappy_decode(body, limit=1 << 31))
        return {i: sorted((tuple(sorted((lb.name, lb.value) for lb in ts.labels)),
                           tuple((s.timestamp, s.value) for s in ts.samples)) for ts in r.timeseries)
                for i, r in enumerate(resp.results) if len(r.timeseries)}
    by_query: dict[int, list[tuple[Any, ...]]] = {}
    for raw in rr.read_frames(body):
        msg = rr.ChunkedReadResponse()
        msg.ParseFromString(raw)
        for cs in msg.chunked_series:
            by_query.setdefault(msg.query_index, []).append((
                tuple(sorted((lb.name, lb.value) for lb in cs.labels)),
                tuple((c.min_time_ms, c.max_time_ms, c.type, c.data) for c in cs.chunks)))
    return {i: sorted(rows) for i, rows in by_query.items()}


@pytest.mark.parametrize("key", MULTI)
@pytest.mark.parametrize("types", [(rr.SAMPLES,), (rr.STREAMED_XOR_CHUNKS,), (rr.STREAMED_XOR_CHUNKS, rr.SAMPLES)],
                         ids=["samples", "streamed", "either"])
def test_remote_read_fans_out(servers: dict[str, PrometheusProcess], key: str, types: tuple[int, ...]) -> None:
    pols = POLICY_SETS[key]
    rng = random.Random(f"{key}{types}")
    nonempty = 0
    for _ in range(8):
        queries = rng.sample(READ_MATCHERS, rng.choice([1, 2, 3]))
        lo = rng.choice([START, START + 1800])
        body = _read_body(queries, types, lo, rng.choice([lo + 600, END]))
        p = plan_remote_read(body, pols)
        assert p is not None and len(p.legs) > 1
        want_type, want_body = servers[key].remote_read(body)
        answers = [servers["__full__"].remote_read(leg.body or b"") for leg in p.legs]
        ctypes = {c for c, _ in answers}
        assert len(ctypes) == 1, ctypes
        ctype = ctypes.pop()
        if ctype.startswith(rr.SAMPLES_CONTENT_TYPE):
            assert rr.SAMPLES in types  # samples whenever the client takes them
            merged = rr.merge_samples([b for _, b in answers])
        else:
            assert types == (rr.STREAMED_XOR_CHUNKS,)
            merged = rr.merge_streamed([b for _, b in answers])
        got = _decoded(ctype, merged)
        want = _decoded(want_type, want_body)
        for rows in got.values():
            for row in rows:
                assert visible(dict(row[0]), pols), f"LEAK {row[0]}"
        if want_type.split(";")[0] != ctype.split(";")[0]:
            # the client also accepts samples: compare series sets (chunks and samples differ in shape)
            assert {i: [r[0] for r in rows] for i, rows in got.items()} == {
                i: [r[0] for r in rows] for i, rows in want.items()}, queries
        else:
            assert got == want, queries
        nonempty += bool(want)
    assert nonempty > 0


def test_report(capsys: pytest.CaptureFixture[str]) -> None:
    """Print the counts (run with -s, or see the captured output in the report)."""
    if not STATS:
        pytest.skip("differential tests did not run")
    total = {
        k: sum(s[k] for s in STATS.values())
        for k in ("examples", "compared", "nonempty", "both_error", "original_error", "refused")
    }
    with capsys.disabled():
        print("\nPromQL differential:", total)
        for key, s in STATS.items():
            print(f"  {key:10s} {s}")
    assert total["refused"] * 10 <= total["examples"]
