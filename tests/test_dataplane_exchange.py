"""The protocol data path's callback exchange (gateway/dataplane/exchange.py, gateway/proxy/fastpath.py):
a bodiless request with a cached decision, sent on an idle pooled upstream connection without a handler
task. Over real sockets: that it is taken (and when it is not), keep-alive and pipelining, the same access
log line and metrics as the handler's, upstream failures (a closed pooled connection retried, a broken or
silent upstream answered 502/504), big answers streamed, HEAD, and a client hanging up."""

from __future__ import annotations

import asyncio
import contextlib
import io
import ipaddress
import json
from collections.abc import AsyncIterator, Callable
from typing import Any, cast

import pytest

from gateway.dataplane import exchange
from gateway.logfmt import access_line
from gateway.proxy import fastpath
from tests.recorder import Recorder
from tests.test_dataplane import DP, Q, _dp, _exchange, _get
from tests.test_proxy import basic


@pytest.fixture
def taken(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The targets of the requests the exchange took (``exchange.start`` returned True)."""
    seen: list[str] = []
    real = exchange.start

    def spy(proto: Any, req: Any) -> bool:
        ok = real(proto, req)
        if ok:
            seen.append(f"{req.rel_url.raw_path}?{req.rel_url.raw_query_string}")
        return ok

    monkeypatch.setattr(exchange, "start", spy)
    return seen


async def _prime(dp: DP, tok: str) -> None:
    """One request through the handler: the decision is cached and a connection pooled afterwards."""
    out = await _exchange(dp.port, _get(tok, extra=b"Connection: close\r\n"))
    assert out.startswith(b"HTTP/1.1 200 "), out


def _answers(out: bytes) -> list[bytes]:
    return [b"HTTP/1.1 " + part for part in out.split(b"HTTP/1.1 ")[1:]]


async def test_keep_alive_requests_go_by_callbacks_once_the_decision_is_cached(
        db_dsn: str, aiohttp_client: Any, aiohttp_server: Any, taken: list[str]) -> None:
    async with _dp(db_dsn, aiohttp_client, aiohttp_server) as dp:
        tok = await dp.token(["metrics:read"])
        await _prime(dp, tok)
        assert taken == []  # the first use of a token is decided by the handler
        reader, writer = await asyncio.open_connection("127.0.0.1", dp.port)
        try:
            for i in range(4):
                writer.write(_get(tok, f"{Q}?query=q{i}"))
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
                assert head.startswith(b"HTTP/1.1 200 "), head
                length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
                assert await reader.readexactly(length) == dp.rec.reply
                assert b"Connection: close" not in head
        finally:
            writer.close()
        assert taken == [f"{Q}?query=q{i}" for i in range(4)]
        last = dp.rec.seen[-1]
        assert last.query == [("query", "q3")] and last.headers["X-Scope-OrgID"] == "100"
        assert "Authorization" not in last.headers and last.headers["X-Forwarded-For"] == "127.0.0.1"


async def test_pipelined_requests_are_answered_in_order_and_close_when_asked(
        db_dsn: str, aiohttp_client: Any, aiohttp_server: Any, taken: list[str]) -> None:
    async with _dp(db_dsn, aiohttp_client, aiohttp_server) as dp:
        tok = await dp.token(["metrics:read"])
        await _prime(dp, tok)
        n = len(dp.rec.seen)
        burst = b"".join(_get(tok, f"{Q}?query=p{i}") for i in range(3)) + _get(
            tok, f"{Q}?query=p3", b"Connection: close\r\n")
        out = await _exchange(dp.port, burst)  # read until the gateway closes
        answers = _answers(out)
        assert len(answers) == 4 and all(a.startswith(b"HTTP/1.1 200 ") for a in answers), out
        assert b"Connection: close" in answers[-1] and all(b"Connection: close" not in a for a in answers[:-1])
        assert [s.query for s in dp.rec.seen[n:]] == [[("query", f"p{i}")] for i in range(4)]
        assert len(taken) == 4


async def test_the_access_log_line_and_metrics_are_the_handlers(
        db_dsn: str, aiohttp_client: Any, aiohttp_server: Any, taken: list[str]) -> None:
    from gateway.proxy.handler import ACCESS_LOG
    from gateway.tally import TALLY

    async with _dp(db_dsn, aiohttp_client, aiohttp_server) as dp:
        log = dp.gw.client.server.app[ACCESS_LOG]
        log.stream, log.enabled = io.StringIO(), True
        tok = await dp.token(["metrics:read"])
        await _prime(dp, tok)
        before = TALLY._requests.get(("metrics", "metrics:read", "200"), 0)
        out = await _exchange(dp.port, _get(tok, extra=b"Connection: close\r\n"))
        assert out.startswith(b"HTTP/1.1 200 ") and len(taken) == 1
        log.flush()
        raw = log.stream.getvalue().splitlines()[-1]
        slow, fast = (json.loads(line) for line in log.stream.getvalue().splitlines()[-2:])
        assert list(fast) == list(slow)  # the same fields in the same order
        # the callback path's line comes from a template: byte for byte what the encoder makes of its fields
        assert raw == access_line(dict(list(fast.items())[2:]))
        for k in ("method", "path", "token_id", "policy", "tenant", "client_ip", "status", "bytes"):
            assert fast[k] == slow[k], k
        assert fast["bytes"] == len(dp.rec.reply) and fast["duration_ms"] > 0 and fast["upstream_ms"] >= 0
        assert TALLY._requests.get(("metrics", "metrics:read", "200"), 0) == before + 1
        assert dp.gw.state.in_flight == 0 and dp.gw.state.idle.is_set()


async def test_a_keep_alive_connection_sees_a_revoked_token_and_a_restricted_policy_at_once(
        db_dsn: str, aiohttp_client: Any, aiohttp_server: Any, taken: list[str]) -> None:
    """What the callback path keeps per connection holds for one policy generation only."""
    async with _dp(db_dsn, aiohttp_client, aiohttp_server) as dp:
        p = await dp.gw.policy("kept", ["metrics:read"], [{"type": "stack", "identifier": "100"}])
        t = await dp.gw.token(p["id"], "kept")
        tok = str(t["token"])
        await _prime(dp, tok)
        reader, writer = await asyncio.open_connection("127.0.0.1", dp.port)

        async def ask() -> bytes:
            writer.write(_get(tok))
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            await reader.readexactly(int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0]))
            return head

        try:
            assert (await ask()).startswith(b"HTTP/1.1 200 ") and len(taken) == 1
            # a label policy added to the token's policy: the next request on this connection is narrowed
            await dp.gw.api("POST", f"/api/v1/accesspolicies/{p['id']}", {
                "scopes": ["metrics:read"], "realms": [{"type": "stack", "identifier": "100",
                                                        "labelPolicies": [{"selector": '{env="dev"}'}]}]})
            assert (await ask()).startswith(b"HTTP/1.1 200 ")
            assert 'env="dev"' in dp.rec.seen[-1].query[0][1] or \
                dp.rec.seen[-1].headers.getall("X-Prom-Label-Policy", [])
            await dp.gw.api("DELETE", f"/api/v1/tokens/{t['id']}", expect=200)
            assert (await ask()).startswith(b"HTTP/1.1 401 ")
        finally:
            writer.close()


async def test_what_the_exchange_declines_goes_to_the_handler(
        db_dsn: str, aiohttp_client: Any, aiohttp_server: Any, taken: list[str]) -> None:
    async with _dp(db_dsn, aiohttp_client, aiohttp_server) as dp:
        tok = await dp.token(["metrics:read"])
        await _prime(dp, tok)
        # a token never seen, a client-sent label policy, an unknown route: all the handler's
        other = await dp.token(["metrics:read"])
        out = await _exchange(dp.port, _get(other, extra=b"Connection: close\r\n"))
        assert out.startswith(b"HTTP/1.1 200 ")
        out = await _exchange(dp.port, _get(tok, extra=b'X-Prom-Label-Policy: 100:%7Bjob%3D%22a%22%7D\r\n'
                                                      b"Connection: close\r\n"))
        assert out.startswith(b"HTTP/1.1 200 ")
        last = dp.rec.seen[-1]  # narrowed by the handler: the query rewritten (enforce) or the header sent
        assert last.query != [("query", "up")] or "X-Prom-Label-Policy" in last.headers
        out = await _exchange(dp.port, _get(tok, "/prometheus/api/v1/nope", b"Connection: close\r\n"))
        assert out.startswith(b"HTTP/1.1 404 ")
        assert taken == []


def test_prepare_declines_without_a_cached_decision() -> None:
    """``prepare`` is pure: nothing cached, nothing prepared (and nothing changed)."""
    from multidict import CIMultiDict, CIMultiDictProxy

    from gateway.app import build_app
    from gateway.dataplane.request import RelURL
    from gateway.decision_cache import DecisionCache
    from gateway.proxy.forward import Upstreams
    from gateway.routes import match
    from tests.conftest import make_config
    from tests.test_deploy import stub_state

    st = stub_state(make_config("postgresql://x/y"))
    st.cache.generation = 0
    build_app(st)

    class Req:
        method = "GET"
        headers = CIMultiDictProxy(CIMultiDict({"Authorization": "Basic eDp5"}))
        rel_url = RelURL("/prometheus/api/v1/query", "query=up")
        remote = "127.0.0.1"
        body_exists = False
        memo: dict[object, object] = {}

    m = match("GET", "/prometheus/api/v1/query")
    assert m is not None
    st.decisions = DecisionCache()
    assert fastpath.prepare(Req(), st, m, Upstreams()) is None  # type: ignore[arg-type]
    facts = cast(tuple[object, ...], Req.memo["ip"])  # the client address, resolved once per header set
    assert len(st.decisions) == 0 and facts[1:] == (ipaddress.ip_address("127.0.0.1"),)


# ---- a scripted raw upstream ---------------------------------------------------------------------------

OK = b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}'


@contextlib.asynccontextmanager
async def _raw_upstream(script: list[Callable[[asyncio.StreamWriter], Any]]) -> AsyncIterator[tuple[int, list[int]]]:
    """An HTTP/1.1 upstream that answers its n-th request with ``script[n]`` (an async function of the
    writer; the last one repeats); yields its port and the connection number of each request."""
    seen: list[int] = []
    conns = 0

    async def on_conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal conns
        conns += 1
        me = conns
        try:
            while True:
                await reader.readuntil(b"\r\n\r\n")
                seen.append(me)
                step = script[min(len(seen) - 1, len(script) - 1)]
                if await step(writer) is False:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(on_conn, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1], seen
    finally:
        server.close()


async def ok(w: asyncio.StreamWriter) -> None:
    w.write(OK)
    await w.drain()


async def hang_up(w: asyncio.StreamWriter) -> bool:
    return False  # close without a byte


async def garbage(w: asyncio.StreamWriter) -> bool:
    w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
    await w.drain()
    return False  # cut short


async def silent(w: asyncio.StreamWriter) -> None:
    await asyncio.sleep(30)


@contextlib.asynccontextmanager
async def _dp_raw(db_dsn: str, aiohttp_client: Any, aiohttp_server: Any, script: list[Any],
                  read_timeout: float = 30) -> AsyncIterator[tuple[DP, list[int]]]:
    from gateway.app import build_app, close_state, open_state
    from tests.conftest import Gateway, bootstrap_token, make_config
    from tests.dataplane_server import ProtocolTestServer

    async with _raw_upstream(script) as (port, seen):
        url = f"http://127.0.0.1:{port}"
        up = {"url": url, "read_timeout": read_timeout}
        state = await open_state(make_config(db_dsn, upstreams={"metrics": up, "logs": up, "traces": up}))
        try:
            server = ProtocolTestServer(build_app(state))
            client = await aiohttp_client(server)
            yield DP(Gateway(client, state, await bootstrap_token(state)), Recorder(), server.port or 0), seen
        finally:
            await close_state(state)


async def test_a_pooled_connection_the_upstream_closed_is_retried_once_on_a_fresh_one(
        db_dsn: str, aiohttp_client: Any, aiohttp_server: Any, taken: list[str]) -> None:
    async with _dp_raw(db_dsn, aiohttp_client, aiohttp_server, [ok, hang_up, ok]) as (dp, seen):
        tok = await dp.token(["metrics:read"])
        await _prime(dp, tok)
        out = await _exchange(dp.port, _get(tok, extra=b"Connection: close\r\n"))
        assert out.startswith(b"HTTP/1.1 200 ") and out.endswith(b"{}"), out
        assert len(taken) == 1 and seen == [1, 1, 2]  # the pooled one hung up; a new connection answered
        assert dp.gw.state.in_flight == 0


@pytest.mark.parametrize(("step", "status", "said"), [
    (garbage, b"502", b"metrics upstream unavailable"),
    (silent, b"504", b"metrics upstream timed out"),
])
async def test_an_upstream_that_breaks_or_goes_silent_gets_the_handlers_answer(
        db_dsn: str, aiohttp_client: Any, aiohttp_server: Any, taken: list[str], step: Any, status: bytes,
        said: bytes) -> None:
    async with _dp_raw(db_dsn, aiohttp_client, aiohttp_server, [ok, step], read_timeout=0.5) as (dp, seen):
        tok = await dp.token(["metrics:read"])
        await _prime(dp, tok)
        out = await _exchange(dp.port, _get(tok), until=b"}")
        assert out.startswith(b"HTTP/1.1 " + status), out
        body = json.loads(out.split(b"\r\n\r\n", 1)[1])
        assert body["status"] == "error" and said in body["error"].encode() and "127.0.0.1" not in body["error"]
        assert len(taken) == 1 and seen == [1, 1]
        assert dp.gw.state.in_flight == 0


async def test_big_answers_stream_and_head_requests_continue_in_a_task(
        db_dsn: str, aiohttp_client: Any, aiohttp_server: Any, taken: list[str]) -> None:
    big = bytes(range(256)) * 4096  # 1 MiB: past the lean client's whole-answer bound
    rec = Recorder(reply=big, reply_headers={"Content-Type": "application/octet-stream"})
    async with _dp(db_dsn, aiohttp_client, aiohttp_server, rec=rec) as dp:
        tok = await dp.token(["metrics:read"])
        await _prime(dp, tok)
        out = await _exchange(dp.port, _get(tok, extra=b"Connection: close\r\n"), wait=10)
        head, _, body = out.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 ") and body == big
        head_req = _get(tok, extra=b"Connection: close\r\n").replace(b"GET ", b"HEAD ", 1)
        out = await _exchange(dp.port, head_req)
        assert out.startswith(b"HTTP/1.1 200 ") and out.endswith(b"\r\n\r\n")  # no body after the head
        assert len(taken) == 2 and dp.gw.state.in_flight == 0


async def test_a_client_that_hangs_up_closes_the_upstream_exchange(
        db_dsn: str, aiohttp_client: Any, aiohttp_server: Any, taken: list[str]) -> None:
    async with _dp_raw(db_dsn, aiohttp_client, aiohttp_server, [ok, silent, ok]) as (dp, seen):
        tok = await dp.token(["metrics:read"])
        await _prime(dp, tok)
        reader, writer = await asyncio.open_connection("127.0.0.1", dp.port)
        writer.write(_get(tok))
        for _ in range(250):
            if len(seen) == 2:
                break
            await asyncio.sleep(0.02)
        assert len(seen) == 2 and dp.gw.state.in_flight == 1 and len(taken) == 1
        writer.close()
        for _ in range(250):
            if dp.gw.state.in_flight == 0:
                break
            await asyncio.sleep(0.02)
        assert dp.gw.state.in_flight == 0
        # the spent upstream connection is not reused: the next request is served on a new one
        out = await _exchange(dp.port, _get(tok, extra=b"Connection: close\r\n"))
        assert out.startswith(b"HTTP/1.1 200 ") and seen[-1] != seen[1]


async def test_an_upstream_answer_the_client_reads_slowly_is_paced(
        db_dsn: str, aiohttp_client: Any, aiohttp_server: Any, taken: list[str]) -> None:
    """A big answer to a client that does not read: the gateway holds a bounded amount, not all of it."""
    big = b"x" * (8 << 20)
    rec = Recorder(reply=big, reply_headers={"Content-Type": "application/octet-stream"})
    async with _dp(db_dsn, aiohttp_client, aiohttp_server, rec=rec) as dp:
        tok = await dp.token(["metrics:read"])
        await _prime(dp, tok)
        reader, writer = await asyncio.open_connection("127.0.0.1", dp.port, limit=1 << 16)
        writer.transport.set_write_buffer_limits(0)
        sock = writer.get_extra_info("socket")
        import socket
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 16)
        writer.write(_get(tok, extra=b"Connection: close\r\n"))
        await asyncio.sleep(1.0)  # the client reads nothing meanwhile
        assert len(taken) == 1 and dp.gw.state.in_flight == 1  # still under way: paused, not finished
        got = 0
        async with asyncio.timeout(20):
            while chunk := await reader.read(1 << 20):
                got += len(chunk)
        writer.close()
        assert got > len(big)  # the head and all of the body
        assert dp.gw.state.in_flight == 0


# ---- the relay: what it takes, and what it hands back to the lean client's parser ------------------------

def _raw(answer: bytes, then_close: bool = False) -> Callable[[asyncio.StreamWriter], Any]:
    async def step(w: asyncio.StreamWriter) -> bool:
        w.write(answer)
        await w.drain()
        return not then_close

    return step


async def _split(w: asyncio.StreamWriter) -> None:
    """The head, then the body a moment later (a body still arriving after the head's read)."""
    w.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n\r\nhe")
    await w.drain()
    await asyncio.sleep(0.1)
    w.write(b"llo")
    await w.drain()


@pytest.mark.parametrize(("answer", "body", "reused"), [
    # taken by the relay: a whole small answer with one Content-Length; the connection is pooled again
    (_raw(b"HTTP/1.1 201 Created\r\nContent-Type: text/plain\r\nX-A: 1\r\nContent-Length: 3\r\n\r\nabc"),
     b"abc", True),
    (_raw(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"), b"", True),
    # the upstream asks to close: answered, never reused
    (_raw(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok", then_close=True), b"ok", False),
    # handed back: chunked, a body split over reads, 1xx before the answer, bytes after it
    (_raw(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"), b"abc", True),
    (_split, b"hello", True),
    (_raw(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi"), b"hi", True),
    (_raw(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhiHTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"), b"hi",
     False),
])
async def test_the_answer_is_relayed_or_handed_back_and_the_connection_pooled_only_when_it_may_be(
        db_dsn: str, aiohttp_client: Any, aiohttp_server: Any, taken: list[str], answer: Any, body: bytes,
        reused: bool) -> None:
    async with _dp_raw(db_dsn, aiohttp_client, aiohttp_server, [ok, answer, ok]) as (dp, seen):
        tok = await dp.token(["metrics:read"])
        await _prime(dp, tok)
        reader, writer = await asyncio.open_connection("127.0.0.1", dp.port)
        try:
            writer.write(_get(tok))
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            assert head.startswith(b"HTTP/1.1 20"), head
            assert b"Transfer-Encoding" not in head and b"Connection: close" not in head
            assert f"Content-Length: {len(body)}\r\n".encode() in head and b"Date: " in head
            assert await asyncio.wait_for(reader.readexactly(len(body)), 5) == body
            # the client's connection carries on
            writer.write(_get(tok))
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            assert head.startswith(b"HTTP/1.1 200 ") and await reader.readexactly(2) == b"{}"
        finally:
            writer.close()
        # the third request on the second one's connection (by callbacks again), or on a new one (by the handler)
        assert len(taken) == (2 if reused else 1)
        assert (seen[2] == seen[1]) is reused, seen


async def test_a_label_restricted_query_is_rewritten_on_the_callback_path_as_by_the_handler(
        db_dsn: str, aiohttp_client: Any, aiohttp_server: Any, taken: list[str]) -> None:
    async with _dp(db_dsn, aiohttp_client, aiohttp_server) as dp:
        p = await dp.gw.policy("restricted", ["metrics:read"], [{"type": "stack", "identifier": "100",
                                                                 "labelPolicies": [{"selector": '{env="dev"}'}]}])
        tok = str((await dp.gw.token(p["id"], "restricted"))["token"])
        await _prime(dp, tok)
        by_handler = dp.rec.seen[-1]
        out = await _exchange(dp.port, _get(tok, extra=b"Connection: close\r\n"))
        assert out.startswith(b"HTTP/1.1 200 ") and len(taken) == 1
        by_callbacks = dp.rec.seen[-1]
        assert by_callbacks.query == by_handler.query and 'env="dev"' in by_callbacks.query[0][1]
        assert by_callbacks.headers.getall("X-Prom-Label-Policy", []) == by_handler.headers.getall(
            "X-Prom-Label-Policy", [])
        # a query the rewriter refuses is the handler's 400, not the callback path's
        out = await _exchange(dp.port, _get(tok, f"{Q}?query=up%7B", b"Connection: close\r\n"))
        assert out.startswith(b"HTTP/1.1 400 ") and len(taken) == 1


async def _ok_split(w: asyncio.StreamWriter) -> None:
    w.write(OK[:-1])
    await w.drain()
    await asyncio.sleep(0.1)
    w.write(OK[-1:])
    await w.drain()


@pytest.mark.parametrize(("answer", "parsed", "reused"), [
    (ok, 1, True),  # the head the relay read before, then exactly its body: not parsed again
    (_raw(OK + b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"), 2, False),  # bytes after it: parsed, handed back
    (_ok_split, 2, True),  # its body not all in the head's read: parsed, then handed back
])
async def test_a_head_the_relay_read_before_skips_the_parser_only_for_exactly_its_answer(
        db_dsn: str, aiohttp_client: Any, aiohttp_server: Any, taken: list[str], monkeypatch: pytest.MonkeyPatch,
        answer: Any, parsed: int, reused: bool) -> None:
    monkeypatch.setattr(exchange, "_KNOWN_HEADS", {})
    heads: list[int] = []
    real = exchange._Relay.on_headers_complete

    def counted(self: Any) -> None:
        heads.append(1)
        real(self)

    monkeypatch.setattr(exchange._Relay, "on_headers_complete", counted)
    async with _dp_raw(db_dsn, aiohttp_client, aiohttp_server, [ok, ok, answer, ok]) as (dp, seen):
        tok = await dp.token(["metrics:read"])
        await _prime(dp, tok)  # (by the handler: no relay)
        reader, writer = await asyncio.open_connection("127.0.0.1", dp.port)
        try:
            for _ in range(2):
                writer.write(_get(tok))
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
                assert head.startswith(b"HTTP/1.1 200 ") and b"Content-Length: 2\r\n" in head, head
                assert await asyncio.wait_for(reader.readexactly(2), 5) == b"{}"
        finally:
            writer.close()
        assert OK[:-2] in exchange._KNOWN_HEADS and len(taken) == 2
        assert len(heads) == parsed
        assert (seen[2] == seen[1]) is True  # the second answer came on the first one's pooled connection
        out = await _exchange(dp.port, _get(tok, extra=b"Connection: close\r\n"))
        assert out.startswith(b"HTTP/1.1 200 ")
        assert (seen[3] == seen[2]) is reused, seen


@pytest.mark.parametrize("answer", [b"HTTP/1.1 204 No Content\r\nX-A: 1\r\n\r\n",
                                    b"HTTP/1.1 304 Not Modified\r\nX-A: 1\r\nContent-Length: 10\r\n\r\n"])
async def test_an_answer_without_a_body_is_written_whole_and_the_connection_carries_on(
        db_dsn: str, aiohttp_client: Any, aiohttp_server: Any, taken: list[str], answer: bytes) -> None:
    async with _dp_raw(db_dsn, aiohttp_client, aiohttp_server, [ok, _raw(answer)]) as (dp, seen):
        tok = await dp.token(["metrics:read", "metrics:write"])
        await _prime(dp, tok)
        auth = basic("100", tok)["Authorization"].encode()
        push = (b"POST /api/v1/push HTTP/1.1\r\nHost: x\r\nAuthorization: " + auth
                + b"\r\nContent-Type: application/x-protobuf\r\nContent-Length: 3\r\n\r\nabc")
        reader, writer = await asyncio.open_connection("127.0.0.1", dp.port)
        try:
            for req in (_get(tok), push, _get(tok)):  # by callbacks, by the handler (a body), by callbacks
                writer.write(req)
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
                assert head.startswith(answer[:12]) and b"X-A: 1\r\n" in head, head
                assert b"Content-Length" not in head and b"Transfer-Encoding" not in head
                assert b"Connection: close" not in head
        finally:
            writer.close()
        assert len(taken) == 2 and len(set(seen[1:])) == 1  # one pooled upstream connection throughout


async def test_a_new_lbac_probe_verdict_changes_the_mode_on_a_kept_alive_connection(
        db_dsn: str, aiohttp_client: Any, aiohttp_server: Any, taken: list[str]) -> None:
    """``auto``: header mode while the probe finds that the backend enforces, enforce mode from the request
    after a verdict that it does not, on the same connection."""
    from gateway.app import build_app, close_state, open_state
    from gateway.lbac.probe import Verdict, probe_of
    from tests.conftest import Gateway, bootstrap_token, make_config
    from tests.dataplane_server import ProtocolTestServer

    rec = Recorder()
    up = await aiohttp_server(rec.app())
    url = f"http://127.0.0.1:{up.port}"
    state = await open_state(make_config(db_dsn, upstreams={"metrics": {"url": url, "lbac": "auto"}}))
    try:
        client = await aiohttp_client(ProtocolTestServer(build_app(state)))
        dp = DP(Gateway(client, state, await bootstrap_token(state)), rec, client.server.port or 0)
        probe = probe_of(state.extras)
        read_url = state.config.upstreams["metrics"].url_for("read")
        for _ in range(100):  # the start-up probe's own verdict first
            if probe.verdicts.get("metrics") is not None:
                break
            await asyncio.sleep(0.05)
        probe.verdicts["metrics"] = Verdict(read_url, True, "test: enforces", 0.0)
        p = await dp.gw.policy("auto", ["metrics:read"], [{"type": "stack", "identifier": "100",
                                                           "labelPolicies": [{"selector": '{env="dev"}'}]}])
        tok = str((await dp.gw.token(p["id"], "auto"))["token"])
        await _prime(dp, tok)
        reader, writer = await asyncio.open_connection("127.0.0.1", dp.port)
        try:
            for enforces in (True, False):
                probe.verdicts["metrics"] = Verdict(read_url, enforces, "test", 0.0)
                writer.write(_get(tok))
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
                assert head.startswith(b"HTTP/1.1 200 "), head
                await reader.readexactly(int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0]))
                seen = rec.seen[-1]
                if enforces:  # header mode: the query as sent, the policy in a header
                    assert seen.query == [("query", "up")] and seen.headers.getall("X-Prom-Label-Policy")
                else:  # enforce mode: the query rewritten, no header
                    assert 'env="dev"' in seen.query[0][1] and "X-Prom-Label-Policy" not in seen.headers
        finally:
            writer.close()
        assert len(taken) == 2
    finally:
        await close_state(state)
