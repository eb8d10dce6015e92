"""Tempo reads of a token limited to ``{resource.env="dev"}``, through the real gateway against the fake Tempo.

For every read Grafana's Tempo data source sends (search, metrics query and query_range, v2 tag names and
values, and the v1 forms), what Tempo receives: ``q`` restricted exactly as gateway.lbac.traceql writes it,
every other parameter as sent; what Tempo cannot filter is refused with a JSON error and never reaches it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, quote, urlsplit

import pytest

from tests.fake_tempo import FakeTempo, attrs, resource_spans, span
from tests.test_forward_auth import fa_env
from tests.test_proxy import Env, _env, basic, expect_refusal

DEV = '(resource.env = "dev")'
DEV_TRACE = "0" * 31 + "1"
PROD_TRACE = "0" * 31 + "2"


@dataclass
class World:
    env: Env
    tempo: FakeTempo
    dev: dict[str, str]
    checkout: dict[str, str]
    full: dict[str, str]
    two: dict[str, str]  # {resource.env="dev"} or {resource.service.name="checkout"}


def _trace(n: int, env: str, service: str) -> list[dict[str, Any]]:
    tid = bytes(15) + bytes([n])
    return [resource_spans(attrs(env=env, service__name=service), span(tid, bytes(7) + bytes([n]), f"GET /{env}"))]


async def _world(db_dsn: str, aiohttp_client: Any, aiohttp_server: Any, lbac: str) -> AsyncIterator[World]:
    tempo = FakeTempo({DEV_TRACE: _trace(1, "dev", "checkout"), PROD_TRACE: _trace(2, "prod", "payments")})
    url = str((await aiohttp_server(tempo.app())).make_url("")).rstrip("/")
    async with _env(db_dsn, aiohttp_client, aiohttp_server, upstreams={"traces": {"url": url, "lbac": lbac}}) as e:
        def realm(*selectors: str) -> list[dict[str, Any]]:
            return [{"type": "stack", "identifier": "100", "labelPolicies": [{"selector": s} for s in selectors]}]
        dev = basic("100", await e.token(["traces:read"], realm('{resource.env="dev"}')))
        checkout = basic("100", await e.token(["traces:read"], realm('{resource.service.name="checkout"}')))
        full = basic("100", await e.token(["traces:read"]))
        two = basic("100", await e.token(["traces:read"], realm('{resource.env="dev"}',
                                                                  '{resource.service.name="checkout"}')))
        yield World(e, tempo, dev, checkout, full, two)


@pytest.fixture
async def world(db_dsn: str, aiohttp_client: Any, aiohttp_server: Any) -> AsyncIterator[World]:
    async for w in _world(db_dsn, aiohttp_client, aiohttp_server, "auto"):
        yield w


async def _sent(w: World, path: str, headers: dict[str, str]) -> tuple[dict[str, str], Any]:
    """GET ``path`` through the gateway; the parameters Tempo received and the answer."""
    w.tempo.seen.clear()
    r = await w.env.gw.client.get(path, headers=headers)
    assert r.status == 200, (path, r.status, await r.text())
    assert len(w.tempo.seen) == 1, w.tempo.seen
    _, path_qs, _ = w.tempo.seen[0]
    return dict(parse_qsl(urlsplit(path_qs).query, keep_blank_values=True)), await r.json()


def _url(path: str, **params: str) -> str:
    return path + "?" + "&".join(f"{k}={quote(v, safe='')}" for k, v in params.items())


GRAFANA_READS = [
    # search (Grafana's TraceQL and Search tabs)
    (_url("/api/search", q='{ span.http.method = "GET" } | select(span.http.url)', limit="20", spss="3",
          start="1700000000", end="1700003600"),
     {"q": f'{{ (span.http.method = "GET") && {DEV} }} | select(span.http.url)', "limit": "20", "spss": "3",
      "start": "1700000000", "end": "1700003600"}),
    (_url("/api/search", limit="20"), {"q": f"{{ {DEV} }}", "limit": "20"}),
    # TraceQL metrics: range and instant, `query` as Grafana's older versions send it
    (_url("/api/metrics/query_range", q="{ status = error } | rate() by (resource.service.name)", start="1",
          end="2", step="60s"),
     {"q": f"{{ (status = error) && {DEV} }} | rate() by (resource.service.name)", "start": "1", "end": "2",
      "step": "60s"}),
    (_url("/api/metrics/query", query="{} | count_over_time()"), {"q": f"{{ {DEV} }} | count_over_time()"}),
    # tag names and values, v2 (Grafana's autocomplete)
    (_url("/api/v2/search/tags", scope="span", start="1", end="2"),
     {"scope": "span", "start": "1", "end": "2", "q": f"{{ {DEV} }}"}),
    (_url("/api/v2/search/tag/resource.service.name/values", q='{ span.http.method = "GET" }'),
     {"q": f'{{ span.http.method = "GET" && {DEV} }}'}),
    ("/api/v2/search/tag/resource.k8s.io%2Fname/values", {"q": f"{{ {DEV} }}"}),
]


async def test_tempo_receives_the_restricted_query(world: World) -> None:
    for path, expected in GRAFANA_READS:
        sent, _ = await _sent(world, path, world.dev)
        assert sent == expected, path
    sent, doc = await _sent(world, _url("/api/search", q="{ .a }"), world.full)  # no policy: as sent
    assert sent == {"q": "{ .a }"}
    assert {t["rootServiceName"] for t in doc["traces"]} == {"checkout", "payments"}
    # Grafana's team LBAC for Tempo: the rules arrive as X-Prom-Label-Policy on an unrestricted token
    team = {**world.full, "X-Prom-Label-Policy": "100:" + quote('{resource.env="dev"}', safe="")}
    sent, _ = await _sent(world, _url("/api/search", q="{ .a }"), team)
    assert sent == {"q": f"{{ (.a) && {DEV} }}"}
    # tag values under two selectors: one look-up each, the answers' union
    world.tempo.tag_values["resource.service.name"] = ["checkout", "payments"]
    world.tempo.seen.clear()
    r = await world.env.gw.client.get("/api/v2/search/tag/resource.service.name/values", headers=world.two)
    assert r.status == 200, await r.text()
    assert sorted(dict(parse_qsl(urlsplit(p).query))["q"] for _, p, _ in world.tempo.seen) == [
        '{ (resource.env = "dev") }', '{ (resource.service.name = "checkout") }']
    assert [v["value"] for v in (await r.json())["tagValues"]] == ["checkout", "payments"]
    q = "{ .a = 1 } && " * 100 + "{}"  # long: rewritten in the rewrite pool, alike
    sent, _ = await _sent(world, _url("/api/search", q=q), world.dev)
    assert sent["q"].count(DEV) == 101
    # the search answer: root services the policy does not prove visible are removed (the fake answers every
    # trace whatever q says: the answer filter alone is under test here)
    _, doc = await _sent(world, "/api/search?q=%7B%7D", world.dev)
    assert all("rootServiceName" not in t for t in doc["traces"])
    assert {t["rootTraceName"] for t in doc["traces"]} == {"GET /dev", "GET /prod"}  # intrinsic: kept
    _, doc = await _sent(world, "/api/search?q=%7B%7D", world.checkout)
    assert {t.get("rootServiceName") for t in doc["traces"]} == {"checkout", None}


REFUSALS = [
    ("/api/search/tags", 403, "use the v2 form"),
    ("/api/search/tag/service.name/values", 403, "use the v2 form"),
    ("/api/metrics/summary?q=%7B%7D", 403, "query_range"),
    ("/api/search?tags=service.name%3Dcheckout&minDuration=1s", 400, "search by tags"),
    ("/api/search?q=%7B%20parent.resource.env%20%3D%20%22prod%22%20%7D", 400, "parent. attributes"),
    ("/api/search?q=%7B%20rootServiceName%20%3D%20%22payments%22%20%7D", 400, "rootServiceName"),
    ("/api/search?q=%7B%7D&dc=%5B%5D", 400, "'dc' cannot be used"),
    ("/api/search?q=" + "(" * 80 + "%7B%7D" + ")" * 80, 400, "nests deeper"),
    ("/api/v2/search/tags?q=%7B.a%20%3D%201%20%7C%7C%20.b%20%3D%202%7D", 400, "one spanset filter"),
    ("/api/metrics/query_range?step=5", 400, "needs q"),
    ("/api/v2/search/tag/parent.resource.env/values", 400, "parent. attributes"),
    ("/api/v2/search/tag/rootServiceName/values", 400, "rootServiceName"),
]


async def test_refusals_never_reach_tempo(world: World) -> None:
    world.tempo.seen.clear()
    for path, status, text in REFUSALS:
        await expect_refusal(await world.env.gw.client.get(path, headers=world.dev), status, text)
    assert world.tempo.seen == []


async def test_header_mode_for_traces_is_refused(db_dsn: str, aiohttp_client: Any, aiohttp_server: Any) -> None:
    async for w in _world(db_dsn, aiohttp_client, aiohttp_server, "header"):
        await expect_refusal(await w.env.gw.client.get("/api/search?q=%7B%7D", headers=w.dev), 503,
                             "does not (verifiably) enforce trace label policies")
        assert w.tempo.seen == []


async def test_forward_auth_refuses_restricted_tempo_reads(db_dsn: str, aiohttp_client: Any,
                                                           aiohttp_server: Any) -> None:
    """Tempo applies no label policies, so only the data path's rewrite can restrict a TraceQL read."""
    async with fa_env(db_dsn, aiohttp_client, aiohttp_server) as env:
        realm = [{"type": "stack", "identifier": "100", "labelPolicies": [{"selector": '{resource.env="dev"}'}]}]
        dev = basic("100", await env.token(["traces:read"], realm))
        for uri in ("/api/search?q=%7B%7D", "/api/metrics/query_range?q=%7B%7D%7Crate()", "/api/v2/search/tags"):
            r = await env.gw.client.get("/forward-auth/nginx", headers={**dev, "X-Original-Method": "GET",
                                                                         "X-Original-URI": uri})
            assert r.status == 403, (uri, r.status, await r.text())


async def test_the_protocol_data_path_restricts_cached_decisions_too(db_dsn: str, aiohttp_client: Any,
                                                                      aiohttp_server: Any) -> None:
    """On the production data path a repeated request takes the callback fast path (a cached decision and
    plan): Tempo must get the restricted query every time, and the search answer stay filtered."""
    from tests.test_dataplane import _dp

    tempo = FakeTempo({DEV_TRACE: _trace(1, "dev", "checkout"), PROD_TRACE: _trace(2, "prod", "payments")})
    async with _dp(db_dsn, aiohttp_client, aiohttp_server, upstream=tempo.app()) as dp:
        realm = [{"type": "stack", "identifier": "100", "labelPolicies": [{"selector": '{resource.env="dev"}'}]}]
        p = await dp.gw.policy("dev-traces", ["traces:read"], realm)
        dev = basic("100", str((await dp.gw.token(p["id"], "dev-traces"))["token"]))
        for _ in range(3):
            tempo.seen.clear()
            r = await dp.gw.client.get(_url("/api/metrics/query_range", q="{} | rate()", step="60s"), headers=dev)
            assert r.status == 200, await r.text()
            assert [dict(parse_qsl(urlsplit(s[1]).query))["q"] for s in tempo.seen] == [f"{{ {DEV} }} | rate()"]
            r = await dp.gw.client.get("/api/search?q=%7B%7D", headers=dev)
            assert r.status == 200 and all("rootServiceName" not in t for t in (await r.json())["traces"])
