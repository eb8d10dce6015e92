"""LogQL metric queries under several label policies, enforce mode: the gateway's answer equals the
answer of a tenant holding only the visible streams.

The upstream is tests/fake_loki.py with tests/fake_loki_metrics.py, which evaluate range and vector
aggregations as Loki does. Lines are logfmt and some carry ``env=...`` although their stream has no
``env`` label: Loki's parser then supplies a label of a policy's name, the case where the union
rewrite (``... or ...``) would count two streams as one series. The gateway sends sums over streams
as inclusion-exclusion legs and ``absent_over_time`` as one leg per selector; the union rewrite
keeps the queries without parsers.
"""

from __future__ import annotations

import math
import random
from collections.abc import AsyncIterator
from typing import Any

import pytest

from gateway.lbac.fanout import Merge, plan
from gateway.lbac.metric_fanout import absent_labels, has_parser, shape
from gateway.policy.selector import Selector, parse_selector
from gateway.proxy.metric_merge import go_float
from gateway.routes import Kind
from tests.fake_loki import FakeLoki, Stream, enforce_gateway, stack_realm
from tests.test_proxy import Env, basic, expect_refusal

BASE = 1_700_000_000 * 10**9
SEC = 10**9
T0 = BASE // SEC

SETS: dict[str, tuple[str, ...]] = {
    "issue": ('{env="dev"}', '{team="a", env!="prod"}'),  # overlap: 3 legs for a sum
    "two_labels": ('{app="a"}', '{team="b"}'),  # overlap: 3 legs
    "three_overlapping": ('{app="a"}', '{team="b"}', '{env="dev"}'),  # 7 legs
    "disjoint": ('{env="dev", app="a"}', '{env="prod"}', '{env="", team="b"}'),  # 3 legs, no intersections
    "single": ('{team="a", env!="prod"}',),  # one rewrite; absent_over_time labelled from the client's selector
}


def make_streams() -> list[Stream]:
    rng = random.Random(1717)
    out = []
    k = 0
    for app in ("a", "b"):
        for env in ("dev", "prod", None):
            for team in ("a", "b", None):
                labels = {"app": app, **({"env": env} if env else {}), **({"team": team} if team else {})}
                k += 1
                entries = []
                for i, t in enumerate(sorted(rng.sample(range(0, 600), 16))):
                    parsed_env = f" env={rng.choice(['dev', 'prod'])}" if env is None and rng.random() < 0.6 else ""
                    line = (f"level={rng.choice(['info', 'error'])} n={rng.randint(1, 9)} "
                            f"user={rng.randint(1, 3)}{parsed_env} i={i}")
                    entries.append((BASE + t * SEC + k, line))  # unique timestamps: no sample is deduplicated
                out.append(Stream(labels, tuple(entries)))
    return out


STREAMS = make_streams()


def policies(name: str) -> tuple[Selector, ...]:
    return tuple(parse_selector(s) for s in SETS[name])


def visible_only(name: str) -> FakeLoki:
    return FakeLoki(STREAMS, now_ns=BASE + 700 * SEC).visible_only(policies(name))


SHAPES = [
    'sum by (level) (sum_over_time({S} | logfmt | unwrap n [R]))',
    'sum by (level) (count_over_time({S} | logfmt [R]))',  # union would be valid, but a parser supplies env
    'count_over_time({S} | drop env [R])',  # drop of a policy label
    'rate({S} |= "error" | drop team, env [R])',
    'sum(bytes_over_time({S} | logfmt | drop env [R]))',
    'sum without (n, user, i) (count_over_time({S} | logfmt [R]))',
    'sum by (env) (rate({S} | logfmt | unwrap n [R]))',
    'count_over_time({S} [R])',  # no parser: the union rewrite, one request
    'sum by (app) (rate({S} != "info" [R]))',
    'absent_over_time({S} [R])',
    'absent_over_time({S} |= "level=error n=9 user=3" [R])',
    'max_over_time({S} | logfmt | unwrap n [R]) by (level)',  # grouping drops the policy labels
    'max by (app) (max_over_time({S} | logfmt | drop env | unwrap n [R]))',
    'min_over_time({S} | logfmt | unwrap n [R]) by (env)',
]
SELECTORS = ['{app="a"}', '{app=~"a|b"}', '{app="b", env=~"dev|prod"}', '{app=~".+", team!="b"}', '{app="nope"}']


def generated(seed: int, n: int) -> list[tuple[str, dict[str, str]]]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        query = SHAPES[i % len(SHAPES)].replace("{S}", rng.choice(SELECTORS)).replace(
            "[R]", f"[{rng.choice(['20s', '1m', '5m'])}]")
        if rng.random() < 0.25:
            out.append(("/loki/api/v1/query", {"query": query, "time": str(T0 + rng.choice([60, 300, 599, 650]))}))
            continue
        lo = rng.choice([0, 30, 120])
        out.append(("/loki/api/v1/query_range", {"query": query, "start": str(T0 + lo),
                                                 "end": str(T0 + lo + rng.choice([300, 600])),
                                                 "step": rng.choice(["15", "60", "1m"])}))
    return out


def same(got: dict[str, Any], want: dict[str, Any]) -> None:
    """Same result type, series, timestamps; values equal up to float rounding of the sums."""
    g, w = got["data"], want["data"]
    assert g["resultType"] == w["resultType"]
    assert [s["metric"] for s in g["result"]] == [s["metric"] for s in w["result"]]
    for gs, ws in zip(g["result"], w["result"], strict=True):
        gp = gs["values"] if "values" in gs else [gs["value"]]
        wp = ws["values"] if "values" in ws else [ws["value"]]
        assert [p[0] for p in gp] == [p[0] for p in wp], gs["metric"]
        for (_, gv), (_, wv) in zip(gp, wp, strict=True):
            assert math.isclose(float(gv), float(wv), rel_tol=1e-9, abs_tol=1e-12), (gs["metric"], gv, wv)


@pytest.fixture
async def loki(aiohttp_server: Any) -> AsyncIterator[tuple[FakeLoki, str]]:
    fake = FakeLoki(STREAMS, now_ns=BASE + 700 * SEC)
    server = await aiohttp_server(fake.app())
    yield fake, f"http://127.0.0.1:{server.port}"


@pytest.fixture
async def env(db_dsn: str, aiohttp_client: Any, aiohttp_server: Any, loki: tuple[FakeLoki, str]
              ) -> AsyncIterator[Env]:
    async with enforce_gateway(db_dsn, aiohttp_client, aiohttp_server, loki[1]) as e:
        yield e


async def auth(env: Env, name: str) -> dict[str, str]:
    return basic("100", await env.token(["logs:read"], stack_realm(SETS[name])))


@pytest.mark.parametrize("name", list(SETS))
async def test_metric_queries_equal_the_visible_only_tenant(env: Env, loki: tuple[FakeLoki, str], name: str) -> None:
    fake = loki[0]
    h = await auth(env, name)
    truth = visible_only(name)
    nonempty = fanned = 0
    for i, (path, params) in enumerate(generated(sum(map(ord, name)), 84)):
        n = len(fake.seen)
        if i % 2:
            r = await env.gw.client.get(path, params=params, headers=h)
        else:
            r = await env.gw.client.post(path, data=params, headers=h)
        assert r.status == 200, (params, await r.text())
        got = await r.json()
        want = truth.metric(params, instant=path.endswith("/query"))
        same(got, want)
        nonempty += bool(want["data"]["result"])
        legs = len(fake.seen) - n
        fanned += legs > 1
        if "absent_over_time" in params["query"]:
            assert legs == len(SETS[name])
    assert nonempty >= 40  # the comparison is not vacuous
    assert fanned >= (0 if name == "single" else 30)


async def test_sums_cost_one_leg_per_signed_intersection(env: Env, loki: tuple[FakeLoki, str]) -> None:
    fake = loki[0]
    params = {"query": 'sum by (level) (sum_over_time({app=~".+"} | logfmt | unwrap n [1m]))',
              "start": str(T0), "end": str(T0 + 600), "step": "60"}
    for name, legs in (("issue", 3), ("three_overlapping", 7), ("disjoint", 3)):
        n = len(fake.seen)
        r = await env.gw.client.get("/loki/api/v1/query_range", params=params, headers=await auth(env, name))
        assert r.status == 200, await r.text()
        assert len(fake.seen) - n == legs, name
        same(await r.json(), visible_only(name).metric(params, instant=False))


async def test_what_is_not_a_sum_stays_refused(env: Env) -> None:
    h = await auth(env, "issue")
    for query in ('avg_over_time({app="a"} | logfmt | unwrap n [1m]) by (level)',
                  'max(count_over_time({app="a"} | drop env [1m]))',
                  'sum(absent_over_time({app="a"}[1m]))',
                  'sum(count_over_time({app="a"} | drop env [1m])) / sum(count_over_time({app="b"} | drop env [1m]))'):
        r = await env.gw.client.get("/loki/api/v1/query_range", headers=h,
                                    params={"query": query, "start": str(T0), "end": str(T0 + 600), "step": "60"})
        await expect_refusal(r, 400, "label")
    # five overlapping selectors would take 31 requests: refused, saying why
    tok = await env.token(["logs:read"], stack_realm(tuple(f'{{l{i}="x"}}' for i in range(5))))
    r = await env.gw.client.get("/loki/api/v1/query", headers=basic("100", tok),
                                params={"query": 'count_over_time({app="a"} | drop l0 [1m])', "time": str(T0 + 60)})
    await expect_refusal(r, 400, "overlap")


# --------------------------------------------------------------------------- pure parts


TWO = (parse_selector('{env="dev"}'), parse_selector('{team="a", env!="prod"}'))


def test_shapes() -> None:
    assert shape('sum by (x) (sum(rate({a="b"} | drop env [5m])))').kind == "additive"  # type: ignore[union-attr]
    assert shape('(count_over_time({a="b"}[5m]))').kind == "additive"  # type: ignore[union-attr]
    assert shape('absent_over_time({a="b"} |= "x" [5m])').kind == "absent"  # type: ignore[union-attr]
    for q in ('sum(absent_over_time({a="b"}[5m]))', 'avg(count_over_time({a="b"}[5m]))',
              'rate_counter({a="b"} | unwrap n [5m])', 'count_over_time({a="b"}[5m]) * 2',
              'sum(count_over_time({a="b"}[5m])) + sum(count_over_time({a="c"}[5m]))', 'topk(3, rate({a="b"}[1m]))'):
        assert shape(q) is None, q
    assert shape('max by (x) (max_over_time({a="b"} | unwrap n [5m]) by (x, y))').kind == "max"  # type: ignore[union-attr]
    assert shape('min_over_time({a="b"} | unwrap n [5m]) by (x)').kind == "min"  # type: ignore[union-attr]
    assert shape('min(max_over_time({a="b"} | unwrap n [5m]))') is None
    assert shape('sum(max_over_time({a="b"} | unwrap n [5m]))') is None
    assert has_parser('rate({a="b"} | json [1m])') and not has_parser('rate({a="b"} |= "| json" [1m])')


def test_plans() -> None:
    def p(query: str) -> Any:
        return plan(Kind.LOGQL, "/loki/api/v1/query_range", "GET", f"query={query}", None, TWO)
    absent = p('absent_over_time({app="a", env="x"}[5m])')
    assert absent.merge is Merge.ABSENT and len(absent.legs) == 2 and dict(absent.labels) == {"app": "a", "env": "x"}
    summed = p('sum by (level) (sum_over_time({app="a"} | drop env | unwrap n [5m]))')
    assert summed.merge is Merge.SIGNED and summed.counts.signs == (1, 1, -1)
    assert p('count_over_time({app="a"}[5m])') is None  # the union rewrite: one request
    assert p('count_over_time({app="a"} | logfmt [5m])').merge is Merge.SIGNED  # a parser may supply env


def test_absent_labels_as_loki() -> None:
    def labels(text: str) -> dict[str, str]:
        return absent_labels(parse_selector(text).matchers)
    assert labels('{app="a", env="dev"}') == {"app": "a", "env": "dev"}
    assert labels('{app="a", env=~"dev|x"}') == {"app": "a"}
    assert labels('{app="a", app!="b", env="x"}') == {"env": "x"}
    assert labels('{app="a", app="a"}') == {}


def test_go_float() -> None:
    cases = {3.0: "3", 0.1: "0.1", 1e-05: "0.00001", 1e16: "10000000000000000", 0.016666666666666666:
             "0.016666666666666666", -0.0: "-0", 2.5e-7: "0.00000025", float("inf"): "+Inf", float("-inf"): "-Inf"}
    for v, text in cases.items():
        assert go_float(v) == text, v
    assert go_float(float("nan")) == "NaN"
