"""Honest health around a database outage (issue 23): ``/ready``, ``gateway_database_up`` and the admin API
say the same thing at every moment, and passing ``max_staleness`` is logged once, as is the recovery.

A real (private) PostgreSQL is stopped and started under one in-process gateway.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from tests.conftest import bootstrap_token, make_config
from tests.e2e.pgctl import OwnPostgres

STALE_LINE = "past database.max_staleness"
FRESH_LINE = "policy snapshot fresh again"


@pytest.fixture
async def own_pg() -> AsyncIterator[OwnPostgres]:
    pg = OwnPostgres()
    await asyncio.to_thread(pg.start)
    conn = await asyncpg.connect(pg.dsn)
    await conn.close()
    yield pg
    await asyncio.to_thread(pg.cleanup)


async def _health(client: Any) -> tuple[int, str, float]:
    """(/ready's status, its ``database``, gateway_database_up)."""
    r = await client.get("/ready")
    body = await r.json()
    text = await (await client.get("/metrics")).text()
    up = next(float(line.split()[-1]) for line in text.splitlines() if line.startswith("gateway_database_up"))
    return r.status, body["database"], up


async def _until(what: str, check: Any, within: float = 20.0) -> None:
    deadline = time.monotonic() + within
    while not await check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


async def test_health_agrees_with_the_admin_api_and_staleness_is_logged_once(
        own_pg: OwnPostgres, aiohttp_client: Any, caplog: pytest.LogCaptureFixture) -> None:
    from gateway.app import build_app, close_state, open_state

    caplog.set_level(logging.INFO, logger="gateway.cache")
    # reconnect_max_backoff as an operator might have left it from before: at 2 s the worker's listener
    # is still waiting when the database is back, and the API must not acknowledge writes meanwhile.
    state = await open_state(make_config(own_pg.dsn, database={"max_staleness": 30, "reconnect_max_backoff": 2,
                                                               "connect_timeout": 1, "command_timeout": 2}))
    try:
        client = await aiohttp_client(build_app(state))
        admin = {"Authorization": f"Bearer {await bootstrap_token(state)}"}
        r = await client.post("/api/v1/accesspolicies", headers=admin, json={
            "name": "reader", "scopes": ["metrics:read"], "realms": [{"type": "org", "identifier": "1"}]})
        assert r.status == 200, await r.text()
        pid = (await r.json())["id"]
        assert await _health(client) == (200, "ok", 1.0)

        async def unreachable() -> bool:
            return (await _health(client))[1:] == ("unreachable", 0.0)

        # 1. a short outage: the admin API refuses while /ready says unreachable, and once the database is
        # back, every write it acknowledges is one /ready and the gauge, asked right after, call reachable
        await asyncio.to_thread(own_pg.stop)
        await _until("/ready to say the database is unreachable", unreachable)
        r = await client.get("/api/v1/accesspolicies", headers=admin)
        assert r.status == 503 and r.headers["Retry-After"] == "1", await r.text()
        r = await client.post("/api/v1/push", headers=admin, data=b"x")  # the data path's, not the admin API's
        assert r.status == 400 and (await r.json())["errorType"] == "bad_data"  # decided from the snapshot
        await asyncio.to_thread(own_pg.restart)
        acknowledged = refused = 0
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            r = await client.post(f"/api/v1/accesspolicies/{pid}", headers=admin, json={"displayName": "x"})
            status, database, up = await _health(client)
            if r.status == 200:
                acknowledged += 1
                assert (status, database, up) == (200, "ok", 1.0), \
                    f"a write was acknowledged while /ready said {database!r} and gateway_database_up {up}"
            else:
                assert r.status == 503 and r.headers["Retry-After"] == "1", await r.text()
                refused += 1
            await asyncio.sleep(0.02)
        assert acknowledged, "the admin API did not recover"
        print(f"\nafter the database returned: {refused} writes refused with 503, then {acknowledged} acknowledged")
        assert not [r for r in caplog.records if STALE_LINE in r.getMessage() or FRESH_LINE in r.getMessage()]

        # 2. a long one, past max_staleness: one line, however many requests are refused meanwhile; one on recovery
        state.cache.max_staleness = 1.0
        await asyncio.to_thread(own_pg.stop)

        async def stale() -> bool:
            return (await client.get("/ready")).status == 503
        await _until("the snapshot to pass max_staleness", stale)
        for _ in range(20):
            r = await client.get("/prometheus/api/v1/query?query=up", headers=admin)
            assert r.status == 503
        await asyncio.sleep(2.2)  # two more ticks of the gauge loop
        assert [r.levelname for r in caplog.records if STALE_LINE in r.getMessage()] == ["ERROR"]
        assert not [r for r in caplog.records if FRESH_LINE in r.getMessage()]
        await asyncio.to_thread(own_pg.restart)

        async def ready() -> bool:
            return await _health(client) == (200, "ok", 1.0)
        await _until("/ready after the outage", ready)
        await asyncio.sleep(1.1)
        assert [r.levelname for r in caplog.records if FRESH_LINE in r.getMessage()] == ["WARNING"]
        assert len([r for r in caplog.records if STALE_LINE in r.getMessage()]) == 1
    finally:
        await close_state(state)
