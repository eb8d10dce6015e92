"""Header mode is trusted only once verified: the probe, the 503, `auto`, normalisation, source_tenants."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from aiohttp import web

from gateway.config import Upstream
from gateway.lbac.probe import MALFORMED_POLICY, PROBE_TENANT, LbacProbe, probe_of, probe_upstream
from tests.loki_lbac import extract
from tests.test_proxy import Env, _env, basic, expect_refusal

HDR = "X-Prom-Label-Policy"
RESTRICTED = [{"type": "stack", "identifier": "100",
               "labelPolicies": [{"selector": '{team="a", env!="prod"}'}, {"selector": '{job=~"x{1,3}"}'}]}]
Q = "/prometheus/api/v1/query?query=up"


async def _restricted(env: Env, scopes: list[str] | None = None) -> str:
    return await env.token(scopes or ["metrics:read", "logs:read", "metrics:write"], RESTRICTED)


async def test_verified_header_mode_sends_multi_matcher_policies_loki_parses(
        db_dsn: str, aiohttp_client: Any, aiohttp_server: Any) -> None:
    async with _env(db_dsn, aiohttp_client, aiohttp_server, "header") as env:
        probe = probe_of(env.gw.state.extras)
        assert probe.verdicts["metrics"].enforces is True and probe.verdicts["logs"].enforces is True
        tok = await _restricted(env)
        for path in (Q, '/loki/api/v1/query_range?query={app="x"}'):
            r = await env.gw.client.get(path, headers=basic("100", tok))
            assert r.status == 200, await r.text()
            seen = env.rec.last
            assert seen.headers["X-Scope-OrgID"] == "100"
            got = extract(seen.headers.getall(HDR))
            assert got == {"100": [[("team", "=", "a"), ("env", "!=", "prod")], [("job", "=~", "x{1,3}")]]}
        ready = await (await env.gw.client.get("/ready")).json()
        assert ready["lbac"]["metrics"]["effective"] == "header"
        assert ready["lbac"]["metrics"]["backendEnforces"] is True
        text = await (await env.gw.client.get("/metrics")).text()
        assert 'gateway_lbac_backend_enforces{backend="metrics"} 1.0' in text


async def test_header_mode_to_a_backend_that_ignores_the_header_refuses_restricted_reads(
        db_dsn: str, aiohttp_client: Any, aiohttp_server: Any) -> None:
    async with _env(db_dsn, aiohttp_client, aiohttp_server, "header", backend_lbac=False) as env:
        tok = await _restricted(env)
        for path in (Q, '/loki/api/v1/query_range?query={app="x"}', "/prometheus/api/v1/series?match[]=up"):
            await expect_refusal(await env.gw.client.get(path, headers=basic("100", tok)), 503,
                                 "does not (verifiably) enforce label policies")
        assert env.rec.seen == []  # never forwarded
        # unrestricted reads and writes are unaffected
        free = await env.token(["metrics:read"])
        assert (await env.gw.client.get(Q, headers=basic("100", free))).status == 200
        assert (await env.gw.client.post("/api/v1/push", data=b"x", headers=basic("100", tok))).status == 200
        ready = await (await env.gw.client.get("/ready")).json()
        assert ready["status"] == "ready"
        assert ready["lbac"]["metrics"] == {**ready["lbac"]["metrics"], "configured": "header",
                                            "effective": "unverified", "backendEnforces": False}
        assert "ignores the header" in ready["lbac"]["metrics"]["detail"]
        text = await (await env.gw.client.get("/metrics")).text()
        assert 'gateway_lbac_backend_enforces{backend="metrics"} 0.0' in text


async def test_auto_picks_enforce_for_a_backend_that_ignores_the_header(
        db_dsn: str, aiohttp_client: Any, aiohttp_server: Any) -> None:
    async with _env(db_dsn, aiohttp_client, aiohttp_server, "auto", backend_lbac=False) as env:
        tok = await _restricted(env)
        r = await env.gw.client.get(Q, headers=basic("100", tok))
        assert r.status == 200, await r.text()
        assert HDR not in env.rec.last.headers
        (query,) = [v for k, v in env.rec.last.query if k == "query"]
        assert 'team="a"' in query and 'env!="prod"' in query and 'job=~"x{1,3}"' in query
        ready = await (await env.gw.client.get("/ready")).json()
        assert ready["lbac"]["metrics"]["effective"] == "enforce"


async def test_auto_picks_header_for_a_backend_that_enforces_it(
        db_dsn: str, aiohttp_client: Any, aiohttp_server: Any) -> None:
    async with _env(db_dsn, aiohttp_client, aiohttp_server, "auto", backend_lbac=True) as env:
        tok = await _restricted(env)
        assert (await env.gw.client.get(Q, headers=basic("100", tok))).status == 200
        assert env.rec.last.query == [("query", "up")]
        assert len(extract(env.rec.last.headers.getall(HDR))["100"]) == 2
        text = await (await env.gw.client.get("/metrics")).text()
        assert 'gateway_lbac_header_mode{backend="metrics"} 1.0' in text


async def test_periodic_probe_follows_the_backend(db_dsn: str, aiohttp_client: Any, aiohttp_server: Any) -> None:
    ups = {"lbac": "header", "lbac_probe_interval": 0.2}
    async with _env(db_dsn, aiohttp_client, aiohttp_server, "header", backend_lbac=False) as env:
        ups_cfg = {s: {"url": env.upstream, **ups} for s in ("metrics", "logs")}
        from dataclasses import replace

        from gateway.config import parse_config
        env.gw.state.config = replace(env.gw.state.config, upstreams=parse_config(
            {"upstreams": ups_cfg}, env={}).upstreams)
        tok = await _restricted(env)
        await expect_refusal(await env.gw.client.get(Q, headers=basic("100", tok)), 503, "does not")
        env.rec.lbac = True  # the backend gains LBAC (say, upgraded): the next probe trusts it
        probe = probe_of(env.gw.state.extras)
        probe.kick()  # what a config reload does
        for _ in range(50):
            await asyncio.sleep(0.1)
            if probe.verdicts["metrics"].enforces:
                break
        assert (await env.gw.client.get(Q, headers=basic("100", tok))).status == 200
        env.rec.lbac = False  # and loses it again: refused within one interval
        for _ in range(50):
            await asyncio.sleep(0.1)
            if probe.verdicts["metrics"].enforces is False:
                break
        await expect_refusal(await env.gw.client.get(Q, headers=basic("100", tok)), 503, "does not")


def _fake(answer: Any) -> web.Application:
    app = web.Application()

    async def handle(request: web.Request) -> web.Response:
        status, data = answer(request.headers.get("X-Scope-OrgID"), request.headers.getall(HDR, []))
        return web.json_response({"status": "success" if status == 200 else "error", "data": data}, status=status)
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


async def test_second_probe_with_a_policy_matching_nothing(aiohttp_server: Any) -> None:
    """A front that answers the malformed policy with something else (here 401 for the probe tenant)."""
    def enforcing(tenant: str | None, pols: list[str]) -> tuple[int, Any]:
        if tenant == PROBE_TENANT:
            return 401, None
        if pols:
            extract(pols)
            return 200, []  # the policy matches no series: no label names
        return 200, ["__name__", "env"]

    def ignoring(tenant: str | None, pols: list[str]) -> tuple[int, Any]:
        return (401, None) if tenant == PROBE_TENANT else (200, ["__name__", "env"])

    def empty(tenant: str | None, pols: list[str]) -> tuple[int, Any]:
        return (401, None) if tenant == PROBE_TENANT else (200, [])

    import aiohttp
    async with aiohttp.ClientSession() as session:
        for answer, expected in ((enforcing, True), (ignoring, False), (empty, None)):
            server = await aiohttp_server(_fake(answer))
            up = Upstream("metrics", {"read": f"http://127.0.0.1:{server.port}"}, "header")
            v = await probe_upstream(session, up, "100")
            assert v.enforces is expected, v
        dead = Upstream("logs", {"read": "http://127.0.0.1:9"}, "header")
        v = await probe_upstream(session, dead, "100")
        assert v.enforces is None and "unreachable" in v.detail


async def test_malformed_probe_is_what_loki_rejects(aiohttp_server: Any) -> None:
    seen: list[tuple[str | None, list[str]]] = []

    def loki(tenant: str | None, pols: list[str]) -> tuple[int, Any]:
        seen.append((tenant, pols))
        try:
            extract(pols)
        except ValueError as exc:
            return 400, str(exc)
        return 200, []

    server = await aiohttp_server(_fake(loki))
    probe = LbacProbe()
    from tests.conftest import make_config
    cfg = make_config("postgresql://x/y", upstreams={"logs": {"url": f"http://127.0.0.1:{server.port}",
                                                              "lbac": "auto"}})
    await probe.refresh(cfg)
    assert seen == [(PROBE_TENANT, [MALFORMED_POLICY])]
    assert probe.mode(cfg.upstreams["logs"]) == "header"
    assert json.dumps(probe.status(cfg))  # /ready can show it


async def test_header_mode_merges_url_and_body_into_the_url(
        db_dsn: str, aiohttp_client: Any, aiohttp_server: Any) -> None:
    async with _env(db_dsn, aiohttp_client, aiohttp_server, "header") as env:
        tok = await _restricted(env)
        form = {**basic("100", tok), "Content-Type": "application/x-www-form-urlencoded"}
        r = await env.gw.client.post("/loki/api/v1/query_range?limit=5", data='query={app="x"}&start=1',
                                     headers=form)
        assert r.status == 200, await r.text()
        seen = env.rec.last
        assert seen.method == "POST" and seen.body == b""  # Loki's LBAC middleware reads only the URL
        assert sorted(seen.query) == [("limit", "5"), ("query", '{app="x"}'), ("start", "1")]
        assert extract(seen.headers.getall(HDR))["100"]
        # the same parameter in URL and body: which one would run? refused
        await expect_refusal(await env.gw.client.post('/loki/api/v1/query_range?query={app="x"}',
                                                      data='query={app="y"}', headers=form), 400, "more than once")
        # match[] may repeat (in r.Form's order: body, then URL)
        r = await env.gw.client.post("/prometheus/api/v1/series?match[]=a", data="match[]=b", headers=form)
        assert r.status == 200 and [v for k, v in env.rec.last.query if k == "match[]"] == ["b", "a"]


async def test_rule_groups_cannot_federate_from_tenants_with_label_policies(
        db_dsn: str, aiohttp_client: Any, aiohttp_server: Any) -> None:
    async with _env(db_dsn, aiohttp_client, aiohttp_server, "enforce") as env:
        c = env.gw.client
        realms = [{"type": "stack", "identifier": "100"},
                  {"type": "stack", "identifier": "101", "labelPolicies": [{"selector": '{env="dev"}'}]}]
        tok = await env.token(["rules:write", "metrics:read"], realms)
        ok = b"name: g\nsource_tenants: ['100']\nrules: []\n"
        r = await c.post("/prometheus/config/v1/rules/ns", data=ok, headers=basic("100", tok))
        assert r.status == 200
        bad = b"name: g\nsource_tenants: ['100', '101']\nrules: []\n"
        await expect_refusal(await c.post("/prometheus/config/v1/rules/ns", data=bad, headers=basic("100", tok)),
                             403, "label policies")
        # a Grafana user narrowed by team rules on the source tenant is refused too
        from tests.test_datasources import datasource, rule, team
        free = await env.gw.policy("free", ["rules:write", "metrics:read"],
                                   [{"type": "stack", "identifier": "100"}, {"type": "stack", "identifier": "101"}])
        ftok = str((await env.gw.token(free["id"], "grafana"))["token"])
        await datasource(env.gw, "ds", free["id"])
        one = await team(env.gw, "one", ["alice"])
        await env.gw.api("PUT", "/api/datasources/ds/lbac/teams",
                         {"teamId": one["id"], "rules": [rule('101:{env="dev"}')]})
        await asyncio.sleep(0.3)  # the cache learns the rules through NOTIFY
        fed = b"name: g\nsource_tenants: ['101']\nrules: []\n"
        assert (await c.post("/prometheus/config/v1/rules/ns", data=fed, headers=basic("100", ftok))).status == 200
        r = await c.post("/prometheus/config/v1/rules/ns", data=fed, headers={**basic("100", ftok),
                                                                              "X-Grafana-User": "alice"})
        assert r.status == 403
        # the check itself, with team rules narrowing the user on the source tenant only
        from gateway.policy.selector import parse_selector
        from gateway.proxy.errors import ProxyError
        from gateway.proxy.rules import check_source_tenants
        ident = _ident(env, free["id"])
        check_source_tenants(fed, env.gw.state.config, ident, lambda t: ())
        try:
            check_source_tenants(fed, env.gw.state.config, ident,
                                 lambda t: (parse_selector('{env="dev"}'),) if t == "101" else ())
        except ProxyError as exc:
            assert exc.status == 403 and "label policies" in exc.message
        else:
            raise AssertionError("source_tenants with team rules was not refused")


def _ident(env: Env, policy_id: str) -> Any:
    from gateway.policy.decision import Identity
    cache = env.gw.state.cache
    policy = cache.policies[policy_id]
    token = next(t for t in cache.tokens.values() if t.access_policy_id == policy_id)
    return Identity(token, policy)


async def test_a_config_reload_probes_the_new_backend(db_dsn: str, aiohttp_client: Any, aiohttp_server: Any,
                                                      tmp_path: Any) -> None:
    import yaml

    from gateway.server import reload_config
    from tests.conftest import TEST_CONFIG
    from tests.recorder import start_recorder

    async with _env(db_dsn, aiohttp_client, aiohttp_server, "header") as env:
        tok = await _restricted(env)
        assert (await env.gw.client.get(Q, headers=basic("100", tok))).status == 200
        plain, plain_url = await start_recorder(aiohttp_server)  # ignores the header, like Prometheus
        path = tmp_path / "gateway.yaml"

        def point_at(url: str) -> None:
            raw = {**TEST_CONFIG, "database": {"url": db_dsn},
                   "upstreams": {"metrics": {"url": url, "lbac": "header"}, "logs": {"url": url, "lbac": "header"}}}
            path.write_text(yaml.safe_dump(raw))
            assert reload_config(env.gw.state, str(path))

        point_at(plain_url)
        # at once: a header-mode URL nobody has probed is not trusted
        await expect_refusal(await env.gw.client.get(Q, headers=basic("100", tok)), 503, "does not")
        probe = probe_of(env.gw.state.extras)
        for _ in range(50):
            await asyncio.sleep(0.1)
            v = probe.verdict(env.gw.state.config.upstreams["metrics"])
            if v is not None:
                break
        assert v is not None and v.enforces is False
        await expect_refusal(await env.gw.client.get(Q, headers=basic("100", tok)), 503, "does not")
        assert not [s for s in plain.seen if s.path == "/prometheus/api/v1/query"]
        point_at(env.upstream)
        for _ in range(50):
            await asyncio.sleep(0.1)
            v = probe.verdict(env.gw.state.config.upstreams["metrics"])
            if v is not None and v.enforces:
                break
        assert (await env.gw.client.get(Q, headers=basic("100", tok))).status == 200


def test_lbac_modes_in_config_and_their_effect() -> None:
    from gateway.config import parse_config
    from gateway.lbac.probe import Verdict
    cfg = parse_config({"upstreams": {s: {"url": "http://x", **({"lbac": m} if m else {})}
                                      for s, m in (("metrics", None), ("logs", "auto"), ("traces", "header"))}},
                       env={})
    assert cfg.upstreams["metrics"].lbac == "enforce" and cfg.upstreams["metrics"].lbac_probe_interval == 300
    probe = LbacProbe()
    ups = cfg.upstreams
    assert (probe.mode(ups["metrics"]), probe.mode(ups["logs"])) == ("enforce", "enforce")  # auto, unprobed
    header = Upstream("metrics", {"read": "http://x"}, "header")
    assert probe.mode(header) == "unverified"
    probe.verdicts["metrics"] = Verdict("http://x", True, "ok", 0.0)
    assert probe.mode(header) == "header"
    moved = Upstream("metrics", {"read": "http://y"}, "header")
    assert probe.mode(moved) == "unverified"  # a verdict is for one URL only
    assert probe.mode(ups["traces"]) == "enforce"  # nothing to filter on traces: never refused


def test_header_mode_normalisation_is_a_pure_function() -> None:
    import pytest

    from gateway.lbac.headermode import normalize
    from gateway.proxy.errors import ProxyError
    r = normalize("limit=5", b"query=%7Ba%3D%22b%22%7D")
    assert (r.query, r.body) == ("query=%7Ba%3D%22b%22%7D&limit=5", b"")  # r.Form's order: body, then URL
    assert normalize("query=up", None).body is None
    assert normalize("match[]=a&match[]=b", b"match=c").query == "match=c&match%5B%5D=a&match%5B%5D=b"
    with pytest.raises(ProxyError) as exc:
        normalize("query=a", b"query=b")
    assert exc.value.status == 400
    with pytest.raises(ProxyError):
        normalize("time=1&time=2", None)
