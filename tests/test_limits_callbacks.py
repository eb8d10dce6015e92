"""Concurrent-query limits on the protocol server's callback path (issue 28): the exchange counts a read in
flight in the shared table when it starts and gives the count back exactly once however it ends (answered,
upstream failure, retried and failed in a task, client gone, upstream timeout, the client closing mid-answer,
a HEAD or a big answer handed to a task, a request left to the handler); past the limit the request goes to
the handler, which refuses it with the same answer, access-log line and metrics as when the handler served
all of them. The real server over real sockets, against a raw upstream scripted by the query."""

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
from gateway.limits.shared import table
from gateway.limits.stage import LIMITED
from gateway.proxy.handler import ACCESS_LOG
from tests.conftest import Gateway, bootstrap_token, make_config
from tests.dataplane_server import ProtocolTestServer
from tests.test_dataplane import Q, _get
from tests.test_pipeline_transports import _TIMINGS, ANSWER, BODY, _delta, _metrics

BIG = b"x" * (1 << 20)  # past the lean client's whole-answer bound: streamed from a task


@dataclass
class Scripted:
    """Answers each request as its ``query=`` says: ``ok`` (``ANSWER``), ``slow`` (``ANSWER`` once
    ``go`` is set), ``garbage`` (a cut answer, then close), ``hangup`` (close without a byte), ``silent``
    (nothing, until the gateway closes), ``big`` (a 1 MiB answer)."""

    go: asyncio.Event = field(default_factory=asyncio.Event)
    seen: dict[str, int] = field(default_factory=dict)

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                line = head.split(b"\r\n", 1)[0].decode()
                got = re.search(r"query=(\w+)", line)
                kind = got.group(1) if got else "ok"
                self.seen[kind] = self.seen.get(kind, 0) + 1
                if kind == "slow":
                    await self.go.wait()
                elif kind == "garbage":
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
                    await writer.drain()
                    break
                elif kind == "hangup":
                    break
                elif kind == "silent":
                    await reader.read(1)  # (b"" once the gateway closes the connection)
                    break
                if kind == "big":
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
                                 b"Content-Length: %d\r\n\r\n%b" % (len(BIG), BIG))
                else:
                    writer.write(ANSWER[:len(ANSWER) - len(BODY)] if line.startswith("HEAD ") else ANSWER)
                await writer.drain()
        writer.close()


@dataclass
class Env:
    gw: Gateway
    up: Scripted
    port: int
    taken: list[tuple[str, bool]]  # (request target, served by callbacks)


@contextlib.asynccontextmanager
async def _env(db_dsn: str, aiohttp_client: Any, monkeypatch: pytest.MonkeyPatch, read_timeout: float = 30,
               **config: Any) -> AsyncIterator[Env]:
    from gateway.app import build_app, close_state, open_state

    up = Scripted()
    server = await asyncio.start_server(up.serve, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    ups = {s: {"url": url, "read_timeout": read_timeout} for s in ("metrics", "logs", "traces")}
    state = await open_state(make_config(db_dsn, upstreams=ups, **config))
    taken: list[tuple[str, bool]] = []
    real = exchange.start

    def spy(proto: Any, req: Any) -> bool:
        ok = real(proto, req)
        taken.append((f"{req.method} {req.rel_url.raw_query_string}", ok))
        return ok

    monkeypatch.setattr(exchange, "start", spy)
    try:
        client = await aiohttp_client(ProtocolTestServer(build_app(state)))
        log = client.server.app[ACCESS_LOG]
        log.stream, log.enabled = io.StringIO(), True
        yield Env(Gateway(client, state, await bootstrap_token(state)), up, client.server.port or 0, taken)
    finally:
        await close_state(state)
        server.close()


async def _policy(env: Env, limits: dict[str, Any]) -> tuple[str, str, str]:
    """A policy with ``gatewayLimits``: its name, a token, and its key in the shared table."""
    name = f"cq{os.urandom(3).hex()}"
    p = await env.gw.policy(name, ["metrics:read"], [{"type": "stack", "identifier": "100"}])
    p = await env.gw.api("POST", f"/api/v1/accesspolicies/{p['id']}", {"attributes": {"gatewayLimits": limits}})
    return name, str((await env.gw.token(p["id"], name))["token"]), f"p{p['id']}"


async def _ask(env: Env, tok: str, kind: str, method: str = "GET") -> bytes:
    """One request on a connection of its own; the whole answer (until the gateway closes)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", env.port)
    writer.write(_get(tok, f"{Q}?query={kind}", b"Connection: close\r\n").replace(b"GET ", method.encode() + b" ", 1))
    try:
        async with asyncio.timeout(10):
            return await reader.read(-1)
    finally:
        writer.close()


async def _until(cond: Any, what: str) -> None:
    for _ in range(500):
        if cond():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


async def _held(env: Env, tok: str, n: int) -> list[asyncio.Task[bytes]]:
    """``n`` slow reads at once (each on a connection of its own), once the upstream holds all of them."""
    env.up.go.clear()
    seen = env.up.seen.get("slow", 0)
    tasks = [asyncio.create_task(_ask(env, tok, "slow")) for _ in range(n)]
    await _until(lambda: env.up.seen.get("slow", 0) == seen + n, f"{n} slow requests upstream")
    return tasks


async def _quiet(env: Env) -> None:
    await _until(lambda: env.gw.state.in_flight == 0, "every request's books")


async def test_the_callback_path_gives_every_in_flight_count_back_however_a_request_ends(
        db_dsn: str, aiohttp_client: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    limits = {"defaults": {"concurrent_queries": 1000}}  # the tenant's (key tmetrics|100) beside the policy's
    async with _env(db_dsn, aiohttp_client, monkeypatch, read_timeout=0.3, tenant_limits=limits) as env:
        _, tok, key = await _policy(env, {"concurrentQueries": 1000, "requestsPerSecond": 10**6, "burst": 10**6})
        keys = (key, "tmetrics|100")
        t = table()

        async def by_callbacks(kind: str, n: int, end: Any) -> None:
            """``n`` requests that end by ``end``, each taken by the exchange (an answered one first puts an
            idle connection in the pool: a failure spends its connection)."""
            for _ in range(n):
                assert (await _ask(env, tok, "ok")).startswith(b"HTTP/1.1 200 ")
                await _quiet(env)
                before = len(env.taken)
                await end()
                await _quiet(env)
                assert env.taken[before:] == [(f"{'HEAD' if kind == 'head' else 'GET'} query={kind}", True)], kind
                assert [t.in_flight(k) for k in keys] == [0, 0], kind

        async def answered() -> None:
            assert (await _ask(env, tok, "ok")).endswith(BODY)

        async def head() -> None:  # (a HEAD's answer is read in a task)
            assert (await _ask(env, tok, "head", "HEAD")).startswith(b"HTTP/1.1 200 ")

        async def garbage() -> None:
            assert (await _ask(env, tok, "garbage")).startswith(b"HTTP/1.1 502 ")

        async def hangup() -> None:  # the pooled connection closed: retried in a task, which fails too
            assert (await _ask(env, tok, "hangup")).startswith(b"HTTP/1.1 502 ")

        async def timeout() -> None:
            assert (await _ask(env, tok, "silent")).startswith(b"HTTP/1.1 504 ")

        async def client_gone() -> None:
            seen = env.up.seen.get("silent", 0)
            reader, writer = await asyncio.open_connection("127.0.0.1", env.port)
            writer.write(_get(tok, f"{Q}?query=silent"))
            await _until(lambda: env.up.seen.get("silent", 0) > seen, "the upstream to have the request")
            assert [t.in_flight(k) for k in keys] == [1, 1]  # counted while it runs
            writer.close()

        async def closed_mid_answer() -> None:
            reader, writer = await asyncio.open_connection("127.0.0.1", env.port)
            writer.write(_get(tok, f"{Q}?query=big"))
            assert (await reader.readexactly(100_000)).startswith(b"HTTP/1.1 200 ")
            writer.close()

        await _ask(env, tok, "ok")  # the token's first request: the handler's (its decision is kept)
        for kind, n, end in (("ok", 20, answered), ("head", 3, head), ("garbage", 4, garbage),
                             ("hangup", 3, hangup), ("silent", 2, timeout), ("silent", 4, client_gone),
                             ("big", 3, closed_mid_answer)):
            await by_callbacks(kind, n, end)
        # two at once on one pooled connection: one by callbacks, the other left to the handler (the exchange
        # gave back what it had taken), both counted while they run
        assert (await _ask(env, tok, "ok")).startswith(b"HTTP/1.1 200 ")  # (one idle pooled connection)
        await _quiet(env)
        before = len(env.taken)
        running = await _held(env, tok, 2)
        assert sorted(ok for _, ok in env.taken[before:]) == [False, True]
        assert [t.in_flight(k) for k in keys] == [2, 2]
        env.up.go.set()
        assert all(a.startswith(b"HTTP/1.1 200 ") for a in await asyncio.gather(*running))
        await _quiet(env)
        assert [t.in_flight(k) for k in keys] == [0, 0]


async def test_past_the_limit_the_callback_path_refuses_as_the_handler_does(
        db_dsn: str, aiohttp_client: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """N+1 slow reads under a concurrent-queries limit of N: the last one gets 429, Retry-After, the error
    naming the limit, the access log naming it and ``gateway_limited_requests_total`` counting it, the same
    (answers, log lines and metrics) whether the N running ones were served by callbacks or by the handler."""
    async with _env(db_dsn, aiohttp_client, monkeypatch) as env:
        name, tok, key = await _policy(env, {"concurrentQueries": 2})
        _, free, _ = await _policy(env, {})
        log = env.gw.client.server.app[ACCESS_LOG]
        limited = LIMITED.labels("concurrent_queries", "policy", name)
        await _ask(env, tok, "ok")  # the token's first request: the handler's (its decision is kept)
        runs: dict[bool, Any] = {}
        for callbacks in (False, True):
            if not callbacks:
                monkeypatch.setattr(exchange, "start", lambda proto, req: False)
            else:
                monkeypatch.undo()
                monkeypatch.setattr(exchange, "start", _spying(env))
            # three idle pooled upstream connections (three reads at once of an unlimited token), so that
            # the exchange could take all three reads: the third is refused by the limit, not for want of one
            priming = await _held(env, free, 3)
            env.up.go.set()
            await asyncio.gather(*priming)
            await _quiet(env)
            log.flush()
            before, mark = len(env.taken), len(log.stream.getvalue())
            running = await _held(env, tok, 2)
            seen = env.up.seen["slow"]
            assert table().in_flight(key) == 2
            metrics, count = _metrics(), limited._value.get()
            refused = await _ask(env, tok, "slow")
            await _until(lambda: env.gw.state.in_flight == 2, "the refusal's books")
            refusal_metrics, counted = _delta(metrics, _metrics()), limited._value.get() - count
            env.up.go.set()
            answers = await asyncio.gather(*running)
            await _quiet(env)
            log.flush()
            lines = [_TIMINGS.sub(r'"\1":0', x) for x in log.stream.getvalue()[mark:].splitlines()]
            assert table().in_flight(key) == 0 and env.up.seen["slow"] == seen  # the refused one never went
            runs[callbacks] = (refused, answers, sorted(lines), refusal_metrics, counted,
                               [ok for _, ok in env.taken[before:]])
        for callbacks, (refused, answers, lines, refusal_metrics, counted, taken) in runs.items():
            head, _, body = refused.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 429 ") and b"\r\nRetry-After: 1\r\n" in head, head
            doc = json.loads(body)
            assert doc["status"] == "error" and doc["errorType"] == "too_many_requests"
            assert doc["error"].startswith(f"concurrent_queries limit reached for policy '{name}': 2 queries")
            assert all(a.startswith(b"HTTP/1.1 200 ") and a.endswith(BODY) for a in answers)
            entries = [json.loads(x) for x in lines]
            assert sorted((e["status"], e.get("limit", "")) for e in entries) == [
                (200, ""), (200, ""), (429, "policy:concurrent_queries")]
            assert counted == 1 and refusal_metrics
            # by callbacks: the two running reads were the exchange's, the refused one the handler's
            assert taken == ([True, True, False] if callbacks else [])
        task, relay = runs[False], runs[True]
        assert _no_date(relay[0]) == _no_date(task[0]) and relay[1:5] == task[1:5]


def _spying(env: Env) -> Any:
    real = exchange.start

    def spy(proto: Any, req: Any) -> bool:
        ok = real(proto, req)
        env.taken.append((req.rel_url.raw_query_string, ok))
        return ok

    return spy


def _no_date(answer: bytes) -> bytes:
    return re.sub(rb"\r\nDate: [^\r]*", b"", answer)


def test_the_tables_one_call_takes_all_or_nothing_and_counts_across_processes() -> None:
    from gateway.limits.shared import Table

    t = Table(slots=64, lanes=4)
    rows = ((t.row("c"), 1),)
    buckets = ((t.bucket("a"), 1.0, 2.0), (t.bucket("b"), 1.0, 1.0))
    assert t.acquire(rows, buckets) and t.in_flight("c") == 1  # a: 1 token left, b: none
    assert not t.acquire((), buckets)  # b is empty: nothing is taken from a either
    assert t.take("a", 1.0, 2.0, 1.0, debt=False) == 0.0 and t.take("a", 1.0, 2.0, 1.0, debt=False) > 0.5
    assert not t.acquire(rows, ())  # c is full
    t.release(rows)
    assert t.in_flight("c") == 0 and t.acquire(rows, ())
    # a forked worker (its own lane) counts against the same rows, and sees this process's count
    two = ((t.row("c"), 2),)
    pid = os.fork()
    if pid == 0:
        os._exit(0 if t.acquire(two, ()) and t.in_flight("c") == 2 and not t.acquire(two, ()) else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0 and t.in_flight("c") == 2
    t.release(two)  # (this process's own count only)
    assert t.in_flight("c") == 1


def test_in_flight_counts_take_no_lock_and_a_shared_lane_still_counts_right() -> None:
    """Concurrency is counted without the table's lock (each worker writes only its own lane), so a lock
    held elsewhere (a worker busy with a bucket, or dead inside it) neither delays a count nor switches the
    table to its lock-less fallback; a worker that has to share its lane (more workers than lanes) counts
    under the lock instead, and its counts and the other sharer's add up."""
    from gateway.limits.shared import Table

    t = Table(slots=64, lanes=1)
    rows = ((t.row("c"), 3),)
    assert t.acquire(rows, ())  # (claims the one lane)
    assert t._sem.acquire(False)  # the lock, held as another worker would hold it
    try:
        assert t.acquire(rows, ()) and t.in_flight("c") == 2
        t.release(rows)
    finally:
        t._sem.release()
    assert not t._unlocked and t.in_flight("c") == 1
    pid = os.fork()
    if pid == 0:  # a second worker, no lane left: it shares this one
        ok = t.acquire(rows, ()) and t.acquire(rows, ()) and not t.acquire(rows, ()) and t._lane_shared
        t.release(rows)
        os._exit(0 if ok and t.in_flight("c") == 2 else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0 and t.in_flight("c") == 2  # this one's and the child's
