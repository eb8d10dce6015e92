"""Limits per policy and tenant on the data path (issue 28): tenant blocks from the YAML (reloaded without a
restart), per-policy and per-tenant request rates, write byte rates and concurrent queries, the shared
table behind them, and the metrics and access-log field that name the limit."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import web

from gateway.config import ConfigError
from gateway.limits.shared import Table
from tests.conftest import TEST_CONFIG, make_config
from tests.test_proxy import Env, _env, basic

QUERY = "/prometheus/api/v1/query?query=up"


async def policy_token(env: Env, scopes: list[str], attributes: dict[str, Any] | None = None) -> tuple[str, str]:
    name = f"p{os.urandom(4).hex()}"
    body: dict[str, Any] = {"name": name, "scopes": scopes, "realms": [{"type": "stack", "identifier": "100"}]}
    if attributes is not None:
        body["attributes"] = attributes
    p = await env.gw.api("POST", "/api/v1/accesspolicies", body)
    return name, str((await env.gw.token(p["id"], name))["token"])


BLOCKS = {"reads": {"status": 503, "message": "maintenance until 23:00 UTC", "retry_after": 600},
          "writes": {"status": 402, "message": "account unpaid: writes are suspended"},
          "rules": {"status": 403, "message": "abuse: the ruler is off for this tenant"},
          "alerts": {"status": 451}}


async def test_each_block_kind_answers_its_status_and_message(db_dsn: str, aiohttp_client: Any,
                                                            aiohttp_server: Any) -> None:
    limits = {"tenants": {"100": {"block": BLOCKS}}}
    async with _env(db_dsn, aiohttp_client, aiohttp_server, tenant_limits=limits) as env:
        _, tok = await policy_token(env, ["metrics:read", "metrics:write", "rules:read", "alerts:read"])
        cases = [("GET", QUERY, 503, "maintenance until 23:00 UTC", "600"),
                 ("POST", "/api/v1/push", 402, "account unpaid: writes are suspended", None),
                 ("GET", "/prometheus/api/v1/rules", 403, "abuse: the ruler is off for this tenant", None),
                 ("GET", "/alertmanager/api/v2/alerts", 451, "alerts are blocked for tenant 100", None)]
        for method, path, status, message, after in cases:
            r = await env.gw.client.request(method, path, data=b"x" if method == "POST" else None,
                                            headers=basic("100", tok))
            body = await r.json()
            assert (r.status, body["status"], body["error"]) == (status, "error", message), path
            assert r.headers.get("Retry-After") == after
        assert env.rec.seen == []  # nothing blocked reached the backend
        # another tenant of the same token's realm is not blocked
        org_tok = (await env.gw.token((await env.gw.policy("org-wide", ["metrics:read"]))["id"], "o"))["token"]
        r = await env.gw.client.get(QUERY, headers=basic("101", org_tok))
        assert r.status == 200
        metrics = await (await env.gw.client.get("/metrics")).text()
        assert 'gateway_limited_requests_total{by="tenant",limit="blocked_read",name="100"} 1.0' in metrics


async def test_blocks_are_reloaded_without_restart(db_dsn: str, aiohttp_client: Any, aiohttp_server: Any,
                                                   tmp_path: Path) -> None:
    from gateway.server import reload_config

    async with _env(db_dsn, aiohttp_client, aiohttp_server) as env:
        _, tok = await policy_token(env, ["metrics:write"])
        ups = {k: {"url": u.urls["write"]} for k, u in env.gw.state.config.upstreams.items()}
        path = tmp_path / "gw.yaml"

        def write(limits: dict[str, Any] | None) -> None:
            raw = {**TEST_CONFIG, "upstreams": ups, "database": {"url": db_dsn}}
            if limits is not None:
                raw["tenant_limits"] = limits
            path.write_text(yaml.safe_dump(raw))

        async def push() -> int:
            return (await env.gw.client.post("/api/v1/push", data=b"x", headers=basic("100", tok))).status

        assert await push() == 200
        write({"tenants": {"100": {"block": {"writes": {"status": 503, "message": "maintenance"}}}}})
        assert reload_config(env.gw.state, str(path))
        assert await push() == 503
        write({"tenants": {"100": {"block": {"writes": {"status": 99}}}}})  # a bad file keeps the running one
        assert not reload_config(env.gw.state, str(path))
        assert await push() == 503
        write(None)
        assert reload_config(env.gw.state, str(path))
        assert await push() == 200


def test_config_problems_are_named() -> None:
    bad = {"write_status": 500, "defaults": {"requests_per_second": -1, "burst": 1.5},
           "tenants": {"100": {"block": {"reads": {"status": 200}, "writes": {"message": "a\nb"},
                                         "reboot": {}}, "concurrent_queries": "x"}}}
    with pytest.raises(ConfigError) as exc:
        make_config("postgresql://x/y", tenant_limits=bad)
    problems = "\n".join(exc.value.problems)
    for want in ("tenant_limits.write_status: must be 429 or 503",
                 "tenant_limits.defaults.requests_per_second: must be a number >= 0",
                 "tenant_limits.defaults.burst: must be a whole number >= 0",
                 "tenant_limits.tenants.100.block.reads.status: must be an HTTP status from 400 to 599",
                 "tenant_limits.tenants.100.block.writes.message: must be one line",
                 "tenant_limits.tenants.100.block.reboot: unknown key",
                 "tenant_limits.tenants.100.concurrent_queries: must be a whole number >= 0"):
        assert want in problems, problems
    cfg = make_config("postgresql://x/y", tenant_limits={"defaults": {"requests_per_second": 5},
                                                        "tenants": {"101": {"burst": 2}}})
    assert cfg.tenant_limits.active and cfg.tenant_limits.rates_for("101").requests_per_second == 5
    assert cfg.tenant_limits.rates_for("101").burst == 2 and not make_config("postgresql://x/y").tenant_limits.active


async def test_policy_request_rate_is_bounded_and_429_names_the_limit(db_dsn: str, aiohttp_client: Any,
                                                                     aiohttp_server: Any) -> None:
    async with _env(db_dsn, aiohttp_client, aiohttp_server) as env:
        name, tok = await policy_token(env, ["metrics:read"], {"gatewayLimits": {"requestsPerSecond": 1, "burst": 3}})
        _, free = await policy_token(env, ["metrics:read"])
        loop = asyncio.get_running_loop()
        started = loop.time()
        statuses = [(await env.gw.client.get(QUERY, headers=basic("100", tok))).status for _ in range(12)]
        elapsed = loop.time() - started
        ok = statuses.count(200)
        assert statuses.count(429) == 12 - ok
        assert 3 <= ok <= 3 + int(elapsed) + 1, (statuses, elapsed)  # the burst, plus one per second passed
        r = await env.gw.client.get(QUERY, headers=basic("100", tok))
        if r.status == 200:  # (a second passed on a slow machine: the next one is refused)
            r = await env.gw.client.get(QUERY, headers=basic("100", tok))
        body = await r.json()
        assert r.status == 429 and body["errorType"] == "too_many_requests"
        assert body["error"].startswith(f"requests_per_second limit exceeded for policy '{name}'")
        assert int(r.headers["Retry-After"]) >= 1
        # a token of another policy is not limited
        assert [(await env.gw.client.get(QUERY, headers=basic("100", free))).status for _ in range(10)] == [200] * 10
        metrics = await (await env.gw.client.get("/metrics")).text()
        assert f'gateway_limited_requests_total{{by="policy",limit="requests_per_second",name="{name}"}}' in metrics


async def test_tenant_defaults_and_write_bytes(db_dsn: str, aiohttp_client: Any, aiohttp_server: Any) -> None:
    limits = {"defaults": {"write_bytes_per_second": 1000}}
    async with _env(db_dsn, aiohttp_client, aiohttp_server, tenant_limits=limits) as env:
        _, tok = await policy_token(env, ["metrics:write"])
        r = await env.gw.client.post("/api/v1/push", data=b"x" * 900, headers=basic("100", tok))
        assert r.status == 200
        r = await env.gw.client.post("/api/v1/push", data=b"x" * 900, headers=basic("100", tok))
        body = await r.json()
        assert r.status == 503 and body["error"].startswith(
            "write_bytes_per_second limit exceeded for tenant '100'") and int(r.headers["Retry-After"]) >= 1

        async def chunked() -> Any:
            yield b"x" * 10
        r = await env.gw.client.post("/api/v1/push", data=chunked(), headers=basic("100", tok))
        assert r.status == 411 and "Content-Length" in (await r.json())["error"]
        assert len(env.rec.seen) == 1


async def test_concurrent_queries(db_dsn: str, aiohttp_client: Any, aiohttp_server: Any) -> None:
    release, two_arrived = asyncio.Event(), asyncio.Event()
    arrived: list[int] = []

    async def slow(_r: web.Request) -> web.Response:
        arrived.append(1)
        if len(arrived) == 2:
            two_arrived.set()
        await release.wait()
        return web.json_response({"status": "success", "data": {"resultType": "vector", "result": []}})
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", slow)
    server = await aiohttp_server(app)
    url = f"http://127.0.0.1:{server.port}"
    ups = {"metrics": {"url": url}, "logs": {"url": url}, "traces": {"url": url}}
    async with _env(db_dsn, aiohttp_client, aiohttp_server, upstreams=ups) as env:
        name, tok = await policy_token(env, ["metrics:read"], {"gatewayLimits": {"concurrentQueries": 2}})
        running = [asyncio.create_task(env.gw.client.get(QUERY, headers=basic("100", tok))) for _ in range(2)]
        await asyncio.wait_for(two_arrived.wait(), 10)
        refused = [await env.gw.client.get(QUERY, headers=basic("100", tok)) for _ in range(3)]
        assert [r.status for r in refused] == [429] * 3
        assert (await refused[0].json())["error"].startswith(f"concurrent_queries limit reached for policy '{name}'")
        release.set()
        assert [(await t).status for t in running] == [200, 200]
        assert (await env.gw.client.get(QUERY, headers=basic("100", tok))).status == 200  # counts were given back
        assert len(arrived) == 3


def test_shared_table_buckets_and_lanes() -> None:
    t = Table(slots=64, lanes=4)
    assert [t.take("a", 1.0, 3.0, 1.0, debt=False) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert t.take("a", 1.0, 3.0, 1.0, debt=False) > 0.5
    t.refund("a", 3.0)  # (the callback path gives back what it took for a request it then leaves)
    assert t.take("a", 1.0, 3.0, 1.0, debt=False) == 0.0 and t.take("a", 1.0, 3.0, 1.0, debt=False) > 0.5
    assert t.take("b", 1.0, 3.0, 1.0, debt=False) == 0.0  # another key, another bucket
    assert t.take("w", 100.0, 100.0, 500.0, debt=True, kind=1) == 0.0  # too big: passes once, then owes
    assert t.take("w", 100.0, 100.0, 1.0, debt=True, kind=1) >= 3.9
    assert t.enter("c", 2) and t.enter("c", 2) and not t.enter("c", 2)
    t.leave("c")
    assert t.in_flight("c") == 1 and t.enter("c", 2)
    # a forked worker counts against the same table; its counts go when it dies and its lane is reclaimed
    pid = os.fork()
    if pid == 0:
        os._exit(0 if t.enter("d", 5) and t.enter("d", 5) and t.take("a", 1.0, 3.0, 1.0, debt=False) > 0 else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert t.in_flight("d") == 2  # the child's two, seen here
    pid = os.fork()
    if pid == 0:  # a new worker takes the dead one's lane: its requests are no longer in flight
        t._lane_pid = 0
        os._exit(0 if t.enter("d", 5) and t.in_flight("d") == 1 else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    # a worker killed while holding the lock: the others wait for it once, then go on without it
    pid = os.fork()
    if pid == 0:
        t._sem.acquire()
        os._exit(0)
    os.waitpid(pid, 0)
    assert t.take("e", 1.0, 1.0, 1.0, debt=False) == 0.0 and t._unlocked
    assert t.take("e", 1.0, 1.0, 1.0, debt=False) > 0 and t.enter("e", 1)


async def test_access_log_names_the_limit(db_dsn: str, aiohttp_client: Any, aiohttp_server: Any) -> None:
    import io

    from gateway.proxy.handler import ACCESS_LOG
    async with _env(db_dsn, aiohttp_client, aiohttp_server) as env:
        _, tok = await policy_token(env, ["metrics:read"], {"gatewayLimits": {"requestsPerSecond": 1, "burst": 1}})
        out = io.StringIO()
        log = env.gw.client.server.app[ACCESS_LOG]
        log.stream, log.enabled = out, True
        for _ in range(3):
            await env.gw.client.get(QUERY, headers=basic("100", tok))
        log.flush()
        lines = [json.loads(x) for x in out.getvalue().splitlines() if x.startswith("{")]
        limited = [x for x in lines if x.get("status") == 429]
        assert limited and all(x["limit"] == "policy:requests_per_second" for x in limited)
        assert all("_limits_held" not in x for x in lines)


async def test_the_page_shows_a_policys_limits(gw: Any) -> None:
    from tests.test_page import Browser
    attrs = {"gatewayLimits": {"requestsPerSecond": 5, "concurrentQueries": 2},
             "lokiQueryPolicy": {"maxQueryLookback": "7d", "requiredLabels": ["namespace"]}}
    p = await gw.api("POST", "/api/v1/accesspolicies", {"name": "limited", "scopes": ["logs:read"],
                                                        "realms": [{"type": "org", "identifier": "1"}],
                                                        "attributes": attrs})
    plain = await gw.policy("plain", ["logs:read"])
    b = Browser(gw)
    await b.sign_in()
    text = await b.get(f"/ui/policies/{p['id']}")
    for want in ("gatewayLimits.concurrentQueries: <code>2</code>", "gatewayLimits.requestsPerSecond: <code>5</code>",
                 "lokiQueryPolicy.maxQueryLookback: <code>7d</code>",
                 "lokiQueryPolicy.requiredLabels: <code>[&#34;namespace&#34;]</code>"):
        assert want in text, text
    assert "none of its own" in await b.get(f"/ui/policies/{plain['id']}")

    # the form edits them: typed values saved, an emptied one removed, Cloud's other attributes kept
    from tests.test_page import policy_form
    await gw.api("POST", f"/api/v1/accesspolicies/{p['id']}", {"attributes": {
        **attrs, "pdcConfiguration": {"limitedHosts": ["db:5432"]}}})
    form = await b.get(f"/ui/policies/{p['id']}/edit")
    assert 'name="limit:lokiQueryPolicy.maxQueryLookback" value="7d"' in form
    base = policy_form("limited", ["logs:read"], realm="org:1")
    fields = [("limit:gatewayLimits.requestsPerSecond", "2.5"), ("limit:gatewayLimits.concurrentQueries", ""),
              ("limit:lokiQueryPolicy.maxQueryLookback", "30d"), ("limit:lokiQueryPolicy.requiredLabels", "a, b")]
    _, text = await b.post(f"/ui/policies/{p['id']}/edit", base + [("limit:lokiQueryPolicy.maxQueryLength",
                                                                     "a week")] + fields, status=400)
    assert "must be a duration such as 30d" in text
    await b.post(f"/ui/policies/{p['id']}/edit", base + fields)
    got = (await gw.api("GET", f"/api/v1/accesspolicies/{p['id']}"))["attributes"]
    assert got == {"gatewayLimits": {"requestsPerSecond": 2.5},
                   "lokiQueryPolicy": {"maxQueryLookback": "30d", "requiredLabels": ["a", "b"]},
                   "pdcConfiguration": {"limitedHosts": ["db:5432"]}}
    await b.post("/ui/policies/new", policy_form("fresh", ["logs:read"]) + [
        ("limit:lokiQueryPolicy.maxEntriesLimitPerQuery", "500")])
    fresh = [x for x in (await gw.api("GET", "/api/v1/accesspolicies"))["items"] if x["name"] == "fresh"]
    assert fresh[0]["attributes"] == {"lokiQueryPolicy": {"maxEntriesLimitPerQuery": 500}}


async def test_forward_auth_applies_blocks_and_request_rates(db_dsn: str, aiohttp_client: Any,
                                                             aiohttp_server: Any) -> None:
    limits = {"tenants": {"100": {"block": {"writes": {"status": 503, "message": "maintenance",
                                                       "retry_after": 60}}}}}
    async with _env(db_dsn, aiohttp_client, aiohttp_server, tenant_limits=limits, trusted_proxies=["127.0.0.1/32"]
                    ) as env:
        _, tok = await policy_token(env, ["metrics:read", "metrics:write"],
                                    {"gatewayLimits": {"requestsPerSecond": 1, "burst": 1, "concurrentQueries": 1}})
        push = {**basic("100", tok), "X-Forwarded-Method": "POST", "X-Forwarded-Uri": "/api/v1/push"}
        r = await env.gw.client.get("/forward-auth/traefik", headers=push)
        assert r.status == 503 and r.headers["Retry-After"] == "60" and (await r.json())["error"] == "maintenance"
        r = await env.gw.client.get("/forward-auth/nginx", headers={**basic("100", tok), "X-Original-Method": "POST",
                                                                   "X-Original-URI": "/api/v1/push"})
        assert r.status == 403  # (nginx's auth_request takes 401 and 403 only)
        read = {**basic("100", tok), "X-Forwarded-Method": "GET", "X-Forwarded-Uri": QUERY}
        statuses = [(await env.gw.client.get("/forward-auth/traefik", headers=read)).status for _ in range(3)]
        assert statuses[0] == 200 and 429 in statuses  # one a second; concurrency is not counted here
