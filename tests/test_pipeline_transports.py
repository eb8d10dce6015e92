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
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from gateway.dataplane import exchange
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


@dataclass
class RawUpstream:
    """Records every request head it reads (bodiless requests only) and answers ``ANSWER`` (its head alone to
    HEAD), keeping alive."""

    seen: list[bytes] = field(default_factory=list)
    port: int = 0

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                self.seen.append(head)
                writer.write(ANSWER[:len(ANSWER) - len(BODY)] if head.startswith(b"HEAD ") else ANSWER)
                await writer.drain()
        writer.close()


@contextlib.asynccontextmanager
async def _gateway(db_dsn: str, aiohttp_client: Any) -> AsyncIterator[tuple[Gateway, RawUpstream, int]]:
    from gateway.app import build_app, close_state, open_state

    up = RawUpstream()
    server = await asyncio.start_server(up.serve, "127.0.0.1", 0)
    up.port = server.sockets[0].getsockname()[1]
    url = f"http://127.0.0.1:{up.port}"
    state = await open_state(make_config(db_dsn, upstreams={s: {"url": url, "lbac": "enforce"}
                                                            for s in ("metrics", "logs")} | {"traces": {"url": url}}))
    try:
        dp = ProtocolTestServer(build_app(state))
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
    return Run(up.seen[n], answer, _TIMINGS.sub(r'"\1":0', lines[0]), _delta(before, _metrics()), taken == [True])


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
