"""Issue 22, findings 1 and 2, on the protocol data path over real sockets: llhttp alone frames a request
(a Content-Length with whitespace around it is a length, for every reader), no request's bytes land in
another's body, and a hand-over to aiohttp never feeds it a request that was already answered."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import re
from typing import Any

from gateway.dataplane.body import HIGH_WATER, Body
from tests.test_dataplane import Q, _dp, _exchange, _get
from tests.test_lbac_bypass import EQ, RR, lbac_env, read_request, restricted
from tests.test_proxy import basic

PUSH = "/api/v1/push"


def _auth(tok: str) -> bytes:
    return b"Authorization: " + basic("100", tok)["Authorization"].encode() + b"\r\n"


def _statuses(out: bytes) -> list[bytes]:
    return re.findall(rb"HTTP/1\.1 (\d{3}) ", out)


async def test_a_length_with_a_trailing_space_frames_the_body_for_the_upstream_too(
        db_dsn: str, aiohttp_client: Any, aiohttp_server: Any) -> None:
    async with _dp(db_dsn, aiohttp_client, aiohttp_server) as dp:
        tok = await dp.token(["metrics:write"])
        for value in (b"5 ", b"  5  ", b"0005", b"5\t", b"\t5"):
            dp.rec.seen.clear()
            data = (b"POST /api/v1/push HTTP/1.1\r\nHost: x\r\n" + _auth(tok) + b"Content-Length: " + value
                    + b"\r\nConnection: close\r\n\r\nhello")
            out = await _exchange(dp.port, data)
            if b"\t" in value:  # nginx refuses a tab there, llhttp skips it: refused, one reading for all
                assert _statuses(out) == [b"400"] and dp.rec.seen == [], (value, out[:300])
                continue
            assert _statuses(out) == [b"200"], (value, out[:300])
            assert [(s.method, s.path, s.body) for s in dp.rec.seen] == [("POST", PUSH, b"hello")], value
            assert dp.rec.last.headers["Content-Length"] == "5"


async def test_an_unauthenticated_body_with_a_trailing_space_length_is_dropped_and_the_connection_closed(
        db_dsn: str, aiohttp_client: Any, aiohttp_server: Any) -> None:
    """The answer (401) does not need the body: it is read and dropped, and the connection closes after it
    (on ae4b1b2 the request was judged bodiless and kept alive, its 200 MiB stored)."""
    async with _dp(db_dsn, aiohttp_client, aiohttp_server) as dp:
        reader, writer = await asyncio.open_connection("127.0.0.1", dp.port)
        writer.write(b"POST /api/v1/push HTTP/1.1\r\nHost: x\r\nContent-Length: 209715200 \r\n\r\n"
                     + b"A" * 65536)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        writer.close()
        assert head.startswith(b"HTTP/1.1 401 ") and b"Connection: close" in head, head
        assert dp.rec.seen == []


async def test_body_bytes_never_reach_another_requests_body(db_dsn: str, aiohttp_client: Any,
                                                            aiohttp_server: Any) -> None:
    """An unauthenticated client sends a remote-read body under a length the old server misread; a
    label-restricted, bodiless remote read on another connection then must not read it as its own."""
    async with lbac_env(db_dsn, aiohttp_client, aiohttp_server, "enforce") as env:
        port = env.gw.client.server.port
        h = await restricted(env)
        victim = (b"POST /prometheus/api/v1/read HTTP/1.1\r\nHost: x\r\n"
                  + "".join(f"{k}: {v}\r\n" for k, v in {**h, **RR}.items()).encode()
                  + b"Content-Length: 0\r\nConnection: close\r\n\r\n")
        await _exchange(port, victim)  # (on ae4b1b2, this one takes whatever earlier tests left in that body)
        smuggled = read_request([(EQ, "__name__", "secret_metric")])
        out = await _exchange(port, b"POST /prometheus/api/v1/read HTTP/1.1\r\nHost: x\r\nContent-Length: %d \r\n"
                              b"\r\n%b" % (len(smuggled), smuggled), until=b'"}')
        assert out.startswith(b"HTTP/1.1 401 ") and b"Connection: close" in out, out[:200]
        out = await _exchange(port, victim)
        assert out.startswith(b"HTTP/1.1 400 ") and b"not snappy" in out, out[:300]  # its own, empty body
        assert all(b"secret_metric" not in s.body for s in env.rec.seen)


async def test_a_hand_over_after_a_split_head_feeds_aiohttp_only_the_requests_not_answered(
        db_dsn: str, aiohttp_client: Any, aiohttp_server: Any) -> None:
    """A push whose head arrives in two reads, then a pipelined /health: one push upstream, two answers
    (on ae4b1b2: the push went upstream twice and the client read three answers)."""
    async with _dp(db_dsn, aiohttp_client, aiohttp_server) as dp:
        tok = await dp.token(["metrics:write"])
        reader, writer = await asyncio.open_connection("127.0.0.1", dp.port)
        writer.write(b"POST /api/v1/push HTTP/1.1\r\nHost: x\r\n")
        await writer.drain()
        await asyncio.sleep(0.2)  # (only so that the head arrives in two reads; nothing is timed)
        writer.write(_auth(tok) + b"Content-Length: 5\r\n\r\nhello"
                     + b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        out = b""
        async with asyncio.timeout(10):
            while chunk := await reader.read(65536):
                out += chunk
        writer.close()
        assert [(s.method, s.path, s.body) for s in dp.rec.seen] == [("POST", PUSH, b"hello")]
        assert _statuses(out) == [b"200", b"200"], out
        assert out.endswith(b'{"status": "ok"}')  # /health's answer, from aiohttp


async def test_data_path_and_admin_requests_pipelined_in_any_order_are_each_answered_once(
        db_dsn: str, aiohttp_client: Any, aiohttp_server: Any) -> None:
    async with _dp(db_dsn, aiohttp_client, aiohttp_server) as dp:
        tok = await dp.token(["metrics:read", "metrics:write"])
        chunked = (b"POST /api/v1/push HTTP/1.1\r\nHost: x\r\n" + _auth(tok)
                   + b"Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\n")
        data = (_get(tok, f"{Q}?query=a") + b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n" + chunked
                + _get(tok, f"{Q}?query=b", b"Connection: close\r\n"))
        for cut in (0, 40, len(data) // 2, len(data) - 3):
            dp.rec.seen.clear()
            reader, writer = await asyncio.open_connection("127.0.0.1", dp.port)
            writer.write(data[:cut])
            await writer.drain()
            await asyncio.sleep(0.05)
            writer.write(data[cut:])
            out = b""
            async with asyncio.timeout(10):
                while chunk := await reader.read(65536):
                    out += chunk
            writer.close()
            assert _statuses(out) == [b"200"] * 4, (cut, out)
            assert [(s.method, s.path, s.body) for s in dp.rec.seen] == [
                ("GET", Q, b""), ("POST", PUSH, b"abcde"), ("GET", Q, b"")], cut


async def test_a_body_nobody_reads_is_never_held(db_dsn: str, aiohttp_client: Any, aiohttp_server: Any) -> None:
    """8 MiB behind an unauthenticated push with a padded length: dropped as they arrive, no body buffer
    holds more than its flow-control mark (on ae4b1b2 the shared bodiless body kept them all)."""
    async with _dp(db_dsn, aiohttp_client, aiohttp_server) as dp:
        reader, writer = await asyncio.open_connection("127.0.0.1", dp.port)
        writer.write(b"POST /api/v1/push HTTP/1.1\r\nHost: x\r\nContent-Length: 209715200 \r\n\r\n")
        with contextlib.suppress(OSError):
            for _ in range(128):
                writer.write(b"A" * 65536)
                await writer.drain()
        head = await asyncio.wait_for(reader.read(65536), 10)
        writer.close()
        held = [b._size for b in gc.get_objects() if isinstance(b, Body)]
        assert head.startswith(b"HTTP/1.1 401 ") and max(held, default=0) <= HIGH_WATER, (head[:100], max(held))


async def test_after_a_hand_over_bodies_reach_aiohttp_as_llhttp_framed_them(
        db_dsn: str, aiohttp_client: Any, aiohttp_server: Any) -> None:
    """A chunked admin API request (with a chunk extension) behind /health: aiohttp reads the body llhttp
    read; an upgrade with a body is refused; a malformed request after a hand-over closes the connection
    after the answers before it, and nothing after it is answered."""
    async with _dp(db_dsn, aiohttp_client, aiohttp_server) as dp:
        body = json.dumps({"name": "chunky", "scopes": ["metrics:read"],
                           "realms": [{"type": "stack", "identifier": "100"}]}).encode()
        chunked = b"%x;ext=1\r\n%b\r\n%x\r\n%b\r\n0\r\n\r\n" % (10, body[:10], len(body) - 10, body[10:])
        out = await _exchange(dp.port, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
                              b"POST /api/v1/accesspolicies HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                              + dp.gw.admin_token.encode() + b"\r\nContent-Type: application/json\r\n"
                              b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n" + chunked)
        assert _statuses(out) == [b"200", b"200"] and b'"name": "chunky"' in out, out[-400:]
        out = await _exchange(dp.port, b"GET /loki/api/v1/tail?query={a=\"b\"} HTTP/1.1\r\nHost: x\r\n"
                              b"Connection: Upgrade\r\nUpgrade: websocket\r\nContent-Length: 5\r\n\r\nhello")
        assert _statuses(out) == [b"400"] and b"protocol switch" in out, out
        out = await _exchange(dp.port, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\nGET /health HTTP/1.1\r\nHost: x\r\n"
                              b"X: \x00\r\n\r\nGET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert _statuses(out) == [b"200"], out
        assert dp.rec.seen == []


async def test_framing_refusals_close_the_connection_and_forward_nothing(
        db_dsn: str, aiohttp_client: Any, aiohttp_server: Any) -> None:
    async with _dp(db_dsn, aiohttp_client, aiohttp_server) as dp:
        tok = await dp.token(["metrics:read", "metrics:write"])
        push = b"POST /api/v1/push HTTP/1.1\r\nHost: x\r\n" + _auth(tok)
        cases = [
            (push + b"Transfer-Encoding: gzip, chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n", b"501"),
            (push + b"Content-Length:\t5\r\n\r\nhello", b"400"),
            (push.replace(b"HTTP/1.1", b"HTTP/1.0") + b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n", b"400"),
            (_get(tok).replace(b"HTTP/1.1", b"HTTP/2.0"), b"505"),
            (_get(tok).replace(b"Host: x\r\n", b""), b"400"),
            (_get(tok).replace(b"Host: x\r\n", b"Host: x\r\nHost: y\r\n"), b"400"),
            (_get(tok).replace(b"Host: x\r\n", b"Host: a/b\r\n"), b"400"),
            (_get(tok, f"{Q}?query=up#f"), b"400"),
            (_get(tok).replace(b"GET", b"TRACE"), b"405"),
            (push + b"Expect: 100-continue\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\nhello", b"400"),
        ]
        for data, status in cases:
            out = await _exchange(dp.port, data + _get(tok))  # (a good request behind: never answered)
            assert _statuses(out) == [status] and b"Connection: close" in out, (data[:60], out[:300])
        assert dp.rec.seen == []


async def test_a_websocket_upgrade_pipelined_behind_a_data_path_request_gets_the_socket_after_it(
        db_dsn: str, aiohttp_client: Any, aiohttp_server: Any) -> None:
    async with _dp(db_dsn, aiohttp_client, aiohttp_server) as dp:
        tok = await dp.token(["metrics:read", "logs:read"])
        upgrade = (b"GET /loki/api/v1/tail?query=%7Bapp%3D%22x%22%7D HTTP/1.1\r\nHost: x\r\n" + _auth(tok)
                   + b"Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
                   b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n")
        reader, writer = await asyncio.open_connection("127.0.0.1", dp.port)
        writer.write(_get(tok, f"{Q}?query=a") + upgrade)
        out = b""
        async with asyncio.timeout(10):
            while b"hello" not in out:
                out += await reader.read(65536)
        writer.close()
        assert _statuses(out) == [b"200", b"101"], out
        assert [s.method for s in dp.rec.seen] == ["GET", "WS"]


async def _one_by_one(port: int, requests: list[bytes]) -> list[bytes]:
    """Each request sent after the previous answer (a keep-alive client such as requests): each answer, or
    b"" when the connection closed, or b"<hang>" when nothing came within 5 s."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    outs = []
    try:
        for data in requests:
            writer.write(data)
            try:
                async with asyncio.timeout(5):
                    head = await reader.readuntil(b"\r\n\r\n")
                    length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))  # type: ignore[union-attr]
                    outs.append(head + await reader.readexactly(length))
            except TimeoutError:
                outs.append(b"<hang>")
            except asyncio.IncompleteReadError:
                outs.append(b"")
    finally:
        writer.close()
    return outs


async def test_after_a_hand_over_every_request_is_answered_in_turn_never_left_hanging(
        db_dsn: str, aiohttp_client: Any, aiohttp_server: Any) -> None:
    """A keep-alive client whose connection was handed to aiohttp: TRACE gets aiohttp's JSON 405 (it echoes
    nothing), a request that does not parse gets a 400 and the close (on the first cut both hung: the client
    waited for an answer that never came)."""
    async with _dp(db_dsn, aiohttp_client, aiohttp_server) as dp:
        health = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
        outs = await _one_by_one(dp.port, [health, b"TRACE /api/instances HTTP/1.1\r\nHost: x\r\n\r\n", health])
        assert _statuses(outs[0]) == [b"200"] and _statuses(outs[2]) == [b"200"], outs
        assert _statuses(outs[1]) == [b"405"] and b"application/json" in outs[1], outs
        outs = await _one_by_one(dp.port, [health, b"GET /health HTTP/1.1\r\nHost: a/b\r\n\r\n", health])
        assert _statuses(outs[0]) == [b"200"] and outs[1].startswith(b"HTTP/1.0 400 ") and outs[2] == b"", outs
        assert dp.rec.seen == []


async def test_a_heads_fields_in_a_short_first_read_count_toward_its_bound(
        db_dsn: str, aiohttp_client: Any, aiohttp_server: Any) -> None:
    """A read of a few hundred bytes that starts a head has its fields collected without counting them
    (``server._LIGHT_READ``); when the head goes on in the next reads they are counted then, so the 64 KiB
    bound on header fields is the same however the head was cut into reads."""
    async with _dp(db_dsn, aiohttp_client, aiohttp_server) as dp:
        # (httptools hands a field over when the next one starts: Host and X-A, 316 bytes, in this read)
        first = f"GET {Q} HTTP/1.1\r\nHost: x\r\nX-A: ".encode() + b"a" * 300 + b"\r\nX-Z: z\r\n"
        assert len(first) <= 400
        # 65,379 bytes of fields after them: under the 65,536 alone, over it with the first read's
        rest = b"".join(b"X-B%d: %s\r\n" % (i, b"b" * 8000) for i in range(8)) + b"X-C0: " + b"c" * 1300 + b"\r\n"
        reader, writer = await asyncio.open_connection("127.0.0.1", dp.port)
        try:
            writer.write(first)
            await writer.drain()
            await asyncio.sleep(0.3)  # (read alone)
            writer.write(rest + b"\r\n")
            out = b""
            with contextlib.suppress(ConnectionError):
                async with asyncio.timeout(5):
                    while chunk := await reader.read(65536):
                        out += chunk
        finally:
            writer.close()
        assert _statuses(out) == [b"431"], out[:300]
        assert dp.rec.seen == []
