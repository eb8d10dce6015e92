"""Debian's nginx with ``auth_request`` to the gateway (the shipped deploy/forward-auth/nginx snippets), in
front of a real Prometheus (remote-write receiver) and of a fake Loki that enforces X-Prom-Label-Policy as
Loki's ``pkg/labelaccess`` does: the quick start's token checks, decided by the gateway, judged by nginx.

The client connects from 127.0.0.2 and 127.0.0.3 (both loopback) so that the address the gateway checks
is the one nginx passes in X-Forwarded-For, not nginx's own (127.0.0.1, the trusted proxy).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import struct
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import cramjam
from aiohttp import web

from gateway.app import build_app, close_state, open_state
from gateway.forwardauth import enforcement
from tests.conftest import Gateway, bootstrap_token, free_port, make_config, require
from tests.e2e.nginx_proc import NginxProcess, find_nginx
from tests.e2e.prom import PrometheusProcess, find_prometheus
from tests.fake_loki import FakeLoki, Stream
from tests.loki_lbac import PolicyHeaderError, extract
from tests.test_proxy import basic

SHIPPED = Path(__file__).resolve().parents[2] / "deploy" / "forward-auth" / "nginx"
METRIC = "gateway_forward_auth_e2e"


def _field(num: int, payload: bytes) -> bytes:
    return _varint(num << 3 | 2) + _varint(len(payload)) + payload


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def write_request(name: str, value: float) -> bytes:
    """A remote-write WriteRequest (prompb: TimeSeries{labels, samples}) of one sample now, snappy block."""
    labels = _field(1, _field(1, b"__name__") + _field(2, name.encode()))
    sample = _field(2, b"\x09" + struct.pack("<d", value) + b"\x10" + _varint(int(time.time() * 1000)))
    return bytes(cramjam.snappy.compress_raw(_field(1, labels + sample)))


def _matches(labels: dict[str, str], matchers: list[tuple[str, str, str]]) -> bool:
    import re
    for name, op, value in matchers:
        have = labels.get(name, "")
        ok = {"=": have == value, "!=": have != value, "=~": re.fullmatch(value, have) is not None,
              "!~": re.fullmatch(value, have) is None}[op]
        if not ok:
            return False
    return True


class LabelAccessLoki:
    """Loki with ``-lbac.enabled``: ``labelAccessMiddleware`` parses X-Prom-Label-Policy (400 on a bad
    value, ``tests/loki_lbac``), and the store returns only the tenant's streams that match one of its
    policies (OR across policies, AND within one). A missing X-Scope-OrgID is 401 ("no org id")."""

    def __init__(self, loki: FakeLoki):
        self.loki = loki
        self.seen: list[tuple[str, str | None]] = []

    async def handle(self, request: web.Request) -> web.StreamResponse:
        tenant = request.headers.get("X-Scope-OrgID")
        self.seen.append((request.path, tenant))
        if not tenant:
            return web.Response(status=401, text="no org id\n")
        try:
            policies = extract(request.headers.getall("X-Prom-Label-Policy", [])).get(tenant, [])
        except PolicyHeaderError as exc:
            return web.json_response({"status": "error", "errorType": "bad_data", "error": str(exc)}, status=400)
        view = self.loki if not policies else FakeLoki(
            [s for s in self.loki.streams if any(_matches(s.labels, p) for p in policies)], now_ns=self.loki.now_ns)
        return await view.handle(request)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        return app


@contextlib.asynccontextmanager
async def stack(db_dsn: str, tmp_path: Path, aiohttp_server: Any, max_age: int = 0
                ) -> AsyncIterator[tuple[Gateway, str, Any]]:
    """(gateway with admin token, nginx base URL, the Loki fake); with ``max_age``, nginx caches the answers
    (the shipped gateway-auth-cache.conf) for that long."""
    nginx = find_nginx()
    require(nginx is not None, "nginx (Debian: apt-get install nginx)")
    require(find_prometheus() is not None, "prometheus (Debian: apt-get install prometheus)")
    now = time.time_ns()
    loki = LabelAccessLoki(FakeLoki([
        Stream({"app": "checkout", "team": "a"}, ((now - 60 * 10**9, "a says hello"),)),
        Stream({"app": "checkout", "team": "b"}, ((now - 30 * 10**9, "b says hello"),))], now_ns=now))
    loki_srv = await aiohttp_server(loki.app())
    loki_url = f"http://127.0.0.1:{loki_srv.port}"
    with PrometheusProcess(tmp_path / "tsdb", remote_write_receiver=True, route_prefix="/prometheus") as prom:
        state = await open_state(make_config(
            db_dsn, trusted_proxies=["127.0.0.1/32"],
            forward_auth={"max_age": max_age,
                          "label_policies": {"logs": {"enforced_by_backend": True, "url": loki_url}}}))
        try:
            gw_srv = await aiohttp_server(build_app(state))
            await enforcement.probe_of(state.extras).refresh(state.config)
            conf = tmp_path / "nginx"
            (conf / "gateway").mkdir(parents=True)
            for name in ("gateway-auth-location.conf", "gateway-auth.conf", "gateway-auth-cache.conf"):
                shutil.copy(SHIPPED / name, conf / "gateway" / name)
            if not max_age:
                (conf / "gateway" / "gateway-auth-cache.conf").write_text("# no cache: every request is decided\n")
            port = free_port()
            cache = f"proxy_cache_path {conf}/cache levels=1 keys_zone=gateway_auth:1m;" if max_age else ""
            http = f"""
  {cache}
  upstream gateway_forward_auth {{ server 127.0.0.1:{gw_srv.port}; keepalive 4; }}
  server {{
    listen 127.0.0.1:{port};
    include gateway/gateway-auth-location.conf;
    location /prometheus/ {{ include gateway/gateway-auth.conf; proxy_pass http://127.0.0.1:{prom.port}; }}
    location = /api/v1/push {{
      include gateway/gateway-auth.conf;
      proxy_pass http://127.0.0.1:{prom.port}/prometheus/api/v1/write;
    }}
    location /loki/ {{ include gateway/gateway-auth.conf; proxy_pass {loki_url}; }}
  }}"""
            with NginxProcess(nginx or "nginx", conf, http, port):
                async with aiohttp.ClientSession(f"http://127.0.0.1:{gw_srv.port}") as admin:  # the admin API
                    yield Gateway(admin, state, await bootstrap_token(state)), f"http://127.0.0.1:{port}", loki
        finally:
            await close_state(state)


async def _token(gw: Gateway, scopes: list[str], realms: list[dict[str, Any]] | None = None,
                 subnets: list[str] | None = None) -> str:
    name = f"p{os.urandom(4).hex()}"
    p = await gw.policy(name, scopes, realms or [{"type": "stack", "identifier": "100"}], subnets=subnets)
    return str((await gw.token(p["id"], name))["token"])


def _from(address: str) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(local_addr=(address, 0), force_close=True))


async def test_quick_start_token_checks_through_nginx_auth_request_against_prometheus(
        db_dsn: str, tmp_path: Path, aiohttp_server: Any) -> None:
    async with stack(db_dsn, tmp_path, aiohttp_server) as (gw, base, _loki), _from("127.0.0.2") as c:
        rw = {"Content-Encoding": "snappy", "Content-Type": "application/x-protobuf",
              "X-Prometheus-Remote-Write-Version": "0.1.0"}
        token = await _token(gw, ["metrics:read", "metrics:write"], subnets=["127.0.0.2/32"])
        r = await c.post(f"{base}/api/v1/push", data=write_request(METRIC, 42.0), headers={**basic("100", token), **rw})
        assert r.status == 204, await r.text()
        q = f"{base}/prometheus/api/v1/query"
        r = await c.get(q, params={"query": METRIC}, headers=basic("100", token))
        assert r.status == 200, await r.text()
        (sample,) = (await r.json())["data"]["result"]
        assert sample["metric"]["__name__"] == METRIC and sample["value"][1] == "42"
        # a wrong token: 401 with the challenge, from nginx
        r = await c.get(q, params={"query": METRIC}, headers=basic("100", token[:-3] + "xyz"))
        assert r.status == 401 and r.headers.get("WWW-Authenticate", "").startswith("Basic")
        # a missing scope: 403, and nothing reached Prometheus
        reader = await _token(gw, ["metrics:read"])
        r = await c.post(f"{base}/api/v1/push", data=write_request(METRIC + "_refused", 1.0),
                         headers={**basic("100", reader), **rw})
        assert r.status == 403
        # another stack's tenant: 403
        r = await c.get(q, params={"query": METRIC}, headers=basic("200", token))
        assert r.status == 403
        # an address outside the policy's range: 403 (nginx passes 127.0.0.3 in X-Forwarded-For)
        async with _from("127.0.0.3") as other:
            r = await other.get(q, params={"query": METRIC}, headers=basic("100", token))
            assert r.status == 403
        r = await c.get(q, params={"query": "count({__name__=~\".+_refused\"}) or vector(0)"},
                        headers=basic("100", reader))
        assert (await r.json())["data"]["result"][0]["value"][1] == "0"
        # a label-restricted token: Prometheus does not enforce label policies (none configured): refused
        restricted = await _token(gw, ["metrics:read"], [{"type": "stack", "identifier": "100",
                                                          "labelPolicies": [{"selector": '{team="a"}'}]}])
        assert (await c.get(q, params={"query": METRIC}, headers=basic("100", restricted))).status == 403


async def test_label_policies_reach_an_enforcing_loki_through_nginx(db_dsn: str, tmp_path: Path,
                                                                    aiohttp_server: Any) -> None:
    async with stack(db_dsn, tmp_path, aiohttp_server) as (gw, base, loki), _from("127.0.0.2") as c:
        url = f"{base}/loki/api/v1/query_range"
        params = {"query": '{app="checkout"}'}

        async def teams(token: str) -> list[str]:
            r = await c.get(url, params=params, headers=basic("100", token))
            assert r.status == 200, await r.text()
            return sorted(s["stream"]["team"] for s in (await r.json())["data"]["result"])

        assert await teams(await _token(gw, ["logs:read"])) == ["a", "b"]
        a_only = await _token(gw, ["logs:read"], [{"type": "stack", "identifier": "100",
                                                    "labelPolicies": [{"selector": '{team="a", app=~"check.*"}'}]}])
        assert await teams(a_only) == ["a"]
        assert loki.seen[-1] == ("/loki/api/v1/query_range", "100")
        # a client's own X-Prom-Label-Policy (Grafana's team rules) narrows an open token, as on the data path:
        # the gateway answers it back (checked and parsed) and nginx forwards that answer
        r = await c.get(url, params=params, headers={**basic("100", await _token(gw, ["logs:read"])),
                                                     "X-Prom-Label-Policy": "100:%7Bteam%3D%22zzz%22%7D"})
        assert r.status == 200
        assert (await r.json())["data"]["result"] == []


async def test_a_cached_answer_outlives_revocation_for_max_age_only(db_dsn: str, tmp_path: Path,
                                                                   aiohttp_server: Any) -> None:
    """The README's caveat, measured: nginx with the shipped cache snippet keeps a 200 for the answer's
    max-age (2 s), so a revoked token still passes until then, never after; refusals are not cached."""
    async with stack(db_dsn, tmp_path, aiohttp_server, max_age=2) as (gw, base, loki), _from("127.0.0.2") as c:
        name = f"p{os.urandom(4).hex()}"
        p = await gw.policy(name, ["logs:read"], [{"type": "stack", "identifier": "100"}])
        tok = await gw.token(p["id"], name)
        url, params = f"{base}/loki/api/v1/query_range", {"query": '{app="checkout"}'}
        assert (await c.get(url, params=params, headers=basic("100", tok["token"]))).status == 200
        revoked = time.monotonic()
        await gw.api("DELETE", f"/api/v1/tokens/{tok['id']}", expect=None)
        r = await c.get(url, params=params, headers=basic("100", tok["token"]))
        if time.monotonic() - revoked < 1.5:  # (a very slow machine may already be past the cached answer)
            assert r.status == 200  # the cached answer: the revoked token still passes
        await asyncio.sleep(max(0.0, 3.5 - (time.monotonic() - revoked)))  # past the 2 s max-age
        assert (await c.get(url, params=params, headers=basic("100", tok["token"]))).status == 401
        before = len(loki.seen)
        for _ in range(2):  # a 401 is no-store: each attempt is decided again, none reaches Loki
            assert (await c.get(url, params=params, headers=basic("100", tok["token"]))).status == 401
        assert len(loki.seen) == before
