"""The protocol data path (gateway/dataplane) over real sockets: framing, keep-alive and pipelining,
Expect: 100-continue, streaming both ways, disconnects, deadlines, the connection cap, and the hand-over
of everything else to aiohttp on the same port. (The whole suite runs on it: it is the only data path.)"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from gateway.dataplane import Settings
from gateway.dataplane.server import wants_aiohttp
from tests.conftest import Gateway, bootstrap_token, make_config
from tests.dataplane_server import ProtocolTestServer
from tests.recorder import Recorder
from tests.test_proxy import basic, slow_upstream

Q = "/prometheus/api/v1/query"


@dataclass
class DP:
    gw: Gateway
    rec: Recorder
    port: int

    async def token(self, scopes: list[str]) -> str:
        name = f"p{os.urandom(4).hex()}"
        p = await self.gw.policy(name, scopes, [{"type": "stack", "identifier": "100"}])
        return str((await self.gw.token(p["id"], name))["token"])


@contextlib.asynccontextmanager
async def _dp(db_dsn: str, aiohttp_client: Any, aiohttp_server: Any, settings: Settings | None = None,
              upstream: web.Application | None = None, rec: Recorder | None = None) -> AsyncIterator[DP]:
    from gateway.app import build_app, close_state, open_state

    rec = rec or Recorder()
    up = await aiohttp_server(upstream or rec.app())
    url = f"http://127.0.0.1:{up.port}"
    state = await open_state(make_config(db_dsn, upstreams={"metrics": {"url": url}, "logs": {"url": url},
                                                            "traces": {"url": url}}))
    try:
        server = ProtocolTestServer(build_app(state), settings)
        client = await aiohttp_client(server)
        yield DP(Gateway(client, state, await bootstrap_token(state)), rec, server.port or 0)
    finally:
        await close_state(state)


async def _exchange(port: int, data: bytes, until: bytes | None = None, wait: float = 5) -> bytes:
    """Send raw bytes; read until the peer closes (or ``until`` appears)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    out = b""
    try:
        async with asyncio.timeout(wait):
            while chunk := await reader.read(65536):
                out += chunk
                if until is not None and until in out:
                    break
    finally:
        writer.close()
    return out


def _get(tok: str, path: str = f"{Q}?query=up", extra: bytes = b"") -> bytes:
    return (f"GET {path} HTTP/1.1\r\nHost: x\r\n".encode() + b"Authorization: "
            + basic("100", tok)["Authorization"].encode() + b"\r\n" + extra + b"\r\n")


async def test_data_path_is_served_by_the_protocol_server_and_the_rest_by_aiohttp(
        db_dsn: str, aiohttp_client: Any, aiohttp_server: Any) -> None:
    async with _dp(db_dsn, aiohttp_client, aiohttp_server) as dp:
        r = await dp.gw.client.get(f"{Q}?query=up")
        assert r.status == 401 and (await r.json())["errorType"] == "unauthorized"
        assert "Server" not in r.headers  # aiohttp's server would have said its name
        r = await dp.gw.client.get("/ready")
        assert r.status == 200 and r.headers["Server"].startswith("Python/")
        tok = await dp.token(["metrics:read"])  # the admin API, through the hand-over
        r = await dp.gw.client.get(f"{Q}?query=up", headers=basic("100", tok))
        assert r.status == 200, await r.text()
        assert dp.rec.last.headers["X-Scope-OrgID"] == "100"


def test_the_admin_routes_never_match_a_data_path_route() -> None:
    """Which server answers is decided by the route table; no admin, page or health path is in it."""
    from gateway.app import build_app
    from tests.test_deploy import stub_state

    app = build_app(stub_state(make_config("postgresql://x/y")))
    paths = [r.canonical for r in app.router.resources() if "{tail" not in r.canonical]
    assert "/api/v1/accesspolicies" in paths and "/ready" in paths
    headers: CIMultiDictProxy[str] = CIMultiDictProxy(CIMultiDict())
    for path in paths:
        for method in ("GET", "POST", "PUT", "DELETE", "PATCH"):
            assert wants_aiohttp(method, path.replace("{", "").replace("}", ""), headers), (method, path)


async def test_keep_alive_and_pipelined_requests_are_answered_in_order(db_dsn: str, aiohttp_client: Any,
                                                                      aiohttp_server: Any) -> None:
    async with _dp(db_dsn, aiohttp_client, aiohttp_server) as dp:
        tok = await dp.token(["metrics:read"])
        three = (_get(tok, f"{Q}?query=a") + _get(tok, f"{Q}?query=b")
                 + f"GET {Q}?query=c HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        out = await _exchange(dp.port, three)
        assert out.count(b"HTTP/1.1 200 ") == 2 and out.count(b"HTTP/1.1 401 ") == 1
        assert out.rindex(b"HTTP/1.1 200 ") < out.index(b"HTTP/1.1 401 ")  # in order
        assert [s.query for s in dp.rec.seen] == [[("query", "a")], [("query", "b")]]
        # a pipelined admin request behind a data-path one: aiohttp answers it after the data-path answer
        out = await _exchange(dp.port, _get(tok) + b"GET /ready HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert out.count(b"HTTP/1.1 200 ") == 2 and out.index(b'"resultType"') < out.index(b"HTTP/1.1 200 ", 1)
        assert len(dp.rec.seen) == 3


@pytest.mark.parametrize(("name", "data", "status"), [
    ("duplicate Content-Length", b"POST /api/v1/push HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n"
                                 b"Content-Length: 2\r\n\r\nab", b"400"),
    ("CL+TE", b"POST /api/v1/push HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n"
              b"0\r\n\r\n", b"400"),
    ("obs-fold", b"GET /prometheus/api/v1/query HTTP/1.1\r\nHost: x\r\nX-A: a\r\n b\r\n\r\n", b"400"),
    ("bare CR", b"GET /prometheus/api/v1/query HTTP/1.1\r\nHost: x\r\nX-A: a\rb\r\n\r\n", b"400"),
    ("bare LF", b"GET /prometheus/api/v1/query HTTP/1.1\nHost: x\n\n", b"400"),
    ("space before colon", b"GET /prometheus/api/v1/query HTTP/1.1\r\nHost : x\r\n\r\n", b"400"),
    ("chunk size overflow", b"POST /api/v1/push HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                            b"fffffffffffffffff\r\n", b"400"),
    ("long target", b"GET /prometheus/api/v1/query?q=" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", b"414"),
    ("long header", b"GET /prometheus/api/v1/query HTTP/1.1\r\nHost: x\r\nX-A: " + b"a" * 9000 + b"\r\n\r\n",
     b"431"),
    ("many headers", b"GET /prometheus/api/v1/query HTTP/1.1\r\nHost: x\r\n"
                     + b"".join(b"X-%d: a\r\n" % i for i in range(200)) + b"\r\n", b"431"),
    ("raw byte in target", b"GET /prometheus/api/v1/query?query=up\xff HTTP/1.1\r\nHost: x\r\n\r\n", b"400"),
    ("Expect other", b"POST /api/v1/push HTTP/1.1\r\nHost: x\r\nExpect: 200-ok\r\nContent-Length: 1\r\n\r\na",
     b"417"),
])
async def test_ambiguous_or_oversized_requests_are_refused_and_never_forwarded(
        db_dsn: str, aiohttp_client: Any, aiohttp_server: Any, name: str, data: bytes, status: bytes) -> None:
    async with _dp(db_dsn, aiohttp_client, aiohttp_server) as dp:
        out = await _exchange(dp.port, data)
        assert out.split(b" ", 2)[1] == status, (name, out[:300])
        assert b'"status": "error"' in out or b'"status":"error"' in out, out[:300]
        assert dp.rec.seen == []


async def test_expect_100_continue_is_sent_only_once_the_request_is_authorized(
        db_dsn: str, aiohttp_client: Any, aiohttp_server: Any) -> None:
    async with _dp(db_dsn, aiohttp_client, aiohttp_server) as dp:
        tok = await dp.token(["metrics:write"])
        body = os.urandom(5000)
        head = (b"POST /api/v1/push HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: %d\r\n"
                % len(body))
        # refused: the answer comes without a 100, and the connection closes (the body never came)
        out = await _exchange(dp.port, head + b"\r\n")
        assert out.startswith(b"HTTP/1.1 401 ") and b"100 Continue" not in out
        assert b"Connection: close" in out
        reader, writer = await asyncio.open_connection("127.0.0.1", dp.port)
        try:
            writer.write(head + b"Authorization: " + basic("100", tok)["Authorization"].encode() + b"\r\n\r\n")
            assert await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5) == b"HTTP/1.1 100 Continue\r\n\r\n"
            writer.write(body)
            status = await asyncio.wait_for(reader.readuntil(b"\r\n"), 5)
            assert status.startswith(b"HTTP/1.1 200 ")
        finally:
            writer.close()
        assert dp.rec.last.body == body


async def test_big_bodies_stream_both_ways_intact(db_dsn: str, aiohttp_client: Any, aiohttp_server: Any) -> None:
    big = os.urandom(3 << 20)

    async def reply(request: web.Request) -> web.StreamResponse:
        got = hashlib.sha256(await request.read()).hexdigest()
        resp = web.StreamResponse(headers={"X-Got": got})  # chunked: no length
        await resp.prepare(request)
        for i in range(0, len(big), 1 << 16):
            await resp.write(big[i:i + (1 << 16)])
        await resp.write_eof()
        return resp

    app = web.Application(client_max_size=1 << 30)
    app.router.add_route("*", "/{tail:.*}", reply)
    async with _dp(db_dsn, aiohttp_client, aiohttp_server, upstream=app) as dp:
        tok = await dp.token(["metrics:write", "metrics:read"])
        chunks = [big[i:i + 100_000] for i in range(0, len(big), 100_000)]

        async def gen() -> AsyncIterator[bytes]:
            for c in chunks:
                yield c
        r = await dp.gw.client.post("/api/v1/push", data=gen(), headers=basic("100", tok))  # chunked upload
        assert r.status == 200
        assert r.headers["X-Got"] == hashlib.sha256(big).hexdigest()
        assert r.headers.get("Transfer-Encoding") == "chunked"
        assert await r.read() == big
        # again on the same connection, with a length
        r = await dp.gw.client.post("/api/v1/push", data=big, headers=basic("100", tok))
        assert r.status == 200 and await r.read() == big


async def test_a_client_that_hangs_up_cancels_the_upstream_exchange(db_dsn: str, aiohttp_client: Any,
                                                                    aiohttp_server: Any) -> None:
    app, started, cancelled = slow_upstream()
    async with _dp(db_dsn, aiohttp_client, aiohttp_server, upstream=app) as dp:
        tok = await dp.token(["metrics:read"])
        reader, writer = await asyncio.open_connection("127.0.0.1", dp.port)
        writer.write(_get(tok))
        await asyncio.wait_for(started.wait(), 5)
        assert dp.gw.state.in_flight == 1
        writer.close()
        await asyncio.wait_for(cancelled.wait(), 5)
        for _ in range(100):
            if dp.gw.state.in_flight == 0:
                break
            await asyncio.sleep(0.02)
        assert dp.gw.state.in_flight == 0


async def test_deadlines_and_the_connection_cap(db_dsn: str, aiohttp_client: Any, aiohttp_server: Any) -> None:
    settings = Settings(head_timeout=0.3, keepalive_timeout=0.3, body_timeout=0.3, max_connections=2)
    async with _dp(db_dsn, aiohttp_client, aiohttp_server, settings) as dp:
        tok = await dp.token(["metrics:write"])
        # a head that never ends (slowloris)
        out = await _exchange(dp.port, b"GET /prometheus/api/v1/query HTTP/1.1\r\nHost: x\r\n")
        assert out.startswith(b"HTTP/1.1 408 ")
        # an idle keep-alive connection closes
        out = await _exchange(dp.port, _get(tok), wait=3)
        assert out.startswith(b"HTTP/1.1 403 ") and out.count(b"HTTP/1.1") == 1
        # a body that stops arriving: the connection closes, nothing reaches the upstream
        out = await _exchange(dp.port, b"POST /api/v1/push HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n"
                              b"Authorization: " + basic("100", tok)["Authorization"].encode() + b"\r\n\r\nabc",
                              wait=3)
        assert b"HTTP/1.1 200" not in out
        assert dp.rec.seen == []
        # the cap: two connections held open, the third is told to come back later
        held = [await asyncio.open_connection("127.0.0.1", dp.port) for _ in range(2)]
        try:
            for _r, w in held:
                w.write(b"GET / HTTP/1.1\r\n")  # keep them in the head phase
            await asyncio.sleep(0.05)
            out = await _exchange(dp.port, _get(tok))
            assert out.startswith(b"HTTP/1.1 503 ")
        finally:
            for _r, w in held:
                w.close()


async def test_loki_tail_websocket_is_relayed_through_the_hand_over(db_dsn: str, aiohttp_client: Any,
                                                                   aiohttp_server: Any) -> None:
    async with _dp(db_dsn, aiohttp_client, aiohttp_server) as dp:
        tok = await dp.token(["logs:read"])
        async with dp.gw.client.ws_connect("/loki/api/v1/tail?query=%7Bapp%3D%22x%22%7D",
                                           headers=basic("100", tok)) as ws:
            first = await asyncio.wait_for(ws.receive_str(), 5)
            assert "hello" in first
            await ws.send_str("ping")
            assert await asyncio.wait_for(ws.receive_str(), 5) == "echo:ping"
        assert dp.rec.last.method == "WS" and dp.rec.last.headers["X-Scope-OrgID"] == "100"


async def test_an_http2_preface_gets_a_clear_error_not_a_parse_failure(db_dsn: str, aiohttp_client: Any,
                                                                        aiohttp_server: Any) -> None:
    # Grafana's Tempo streaming dials gRPC (HTTP/2 with prior knowledge) at the data source's host and port.
    async with _dp(db_dsn, aiohttp_client, aiohttp_server) as dp:
        out = await _exchange(dp.port, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x12\x04\x00\x00\x00\x00\x00")
        head, _, body = out.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 505 "), out[:300]
        assert b"Streaming off" in body and b'"status": "error"' in body, body
        assert dp.rec.seen == []
