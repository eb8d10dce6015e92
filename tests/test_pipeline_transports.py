"""One plan, two transports (issue 24): every kind of forward plan executed by the connection's handler task
(``handler.handle`` → ``forward``) and by the callback exchange (``exchange.start`` → the relay, or its task
for HEAD) gives byte-identical upstream requests, byte-identical answers, the same access-log line (its
timings aside) and the same metrics. Over real sockets, against a raw upstream that records each request's
exact bytes and answers with fixed bytes (its own Date, so the gateway adds none)."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import re
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from gateway.dataplane import Settings, exchange
from gateway.lbac import restrict as lbac
from gateway.lbac.probe import LbacProbe
from gateway.metrics import ADDED_SECONDS, REFUSALS, REQUESTS, UPSTREAM_SECONDS
from gateway.policy.selector import parse_selector
from gateway.proxy.handler import ACCESS_LOG
from gateway.tally import TALLY
from tests.conftest import Gateway, bootstrap_token, make_config
from tests.dataplane_server import ProtocolTestServer
from tests.test_dataplane import _exchange
from tests.test_proxy import basic

BODY = b'{"status":"success","data":{"resultType":"vector","result":[]}}'
ANSWER = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nDate: Sat, 05 Dec 2026 10:00:00 GMT\r\n"
          b"Content-Length: " + str(len(BODY)).encode() + b"\r\n\r\n" + BODY)
LOKI = "query=%7Bapp%3D%22a%22%7D"


PUSHED = b"HTTP/1.1 204 No Content\r\nDate: Sat, 05 Dec 2026 10:00:00 GMT\r\nConnection: keep-alive\r\n\r\n"


@dataclass
class RawUpstream:
    """Records every request it reads (head and Content-Length body, whole) and answers ``ANSWER`` (its head
    alone to HEAD, ``PUSHED`` to a push, as nginx answers for Mimir and Loki), keeping alive. ``cut_after``:
    close the connection once that many body bytes of a request are read, without answering; ``ended``
    counts the connections the gateway closed."""

    seen: list[bytes] = field(default_factory=list)
    port: int = 0
    cut_after: int | None = None
    ended: int = 0
    heads: int = 0
    early: bytes | None = None  # answered as soon as a head with a body is read (then the body is read)

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except asyncio.IncompleteReadError as exc:
                    self.ended += not exc.partial
                    raise
                self.heads += 1
                length = re.search(rb"\r\nContent-Length: *([0-9]+)", head)
                n = int(length.group(1)) if length else 0
                if self.cut_after is not None and n > self.cut_after:
                    await reader.readexactly(self.cut_after)
                    break
                if self.early is not None and n:
                    writer.write(self.early)
                    try:
                        await reader.readexactly(n)
                    except asyncio.IncompleteReadError:
                        self.ended += 1  # the gateway closed the connection mid-body
                        raise
                    continue
                if n > 1 << 20:  # a large body waits a moment: the gateway's socket buffer fills up
                    await asyncio.sleep(0.2)
                try:
                    self.seen.append(head + await reader.readexactly(n))
                except asyncio.IncompleteReadError:
                    self.ended += 1
                    raise
                writer.write(ANSWER[:len(ANSWER) - len(BODY)] if head.startswith(b"HEAD ")
                             else PUSHED if b"/push " in head.split(b"\r\n", 1)[0] else ANSWER)
                await writer.drain()
        writer.close()


@contextlib.asynccontextmanager
async def _gateway(db_dsn: str, aiohttp_client: Any, settings: Settings | None = None,
                   **config: Any) -> AsyncIterator[tuple[Gateway, RawUpstream, int]]:
    from gateway.app import build_app, close_state, open_state

    up = RawUpstream()
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)  # (accepted sockets inherit it)
    listener.bind(("127.0.0.1", 0))
    server = await asyncio.start_server(up.serve, sock=listener)
    up.port = server.sockets[0].getsockname()[1]
    url = f"http://127.0.0.1:{up.port}"
    state = await open_state(make_config(db_dsn, upstreams={s: {"url": url, "lbac": "enforce"}
                                                            for s in ("metrics", "logs")} | {"traces": {"url": url}},
                                         **config))
    try:
        dp = ProtocolTestServer(build_app(state), settings)
        client = await aiohttp_client(dp)
        yield Gateway(client, state, await bootstrap_token(state)), up, dp.port or 0
    finally:
        await close_state(state)
        server.close()


def _request(method: str, target: str, tok: str, extra: dict[str, str]) -> bytes:
    lines = [f"{method} {target} HTTP/1.1", "Host: gw", "Authorization: " + basic("100", tok)["Authorization"],
             *(f"{k}: {v}" for k, v in extra.items()), "Connection: close"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


_START = exchange.start
_TIMINGS = re.compile(r'"(duration_ms|upstream_ms|time)":[0-9.e-]+')


def _metrics() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The data-path series (histograms by count only: their buckets hold timings)."""
    TALLY.flush()
    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for metric in (REQUESTS, REFUSALS, ADDED_SECONDS, UPSTREAM_SECONDS):
        for family in metric.collect():
            for s in family.samples:
                if s.name.endswith(("_total", "_count")):
                    out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _delta(before: dict[Any, float], after: dict[Any, float]) -> dict[Any, float]:
    return {k: v - before.get(k, 0.0) for k, v in after.items() if v != before.get(k, 0.0)}


_DATE = re.compile(rb"\r\nDate: [^\r]*\r\n")


def _dated(answer: bytes) -> bytes:
    """The answer with the gateway's own Date (its refusals carry one) fixed: the two runs may straddle a second."""
    return _DATE.sub(b"\r\nDate: (the clock)\r\n", answer, count=1)


@dataclass
class Run:
    upstream: bytes
    answer: bytes
    log: str
    metrics: dict[Any, float]
    by_callbacks: bool


async def _run(gw: Gateway, up: RawUpstream, port: int, data: bytes, callbacks: bool,
               monkeypatch: pytest.MonkeyPatch) -> Run:
    log = gw.client.server.app[ACCESS_LOG]
    taken: list[bool] = []

    def start(proto: Any, req: Any) -> bool:
        ok = _START(proto, req) if callbacks else False
        taken.append(ok)
        return ok

    monkeypatch.setattr(exchange, "start", start)
    n, mark, before = len(up.seen), len(log.stream.getvalue()), _metrics()
    answer = await _exchange(port, data)
    for _ in range(100):  # (the books are kept once the answer is written: a moment later at most)
        if gw.state.in_flight == 0:
            break
        await asyncio.sleep(0.01)
    log.flush()
    lines = log.stream.getvalue()[mark:].splitlines()
    assert len(up.seen) == n + 1 and len(lines) == 1, (up.seen[n:], lines)
    return Run(up.seen[n], _dated(answer), _TIMINGS.sub(r'"\1":0', lines[0]), _delta(before, _metrics()),
               taken == [True])


async def test_every_forward_plan_is_the_same_through_the_handler_task_and_the_callback_relay(
        db_dsn: str, aiohttp_client: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    async with _gateway(db_dsn, aiohttp_client) as (gw, up, port):
        log = gw.client.server.app[ACCESS_LOG]
        log.stream, log.enabled = io.StringIO(), True
        scopes = ["metrics:read", "logs:read", "rules:read", "traces:read"]
        free_p = await gw.policy(f"free{os.urandom(3).hex()}", scopes, [{"type": "stack", "identifier": "100"}])
        narrow_p = await gw.policy(f"narrow{os.urandom(3).hex()}", scopes, [
            {"type": "stack", "identifier": "100", "labelPolicies": [{"selector": '{env="dev"}'}]}])
        free = str((await gw.token(free_p["id"], "free"))["token"])
        narrow = str((await gw.token(narrow_p["id"], "narrow"))["token"])
        client_policy = lbac.headers_for("100", (parse_selector('{env="dev"}'),))[0]
        # (mode, token, method, target, extra headers): one line per kind of forward plan
        cases: list[tuple[str, str, str, str, dict[str, str]]] = [
            ("enforce", free, "GET", "/prometheus/api/v1/query?query=up", {}),  # as sent
            ("enforce", free, "HEAD", "/prometheus/api/v1/query?query=up", {}),  # (answered from a task)
            ("enforce", free, "GET", f"/loki/api/v1/query_range?{LOKI}", {"Accept-Encoding": "gzip"}),
            ("enforce", free, "GET", "/prometheus/api/v1/rules", {}),  # another upstream role
            ("enforce", free, "GET", "/tempo/api/search?tags=a%3Db", {"X-Loki-Query-Limits-Context": "x"}),
            ("enforce", narrow, "GET", "/prometheus/api/v1/query?query=up", {}),  # rewritten by the gateway
            ("enforce", narrow, "GET", f"/loki/api/v1/query_range?{LOKI}", {}),
            ("enforce", narrow, "GET", "/prometheus/api/v1/series?match%5B%5D=up", {}),
            ("enforce", free, "GET", "/prometheus/api/v1/query?query=up", {"X-Prom-Label-Policy": client_policy}),
            ("header", narrow, "GET", "/prometheus/api/v1/query?query=up", {}),  # the label-policy header
            ("header", narrow, "GET", f"/loki/api/v1/query_range?{LOKI}", {}),
        ]
        for mode, tok, method, target, extra in cases:
            # header mode as if the probe had verified it (a real probe would send its own requests upstream);
            # each request is on a new connection, so nothing planned under the other mode is kept
            monkeypatch.setattr(LbacProbe, "mode", lambda self, up, m=mode: m)
            data = _request(method, target, tok, extra)
            task = await _run(gw, up, port, data, False, monkeypatch)
            relay = await _run(gw, up, port, data, True, monkeypatch)
            where = f"{mode} {method} {target}"
            assert not task.by_callbacks and relay.by_callbacks, where
            assert relay.upstream == task.upstream, where
            assert relay.answer == task.answer and task.answer.startswith(b"HTTP/1.1 200 "), where
            assert relay.log == task.log, where
            assert relay.metrics == task.metrics and task.metrics, where
            sent = task.upstream.decode()
            assert "\r\nX-Scope-OrgID: 100\r\n" in sent and "Authorization" not in sent, where
            narrowed = tok == narrow or "X-Prom-Label-Policy" in extra
            assert ("X-Prom-Label-Policy" in sent) == (narrowed and mode == "header"), where
            assert ("env%3D%22dev%22" in sent.split("\r\n", 1)[0]) == (narrowed and mode == "enforce"), where
            fields = json.loads(task.log)
            assert fields["status"] == 200 and fields.get("lbac") == (mode if narrowed else None), where


# ---- request bodies (issue 25): a Forward of the client's streamed body, on the callback relay too ------

async def _send(gw: Gateway, up: RawUpstream, port: int, parts: list[tuple[float, bytes]], callbacks: bool,
                monkeypatch: pytest.MonkeyPatch, hang_up: bool = False) -> Run:
    """Like ``_run``, but the request goes out in ``parts`` (a pause before each), and ``hang_up`` closes the
    connection after them instead of reading the answer; the upstream may see no whole request."""
    log = gw.client.server.app[ACCESS_LOG]
    taken: list[bool] = []

    def start(proto: Any, req: Any) -> bool:
        ok = _START(proto, req) if callbacks else False
        taken.append(ok)
        return ok

    monkeypatch.setattr(exchange, "start", start)
    n, mark, before = len(up.seen), len(log.stream.getvalue()), _metrics()
    heads = up.heads
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    answer = b""
    try:
        for pause, data in parts:
            await asyncio.sleep(pause)
            writer.write(data)
        if not hang_up:
            async with asyncio.timeout(10):
                while chunk := await reader.read(65536):
                    answer += chunk
        else:
            for _ in range(200):  # until the upstream has the head (what was sent of the body with it)
                if up.heads > heads:
                    break
                await asyncio.sleep(0.01)
    finally:
        writer.close()
    for _ in range(200):
        if gw.state.in_flight == 0:
            break
        await asyncio.sleep(0.01)
    log.flush()
    lines = log.stream.getvalue()[mark:].splitlines()
    assert len(lines) == 1, lines
    seen = up.seen[n:]
    assert len(seen) <= 1
    return Run(seen[0] if seen else b"", _dated(answer), _TIMINGS.sub(r'"\1":0', lines[0]), _delta(before, _metrics()),
               taken == [True])


async def test_request_bodies_are_the_same_through_the_handler_task_and_the_callback_relay(
        db_dsn: str, aiohttp_client: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A push (remote_write, Loki) and a form query of an unrestricted token: the same upstream request (head
    and body, byte for byte), answer, access-log line and metrics on both transports; a body larger than
    the upstream socket takes at once is sent under flow control (the client's reading paused meanwhile)."""
    async with _gateway(db_dsn, aiohttp_client) as (gw, up, port):
        log = gw.client.server.app[ACCESS_LOG]
        log.stream, log.enabled = io.StringIO(), True
        scopes = ["metrics:read", "metrics:write", "logs:write"]
        pol = await gw.policy(f"push{os.urandom(3).hex()}", scopes, [{"type": "stack", "identifier": "100"}])
        tok = str((await gw.token(pol["id"], "push"))["token"])
        writable: list[int] = []
        spied = exchange.Exchange._writable

        def spy(self: exchange.Exchange) -> None:
            writable.append(1)
            spied(self)

        monkeypatch.setattr(exchange.Exchange, "_writable", spy)
        big = os.urandom(8 * 1024 * 1024)  # (random: no compression on the way)
        loki = json.dumps({"streams": [{"stream": {"app": "a"}, "values": [["1", "x" * 16_000]]}]}).encode()
        cases: list[tuple[str, bytes, dict[str, str]]] = [
            ("/api/v1/push", os.urandom(300), {"Content-Type": "application/x-protobuf",
                                               "Content-Encoding": "snappy"}),
            ("/api/v1/push", big, {"Content-Type": "application/x-protobuf"}),
            ("/loki/api/v1/push", loki, {"Content-Type": "application/json"}),
            ("/prometheus/api/v1/query", b"query=up", {"Content-Type": "application/x-www-form-urlencoded"}),
        ]
        for target, body, extra in cases:
            head = _request("POST", target, tok, extra | {"Content-Length": str(len(body))})
            # the head alone first, then the body in pieces: the head goes upstream with the first piece
            parts = [(0.0, head), (0.05, body[:1000]), (0.0, body[1000:])]
            task = await _send(gw, up, port, parts, False, monkeypatch)
            relay = await _send(gw, up, port, parts, True, monkeypatch)
            assert not task.by_callbacks and relay.by_callbacks, target
            assert relay.upstream == task.upstream and task.upstream.endswith(b"\r\n\r\n" + body), target
            assert relay.answer == task.answer, target
            assert task.answer.startswith(b"HTTP/1.1 204 " if target.endswith("push") else b"HTTP/1.1 200 "), target
            assert relay.log == task.log and json.loads(task.log)["status"] in (200, 204), target
            assert relay.metrics == task.metrics and task.metrics, target
        assert writable, "the 8 MiB body never filled the upstream socket: flow control went untested"


async def test_a_request_body_that_breaks_ends_the_same_on_both_transports(
        db_dsn: str, aiohttp_client: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The client hangs up mid-body (500 in the log, the upstream connection closed, not reused), the body
    stops arriving (its deadline: 502; a body that keeps trickling in is served), the upstream closes
    mid-body (502 JSON, Connection: close), a body over ``limits.max_request_body`` (413, nothing sent): the
    same answer, log line and metrics either way."""
    settings = Settings(body_timeout=0.3, linger=0.6)
    async with _gateway(db_dsn, aiohttp_client, settings, limits={"max_request_body": 100_000}) as (gw, up, port):
        log = gw.client.server.app[ACCESS_LOG]
        log.stream, log.enabled = io.StringIO(), True
        pol = await gw.policy(f"push{os.urandom(3).hex()}", ["metrics:write"], [{"type": "stack", "identifier": "100"}])
        tok = str((await gw.token(pol["id"], "push"))["token"])
        body = os.urandom(6000)  # (the rest after 5000 bytes arrives in one read)
        head = _request("POST", "/api/v1/push", tok, {"Content-Length": str(len(body))})
        for case in ("hang_up", "stalls", "trickles", "upstream_cuts", "too_large"):
            runs = []
            for callbacks in (False, True):
                # a push that ends well first: the token's decision is kept and an idle pooled connection is
                # there (the callback path takes a request only then)
                ok = _request("POST", "/api/v1/push", tok, {"Content-Length": "5"})
                await _send(gw, up, port, [(0, ok + b"12345")], False, monkeypatch)
                ended = up.ended
                up.cut_after = 5000 if case == "upstream_cuts" else None  # (all it was sent: no reset)
                if case == "hang_up":
                    run = await _send(gw, up, port, [(0, head + body[:5000])], callbacks, monkeypatch, hang_up=True)
                    for _ in range(100):  # the gateway closes the upstream connection (it is not reused)
                        if up.ended > ended:
                            break
                        await asyncio.sleep(0.01)
                    assert up.ended == ended + 1, (case, callbacks)
                    assert json.loads(run.log)["status"] == 500
                elif case == "stalls":
                    run = await _send(gw, up, port, [(0, head + body[:5000])], callbacks, monkeypatch)
                    assert run.answer == b"" and json.loads(run.log)["refusal"] == "upstream_unavailable"
                elif case == "trickles":  # slower than the deadline in all, never silent for as long: served
                    parts = [(0.0, head + body[:1000])] + [(0.2, body[i:i + 1000]) for i in range(1000, 6000, 1000)]
                    run = await _send(gw, up, port, parts, callbacks, monkeypatch)
                    assert run.answer.startswith(b"HTTP/1.1 204 ") and run.upstream.endswith(body)
                elif case == "upstream_cuts":
                    run = await _send(gw, up, port, [(0, head + body[:5000]), (0.1, body[5000:])], callbacks,
                                      monkeypatch)
                    assert run.answer.startswith(b"HTTP/1.1 502 ") and b"\r\nConnection: close\r\n" in run.answer
                    assert json.loads(run.answer.split(b"\r\n\r\n", 1)[1])["errorType"] == "unavailable"
                else:
                    large = _request("POST", "/api/v1/push", tok, {"Content-Length": "100001"})
                    run = await _send(gw, up, port, [(0, large + bytes(100_001))], callbacks, monkeypatch)
                    assert run.answer.startswith(b"HTTP/1.1 413 ") and not run.upstream
                runs.append(run)
            task, relay = runs
            assert not task.by_callbacks and relay.by_callbacks == (case != "too_large"), case
            assert relay.answer == task.answer, case
            assert relay.log == task.log, case
            assert relay.metrics == task.metrics and task.metrics, case


async def test_a_body_under_a_write_byte_rate_is_left_to_the_handler(
        db_dsn: str, aiohttp_client: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The callback path takes request rates only: a push under a write-byte rate is the limit stage's."""
    limits = {"defaults": {"write_bytes_per_second": 1000}}
    async with _gateway(db_dsn, aiohttp_client, tenant_limits=limits) as (gw, up, port):
        log = gw.client.server.app[ACCESS_LOG]
        log.stream, log.enabled = io.StringIO(), True
        pol = await gw.policy(f"push{os.urandom(3).hex()}", ["metrics:write"], [{"type": "stack", "identifier": "100"}])
        tok = str((await gw.token(pol["id"], "push"))["token"])
        push = _request("POST", "/api/v1/push", tok, {"Content-Length": "900"}) + bytes(900)
        first = await _send(gw, up, port, [(0, push)], True, monkeypatch)  # (the token's first use: the task)
        again = await _send(gw, up, port, [(0, push)], True, monkeypatch)  # decided, a pooled connection idle
        assert first.answer.startswith(b"HTTP/1.1 204 ") and not again.by_callbacks
        assert again.answer.startswith(b"HTTP/1.1 503 ") and b"write_bytes_per_second" in again.answer


async def test_an_answer_before_the_whole_body_ends_the_exchange_and_spends_the_connection(
        db_dsn: str, aiohttp_client: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The upstream answers a push before its body is all there (as Mimir does to a refusal): the callback
    path relays the answer at once with ``Connection: close``, stops sending the body, and closes the upstream
    connection instead of pooling it (its request was never finished)."""
    async with _gateway(db_dsn, aiohttp_client, Settings(linger=0.3)) as (gw, up, port):
        log = gw.client.server.app[ACCESS_LOG]
        log.stream, log.enabled = io.StringIO(), True
        pol = await gw.policy(f"push{os.urandom(3).hex()}", ["metrics:write"], [{"type": "stack", "identifier": "100"}])
        tok = str((await gw.token(pol["id"], "push"))["token"])
        ok = _request("POST", "/api/v1/push", tok, {"Content-Length": "5"})
        await _send(gw, up, port, [(0, ok + b"12345")], False, monkeypatch)  # (the decision kept, a pooled conn)
        refusal = b'{"status":"error","error":"too many series"}'
        up.early = (b"HTTP/1.1 429 Too Many Requests\r\nDate: Sat, 05 Dec 2026 10:00:00 GMT\r\nContent-Type: "
                    b"application/json\r\nContent-Length: " + str(len(refusal)).encode() + b"\r\n\r\n" + refusal)
        ended = up.ended
        head = _request("POST", "/api/v1/push", tok, {"Content-Length": "6000"})
        run = await _send(gw, up, port, [(0, head + bytes(1000)), (0.2, bytes(5000))], True, monkeypatch)
        assert run.by_callbacks and run.answer.startswith(b"HTTP/1.1 429 ") and run.answer.endswith(refusal)
        assert b"\r\nConnection: close\r\n" in run.answer and json.loads(run.log)["status"] == 429
        for _ in range(100):
            if up.ended > ended:
                break
            await asyncio.sleep(0.01)
        assert up.ended == ended + 1  # not pooled
