"""Several label policies, enforce mode: the gateway's merged answer equals the answer of a tenant
holding only the visible streams (same streams, same entries, same order, nothing outside the policy).

The upstream is tests/fake_loki.py, which evaluates stream selectors and line filters the way Loki
does. For each policy set, generated queries go through the gateway (which fans them out to one
restricted query per selector and merges the answers) and, as ground truth, straight to a fake Loki
loaded with only the streams the policy set makes visible.
"""

from __future__ import annotations

import json
import random
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web

from gateway.lbac import restrict as lbac
from gateway.lbac.fanout import MAX_FANOUT, _pieces, disjoint
from gateway.lbac.logql import simplify
from gateway.policy.selector import Selector, parse_selector
from gateway.routes import Kind
from tests.fake_loki import FakeLoki, Stream, label_string, parse_log_query
from tests.test_proxy import Env, _env, basic, expect_refusal

BASE = 1_700_000_000 * 10**9
SEC = 10**9

SETS: dict[str, tuple[str, ...]] = {
    "issue": ('{env="dev"}', '{team="a", env!="prod"}'),  # the example; the two overlap
    "two_labels": ('{app="a"}', '{team="b"}'),
    "three": ('{env="prod", team="a"}', '{env="dev", team!="a"}', '{app=~"b|c", env=""}'),
    "disjoint": ('{env="dev", app="a"}', '{env="prod"}', '{env="stage", team="b"}'),
}


def make_streams() -> list[Stream]:
    rng = random.Random(1313)
    out = []
    for app in ("a", "b", "c"):
        for env in ("dev", "prod", "stage", None):
            for team in ("a", "b", None):
                labels = {"app": app, **({"env": env} if env else {}), **({"team": team} if team else {})}
                times = sorted(rng.sample(range(0, 600), 14))  # shared seconds across streams: ties
                entries = tuple((BASE + t * SEC, f"{rng.choice(['info', 'error', 'debug'])} user={rng.randint(1, 5)} "
                                 f"path=/{rng.choice(['x', 'y', 'z'])} n={i}") for i, t in enumerate(times))
                out.append(Stream(labels, entries))
    return out


STREAMS = make_streams()


def policies(name: str) -> tuple[Selector, ...]:
    return tuple(parse_selector(s) for s in SETS[name])


def visible_only(name: str) -> FakeLoki:
    return FakeLoki(STREAMS, now_ns=BASE + 700 * SEC).visible_only(policies(name))


SELECTORS = ['{app="a"}', '{app=~"a|b"}', '{app=~".+"}', '{env!="prod", app=~".+"}', '{team="b"}',
             '{app="c", env=~"dev|stage"}', '{app=~".+", team!~"a"}', '{app="nope"}']
FILTERS = ["", ' |= "error"', ' != "debug"', ' |~ "user=(1|2)"', ' |= "path=/x" !~ "n=1[0-9]"', ' |= `user=3`']


def generated(seed: int, n: int) -> list[dict[str, str]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        p = {"query": rng.choice(SELECTORS) + rng.choice(FILTERS), "limit": str(rng.choice([1, 2, 3, 7, 20, 1000]))}
        d = rng.choice(["forward", "backward", "BACKWARD", None])
        if d:
            p["direction"] = d
        lo = rng.choice([0, 100, 250])
        p["start"] = str(BASE + lo * SEC)
        p["end"] = rng.choice([str(BASE + (lo + rng.choice([60, 300, 600])) * SEC), f"{(BASE // SEC) + 700}.5"])
        out.append(p)
    return out


@pytest.fixture
async def loki(aiohttp_server: Any) -> AsyncIterator[tuple[FakeLoki, str]]:
    fake = FakeLoki(STREAMS, now_ns=BASE + 700 * SEC)
    server = await aiohttp_server(fake.app())
    yield fake, f"http://127.0.0.1:{server.port}"


@pytest.fixture
async def env(db_dsn: str, aiohttp_client: Any, aiohttp_server: Any, loki: tuple[FakeLoki, str]
              ) -> AsyncIterator[Env]:
    url = loki[1]
    ups = {"metrics": {"url": url, "lbac": "enforce"}, "logs": {"url": url, "lbac": "enforce"},
           "traces": {"url": url, "write_url": url}}
    async with _env(db_dsn, aiohttp_client, aiohttp_server, lbac="enforce", upstreams=ups) as e:
        yield e


async def auth(env: Env, name: str) -> dict[str, str]:
    tok = await env.token(["logs:read"], [{"type": "stack", "identifier": "100",
                                           "labelPolicies": [{"selector": s} for s in SETS[name]]}])
    return basic("100", tok)


def assert_visible(result: list[dict[str, Any]], name: str) -> None:
    pols = policies(name)
    for s in result:
        assert any(p.matches(s["stream"]) for p in pols), f"LEAK {s['stream']} under {name}"


@pytest.mark.parametrize("name", list(SETS))
async def test_log_queries_equal_the_visible_only_tenant(env: Env, loki: tuple[FakeLoki, str], name: str) -> None:
    fake = loki[0]
    h = await auth(env, name)
    truth = visible_only(name)
    legs_per_query = len(_pieces(simplify(policies(name))))  # one per disjoint piece of the policies
    assert legs_per_query > 1
    nonempty = 0
    for i, params in enumerate(generated(hash(name) % 1000, 60)):
        n = len(fake.seen)
        if i % 3:
            r = await env.gw.client.get("/loki/api/v1/query_range", params=params, headers=h)
        else:
            r = await env.gw.client.post("/loki/api/v1/query_range", data=params, headers=h)
        assert r.status == 200, (params, await r.text())
        got = await r.json()
        want = truth.query_range(params)
        assert got["data"]["result"] == want["data"]["result"], params
        assert got["data"]["resultType"] == "streams"
        assert_visible(got["data"]["result"], name)
        # one upstream request per selector, each with the client's limit, direction, start and end
        legs = fake.seen[n:]
        assert len(legs) == legs_per_query
        for _, pairs in legs:
            sent = dict(pairs)
            assert {k: sent.get(k) for k in ("limit", "direction", "start", "end")} == {
                k: params.get(k) for k in ("limit", "direction", "start", "end")}
        # stats: counters summed over the legs
        assert got["data"]["stats"]["summary"]["totalLinesProcessed"] >= want["data"]["stats"]["summary"][
            "totalLinesProcessed"]
        nonempty += bool(want["data"]["result"])
    assert nonempty >= 20  # the comparison is not vacuous


# Label stages that make streams alike (the answer carries the labels after the pipeline).
PIPELINES = [" | keep x", " | drop env, team", ' | label_format env="same", team="same"', ' |= "line" | keep x, app',
             " | label_format team=env | drop env", " | keep app, team"]


def canonical(result: list[dict[str, Any]]) -> list[tuple[str, list[list[Any]]]]:
    """Streams with their entries sorted by (time, line): Loki orders entries of one label set and time by
    the hash of the stream they came from, which the answer does not carry."""
    return [(label_string(s["stream"]), sorted(s["values"], key=lambda v: (int(v[0]), v[1]))) for s in result]


@pytest.mark.parametrize("name", list(SETS))
async def test_log_queries_whose_pipeline_makes_streams_alike(env: Env, name: str) -> None:
    """keep/drop/label_format under every policy set: each visible stream's entries exactly once (a stream
    read by two overlapping legs would be counted twice, or, deduplicated by its labels after the pipeline,
    would take another stream's identical entries with it)."""
    h = await auth(env, name)
    truth = visible_only(name)
    total = 0
    for i, pipeline in enumerate(PIPELINES):
        for selector in ('{app=~".+"}', '{app="a"}', '{team="b"}'):
            params = {"query": selector + pipeline, "limit": "1000", "start": str(BASE),
                      "end": str(BASE + 700 * SEC), "direction": "forward" if i % 2 else "backward"}
            r = await env.gw.client.get("/loki/api/v1/query_range", params=params, headers=h)
            assert r.status == 200, (params, await r.text())
            got, want = (await r.json())["data"]["result"], truth.query_range(params)["data"]["result"]
            assert canonical(got) == canonical(want), params
            total += sum(len(s["values"]) for s in want)
    assert total > 500


TWIN_TIMES = (10, 20, 30, 40, 50)


def twin_streams() -> list[Stream]:
    """Streams alike but for env and team, holding the same lines at the same times (the issue's case)."""
    out = []
    for env_, team in (("dev", None), ("dev", "a"), ("stage", "a"), ("prod", "a"), ("prod", None), (None, "a")):
        labels = {"app": "a", "x": "1", **({"env": env_} if env_ else {}), **({"team": team} if team else {})}
        out.append(Stream(labels, tuple((BASE + t * SEC, f"same line {t}") for t in TWIN_TIMES)))
    return out


@pytest.fixture
async def twins(db_dsn: str, aiohttp_client: Any, aiohttp_server: Any) -> AsyncIterator[tuple[Env, FakeLoki]]:
    fake = FakeLoki(twin_streams(), now_ns=BASE + 700 * SEC)
    url = f"http://127.0.0.1:{(await aiohttp_server(fake.app())).port}"
    ups = {"metrics": {"url": url, "lbac": "enforce"}, "logs": {"url": url, "lbac": "enforce"},
           "traces": {"url": url, "write_url": url}}
    async with _env(db_dsn, aiohttp_client, aiohttp_server, lbac="enforce", upstreams=ups) as e:
        yield e, fake


async def test_identical_lines_of_streams_the_pipeline_makes_alike_are_all_kept(twins: tuple[Env, FakeLoki]
                                                                                ) -> None:
    """The issue's case: `{app="a"} | keep x` under {env="dev"} OR {team="a", env!="prod"} reads four visible
    streams that become {x="1"}, each with the same five lines at the same times: 20 entries, as the
    visible-only tenant answers (Loki deduplicates only within a stream), not 5."""
    env, fake = twins
    h = await auth(env, "issue")
    truth = fake.visible_only(policies("issue"))
    assert len(truth.streams) == 4
    for query in ['{app="a"}' + p for p in PIPELINES] + ['{app="a"}']:
        for limit, direction in (("1000", "backward"), ("7", "forward"), ("3", "backward")):
            params = {"query": query, "limit": limit, "direction": direction, "start": str(BASE),
                      "end": str(BASE + 700 * SEC)}
            r = await env.gw.client.get("/loki/api/v1/query_range", params=params, headers=h)
            assert r.status == 200, (params, await r.text())
            got, want = (await r.json())["data"]["result"], truth.query_range(params)["data"]["result"]
            assert got == want, params  # (identical entries: the order within a time cannot differ)
            assert sum(len(s["values"]) for s in got) == min(int(limit), 20)
    # Live tail: one socket per disjoint piece, every visible entry once.
    query = '{app="a"} | keep x'
    select, keep, relabel = parse_log_query(query)
    want_tail = sorted((label_string(relabel(s.labels)), str(t), line) for s in truth.streams if select(s.labels)
                       for t, line in s.entries if keep(line))
    got_tail: list[tuple[str, str, str]] = []
    async with env.gw.client.ws_connect("/loki/api/v1/tail", params={"query": query}, headers=h) as ws:
        while len(got_tail) < len(want_tail):
            doc = json.loads(await ws.receive_str(timeout=5))
            got_tail += [(label_string(s["stream"]), v[0], v[1]) for s in doc["streams"] for v in s["values"]]
    assert sorted(got_tail) == want_tail and len(want_tail) == 20


@pytest.mark.parametrize("name", list(SETS))
async def test_labels_values_series_and_detected_labels(env: Env, name: str) -> None:
    h = await auth(env, name)
    truth = visible_only(name)
    rng = {"start": str(BASE), "end": str(BASE + 700 * SEC)}
    c = env.gw.client
    for query in (None, '{app="a"}', '{app=~".+", env!="dev"}'):
        p = {**rng, **({"query": query} if query else {})}
        r = await c.get("/loki/api/v1/labels", params=p, headers=h)
        assert r.status == 200 and (await r.json())["data"] == truth.labels(p)["data"], (query, await r.text())
        for label in ("app", "env", "team"):
            r = await c.get(f"/loki/api/v1/label/{label}/values", params=p, headers=h)
            assert r.status == 200 and (await r.json())["data"] == truth.labels(p, label)["data"], (label, query)
        r = await c.get("/loki/api/v1/detected_labels", params=p, headers=h)  # Grafana sends no query at start-up
        assert r.status == 200, await r.text()
        got = (await r.json())["detectedLabels"]
        want = truth.detected_labels(p)["detectedLabels"]
        assert got == want  # from the visible streams' label sets: each value counted once
    for matches in ([], ['{app="a"}'], ['{app="b"}', '{env="stage", app=~".+"}']):
        r = await c.get("/loki/api/v1/series", params=[("match[]", m) for m in matches] + list(rng.items()),
                        headers=h)
        assert r.status == 200
        got = sorted(label_string(x) for x in (await r.json())["data"])
        want = sorted(label_string(x) for x in truth.series(matches or ['{app=~".+"}'], rng)["data"])
        assert got == want, matches


async def test_index_stats_are_summed_with_the_inclusion_exclusion_signs(env: Env) -> None:
    """Disjoint selectors: plain sums; overlapping ones: minus the overlap (tests/test_lbac_fanout_counts.py)."""
    assert all(disjoint(a, b) for a in policies("disjoint") for b in policies("disjoint") if a != b)
    p = {"query": '{app=~".+"}', "start": str(BASE), "end": str(BASE + 700 * SEC)}
    for name in ("disjoint", "issue"):
        r = await env.gw.client.get("/loki/api/v1/index/stats", params=p, headers=await auth(env, name))
        assert r.status == 200 and await r.json() == visible_only(name).index_stats(p)


@pytest.mark.parametrize("name", ["issue", "three"])
async def test_tail_merges_one_socket_per_selector(env: Env, loki: tuple[FakeLoki, str], name: str) -> None:
    query = '{app=~".+"} |= "error"'
    truth = visible_only(name)
    select, keep = __import__("tests.fake_loki", fromlist=["parse_query"]).parse_query(query)
    want = sorted((label_string(s.labels), str(t), line) for s in truth.streams if select(s.labels)
                  for t, line in s.entries if keep(line))
    n = len(loki[0].seen)
    got: list[tuple[str, str, str]] = []
    async with env.gw.client.ws_connect("/loki/api/v1/tail", params={"query": query},
                                        headers=await auth(env, name)) as ws:
        while len(got) < len(want):
            doc = json.loads(await ws.receive_str(timeout=5))
            got += [(label_string(s["stream"]), v[0], v[1]) for s in doc["streams"] for v in s["values"]]
    assert sorted(got) == want  # every visible entry once, nothing else
    assert len(loki[0].seen) - n == len(_pieces(simplify(policies(name))))
    r = await env.gw.client.get("/loki/api/v1/tail", params={"query": query}, headers=await auth(env, name))
    await expect_refusal(r, 400, "needs a WebSocket")


async def test_single_selector_policies_keep_todays_single_rewrite(env: Env, loki: tuple[FakeLoki, str]) -> None:
    tok = await env.token(["logs:read"], [{"type": "stack", "identifier": "100",
                                           "labelPolicies": [{"selector": '{env="dev"}'}]}])
    params = {"query": '{app="a"} |= "error"', "limit": "5", "start": str(BASE), "end": str(BASE + 700 * SEC)}
    n = len(loki[0].seen)
    r = await env.gw.client.get("/loki/api/v1/query_range", params=params, headers=basic("100", tok))
    assert r.status == 200
    today = lbac.enforce(Kind.LOGQL, "GET", "&".join(f"{k}={v}" for k, v in params.items()).replace(" ", "+"),
                         None, (parse_selector('{env="dev"}'),))
    assert len(loki[0].seen) == n + 1
    assert dict(loki[0].seen[-1][1])["query"] == dict(__import__("urllib.parse").parse.parse_qsl(
        today.query or ""))["query"] == '{app="a", env="dev"} |= "error"'


async def test_detected_labels_without_query_get_the_policy_as_query(env: Env, loki: tuple[FakeLoki, str]) -> None:
    tok = await env.token(["logs:read"], [{"type": "stack", "identifier": "100",
                                           "labelPolicies": [{"selector": '{env="dev"}'}]}])
    r = await env.gw.client.get("/loki/api/v1/detected_labels", headers=basic("100", tok))
    assert r.status == 200
    assert dict(loki[0].seen[-1][1]) == {"query": '{env="dev"}'}
    r = await env.gw.client.get("/loki/api/v1/detected_field/level/values", headers=basic("100", tok))
    assert dict(loki[0].seen[-1][1]) == {"query": '{env="dev"}'}  # the fake has no such endpoint: 404 passed on
    assert r.status == 404


async def test_upstream_errors_are_passed_on_and_fan_out_is_bounded(env: Env) -> None:
    h = await auth(env, "issue")
    r = await env.gw.client.get("/loki/api/v1/query_range", params={"query": '{app="a"}', "limit": "-1"}, headers=h)
    assert r.status == 400 and "limit must be a positive value" in await r.text()
    many = [f'{{app="a", l{i}="x"}}' for i in range(MAX_FANOUT + 1)]  # distinct names: nothing merges
    tok = await env.token(["logs:read"], [{"type": "stack", "identifier": "100",
                                           "labelPolicies": [{"selector": s} for s in many]}])
    r = await env.gw.client.get("/loki/api/v1/query_range", params={"query": '{app="a"}'}, headers=basic("100", tok))
    await expect_refusal(r, 400, f"at most {MAX_FANOUT}")


# --------------------------------------------------------------------------- metadata


METRICS = {"up": {"env": "dev"}, "cpu": {"env": "prod", "team": "a"}, "mem": {"env": "stage"},
           "disk": {"team": "b"}}


async def test_metadata_lists_only_visible_metric_names(db_dsn: str, aiohttp_client: Any, aiohttp_server: Any
                                                        ) -> None:
    seen: list[str] = []

    async def names(request: web.Request) -> web.Response:
        seen.append(request.path_qs)
        sels = [parse_selector(m) for m in request.rel_url.query.getall("match[]", [])]
        visible = [n for n, ls in METRICS.items() if not sels or any(s.matches({"__name__": n, **ls}) for s in sels)]
        return web.json_response({"status": "success", "data": sorted(visible)})

    async def metadata(request: web.Request) -> web.Response:
        seen.append(request.path_qs)
        only = request.rel_url.query.get("metric")
        data = {n: [{"type": "gauge", "help": f"{n} help", "unit": ""}] for n in METRICS if only in (None, n)}
        return web.json_response({"status": "success", "data": data})

    app = web.Application()
    app.router.add_get("/prometheus/api/v1/label/__name__/values", names)
    app.router.add_get("/prometheus/api/v1/metadata", metadata)
    server = await aiohttp_server(app)
    url = f"http://127.0.0.1:{server.port}"
    ups = {"metrics": {"url": url, "lbac": "enforce"}, "logs": {"url": url}, "traces": {"url": url, "write_url": url}}
    async with _env(db_dsn, aiohttp_client, aiohttp_server, upstreams=ups) as e:
        tok = await e.token(["metrics:read"], [{"type": "stack", "identifier": "100", "labelPolicies": [
            {"selector": '{env="dev"}'}, {"selector": '{team="a", env!="stage"}'}]}])
        h = basic("100", tok)
        r = await e.gw.client.get("/prometheus/api/v1/metadata", headers=h)
        assert r.status == 200, await r.text()
        assert sorted((await r.json())["data"]) == ["cpu", "up"]
        assert (await r.json())["data"]["up"] == [{"type": "gauge", "help": "up help", "unit": ""}]
        r = await e.gw.client.get("/prometheus/api/v1/metadata", params={"limit": "1"}, headers=h)
        assert list((await r.json())["data"]) == ["cpu"]
        for metric, want in (("up", ["up"]), ("mem", []), ("disk", [])):
            r = await e.gw.client.get("/prometheus/api/v1/metadata", params={"metric": metric}, headers=h)
            assert r.status == 200 and list((await r.json())["data"]) == want, metric
        assert any("match%5B%5D=%7Benv%3D%22dev%22%7D" in s for s in seen)
        await expect_refusal(await e.gw.client.get("/prometheus/api/v1/cardinality/label_names", headers=h), 403,
                             "cannot be filtered")
