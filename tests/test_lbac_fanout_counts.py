"""Loki's counting endpoints under several, overlapping label policies, enforce mode: the gateway's
answer equals the answer of a tenant holding only the visible streams.

``index/stats``, ``index/volume`` and ``index/volume_range`` go out as one leg per
inclusion-exclusion term (``gateway.lbac.overlap``) and come back summed with signs
(``gateway.lbac.counts``). The upstream is tests/fake_loki.py, which computes them as Loki does
(grouping by the query's matcher names or ``targetLabels``, Loki's ``t=~".+"`` for targets, top
``limit`` per bucket, Loki's ordering and shapes); the truth is a fake Loki holding only the
visible streams. ``patterns`` under several selectors is refused, and a test below shows why.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from typing import Any

import pytest

from gateway.lbac import counts
from gateway.lbac.fanout import disjoint
from gateway.lbac.logql import simplify
from gateway.lbac.overlap import MAX_TERMS, signed_intersections
from gateway.policy.selector import Selector, parse_selector
from tests.fake_loki import FakeLoki, enforce_gateway, stack_realm
from tests.test_lbac_fanout import BASE, SEC, STREAMS
from tests.test_proxy import Env, basic, expect_refusal

SETS: dict[str, tuple[str, ...]] = {
    "issue": ('{env="dev"}', '{team="a", env!="prod"}'),  # the example; the two overlap
    "two_labels": ('{app="a"}', '{team="b"}'),
    "three_overlapping": ('{env="dev"}', '{team="a"}', '{app="b"}'),  # 7 terms
    "mixed": ('{env="prod", team="a"}', '{env="dev", team!="a"}', '{app=~"b|c", env=""}'),
    "disjoint": ('{env="dev", app="a"}', '{env="prod"}', '{env="stage", team="b"}'),
}
NOW = BASE + 700 * SEC


def policies(name: str) -> tuple[Selector, ...]:
    return tuple(parse_selector(s) for s in SETS[name])


def terms(name: str) -> int:
    return len(signed_intersections(simplify(policies(name)), disjoint))


def visible_only(selectors: tuple[str, ...]) -> FakeLoki:
    return FakeLoki(STREAMS, now_ns=NOW).visible_only(tuple(parse_selector(s) for s in selectors))


@pytest.fixture
async def loki(aiohttp_server: Any) -> AsyncIterator[tuple[FakeLoki, str]]:
    fake = FakeLoki(STREAMS, now_ns=NOW)
    server = await aiohttp_server(fake.app())
    yield fake, f"http://127.0.0.1:{server.port}"


@pytest.fixture
async def env(db_dsn: str, aiohttp_client: Any, aiohttp_server: Any, loki: tuple[FakeLoki, str]
              ) -> AsyncIterator[Env]:
    async with enforce_gateway(db_dsn, aiohttp_client, aiohttp_server, loki[1]) as e:
        yield e


async def auth(env: Env, selectors: tuple[str, ...]) -> dict[str, str]:
    return basic("100", await env.token(["logs:read"], stack_realm(selectors)))


SELECTORS = ['{app="a"}', '{app=~".+"}', '{env!="prod", app=~".+"}', '{team="b"}', '{app=~"a|b", env=~"dev|stage"}',
             '{app=~".+", team!~"a"}', '{app="nope"}', '{env="dev", app=~".+", team=~"a|b"}']
TARGETS = [None, None, "env", "team,app", "env,team", "zone"]


def volume_params(rng: random.Random, ranged: bool) -> dict[str, str]:
    p = {"query": rng.choice(SELECTORS)}
    for key, choices in (("targetLabels", TARGETS), ("aggregateBy", [None, None, "series", "labels"]),
                         ("limit", [None, "1", "2", "5", "0", "1000"])):
        v = rng.choice(choices)
        if v is not None:
            p[key] = v
    lo = rng.choice([0, 100, 250])
    p["start"] = str(BASE + lo * SEC)
    p["end"] = str(BASE + (lo + rng.choice([60, 300, 600])) * SEC)
    if ranged and (step := rng.choice(["60", "120", "5m", None])):
        p["step"] = step
    return p


def _answer(doc: Any) -> Any:
    return doc["status"], doc["data"]["resultType"], doc["data"]["result"]


@pytest.mark.parametrize("name", list(SETS))
async def test_volumes_equal_the_visible_only_tenant(env: Env, loki: tuple[FakeLoki, str], name: str) -> None:
    fake, h, truth = loki[0], await auth(env, SETS[name]), visible_only(SETS[name])
    rng = random.Random(f"volume-{name}")
    nonempty = matrices = 0
    for i in range(40):
        ranged = i % 2 == 1
        path = "/loki/api/v1/index/volume_range" if ranged else "/loki/api/v1/index/volume"
        params = volume_params(rng, ranged)
        n = len(fake.seen)
        r = await (env.gw.client.get(path, params=params, headers=h) if i % 3 else
                   env.gw.client.post(path, data=params, headers=h))
        assert r.status == 200, (params, await r.text())
        got, want = await r.json(), truth.volume(params, ranged)
        assert _answer(got) == _answer(want), params
        assert "stats" in got["data"]  # the legs' query statistics, folded
        nonempty += bool(want["data"]["result"])
        matrices += want["data"]["resultType"] == "matrix"
        legs = [dict(pairs) for _, pairs in fake.seen[n:]]
        assert len(legs) == terms(name)
        for leg in legs:  # each leg groups as the original query, and asks for enough to be complete
            assert leg["limit"] == "1000"
            if "targetLabels" in params:
                assert leg["targetLabels"] == params["targetLabels"]
            elif params.get("aggregateBy") != "labels":
                assert leg["targetLabels"] == ",".join(dict.fromkeys(
                    m.name for m in parse_selector(params["query"]).matchers))
    assert nonempty >= 25 and matrices >= 5  # the comparison is not vacuous


@pytest.mark.parametrize("name", list(SETS))
async def test_index_stats_equal_the_visible_only_tenant(env: Env, loki: tuple[FakeLoki, str], name: str) -> None:
    fake, h, truth = loki[0], await auth(env, SETS[name]), visible_only(SETS[name])
    for query in [*SELECTORS, '{app=~".+"} |= "error"']:
        for lo, hi in ((0, 700), (100, 160), (250, 550)):
            p = {"query": query, "start": str(BASE + lo * SEC), "end": str(BASE + hi * SEC)}
            n = len(fake.seen)
            r = await env.gw.client.get("/loki/api/v1/index/stats", params=p, headers=h)
            assert r.status == 200, (p, await r.text())
            got = await r.json()
            assert got == truth.index_stats(p), p
            assert list(got) == ["streams", "chunks", "bytes", "entries"]  # Loki's key order
            assert len(fake.seen) - n == terms(name)
    p = {"query": '{app=~".+"}', "start": str(BASE), "end": str(NOW)}
    assert truth.index_stats(p)["streams"] > 0


@pytest.mark.parametrize("selectors", [('{env!="prod"}',), ('{env="dev"}', '{env="prod"}')])
async def test_one_selector_or_a_union_groups_volumes_as_the_original_query(
        env: Env, loki: tuple[FakeLoki, str], selectors: tuple[str, ...]) -> None:
    fake, h, truth = loki[0], await auth(env, selectors), visible_only(selectors)
    for params in ({"query": '{app=~".+"}'}, {"query": '{team="b"}', "targetLabels": "env"},
                   {"query": '{app="a", team=~".+"}', "aggregateBy": "labels"}):
        p = {**params, "start": str(BASE), "end": str(NOW)}
        n = len(fake.seen)
        r = await env.gw.client.get("/loki/api/v1/index/volume", params=p, headers=h)
        assert r.status == 200, await r.text()
        assert _answer(await r.json()) == _answer(truth.volume(p, False)), p
        assert len(fake.seen) == n + 1
        leg = dict(fake.seen[-1][1])
        assert "limit" not in leg  # one leg: nothing to merge, so nothing asked beyond the client's limit
    # the grouping is the query's: {app} only, although the rewritten query also names env
    got = (await (await env.gw.client.get("/loki/api/v1/index/volume", headers=h, params={
        "query": '{app=~".+"}', "start": str(BASE), "end": str(NOW)})).json())["data"]["result"]
    assert sorted(tuple(x["metric"]) for x in got) == [("app",)] * 3


async def test_a_leg_that_may_have_been_cut_is_refused(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(counts, "VOLUME_LEG_LIMIT", 3)
    h = await auth(env, SETS["issue"])
    p = {"query": '{app=~".+"}', "targetLabels": "app,env,team", "start": str(BASE), "end": str(NOW)}
    r = await env.gw.client.get("/loki/api/v1/index/volume", params={**p, "limit": "2"}, headers=h)
    await expect_refusal(r, 400, "may have been cut")
    r = await env.gw.client.get("/loki/api/v1/index/volume", params={**p, "limit": "40"}, headers=h)
    assert r.status == 200  # each leg asked for 40: complete
    assert _answer(await r.json()) == _answer(visible_only(SETS["issue"]).volume({**p, "limit": "40"}, False))


async def test_loki_errors_are_passed_on_and_too_many_terms_refused(env: Env) -> None:
    h = await auth(env, SETS["issue"])
    base = {"query": '{app="a"}', "start": str(BASE), "end": str(NOW)}
    r = await env.gw.client.get("/loki/api/v1/index/volume", params={**base, "limit": "-1"}, headers=h)
    assert r.status == 400 and "limit must be a positive value" in await r.text()
    r = await env.gw.client.get("/loki/api/v1/index/volume_range", params={**base, "aggregateBy": "x"}, headers=h)
    assert r.status == 400 and "invalid aggregation option" in await r.text()
    r = await env.gw.client.get("/loki/api/v1/index/volume", params={**base, "query": '{app="a"} |= "x"'}, headers=h)
    assert r.status == 400  # a volume query is a plain selector: Loki's own refusal, through today's rewrite
    many = await auth(env, tuple(f'{{app=~".+", l{i}!="x"}}' for i in range(5)))  # 31 overlapping terms
    for path in ("/loki/api/v1/index/volume", "/loki/api/v1/index/stats"):
        r = await env.gw.client.get(path, params=base, headers=many)
        await expect_refusal(r, 400, f"more than {MAX_TERMS} upstream requests")


# --------------------------------------------------------------------------- patterns


def _summed(answers: list[Any]) -> dict[tuple[str, str], dict[int, int]]:
    out: dict[tuple[str, str], dict[int, int]] = {}
    for a in answers:
        for row in a["data"]:
            samples = out.setdefault((row["pattern"], row["level"]), {})
            for t, v in row["samples"]:
                samples[t] = samples.get(t, 0) + v
    return out


def test_patterns_cannot_be_summed_over_selectors_even_disjoint_ones() -> None:
    """Loki prunes each request's patterns (under 30 seen: dropped), so the per-selector answers
    miss patterns that the visible-only tenant's answer has: the reason the gateway refuses."""
    p = {"query": '{app=~".+"}', "start": str(BASE), "end": str(NOW), "step": "600"}
    differ = 0
    for name in ("disjoint", "issue"):
        pols = policies(name)
        terms_ = signed_intersections(simplify(pols), disjoint)
        legs = [FakeLoki([s for s in STREAMS if t.selector.matches(s.labels)], now_ns=NOW).patterns(p) for t in terms_]
        assert all(t.sign == 1 for t in terms_) or name != "disjoint"
        pos = _summed([leg for leg, t in zip(legs, terms_, strict=True) if t.sign > 0])
        neg = _summed([leg for leg, t in zip(legs, terms_, strict=True) if t.sign < 0])
        signed = {k: {ts: v - neg.get(k, {}).get(ts, 0) for ts, v in s.items()} for k, s in pos.items()}
        truth = {(r["pattern"], r["level"]): dict(map(tuple, r["samples"])) for r in
                 visible_only(SETS[name]).patterns(p)["data"]}
        assert truth  # the visible-only tenant does see patterns
        differ += signed != truth
    assert differ == 2


async def test_patterns_under_several_selectors_are_refused(env: Env, loki: tuple[FakeLoki, str]) -> None:
    p = {"query": '{app=~".+"}', "start": str(BASE), "end": str(NOW), "step": "600"}
    for name in ("disjoint", "issue"):
        r = await env.gw.client.get("/loki/api/v1/patterns", params=p, headers=await auth(env, SETS[name]))
        await expect_refusal(r, 400, "patterns cannot be restricted by several label policies")
    one = ('{env!="prod"}',)
    r = await env.gw.client.get("/loki/api/v1/patterns", params=p, headers=await auth(env, one))
    assert r.status == 200 and await r.json() == visible_only(one).patterns(p)
    assert (await r.json())["data"]
    assert dict(loki[0].seen[-1][1])["query"] == '{app=~".+", env!="prod"}'  # today's single rewrite


def test_signed_merges_refuse_what_they_do_not_understand() -> None:
    vec = {"status": "success", "data": {"resultType": "vector", "result": [
        {"metric": {"app": "a"}, "value": [1700000000.5, "10"]}]}}
    more = {"status": "success", "data": {"resultType": "vector", "result": [
        {"metric": {"app": "a"}, "value": [1700000000.5, "25"]}]}}
    out, stats = counts.merge_volumes([more, vec], counts.Counts((1, -1), 100, 1000))
    assert out["data"] == {"resultType": "vector", "result": [{"metric": {"app": "a"},
                                                               "value": [1700000000.5, "15"]}]} and stats == []
    for docs, c in (([vec, more], counts.Counts((1, -1), 100, 1000)),  # a negative volume
                    ([{"status": "success", "data": {"resultType": "streams", "result": []}}], counts.Counts((1,))),
                    ([{"status": "error"}], counts.Counts((1,))),
                    ([{"status": "success", "data": {"resultType": "vector", "result": [
                        {"metric": {"a": "", "b": ""}, "value": [1, "1"]}]}}], counts.Counts((1,), by_labels=True)),
                    ([{"status": "success", "data": {"resultType": "vector", "result": [
                        {"metric": {"a": "x"}, "value": [1, "1.5"]}]}}], counts.Counts((1,)))):
        with pytest.raises(counts.Unmergeable):
            counts.merge_volumes(docs, c)
    with pytest.raises(counts.Unmergeable):
        counts.merge_index_stats([{"streams": 1}, {"streams": 2}], (1, -1))
    assert counts.merge_index_stats([{"streams": 3, "bytes": 9}, {"streams": 1, "bytes": 4}], (1, -1)) == {
        "streams": 2, "bytes": 5}
