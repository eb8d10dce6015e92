"""Forward-auth on a real gateway server: db-auth-gateway's contract (a client written from its Go source),
the nginx / ingress-nginx / Traefik / Envoy conventions, label policies failing closed, the data path's
decision (use recorded, revocation at once), and the decisions metric."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import pytest

from gateway.config import ConfigError, EnforcingBackend, ForwardAuth, parse_config
from gateway.forwardauth import enforcement
from tests import dbauth_client as dag
from tests.test_proxy import Env, _env, basic

DAG = "/forward-auth/db-auth-gateway"
RESTRICTED = [{"type": "stack", "identifier": "100",
               "labelPolicies": [{"selector": '{team="a", env!="prod"}'}, {"selector": '{job=~"x{1,3}"}'}]}]
MATCHERS = [("100", [("team", "=", "a"), ("env", "!=", "prod")]), ("100", [("job", "=~", "x{1,3}")])]
QR = "/loki/api/v1/query_range?query=%7Bapp%3D%22x%22%7D"


@contextlib.asynccontextmanager
async def fa_env(db_dsn: str, aiohttp_client: Any, aiohttp_server: Any, enforcing: bool = True,
                 backend_lbac: bool = True, **cfg: Any) -> AsyncIterator[Env]:
    """A gateway trusting 127.0.0.1 as a proxy; with ``enforcing``, forward_auth names the recording upstream
    (which parses X-Prom-Label-Policy like Loki when ``backend_lbac``) as the enforcing metrics and logs backend."""
    async with _env(db_dsn, aiohttp_client, aiohttp_server, "enforce", backend_lbac=backend_lbac,
                    trusted_proxies=["127.0.0.1/32"], **cfg) as env:
        st = env.gw.state
        backends = {s: EnforcingBackend(s, env.upstream) for s in ("metrics", "logs")} if enforcing else {}
        st.config = replace(st.config, forward_auth=ForwardAuth(5, backends))  # as a reload would
        await enforcement.probe_of(st.extras).refresh(st.config)
        env.rec.seen.clear()
        yield env


async def _ask(env: Env, method: str, path: str, scope: str, headers: dict[str, str], ip: str = "10.1.2.3"
               ) -> dag.AuthResult:
    c = env.gw.client
    return await dag.authenticate(c.session, str(c.make_url(DAG)), method, path, scope, headers, ip)


async def test_db_auth_gateway_contract(db_dsn: str, aiohttp_client: Any, aiohttp_server: Any) -> None:
    async with fa_env(db_dsn, aiohttp_client, aiohttp_server) as env:
        writer = await env.token(["logs:write", "metrics:write", "traces:write"])
        r = await _ask(env, "POST", "/loki/api/v1/push", "logs:write", basic("100", writer))
        assert r.tenant_ids == ["100"] and r.label_policies == []
        assert r.extra_headers["cache-control"] == ["max-age=5"]
        assert (await _ask(env, "POST", "/api/v1/push", "metrics:write", {"Authorization": f"Bearer {writer}"})
                ).tenant_ids == ["100"]
        # OTLP gRPC, which only db-auth-gateway carries: the scope of its own route table
        r = await _ask(env, "POST", "/opentelemetry.proto.collector.trace.v1.TraceService/Export", "traces:write",
                       basic("100", writer))
        assert r.tenant_ids == ["100"]
        with pytest.raises(dag.Unauthorized):
            await _ask(env, "POST", "/loki/api/v1/push", "logs:write", basic("100", writer[:-2] + "xx"))
        with pytest.raises(dag.Unauthorized):
            await _ask(env, "POST", "/loki/api/v1/push", "logs:write", {})
        with pytest.raises(dag.Forbidden):  # missing scope
            await _ask(env, "GET", "/loki/api/v1/query_range", "logs:read", basic("100", writer))
        reader = await env.token(["logs:read", "logs:write"])
        with pytest.raises(dag.Forbidden):  # requiredScope disagrees with the route table (the token has both)
            await _ask(env, "POST", "/loki/api/v1/push", "logs:read", basic("100", reader))
        with pytest.raises(dag.Forbidden):  # unknown route
            await _ask(env, "GET", "/loki/api/v1/nonsense", "logs:read", basic("100", reader))
        with pytest.raises(dag.Forbidden):  # another stack's tenant
            await _ask(env, "GET", "/loki/api/v1/query_range", "logs:read", basic("200", reader))
        ranged = await env.token(["logs:write"], subnets=["10.0.0.0/8"])
        assert (await _ask(env, "POST", "/loki/api/v1/push", "logs:write", basic("100", ranged), "10.9.9.9")
                ).tenant_ids == ["100"]
        with pytest.raises(dag.Forbidden):  # X-Forwarded-For from a trusted proxy decides
            await _ask(env, "POST", "/loki/api/v1/push", "logs:write", basic("100", ranged), "192.0.2.1")
        # label policies: one header per selector, tenant:PathEscape(selector), parsed as db-auth-gateway does
        restricted = await env.token(["logs:read", "logs:write"], RESTRICTED)
        r = await _ask(env, "GET", "/loki/api/v1/query_range", "logs:read", basic("100", restricted))
        assert r.tenant_ids == ["100"] and r.label_policies == MATCHERS
        assert (await _ask(env, "POST", "/loki/api/v1/push", "logs:write", basic("100", restricted))
                ).label_policies == []  # writes carry none
        with pytest.raises(dag.Forbidden):  # Loki filters the URL's query: a form body is refused
            await _ask(env, "POST", "/loki/api/v1/query_range", "logs:read", basic("100", restricted))
        assert env.rec.seen == []  # forward-auth never forwards


async def test_label_policies_fail_closed_until_an_enforcing_backend_is_verified(
        db_dsn: str, aiohttp_client: Any, aiohttp_server: Any) -> None:
    for enforcing, backend_lbac, why in ((False, True, "names no backend that enforces them"),
                                         (True, False, "has not (yet) passed the probe")):
        async with fa_env(db_dsn, aiohttp_client, aiohttp_server, enforcing, backend_lbac) as env:
            restricted = await env.token(["logs:read", "logs:write", "metrics:read"], RESTRICTED)
            h = {**basic("100", restricted), "X-Original-Method": "GET"}
            for uri in (QR, "/prometheus/api/v1/query?query=up"):
                r = await env.gw.client.get("/forward-auth/nginx", headers={**h, "X-Original-URI": uri})
                assert r.status == 403
                body = await r.json()
                assert "need the gateway's own data path or a" in body["error"] and why in body["error"]
                assert "X-Prom-Label-Policy" not in r.headers and "X-Scope-OrgID" not in r.headers
            # writes and unrestricted reads are unaffected
            r = await env.gw.client.get("/forward-auth/nginx", headers={
                **h, "X-Original-Method": "POST", "X-Original-URI": "/loki/api/v1/push"})
            assert r.status == 200 and r.headers["X-Scope-OrgID"] == "100"
            free = await env.token(["logs:read"])
            r = await env.gw.client.get("/forward-auth/nginx", headers={
                **basic("100", free), "X-Original-Method": "GET", "X-Original-URI": QR})
            assert r.status == 200 and "X-Prom-Label-Policy" not in r.headers
            ready = await (await env.gw.client.get("/ready")).json()
            assert all(not v["verified"] for v in ready["forwardAuth"].values())


async def test_proxy_conventions_and_what_each_understands(db_dsn: str, aiohttp_client: Any,
                                                           aiohttp_server: Any) -> None:
    async with fa_env(db_dsn, aiohttp_client, aiohttp_server) as env:
        c = env.gw.client
        restricted = await env.token(["logs:read", "metrics:read", "rules:write"], RESTRICTED)
        auth = basic("100", restricted)
        asks = {
            "/forward-auth/nginx": {"X-Original-Method": "GET", "X-Original-URI": QR},
            "/forward-auth/ingress-nginx": {"X-Original-Method": "GET", "X-Original-URL": "https://h.example" + QR},
            "/forward-auth/traefik": {"X-Forwarded-Method": "GET", "X-Forwarded-Uri": QR,
                                      "X-Forwarded-Host": "logs.example"},
            "/forward-auth/envoy" + QR: {},
        }
        for url, extra in asks.items():
            r = await c.get(url, headers={**auth, **extra})
            assert r.status == 200, (url, await r.text())
            assert r.headers["X-Scope-OrgID"] == "100"
            assert r.headers["Cache-Control"] == "max-age=5"
            (joined,) = r.headers.getall("X-Prom-Label-Policy")  # one header: nginx 1.22 keeps only the first
            assert dag._policies([joined]) == MATCHERS
        r = await c.get("/forward-auth/envoy" + QR, headers=auth)
        assert r.headers["x-envoy-auth-headers-to-remove"] == "authorization"
        # nginx and db-auth-gateway understand only 401 and 403; Traefik and Envoy relay the status
        dup = QR + "&query=%7Bapp%3D%22y%22%7D"
        r = await c.get("/forward-auth/traefik", headers={**auth, "X-Forwarded-Method": "GET", "X-Forwarded-Uri": dup})
        assert r.status == 400 and "given more than once" in (await r.json())["error"]
        r = await c.get("/forward-auth/nginx", headers={**auth, "X-Original-Method": "GET", "X-Original-URI": dup})
        assert r.status == 403
        r = await c.get("/forward-auth/nginx", headers=auth)  # misconfigured proxy: no original URI
        assert r.status == 403 and "X-Original-URI" in (await r.json())["error"]
        assert (await c.get("/forward-auth/traefik", headers=auth)).status == 400
        assert (await c.get("/forward-auth/haproxy", headers=auth)).status == 404
        r = await c.get("/forward-auth/nginx", headers={"X-Original-Method": "GET", "X-Original-URI": QR})
        assert r.status == 401 and "WWW-Authenticate" in r.headers
        # what only the data path can do for a restricted token is refused
        for method, uri, text in (
                ("GET", "/loki/api/v1/detected_labels", "needs a query"),
                ("POST", "/prometheus/api/v1/query", "must use GET"),
                ("POST", "/prometheus/config/v1/rules/ns", "cannot write rules")):
            r = await c.get("/forward-auth/traefik", headers={**auth, "X-Forwarded-Method": method,
                                                              "X-Forwarded-Uri": uri})
            assert r.status == 403 and text in (await r.json())["error"], (uri, await r.text())
        writer = await env.token(["rules:write"])
        r = await c.get("/forward-auth/traefik", headers={**basic("100", writer), "X-Forwarded-Method": "POST",
                                                          "X-Forwarded-Uri": "/prometheus/config/v1/rules/ns"})
        assert r.status == 403 and "source_tenants" in (await r.json())["error"]
        r = await c.get("/forward-auth/envoy/prometheus/api/v1/query", headers={**basic("100", writer)})
        assert r.status == 403 and "metrics:read" in (await r.json())["error"]
        # a snapshot too old to trust: the data path's 503 to Traefik, a 403 to nginx (never a 200)
        cache: Any = env.gw.state.cache
        cache.loaded = False
        try:
            ask = {**auth, "X-Forwarded-Method": "GET", "X-Forwarded-Uri": QR}
            r = await c.get("/forward-auth/traefik", headers=ask)
            assert r.status == 503 and "too old" in (await r.json())["error"]
            r = await c.get("/forward-auth/nginx", headers={**auth, "X-Original-Method": "GET", "X-Original-URI": QR})
            assert r.status == 403 and "too old" in (await r.json())["error"]
        finally:
            cache.loaded = True


async def test_the_data_paths_decision_use_revocation_and_metrics(db_dsn: str, aiohttp_client: Any,
                                                                 aiohttp_server: Any) -> None:
    async with fa_env(db_dsn, aiohttp_client, aiohttp_server) as env:
        gw = env.gw
        before = await _decisions(env)
        name = f"p{os.urandom(4).hex()}"
        p = await gw.policy(name, ["logs:write"], [{"type": "stack", "identifier": "100"}])
        tok = await gw.token(p["id"], name)
        ask = {**basic("100", tok["token"]), "X-Original-Method": "POST", "X-Original-URI": "/loki/api/v1/push"}
        for _ in range(2):  # the second answer comes from the decision cache
            assert (await gw.client.get("/forward-auth/nginx", headers=ask)).status == 200
        for _ in range(50):  # first and last use are flushed every 0.2 s, as for the data path
            seen = await gw.api("GET", f"/api/v1/tokens/{tok['id']}")
            if seen.get("lastUsedAt"):
                break
            await asyncio.sleep(0.1)
        assert seen["firstUsedAt"] and seen["lastUsedAt"]
        await gw.api("DELETE", f"/api/v1/tokens/{tok['id']}", expect=None)
        r = await gw.client.get("/forward-auth/nginx", headers=ask)
        assert r.status == 401  # revoked: refused at once, cached decision or not
        after = await _decisions(env)
        assert after.get(("nginx", "allowed"), 0) - before.get(("nginx", "allowed"), 0) == 2
        assert after.get(("nginx", "unknown_token"), 0) - before.get(("nginx", "unknown_token"), 0) == 1
        text = await (await gw.client.get("/metrics")).text()
        assert 'gateway_forward_auth_backend_enforces{backend="logs"} 1.0' in text


async def _decisions(env: Env) -> dict[tuple[str, str], float]:
    text = await (await env.gw.client.get("/metrics")).text()
    return {(m[1], m[2]): float(m[3]) for m in re.finditer(
        r'^gateway_forward_auth_decisions_total\{caller="([^"]+)",outcome="([^"]+)"\} (\S+)$', text, re.M)}


def test_forward_auth_config_is_validated() -> None:
    with pytest.raises(ConfigError) as e:
        parse_config({"forward_auth": {"max_age": -1, "typo": 1, "ruler_tenant_federation": "no", "label_policies": {
            "traces": {"enforced_by_backend": True}, "metrics": {"enforced_by_backend": "yes"},
            "logs": {"enforced_by_backend": True}}}}, env={})
    assert e.value.problems == [
        "forward_auth.typo: unknown key (allowed: max_age, label_policies, ruler_tenant_federation)",
        "forward_auth.max_age: must be a whole number of seconds from 0 to 3600",
        "forward_auth.ruler_tenant_federation: must be true or false",
        "forward_auth.label_policies.traces: label policies apply to metrics and logs only",
        "forward_auth.label_policies.metrics.enforced_by_backend: must be true or false",
        "forward_auth.label_policies.logs.url: is required (the logs backend behind the proxy, which the gateway "
        "probes) unless upstreams.logs names it"]
    cfg = parse_config({"upstreams": {"logs": {"url": "http://loki:3100"}},
                        "forward_auth": {"label_policies": {"logs": {"enforced_by_backend": True}}}}, env={})
    assert cfg.forward_auth.enforcing["logs"].url == "http://loki:3100" and cfg.forward_auth.max_age == 5


async def test_grafana_team_rules_travel_as_label_policies(db_dsn: str, aiohttp_client: Any,
                                                           aiohttp_server: Any) -> None:
    from tests.test_datasources import _setup
    async with fa_env(db_dsn, aiohttp_client, aiohttp_server) as env:
        tok, *_ = await _setup(env)  # team one {env="dev"}: alice, carol; team two {env="prod"}: carol
        h = basic("100", tok)
        r = await _ask(env, "GET", "/prometheus/api/v1/query", "metrics:read", {**h, "X-Grafana-User": "alice"})
        assert r.label_policies == [("100", [("env", "=", "dev")])]
        r = await _ask(env, "GET", "/prometheus/api/v1/query", "metrics:read", {**h, "X-Grafana-User": "carol"})
        assert sorted(m for _, m in r.label_policies) == [[("env", "=", "dev")], [("env", "=", "prod")]]
        r = await _ask(env, "GET", "/prometheus/api/v1/query", "metrics:read", {**h, "X-Grafana-User": "dave"})
        assert r.label_policies == []  # in no team: the token's full access, as on the data path
