"""The data path on a real aiohttp server, against a recording upstream: every refusal and what is sent."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import io
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from tests.conftest import Gateway, bootstrap_token, make_config
from tests.recorder import Recorder, start_recorder


@dataclass
class Env:
    gw: Gateway
    rec: Recorder
    upstream: str

    async def token(self, scopes: list[str], realms: list[dict[str, Any]] | None = None, **kw: Any) -> str:
        name = f"p{os.urandom(4).hex()}"
        p = await self.gw.policy(name, scopes, realms or [{"type": "stack", "identifier": "100"}],
                                 subnets=kw.pop("subnets", None))
        return str((await self.gw.token(p["id"], name, **kw))["token"])


def basic(user: str, token: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{token}".encode()).decode()}


@contextlib.asynccontextmanager
async def _env(db_dsn: str, aiohttp_client: Any, aiohttp_server: Any, lbac: str = "header",
               backend_lbac: bool | None = None, **cfg: Any) -> AsyncIterator[Env]:
    """A gateway whose upstreams all point at one recording upstream, metrics and logs in ``lbac`` mode.

    The upstream parses X-Prom-Label-Policy like Loki with LBAC (so header mode passes the gateway's
    probe) when ``backend_lbac``, by default in header mode; the probe's requests are forgotten.
    """
    from gateway.app import build_app, close_state, open_state

    rec, url = await start_recorder(aiohttp_server)
    rec.lbac = lbac == "header" if backend_lbac is None else backend_lbac
    ups = cfg.pop("upstreams", None) or {"metrics": {"url": url, "lbac": lbac}, "logs": {"url": url, "lbac": lbac},
                                         "traces": {"url": url, "write_url": url}}
    state = await open_state(make_config(db_dsn, upstreams=ups, **cfg))
    try:
        client = await aiohttp_client(build_app(state))
        rec.seen.clear()  # the start-up LBAC probe
        yield Env(Gateway(client, state, await bootstrap_token(state)), rec, url)
    finally:
        await close_state(state)


@pytest.fixture
async def env(db_dsn: str, aiohttp_client: Any, aiohttp_server: Any) -> AsyncIterator[Env]:
    async with _env(db_dsn, aiohttp_client, aiohttp_server) as e:
        yield e


async def test_remote_write_is_forwarded_with_tenant_and_without_credentials(env: Env) -> None:
    tok = await env.token(["metrics:write"])
    body = os.urandom(4096)
    r = await env.gw.client.post("/api/v1/push", data=body, headers={
        **basic("100", tok), "Content-Encoding": "snappy", "Content-Type": "application/x-protobuf",
        "X-Prometheus-Remote-Write-Version": "0.1.0", "X-Scope-OrgID": "100|200",
        "X-Prom-Label-Policy": "100:%7Ba=%22b%22%7D", "X-Mimir-Foo": "1", "Connection": "keep-alive, X-Hop",
        "X-Hop": "secret", "X-Forwarded-For": "1.2.3.4"})
    assert r.status == 200, await r.text()
    seen = env.rec.last
    assert (seen.method, seen.path) == ("POST", "/api/v1/push")
    assert seen.headers.getall("X-Scope-OrgID") == ["100"]
    assert "Authorization" not in seen.headers and "X-Prom-Label-Policy" not in seen.headers
    assert "X-Mimir-Foo" not in seen.headers and "X-Hop" not in seen.headers
    assert seen.headers["Content-Encoding"] == "snappy"
    assert seen.headers["X-Prometheus-Remote-Write-Version"] == "0.1.0"
    assert seen.headers["X-Forwarded-For"] == "1.2.3.4, 127.0.0.1"
    assert seen.body == body


async def test_query_with_read_token_and_response_passthrough(env: Env) -> None:
    env.rec.reply = b'{"status":"success","data":{"resultType":"vector","result":[{"metric":{},"value":[1,"1"]}]}}'
    tok = await env.token(["metrics:read"])
    r = await env.gw.client.get("/prometheus/api/v1/query?query=up&time=1", headers=basic("100", tok))
    assert r.status == 200 and await r.read() == env.rec.reply
    assert env.rec.last.query == [("query", "up"), ("time", "1")]


async def test_gzip_response_is_passed_through_untouched(env: Env) -> None:
    import gzip
    env.rec.reply = gzip.compress(b'{"status":"success"}')
    env.rec.reply_headers = {"Content-Type": "application/json", "Content-Encoding": "gzip"}
    tok = await env.token(["metrics:read"])
    r = await env.gw.client.get("/prometheus/api/v1/query?query=up", headers={**basic("100", tok),
                                                                              "Accept-Encoding": "gzip"},
                                auto_decompress=False)
    assert r.headers["Content-Encoding"] == "gzip"
    assert await r.read() == env.rec.reply


async def expect_refusal(r: aiohttp.ClientResponse, status: int, text: str) -> None:
    body = await r.json()
    assert r.status == status, (r.status, body)
    assert body["status"] == "error" and text in body["error"], body
    if status == 401:
        assert r.headers["WWW-Authenticate"] == 'Basic realm="gateway"'


async def test_every_refusal_path(env: Env) -> None:
    c = env.gw.client
    q = "/prometheus/api/v1/query?query=up"
    read = await env.token(["metrics:read"])
    write = await env.token(["metrics:write"])
    expired = await env.token(["metrics:read"], expiresAt=(datetime.now(UTC) + timedelta(seconds=1)).isoformat())
    other_stack = await env.token(["metrics:read"], [{"type": "stack", "identifier": "101"}])
    ranged = await env.token(["metrics:read"], subnets=["10.0.0.0/8"])
    await asyncio.sleep(1.1)
    await expect_refusal(await c.get(q), 401, "authentication required")
    await expect_refusal(await c.get(q, headers={"Authorization": "Basic !!!"}), 401, "not base64")
    await expect_refusal(await c.get(q, headers={"Authorization": "Basic " + base64.b64encode(b"nocolon").decode()}),
                         401, "expected tenant ID and token")
    await expect_refusal(await c.get(q, headers={"Authorization": "Digest x"}), 401, "unsupported")
    await expect_refusal(await c.get(q, headers=basic("100", "glc_bm90LWpzb24")), 401, "invalid token")
    forged = read[:-6] + ("AAAAAA" if not read.endswith("AAAAAA") else "BBBBBB")
    await expect_refusal(await c.get(q, headers=basic("100", forged)), 401, "invalid token")
    await expect_refusal(await c.get(q, headers=basic("100", expired)), 401, "token expired")
    await expect_refusal(await c.get(q, headers=basic("100", write)), 403, "lacks the metrics:read scope")
    await expect_refusal(await c.get(q, headers=basic("100", other_stack)), 403, "does not cover stack 100")
    await expect_refusal(await c.get(q, headers=basic("200", read)), 403, "does not cover stack 200")
    await expect_refusal(await c.get(q, headers=basic("999", read)), 401, "unknown metrics tenant '999'")
    await expect_refusal(await c.get(q, headers=basic("100", ranged)), 403, "outside the allowed ranges")
    # a spoofed X-Forwarded-For from an untrusted peer changes nothing
    await expect_refusal(await c.get(q, headers={**basic("100", ranged), "X-Forwarded-For": "10.1.1.1"}), 403,
                         "outside the allowed ranges")
    await expect_refusal(await c.get("/prometheus/api/v1/nope", headers=basic("100", read)), 404, "no such endpoint")
    for path in ("/distributor/all_user_stats", "/ingester/flush", "/config", "/runtime_config", "/debug/pprof/heap",
                 "/memberlist", "/services", "/compactor/ring", "/flush", "/ring", "/log_level", "/status/config",
                 "/prometheus/api/v1/../../../distributor/all_user_stats", "/prometheus%2Fapi/v1/query"):
        await expect_refusal(await c.get(path, headers=basic("100", read)), 404, "no such endpoint")
    await expect_refusal(await c.put("/prometheus/api/v1/query", headers=basic("100", read)), 405, "not allowed")
    assert env.rec.seen == []  # nothing reached the upstream


async def test_trusted_proxy_forwarded_for_is_believed(db_dsn: str, aiohttp_client: Any, aiohttp_server: Any
                                                       ) -> None:
    async with _env(db_dsn, aiohttp_client, aiohttp_server, trusted_proxies=["127.0.0.0/8"]) as e:
        ranged = await e.token(["metrics:read"], subnets=["10.0.0.0/8"])
        q = "/prometheus/api/v1/query?query=up"
        r = await e.gw.client.get(q, headers={**basic("100", ranged), "X-Forwarded-For": "10.1.1.1"})
        assert r.status == 200
        # the client wrote the left-most hop; the right-most untrusted one decides
        r = await e.gw.client.get(q, headers={**basic("100", ranged), "X-Forwarded-For": "10.1.1.1, 8.8.8.8"})
        await expect_refusal(r, 403, "client address 8.8.8.8 is outside")


async def test_bearer_tenant_resolution(env: Env) -> None:
    c = env.gw.client
    q = "/prometheus/api/v1/query?query=up"
    single = await env.token(["metrics:read"])
    r = await c.get(q, headers={"Authorization": f"Bearer {single}"})
    assert r.status == 200 and env.rec.last.headers["X-Scope-OrgID"] == "100"
    org = await env.token(["metrics:read", "logs:read"], [{"type": "org", "identifier": "1"}])
    await expect_refusal(await c.get(q, headers={"Authorization": f"Bearer {org}"}), 400, "ambiguous")
    r = await c.get(q, headers={"Authorization": f"Bearer {org}", "X-Scope-OrgID": "101"})
    assert r.status == 200 and env.rec.last.headers["X-Scope-OrgID"] == "101"
    await expect_refusal(await c.get(q, headers={"Authorization": f"Bearer {org}", "X-Scope-OrgID": "200"}), 403,
                         "does not cover stack 200")
    await expect_refusal(await c.get(q, headers={"Authorization": f"Bearer {org}", "X-Scope-OrgID": "100|101"}),
                         403, "is not a metrics tenant")
    # logs tenant of stack 101 is "l101": the signal decides which tenant ID is used
    r = await c.get("/loki/api/v1/labels", headers={"Authorization": f"Bearer {org}", "X-Scope-OrgID": "l101"})
    assert r.status == 200 and env.rec.last.headers["X-Scope-OrgID"] == "l101"


async def test_scopes_per_route_family(env: Env) -> None:
    c = env.gw.client
    rules = await env.token(["rules:read"])
    alerts = await env.token(["alerts:write"])
    logs_delete = await env.token(["logs:delete"])
    traces = await env.token(["traces:read", "traces:write"])
    assert (await c.get("/prometheus/config/v1/rules", headers=basic("100", rules))).status == 200
    await expect_refusal(await c.post("/prometheus/config/v1/rules/ns", data=b"x", headers=basic("100", rules)),
                         403, "rules:write")
    assert (await c.post("/alertmanager/api/v2/silences", data=b"{}", headers=basic("100", alerts))).status == 200
    assert (await c.post("/loki/api/v1/delete?query={a=\"b\"}&start=1", headers=basic("100", logs_delete))
            ).status == 200
    r = await c.post("/otlp/v1/traces", data=b"spans", headers=basic("100", traces))
    assert r.status == 200 and env.rec.last.path == "/v1/traces"
    assert (await c.get("/api/traces/abc", headers=basic("100", traces))).status == 200
    assert env.rec.last.headers["X-Scope-OrgID"] == "100"


async def test_label_policies_in_header_mode(env: Env) -> None:
    tok = await env.token(["metrics:read", "metrics:write", "logs:read"], [
        {"type": "stack", "identifier": "100",
         "labelPolicies": [{"selector": '{env="dev"}'}, {"selector": '{team=~"a|b"}'}]}])
    c = env.gw.client
    r = await c.get("/prometheus/api/v1/query?query=up", headers=basic("100", tok))
    assert r.status == 200
    assert env.rec.last.headers.getall("X-Prom-Label-Policy") == ["100:%7Benv=%22dev%22%7D",
                                                                   "100:%7Bteam=~%22a%7Cb%22%7D"]
    assert env.rec.last.query == [("query", "up")]  # header mode leaves the query alone
    r = await c.get("/loki/api/v1/query_range?query={app=\"x\"}", headers=basic("100", tok))
    assert env.rec.last.headers.getall("X-Prom-Label-Policy")[0] == "100:%7Benv=%22dev%22%7D"
    # writes are not filtered
    await c.post("/api/v1/push", data=b"x", headers=basic("100", tok))
    assert "X-Prom-Label-Policy" not in env.rec.last.headers
    n = len(env.rec.seen)
    for path in ("/prometheus/api/v1/cardinality/label_names", "/api/v1/user_stats"):
        await expect_refusal(await c.get(path, headers=basic("100", tok)), 403, "cannot be filtered")
    assert len(env.rec.seen) == n


async def test_streamed_50mb_body_arrives_identical(env: Env) -> None:
    tok = await env.token(["logs:write"])
    chunk = os.urandom(1 << 20)
    digest = hashlib.sha256()

    async def gen() -> AsyncIterator[bytes]:
        for i in range(50):
            piece = chunk[i:] + chunk[:i]
            digest.update(piece)
            yield piece

    r = await env.gw.client.post("/loki/api/v1/push", data=gen(), headers={**basic("100", tok),
                                                                          "Content-Type": "application/x-protobuf"})
    assert r.status == 200
    assert env.rec.last.body_len == 50 << 20 and env.rec.last.body_sha256 == digest.hexdigest()


async def test_body_limit(db_dsn: str, aiohttp_client: Any, aiohttp_server: Any) -> None:
    async with _env(db_dsn, aiohttp_client, aiohttp_server, limits={"max_request_body": 1000}) as e:
        tok = await e.token(["metrics:write"])
        await expect_refusal(await e.gw.client.post("/api/v1/push", data=b"x" * 1001, headers=basic("100", tok)),
                             413, "exceeds 1000 bytes")

        async def gen() -> AsyncIterator[bytes]:
            for _ in range(5):
                yield b"y" * 500

        await expect_refusal(await e.gw.client.post("/api/v1/push", data=gen(), headers=basic("100", tok)),
                             413, "exceeds 1000 bytes")
        assert (await e.gw.client.post("/api/v1/push", data=io.BytesIO(b"z" * 1000), headers=basic("100", tok))
                ).status == 200


async def test_upstream_down_is_502_and_slow_is_504(db_dsn: str, aiohttp_client: Any, aiohttp_server: Any,
                                                    unused_tcp_port: int) -> None:
    async def slow(_r: web.Request) -> web.Response:
        await asyncio.sleep(5)
        return web.Response()

    app = web.Application()
    app.router.add_get("/{t:.*}", slow)
    server = await aiohttp_server(app)
    ups = {"metrics": {"url": f"http://127.0.0.1:{unused_tcp_port}"},
           "logs": {"url": f"http://127.0.0.1:{server.port}", "read_timeout": 0.3}}
    async with _env(db_dsn, aiohttp_client, aiohttp_server, upstreams=ups) as e:
        tok = await e.token(["metrics:read", "logs:read"])
        await expect_refusal(await e.gw.client.get("/prometheus/api/v1/query?query=up", headers=basic("100", tok)),
                             502, "metrics upstream unavailable: connection refused")
        await expect_refusal(await e.gw.client.get("/loki/api/v1/labels", headers=basic("100", tok)),
                             504, "logs upstream timed out")


async def test_websocket_tail_relays_both_ways(env: Env) -> None:
    tok = await env.token(["logs:read"])
    async with env.gw.client.ws_connect('/loki/api/v1/tail?query={app="x"}', headers=basic("100", tok)) as ws:
        first = await ws.receive_str(timeout=5)
        assert "hello" in first
        await ws.send_str("ping-1")
        assert await ws.receive_str(timeout=5) == "echo:ping-1"
    seen = env.rec.seen[-1]
    assert seen.method == "WS" and seen.path == "/loki/api/v1/tail"
    assert seen.headers["X-Scope-OrgID"] == "100" and "Authorization" not in seen.headers
    assert env.rec.ws_messages == ["ping-1"]


async def test_websocket_tail_needs_auth(env: Env) -> None:
    with pytest.raises(aiohttp.WSServerHandshakeError) as info:
        await env.gw.client.ws_connect('/loki/api/v1/tail?query={app="x"}')
    assert info.value.status == 401


async def test_metrics_endpoint_counts_requests(env: Env) -> None:
    tok = await env.token(["metrics:read"])
    await env.gw.client.get("/prometheus/api/v1/query?query=up", headers=basic("100", tok))
    await env.gw.client.get("/prometheus/api/v1/query?query=up")
    text = await (await env.gw.client.get("/metrics")).text()
    assert 'gateway_requests_total{backend="metrics",code="200",scope="metrics:read"}' in text
    assert 'gateway_auth_refusals_total{reason="missing_credentials"}' in text
    assert "gateway_upstream_duration_seconds_bucket" in text and "gateway_cache_tokens" in text


async def test_rule_groups_cannot_federate_outside_the_realm(env: Env) -> None:
    c = env.gw.client
    tok = await env.token(["rules:write", "metrics:read"])
    ok = b"name: g\nsource_tenants: ['100']\nrules: []\n"
    r = await c.post("/prometheus/config/v1/rules/ns", data=ok, headers={**basic("100", tok),
                                                                          "Content-Type": "application/yaml"})
    assert r.status == 200 and env.rec.last.body == ok
    assert env.rec.last.headers["Content-Type"] == "application/yaml"
    bad = b"name: g\nsource_tenants: ['100', '200']\nrules: []\n"
    await expect_refusal(await c.post("/prometheus/config/v1/rules/ns", data=bad, headers=basic("100", tok)),
                         403, "tenant '200'")
    await expect_refusal(await c.post("/prometheus/config/v1/rules/ns", data=b"a: [", headers=basic("100", tok)),
                         400, "not valid YAML")
    no_read = await env.token(["rules:write"])
    await expect_refusal(await c.post("/prometheus/config/v1/rules/ns", data=ok, headers=basic("100", no_read)),
                         403, "metrics:read")


async def test_label_restricted_tokens_cannot_write_rules(env: Env) -> None:
    tok = await env.token(["rules:write"], [{"type": "stack", "identifier": "100",
                                             "labelPolicies": [{"selector": '{env="dev"}'}]}])
    await expect_refusal(await env.gw.client.post("/prometheus/config/v1/rules/ns", data=b"name: g\nrules: []\n",
                                                  headers=basic("100", tok)), 403, "bypass the label policies")


async def test_one_json_access_log_line_per_request_without_secrets(env: Env) -> None:
    import json

    from gateway.proxy.handler import ACCESS_LOG

    log = env.gw.client.server.app[ACCESS_LOG]
    log.stream, log.enabled = io.StringIO(), True
    tok = await env.token(["metrics:read"])
    await env.gw.client.get("/prometheus/api/v1/query?query=up", headers=basic("100", tok))
    from gateway.policy import tokens as tokfmt
    unknown_tok = tokfmt.encode("1", "00000000-0000-0000-0000-000000000000", "nope", "local")
    await env.gw.client.get("/prometheus/api/v1/query?query=up", headers=basic("100", unknown_tok))
    await env.gw.client.get("/nope", headers=basic("100", tok))
    log.flush()
    lines = log.stream.getvalue().splitlines()
    assert len(lines) == 3
    ok, bad, unknown = (json.loads(line) for line in lines)
    assert ok["status"] == 200 and ok["tenant"] == "100" and ok["path"] == "/prometheus/api/v1/query"
    assert ok["token_id"] and ok["policy"].startswith("p") and ok["client_ip"] == "127.0.0.1"
    assert ok["duration_ms"] > 0 and ok["upstream_ms"] >= 0 and ok["bytes"] == len(env.rec.reply)
    assert isinstance(ok["time"], float)
    assert bad["status"] == 401 and bad["refusal"] == "unknown_token"
    assert unknown["status"] == 404 and unknown["refusal"] == "unknown_path"
    secret = tok[4:]
    assert all(secret[:20] not in line for line in lines)


def slow_upstream() -> tuple[web.Application, asyncio.Event, asyncio.Event]:
    """An upstream that answers after 30 s; its events tell that a request arrived and that it was cancelled."""
    started, cancelled = asyncio.Event(), asyncio.Event()

    async def slow(_r: web.Request) -> web.Response:
        started.set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return web.Response(text="late")

    app = web.Application(handler_args={"handler_cancellation": True})
    app.router.add_route("*", "/{tail:.*}", slow)
    return app, started, cancelled


async def test_client_disconnect_cancels_the_upstream_call(db_dsn: str, aiohttp_client: Any,
                                                           aiohttp_server: Any) -> None:
    app, started, cancelled = slow_upstream()
    server = await aiohttp_server(app)
    async with _env(db_dsn, aiohttp_client, aiohttp_server,
                    upstreams={"metrics": {"url": f"http://127.0.0.1:{server.port}"}}) as e:
        tok = await e.token(["metrics:read"])
        request = asyncio.create_task(e.gw.client.get("/prometheus/api/v1/query?query=up", headers=basic("100", tok)))
        await asyncio.wait_for(started.wait(), 5)
        request.cancel()  # the client hangs up
        with contextlib.suppress(asyncio.CancelledError):
            await request
        await asyncio.wait_for(cancelled.wait(), 5)  # the gateway dropped its upstream connection


async def test_upstreams_split_by_role(db_dsn: str, aiohttp_client: Any, aiohttp_server: Any) -> None:
    query_rec, query_url = await start_recorder(aiohttp_server)
    write_rec, write_url = await start_recorder(aiohttp_server)
    rules_rec, rules_url = await start_recorder(aiohttp_server)
    am_rec, am_url = await start_recorder(aiohttp_server)
    ups = {"metrics": {"url": query_url, "write_url": write_url, "rules_url": rules_url, "alertmanager_url": am_url}}
    async with _env(db_dsn, aiohttp_client, aiohttp_server, upstreams=ups) as e:
        tok = await e.token(["metrics:read", "metrics:write", "rules:read", "alerts:read"])
        c = e.gw.client
        assert (await c.post("/api/v1/push", data=b"x", headers=basic("100", tok))).status == 200
        assert (await c.get("/prometheus/api/v1/query?query=up", headers=basic("100", tok))).status == 200
        assert (await c.get("/prometheus/config/v1/rules", headers=basic("100", tok))).status == 200
        assert (await c.get("/alertmanager/api/v2/alerts", headers=basic("100", tok))).status == 200
        assert [s.path for s in write_rec.seen] == ["/api/v1/push"]
        assert [s.path for s in query_rec.seen] == ["/prometheus/api/v1/query"]
        assert [s.path for s in rules_rec.seen] == ["/prometheus/config/v1/rules"]
        assert [s.path for s in am_rec.seen] == ["/alertmanager/api/v2/alerts"]
