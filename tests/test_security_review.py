"""Security review of the gateway: each weakness found became a test here (they failed before their fixes)
and pass since; what was checked and held is a plain test.

Helpers come from the existing suites: ``_env``/``basic``/``expect_refusal`` (tests.test_proxy), the
enforce/header environments (tests.test_lbac_bypass), the data-source helpers (tests.test_datasources)
and the signed-in page client (tests.test_page).
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import subprocess
import sys
import tracemalloc
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from gateway.admin.errors import is_cloud_path
from gateway.lbac import RewriteError
from gateway.lbac import promql as promql_mod
from gateway.policy import tokens as tokfmt
from gateway.policy.decision import Denied, identify
from gateway.policy.selector import parse_selector
from tests.conftest import Gateway
from tests.test_datasources import DS, datasource, reader_policy, rule, team
from tests.test_lbac_bypass import HEADER_100, lbac_env
from tests.test_page import Browser
from tests.test_proxy import _env, basic, expect_refusal

ROOT = Path(__file__).resolve().parent.parent
Q = "/prometheus/api/v1/query"


async def _admin(gw: Gateway, method: str, path: str, data: bytes | None = None) -> tuple[int, Any]:
    """An admin API call with a raw body; the answer parsed as JSON when it is JSON."""
    r = await gw.client.request(method, path, data=data, headers={**gw.auth(), "Content-Type": "application/json"})
    text = await r.text()
    try:
        return r.status, json.loads(text)
    except ValueError:
        return r.status, text


def _cursor(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


def _invalid(path: str) -> int:
    """Invalid arguments: 409 on Cloud's API (its spec says so), 400 on the gateway's and Grafana's."""
    return 409 if is_cloud_path(path) else 400


def _api_error(status: int, body: Any, want: int) -> None:
    assert status == want and isinstance(body, dict) and "code" in body, (status, body)


# =========================================================================== findings (fixed)

# ---- F1 (high): PromQL nesting blocks the event loop for seconds, and crashes the worker (SIGSEGV) -------

def test_f1_promql_nesting_does_not_crash_the_process() -> None:
    code = ("from gateway.lbac import RewriteError\n"
            "from gateway.lbac.promql import restrict_promql\n"
            "from gateway.policy.selector import parse_selector\n"
            "n = 15000\n"
            "try:\n"
            "    restrict_promql('(' * n + 'up' + ')' * n, (parse_selector('{ns=\"a\"}'),))\n"
            "    print('rewritten')\n"
            "except RewriteError:\n"
            "    print('refused')\n")
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and p.stdout.strip() == "refused", (p.returncode, p.stdout[-300:], p.stderr[-300:])


# ---- F2 (medium): Grafana team rules do not stop rule writes ---------------------------------------------

async def test_f2_team_restricted_grafana_user_cannot_write_rules(db_dsn: str, aiohttp_client: Any,
                                                                  aiohttp_server: Any) -> None:
    async with _env(db_dsn, aiohttp_client, aiohttp_server) as env:
        gw = env.gw
        p = await reader_policy(gw, ["metrics:read", "rules:write"])
        tok = str((await gw.token(p["id"], "grafana"))["token"])
        await datasource(gw, "mimir", p["id"])
        dev = await team(gw, "dev", ["alice"])
        await gw.api("PUT", f"{DS}/mimir/lbac/teams", {"teamId": dev["id"], "rules": [rule('100:{env="dev"}')]})
        alice = {**basic("100", tok), "X-Grafana-User": "alice"}
        # alice's reads are restricted ...
        r = await gw.client.get(f"{Q}?query=up", headers=alice)
        assert r.status == 200 and env.rec.last.headers.getall("X-Prom-Label-Policy") == ["100:%7Benv=%22dev%22%7D"]
        # ... but she may not widen them with a recording rule
        group = (b"name: g\nrules:\n- record: leaked\n"
                 b"  expr: label_replace(secret_metric, \"env\", \"dev\", \"\", \"\")\n")
        n = len(env.rec.seen)
        r = await gw.client.post("/prometheus/config/v1/rules/ns", data=group,
                                 headers={**alice, "Content-Type": "application/yaml"})
        await expect_refusal(r, 403, "rules")
        assert len(env.rec.seen) == n


# ---- F3 (low): 500s instead of 4xx JSON on the admin API, the page and the rules path ---------------------

async def test_f3_json_nesting_bomb_is_400(gw: Gateway) -> None:
    bomb = b"[" * 100_000 + b"]" * 100_000
    for path in ("/api/v1/accesspolicies", "/api/datasources", "/api/teams"):
        status, body = await _admin(gw, "POST", path, bomb)
        _api_error(status, body, _invalid(path))


async def test_f3_unicode_digits_are_not_numbers(gw: Gateway) -> None:
    status, body = await _admin(gw, "GET", "/api/v1/accesspolicies?pageSize=%C2%B2")
    _api_error(status, body, 409)
    status, body = await _admin(gw, "GET", "/api/teams/%C2%B2")
    _api_error(status, body, 404)
    b = Browser(gw)
    await b.sign_in()
    r = await gw.client.get("/ui/policies?size=%C2%B2", allow_redirects=False)
    assert r.status == 200, r.status
    r = await gw.client.get("/ui/teams/%C2%B2", allow_redirects=False)
    assert r.status == 404, r.status


async def test_f3_forged_page_cursors_are_400(gw: Gateway) -> None:
    for path, rid in (("/api/v1/accesspolicies", "5"), ("/api/v1/tokens", "5"), ("/api/v1/auditlog", "9" * 30),
                      ("/api/teams", "9" * 30)):
        status, body = await _admin(gw, "GET", f"{path}?pageCursor={_cursor('2020-01-01T00:00:00|' + rid)}")
        _api_error(status, body, _invalid(path))


async def test_f3_expiry_beyond_year_9999_is_400(gw: Gateway) -> None:
    p = await gw.policy("far-future", ["metrics:read"])
    status, body = await _admin(gw, "POST", "/api/v1/tokens", json.dumps(
        {"accessPolicyId": p["id"], "name": "t", "expiresAt": "9999-12-31T23:59:59-23:59"}).encode())
    _api_error(status, body, 409)


async def test_f3_nested_rule_group_yaml_is_400(db_dsn: str, aiohttp_client: Any, aiohttp_server: Any) -> None:
    async with _env(db_dsn, aiohttp_client, aiohttp_server) as env:
        tok = await env.token(["rules:write", "metrics:read"])
        r = await env.gw.client.post("/prometheus/config/v1/rules/ns", data=b"[" * 10000, headers=basic("100", tok))
        await expect_refusal(r, 400, "YAML")


# ---- F4 (low): memory held for attacker-chosen keys ------------------------------------------------------

def _forged_token(i: int) -> str:
    token = tokfmt.encode("1", f"{i:08d}-" + os.urandom(320).hex(), "x", "local")
    assert len(token) <= tokfmt.MAX_TOKEN_LEN
    return token


def test_f4_unknown_tokens_are_not_retained() -> None:
    now = datetime.now(UTC)
    forged = [_forged_token(i) for i in range(2000)]
    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot()
        for t in forged:
            with pytest.raises(Denied):
                identify(t, {}, {}, now)
        after = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    retained = sum(s.size_diff for s in after.compare_to(before, "filename"))
    assert retained / len(forged) < 256, f"{retained / len(forged):.0f} bytes kept per unknown token"


def test_f4_rewrite_cache_does_not_keep_huge_queries() -> None:
    pols = (parse_selector('{ns="a"}'),)
    n = 20
    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot()
        for _ in range(n):  # each query is built here and dropped: only a cache can keep it
            with pytest.raises(RewriteError):  # an unterminated string: refused at once
                promql_mod.restrict_promql(f'up{{a="{os.urandom(8).hex()}"}} + "' + "x" * 100_000, pols)
        after = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    retained = sum(s.size_diff for s in after.compare_to(before, "filename"))
    assert retained < 200_000, f"{retained} bytes kept for {n} refused queries"


# =========================================================================== what held

async def _raw_http(port: int, data: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    try:
        return await asyncio.wait_for(reader.read(65536), 5)
    finally:
        writer.close()


async def test_framing_tricks_never_reach_the_upstream_as_a_second_request(db_dsn: str, aiohttp_client: Any,
                                                                         aiohttp_server: Any) -> None:
    """CR, NUL, obs-fold, TE+CL and a smuggled second request: aiohttp's server refuses them before the
    handler, and what is forwarded through the lean client is one request."""
    async with _env(db_dsn, aiohttp_client, aiohttp_server) as env:
        tok = await env.token(["metrics:read", "metrics:write"])
        auth = basic("100", tok)["Authorization"].encode()
        head = b"Host: x\r\nAuthorization: " + auth + b"\r\n"
        get = b"GET " + Q.encode() + b"?query=up HTTP/1.1\r\n"
        refused = {
            "bare CR": get + head + b"X-A: a\rb\r\n\r\n",
            "NUL": get + head + b"X-A: a\x00b\r\n\r\n",
            "obs-fold": get + head + b"X-A: a\r\n b\r\n\r\n",
            "TE+CL": b"POST /api/v1/push HTTP/1.1\r\n" + head
                     + b"Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            "TE not chunked": b"POST /api/v1/push HTTP/1.1\r\n" + head + b"Transfer-Encoding: gzip\r\n\r\nxx",
            "raw byte in query": b"GET " + Q.encode() + b"?query=up\xff HTTP/1.1\r\n" + head + b"\r\n",
        }
        port = env.gw.client.port
        for name, data in refused.items():
            out = await _raw_http(port, data)
            assert out.split(b" ", 2)[1] in (b"400", b"501"), (name, out[:200])
        assert env.rec.seen == []
        # a client header carrying a whole request line is only ever one header value upstream
        smuggle = "x HTTP/1.1 GET /distributor/all_user_stats HTTP/1.1 Host: x"
        r = await env.gw.client.get(f"{Q}?query=up", headers={**basic("100", tok), "X-A": smuggle,
                                                               "Content-Length": "0"})
        assert r.status == 200
        assert [(s.method, s.path) for s in env.rec.seen] == [("GET", Q)]
        assert env.rec.last.headers["X-A"] == smuggle


async def test_tenant_and_policy_headers_cannot_be_smuggled(db_dsn: str, aiohttp_client: Any,
                                                            aiohttp_server: Any) -> None:
    async with lbac_env(db_dsn, aiohttp_client, aiohttp_server, "header") as env:
        tok = await env.token(["metrics:read"], [{"type": "stack", "identifier": "100",
                                                  "labelPolicies": [{"selector": '{ns="allowed"}'}]}])
        r = await env.gw.client.get(f"{Q}?query=up", headers=[
            ("Authorization", basic("100", tok)["Authorization"]), ("x-scope-orgid", "200"),
            ("X-SCOPE-ORGID", "100|200"), ("X-Prom-Label-Policy", "100:%7Bns=~%22.%2A%22%7D"),
            ("x-prom-label-policy", "200:%7Ba=%22b%22%7D"), ("Connection", "X-Prom-Label-Policy"),
            ("X-Mimir-Anything", "1"), ("X-Http-Method-Override", "DELETE")])
        assert r.status == 200
        seen = env.rec.last.headers
        assert seen.getall("X-Scope-OrgID") == ["100"]
        assert seen.getall("X-Prom-Label-Policy") == [HEADER_100]
        assert "X-Mimir-Anything" not in seen and "X-Http-Method-Override" not in seen


async def test_non_utf8_header_values_do_not_crash_the_data_path(db_dsn: str, aiohttp_client: Any,
                                                                 aiohttp_server: Any) -> None:
    async with _env(db_dsn, aiohttp_client, aiohttp_server) as env:
        tok = await env.token(["metrics:read"])
        auth = basic("100", tok)["Authorization"].encode()
        port = env.gw.client.port
        for extra in (b"X-A: \xff\xfe\r\n", b"X-Grafana-User: \xff\r\n", b"X-Prom-Label-Policy: 100:\xff\r\n"):
            out = await _raw_http(port, b"GET " + Q.encode() + b"?query=up HTTP/1.1\r\nHost: x\r\nAuthorization: "
                                  + auth + b"\r\n" + extra + b"Connection: close\r\n\r\n")
            status = int(out.split(b" ", 2)[1])
            assert status in (200, 400), out[:300]
        for scheme in (b"Bearer", b"Basic"):  # (a non-ASCII Basic value once raised past the 401: a 500)
            out = await _raw_http(port, b"GET " + Q.encode() + b" HTTP/1.1\r\nHost: x\r\nAuthorization: " + scheme
                                  + b" \xff\xfe\r\nConnection: close\r\n\r\n")
            assert out.startswith(b"HTTP/1.1 401") and b"malformed" in out, out[:300]


async def test_malformed_credentials_are_401_and_never_echoed(db_dsn: str, aiohttp_client: Any,
                                                             aiohttp_server: Any) -> None:
    async with _env(db_dsn, aiohttp_client, aiohttp_server) as env:
        tok = await env.token(["metrics:read"])
        forged = tok[:-8] + ("A" * 8 if not tok.endswith("A" * 8) else "B" * 8)
        cases = [{"Authorization": "Basic " + base64.b64encode(b"\xff\xfe:x").decode()},
                 {"Authorization": "Bearer " + "glc_" + "A" * 2000},
                 {"Authorization": "Bearer glc_" + base64.urlsafe_b64encode(b"[" * 700).decode()},
                 {"Authorization": "Bearer glc_" + base64.urlsafe_b64encode(b'{"o":1,"i":[],"k":{}}').decode()},
                 basic("100", forged), {"Authorization": "Basic"}, {"Authorization": "bearer\t" + tok[:10]}]
        for headers in cases:
            r = await env.gw.client.get(f"{Q}?query=up", headers=headers)
            text = await r.text()
            assert r.status == 401, (headers, r.status, text)
            assert forged not in text and tok[4:40] not in text
        assert env.rec.seen == []


async def test_policy_regexes_are_not_evaluated_by_python_on_the_hot_path(db_dsn: str, aiohttp_client: Any,
                                                                          aiohttp_server: Any) -> None:
    """A catastrophic-backtracking policy regex costs nothing at the gateway: it is only forwarded (header)
    or spliced into the query (enforce), never matched by Python's `re` against request data."""
    for mode in ("header", "enforce"):
        async with lbac_env(db_dsn, aiohttp_client, aiohttp_server, mode) as env:
            tok = await env.token(["metrics:read"], [{"type": "stack", "identifier": "100",
                                                      "labelPolicies": [{"selector": '{ns=~"(a+)+$"}'}]}])
            loop = asyncio.get_running_loop()
            started = loop.time()
            r = await env.gw.client.get(f"{Q}?query=" + "up{ns=%22" + "a" * 40 + "!%22}", headers=basic("100", tok))
            assert r.status == 200 and loop.time() - started < 1.0


async def test_self_chosen_label_policy_cannot_widen_a_restricted_token(db_dsn: str, aiohttp_client: Any,
                                                                        aiohttp_server: Any) -> None:
    async with lbac_env(db_dsn, aiohttp_client, aiohttp_server, "enforce") as env:
        tok = await env.token(["metrics:read"], [{"type": "stack", "identifier": "100",
                                                  "labelPolicies": [{"selector": '{ns="allowed"}'}]}])
        r = await env.gw.client.get(f"{Q}?query=up", headers={**basic("100", tok),
                                                               "X-Prom-Label-Policy": "100:%7Bns=~%22.%2B%22%7D"})
        assert r.status == 200
        assert env.rec.last.query == [("query", 'up{ns="allowed"}')]
