"""Profiles (Pyroscope) through the real gateway server: the route table line by line, then writes and reads
against a fake Pyroscope written from its handlers (tests/fake_pyroscope.py)."""

from __future__ import annotations

import base64
import contextlib
import json
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest

from gateway.config import ConfigError, parse_config
from gateway.routes import Kind, Role, allowed_methods, match, pyroscope
from tests.conftest import TEST_CONFIG, Gateway, bootstrap_token, make_config
from tests.fake_pyroscope import PROFILE_TYPE, FakePyroscope

Q = "/querier.v1.QuerierService/"

# method, path, scope, role: every line of gateway/routes/pyroscope.py
CASES: list[tuple[str, str, str, Role]] = [
    ("POST", "/ingest", "profiles:write", Role.WRITE),
    ("POST", "/pyroscope/ingest", "profiles:write", Role.WRITE),
    ("POST", "/push.v1.PusherService/Push", "profiles:write", Role.WRITE),
    ("POST", "/opentelemetry.proto.collector.profiles.v1development.ProfilesService/Export", "profiles:write",
     Role.WRITE),
    ("POST", "/v1development/profiles", "profiles:write", Role.WRITE),
    *[("POST", Q + name, "profiles:read", Role.READ) for name in (
        "ProfileTypes", "LabelNames", "LabelValues", "Series", "SelectMergeStacktraces", "SelectMergeSpanProfile",
        "SelectMergeProfile", "SelectSeries", "SelectHeatmap", "Diff", "GetProfileStats", "AnalyzeQuery")],
    ("GET", "/pyroscope/render", "profiles:read", Role.READ),
    ("GET", "/pyroscope/render-diff", "profiles:read", Role.READ),
    ("GET", "/pyroscope/label-values", "profiles:read", Role.READ),
]


@pytest.mark.parametrize(("method", "path", "scope", "role"), CASES)
def test_route(method: str, path: str, scope: str, role: Role) -> None:
    m = match(method, path)
    assert m is not None, f"{method} {path} is not routed"
    assert any(r is m.route for r in pyroscope.ROUTES)
    # Reads cannot be label-filtered (refused to restricted tokens); writes carry nothing to filter.
    kind = Kind.TENANT_WIDE if scope == "profiles:read" else Kind.NONE
    assert (m.route.backend, m.route.scope, m.route.kind, m.route.role) == ("profiles", scope, kind, role)
    assert m.upstream_path == path
    # Connect procedures are POST only; the HTTP API's reads are GET only.
    other = "GET" if method == "POST" else "POST"
    assert match(other, path) is None and allowed_methods(path) == ({method, "HEAD"} if method == "GET" else {method})


def test_every_line_of_the_table_is_walked() -> None:
    walked = {id(m.route) for method, path, *_ in CASES if (m := match(method, path)) is not None}
    assert [f"{sorted(r.methods)} {r.pattern}" for r in pyroscope.ROUTES if id(r) not in walked] == []


@pytest.mark.parametrize("path", [
    "/querier.v1.QuerierService/Unknown", "/ingester.v1.IngesterService/Push", "/distributor/ring",
    "/querier.v1.QuerierService/LabelNames/x", "/settings.v1.SettingsService/Set", "/pyroscope/render/../ingest",
    "/adhocprofiles.v1.AdHocProfileService/Upload", "/api/v1/status/config"])
def test_internal_and_unknown_pyroscope_paths_match_nothing(path: str) -> None:
    assert match("POST", path) is None and match("GET", path) is None


def test_profiles_upstream_and_tenant_in_the_config() -> None:
    raw = {"orgs": [{"id": 1, "name": "a", "stacks": [{"id": 2, "name": "s", "tenants": {"profiles": "p2"}}]}],
           "upstreams": {"profiles": {"url": "http://pyroscope:4040"}}}
    cfg = parse_config(raw, env={})
    assert cfg.upstreams["profiles"].url_for("read") == "http://pyroscope:4040"
    assert cfg.stack_by_tenant[("profiles", "p2")].id == "2"
    with pytest.raises(ConfigError) as info:
        parse_config({**raw, "upstreams": {"profiles": {"url": "pyroscope:4040"}}}, env={})
    assert info.value.problems == ["upstreams.profiles.url: must be an http:// or https:// URL without query or "
                                   "fragment"]


# ---------------------------------------------------------------- through the gateway


@dataclass
class Env:
    gw: Gateway
    fake: FakePyroscope

    async def token(self, scopes: list[str], selectors: list[str] | None = None) -> str:
        name = f"p{os.urandom(4).hex()}"
        realm: dict[str, Any] = {"type": "stack", "identifier": "100"}
        if selectors:
            realm["labelPolicies"] = [{"selector": s} for s in selectors]
        p = await self.gw.policy(name, scopes, [realm])
        return str((await self.gw.token(p["id"], name))["token"])


def basic(user: str, token: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{token}".encode()).decode()}


@contextlib.asynccontextmanager
async def _env(db_dsn: str, aiohttp_client: Any, aiohttp_server: Any) -> AsyncIterator[Env]:
    from gateway.app import build_app, close_state, open_state

    fake = FakePyroscope()
    server = await aiohttp_server(fake.app())
    url = f"http://127.0.0.1:{server.port}"
    orgs = json.loads(json.dumps(TEST_CONFIG["orgs"]))
    orgs[0]["stacks"][0]["tenants"]["profiles"] = "p100"  # not the metrics tenant: the right one must be sent
    orgs[0]["stacks"][1]["tenants"]["profiles"] = "p101"
    ups = {**TEST_CONFIG["upstreams"], "profiles": {"url": url}}
    state = await open_state(make_config(db_dsn, orgs=orgs, upstreams=ups))
    try:
        client = await aiohttp_client(build_app(state))
        yield Env(Gateway(client, state, await bootstrap_token(state)), fake)
    finally:
        await close_state(state)


@pytest.fixture
async def env(db_dsn: str, aiohttp_client: Any, aiohttp_server: Any) -> AsyncIterator[Env]:
    async with _env(db_dsn, aiohttp_client, aiohttp_server) as e:
        yield e


CONNECT = {"Content-Type": "application/json", "Connect-Protocol-Version": "1"}


async def test_write_then_read_profiles_with_the_stack_tenant(env: Env) -> None:
    c = env.gw.client
    write, read = await env.token(["profiles:write"]), await env.token(["profiles:read"])
    # Pyroscope's ingest API (SDKs) and the Connect push (Alloy), each with the client's tenant header replaced.
    r = await c.post("/ingest?name=checkout%7Benv%3Ddev%7D&from=1&until=2&format=pprof", data=os.urandom(256),
                     headers={**basic("p100", write), "X-Scope-OrgID": "p100|p101"})
    assert r.status == 200, await r.text()
    push = {"series": [{"labels": [{"name": "service_name", "value": "cart"}, {"name": "env", "value": "prod"}],
                        "samples": [{"ID": "0", "rawProfile": base64.b64encode(b"pprof").decode()}]}]}
    r = await c.post("/push.v1.PusherService/Push", json=push, headers={**basic("p100", write), **CONNECT})
    assert r.status == 200 and await r.json() == {}, await r.text()
    assert env.fake.tenants_seen == ["p100", "p100"]
    assert set(env.fake.series) == {"p100"}

    # What Grafana's Pyroscope data source sends (pyroscopeClient.go): Connect calls on its URL.
    r = await c.post(Q + "ProfileTypes", json={}, headers={**basic("p100", read), **CONNECT})
    assert (await r.json())["profileTypes"][0]["ID"] == PROFILE_TYPE
    r = await c.post(Q + "LabelNames", json={"matchers": ["{}"]}, headers={**basic("p100", read), **CONNECT})
    assert r.status == 200 and (await r.json())["names"] == ["env", "service_name"]
    r = await c.post(Q + "LabelValues", json={"name": "service_name", "matchers": ['{env="dev"}']},
                     headers={**basic("p100", read), **CONNECT})
    assert (await r.json())["names"] == ["checkout"]
    r = await c.get("/pyroscope/label-values?label=env", headers=basic("p100", read))
    assert r.status == 200 and await r.json() == ["dev", "prod"]
    # Bearer: the realm's only stack, its profiles tenant.
    r = await c.post(Q + "LabelValues", json={"name": "env"}, headers={"Authorization": f"Bearer {read}", **CONNECT})
    assert (await r.json())["names"] == ["dev", "prod"]
    assert env.fake.tenants_seen[2:] == ["p100"] * 5


async def expect(r: Any, status: int, text: str) -> None:
    body = await r.json()
    assert r.status == status, (r.status, body)
    assert body["status"] == "error" and text in body["error"], body


async def test_refusals(env: Env) -> None:
    c = env.gw.client
    write, read = await env.token(["profiles:write"]), await env.token(["profiles:read"])
    metrics = await env.token(["metrics:read", "metrics:write"])
    restricted = await env.token(["profiles:read", "profiles:write"], ['{env="dev"}'])
    names = {"name": "env"}
    await expect(await c.post(Q + "LabelValues", json=names, headers=CONNECT), 401, "")
    await expect(await c.post(Q + "LabelValues", json=names, headers={**basic("p100", "glc_bad"), **CONNECT}),
                 401, "malformed token")
    await expect(await c.post(Q + "LabelValues", json=names, headers={**basic("100", read), **CONNECT}),
                 401, "unknown profiles tenant")  # the metrics tenant is not a profiles tenant
    await expect(await c.post(Q + "LabelValues", json=names, headers={**basic("p200", read), **CONNECT}),
                 401, "unknown profiles tenant")
    await expect(await c.post(Q + "LabelValues", json=names, headers={**basic("p101", read), **CONNECT}),
                 403, "")  # a stack outside the token's realm
    await expect(await c.post(Q + "LabelValues", json=names, headers={**basic("p100", write), **CONNECT}),
                 403, "profiles:read")
    await expect(await c.post(Q + "LabelValues", json=names, headers={**basic("p100", metrics), **CONNECT}),
                 403, "profiles:read")
    await expect(await c.post("/ingest?name=a", data=b"x", headers=basic("p100", read)), 403, "profiles:write")
    # Label policies cannot be applied to profiles yet: a restricted token reads nothing, by any route.
    for path in (Q + "LabelValues", Q + "SelectMergeStacktraces", Q + "ProfileTypes"):
        await expect(await c.post(path, json=names, headers={**basic("p100", restricted), **CONNECT}),
                     403, "cannot be filtered by label policies")
    await expect(await c.get("/pyroscope/render?query=x", headers=basic("p100", restricted)), 403,
                 "cannot be filtered by label policies")
    # Writes are not filtered, for profiles as for logs and metrics.
    r = await c.post("/ingest?name=a", data=b"x", headers=basic("p100", restricted))
    assert r.status == 200, await r.text()
    await expect(await c.get(Q + "LabelValues", headers=basic("p100", read)), 405, "")
    await expect(await c.post(Q + "Nope", json={}, headers={**basic("p100", read), **CONNECT}), 404, "")
    assert env.fake.tenants_seen == ["p100"]  # only the restricted token's write got through
