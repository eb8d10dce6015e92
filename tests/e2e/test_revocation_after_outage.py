"""An acknowledged write is enforced everywhere within 1 s, also right after the database returns (issue 23).

Two replicas of 2 workers each on one (private, real) PostgreSQL, a real Prometheus behind them. The
database is stopped for 8 s (long enough for a listener backing off exponentially to be asleep for
seconds when it returns), started again, and at 0.1, 0.5, 1, 2 and 5 s after it is back the admin API
of replica A deletes a token, narrows a policy's label selector and creates a token. Each write is
retried while the API answers 503 (``Retry-After``: it acknowledged nothing); from its 2xx on, every
worker of both replicas must refuse the deleted token, return only the narrowed selector's series
and accept the new token, within 1 s.

Each worker is reached through keep-alive connections pinned to it: connections are opened until
each worker holds some (the kernel spreads SO_REUSEPORT connections over the workers), the worker
holding each is read from /proc, and every probe checks that it went over its pinned connection.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import aiohttp
import asyncpg
import pytest

from tests.conftest import bootstrap_token, make_config
from tests.e2e.gateway_proc import GatewayProcess
from tests.e2e.pgctl import OwnPostgres
from tests.e2e.prom import PrometheusProcess, build_tsdb, data_window, openmetrics_text, require_prometheus

OFFSETS = (0.1, 0.5, 1.0, 2.0, 5.0)  # seconds after the database is back
OUTAGE = 8.0
BOUND = 1.0  # an acknowledged write is enforced everywhere within this long
PER_WORKER = 3  # pinned connections per worker
NARROWED = '{env="dev"}'


@pytest.fixture
async def own_pg() -> AsyncIterator[OwnPostgres]:
    pg = OwnPostgres()
    await asyncio.to_thread(pg.start)
    conn = await asyncpg.connect(pg.dsn)
    await conn.close()
    yield pg
    await asyncio.to_thread(pg.cleanup)


@pytest.fixture
def prometheus() -> Any:
    """``up`` of two environments, one sample a minute; and a time both have a sample at."""
    require_prometheus()
    start, end = data_window(hours=0.2)
    text = openmetrics_text([({"__name__": "up", "env": env}, [(t, 1.0) for t in range(start, end, 60)])
                             for env in ("dev", "prod")])
    with tempfile.TemporaryDirectory() as d:
        build_tsdb(text, d)
        with PrometheusProcess(d, route_prefix="/prometheus") as p:
            yield p, end - 60


def _basic(token: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"100:{token}".encode()).decode()}


# ---- connections pinned to a worker ---------------------------------------------------------------

def _children(pid: int) -> list[int]:
    return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def _owner(pids: list[int], server_port: int, client_port: int) -> int | None:
    """The process holding the server side of the loopback TCP connection client_port -> server_port."""
    inode = None
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        f = line.split()
        if int(f[1].split(":")[1], 16) == server_port and int(f[2].split(":")[1], 16) == client_port:
            inode = f[9]
    if inode is None:
        return None
    for pid in pids:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                if os.readlink(fd) == f"socket:[{inode}]":
                    return pid
            except OSError:
                continue
    return None


class Pinned:
    """One keep-alive HTTP/1.1 connection (to one worker): a minimal client, so that every probe provably
    goes over this very connection (a pooled client would silently open another one)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: str):
        self.reader, self.writer, self.host = reader, writer, host
        self.port: int = writer.get_extra_info("sockname")[1]

    @classmethod
    async def open(cls, host: str, port: int) -> Pinned:
        reader, writer = await asyncio.open_connection(host, port)
        return cls(reader, writer, f"{host}:{port}")

    async def get(self, target: str, headers: dict[str, str]) -> tuple[int, bytes]:
        lines = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        self.writer.write(f"GET {target} HTTP/1.1\r\nHost: {self.host}\r\n{lines}\r\n".encode())
        head = (await self.reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        status = int(head[0].split()[1])
        fields = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in head[1:] if h)}
        assert fields.get("connection", "").lower() != "close", "the gateway closed a pinned connection"
        if "content-length" in fields:
            return status, await self.reader.readexactly(int(fields["content-length"]))
        assert fields.get("transfer-encoding", "").lower() == "chunked", fields
        body = b""
        while size := int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16):
            body += (await self.reader.readexactly(size + 2))[:-2]
        await self.reader.readuntil(b"\r\n")  # (no trailers)
        return status, body

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()


@dataclass
class Worker:
    name: str
    conns: asyncio.Queue[Pinned] = field(default_factory=asyncio.Queue)

    async def get(self, path: str, token: str, params: dict[str, str]) -> tuple[int, Any]:
        """Status and JSON body (None if not JSON) of a GET over one of this worker's pinned connections."""
        pinned = await self.conns.get()
        try:
            status, body = await pinned.get(f"{path}?{urlencode(params)}", _basic(token))
        finally:
            self.conns.put_nowait(pinned)
        try:
            return status, json.loads(body)
        except ValueError:
            return status, None


async def _pin(gp: GatewayProcess, name: str, token: str, params: dict[str, str]) -> list[Worker]:
    """Workers of one replica, each with PER_WORKER pinned connections."""
    assert gp.proc is not None
    pids = _children(gp.proc.pid)
    assert len(pids) == 2, pids
    workers = {pid: Worker(f"{name}/w{i}") for i, pid in enumerate(sorted(pids))}
    spare: list[Pinned] = []
    for _ in range(64):
        if all(w.conns.qsize() >= PER_WORKER for w in workers.values()):
            break
        pinned = await Pinned.open("127.0.0.1", gp.port)
        status, _ = await pinned.get(f"/prometheus/api/v1/query?{urlencode(params)}", _basic(token))
        assert status == 200
        w = workers.get(_owner(pids, gp.port, pinned.port) or 0)
        if w is not None and w.conns.qsize() < PER_WORKER:
            w.conns.put_nowait(pinned)
        else:
            spare.append(pinned)
    for p in spare:
        await p.close()
    assert all(w.conns.qsize() == PER_WORKER for w in workers.values()), "could not reach every worker"
    return list(workers.values())


# ---- the test -------------------------------------------------------------------------------------

async def _admin_token(dsn: str) -> str:
    from gateway.app import close_state, open_state
    state = await open_state(make_config(dsn))
    try:
        return await bootstrap_token(state)
    finally:
        await close_state(state)


async def test_writes_right_after_the_database_returns_are_enforced_everywhere_within_a_second(
        tmp_path: Path, own_pg: OwnPostgres, prometheus: Any) -> None:
    prometheus, at = prometheus
    dsn = own_pg.dsn
    admin = {"Authorization": f"Bearer {await _admin_token(dsn)}"}
    ups = {"metrics": {"url": prometheus.url.removesuffix("/prometheus")}}
    db = {"connect_timeout": 1, "command_timeout": 2}
    replicas = [GatewayProcess(tmp_path, dsn, name, upstreams=ups, database=db) for name in ("a", "b")]
    await asyncio.gather(*(asyncio.to_thread(r.start, 30.0, ("--workers", "2")) for r in replicas))
    a_url = replicas[0].url
    workers: list[Worker] = []
    query = {"query": "up", "time": str(at)}
    try:
        async with aiohttp.ClientSession() as s:
            refused: list[str] = []  # writes answered 503 (and retried)

            async def api(method: str, path: str, body: Any = None) -> tuple[dict[str, Any], float]:
                """A write through replica A, retried while it answers 503: its JSON and when it was acknowledged."""
                deadline = time.monotonic() + 15
                while True:
                    async with s.request(method, a_url + path, headers=admin, json=body) as r:
                        if r.status != 503:
                            assert r.status == 200, (method, path, r.status, await r.text())
                            return await r.json(), time.monotonic()
                        assert r.headers.get("Retry-After"), "a 503 without Retry-After"
                        refused.append(f"{method} {path}")
                    assert time.monotonic() < deadline, f"{method} {path}: still 503"
                    await asyncio.sleep(0.05)

            # per offset: a policy with a token to delete and a token whose reads get narrowed
            cases = []
            for i, _ in enumerate(OFFSETS):
                policy, _ = await api("POST", "/api/v1/accesspolicies", {
                    "name": f"p{i}", "scopes": ["metrics:read"], "realms": [{"type": "stack", "identifier": "100"}]})
                doomed, _ = await api("POST", "/api/v1/tokens", {"accessPolicyId": policy["id"], "name": f"d{i}"})
                narrowed, _ = await api("POST", "/api/v1/tokens", {"accessPolicyId": policy["id"], "name": f"n{i}"})
                cases.append((policy["id"], doomed, narrowed["token"]))
            for r, name in zip(replicas, ("A", "B"), strict=True):
                workers += await _pin(r, name, cases[0][2], query)

            def deleted(st: int, _b: Any) -> bool:
                return st == 401

            def accepted(st: int, _b: Any) -> bool:
                return st == 200

            def dev_only(st: int, b: Any) -> bool:
                return st == 200 and {x["metric"]["env"] for x in b["data"]["result"]} == {"dev"}

            def both(st: int, b: Any) -> bool:
                return st == 200 and {x["metric"]["env"] for x in b["data"]["result"]} == {"dev", "prod"}

            for w in workers:  # the starting point, on every worker
                for _, doomed, narrowed in cases:
                    assert accepted(*await w.get("/prometheus/api/v1/query", doomed["token"], query)), w.name
                    assert both(*await w.get("/prometheus/api/v1/query", narrowed, query)), w.name

            failures: list[str] = []
            seen: dict[str, list[float]] = {"delete": [], "narrow": [], "create": []}

            async def enforced(kind: str, what: str, token: str, ok: Callable[[int, Any], bool], acked: float,
                               w: Worker) -> None:
                while True:
                    st, body = await w.get("/prometheus/api/v1/query", token, query)
                    late = time.monotonic() - acked
                    if ok(st, body):
                        seen[kind].append(late)
                        return
                    if late > BOUND:
                        failures.append(f"{what}: {w.name} answered {st} {str(body)[:120]} {late:.2f}s after the 2xx")
                        return
                    await asyncio.sleep(0.01)

            async def after(kind: str, what: str, token: str, ok: Callable[[int, Any], bool], acked: float) -> None:
                await asyncio.gather(*(enforced(kind, what, token, ok, acked, w) for w in workers))

            async def writes(i: int, offset: float, back: float) -> list[str]:
                await asyncio.sleep(max(0.0, back + offset - time.monotonic()))
                pid, doomed, narrowed = cases[i]
                checks: list[Awaitable[None]] = []
                _, acked = await api("DELETE", f"/api/v1/tokens/{doomed['id']}")
                checks.append(after("delete", f"token deleted at +{offset}s", doomed["token"], deleted, acked))
                _, acked = await api("POST", f"/api/v1/accesspolicies/{pid}", {"realms": [
                    {"type": "stack", "identifier": "100", "labelPolicies": [{"selector": NARROWED}]}]})
                checks.append(after("narrow", f"policy narrowed at +{offset}s", narrowed, dev_only, acked))
                created, acked = await api("POST", "/api/v1/tokens", {"accessPolicyId": pid, "name": f"c{i}"})
                checks.append(after("create", f"token created at +{offset}s", created["token"], accepted, acked))
                print(f"+{offset}s: the three writes acknowledged by {acked - back:.2f}s after the database was back")
                await asyncio.gather(*checks)
                return [doomed["token"], narrowed, created["token"]]

            await asyncio.to_thread(own_pg.stop)
            await asyncio.sleep(OUTAGE)
            await asyncio.to_thread(own_pg.restart)
            back = time.monotonic()
            tokens = await asyncio.wait_for(
                asyncio.gather(*(writes(i, off, back) for i, off in enumerate(OFFSETS))), 60)
            for kind, lates in seen.items():
                if lates:
                    print(f"{kind}: enforced on every worker at most {max(lates) * 1000:.0f} ms after its 2xx"
                          f" ({len(lates)} checks)")
            print(f"{len(refused)} write attempts answered 503 Retry-After (retried)")
            assert not failures, "\n".join(failures)
            for w in workers:  # and it stays so
                for doomed, narrowed, created in tokens:
                    assert deleted(*await w.get("/prometheus/api/v1/query", doomed, query)), w.name
                    assert dev_only(*await w.get("/prometheus/api/v1/query", narrowed, query)), w.name
                    assert accepted(*await w.get("/prometheus/api/v1/query", created, query)), w.name
    finally:
        for w in workers:
            while not w.conns.empty():
                await w.conns.get_nowait().close()
        for r in replicas:
            r.stop()
