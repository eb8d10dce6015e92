"""A token works the moment the API has answered its creation (issue 12, item 2), on every worker and
replica; and the gauges of a multi-worker gateway describe its workers, not the parent (item 3).

Each use opens a new connection (the kernel spreads SO_REUSEPORT connections over the workers), so the
create and the use usually land on different workers, before the other worker has had the NOTIFY.
"""

from __future__ import annotations

import asyncio
import base64
import re
from collections import Counter
from pathlib import Path

import aiohttp

from tests.conftest import bootstrap_token, make_config
from tests.e2e.gateway_proc import GatewayProcess

ROUNDS = 1000


async def _admin(dsn: str) -> str:
    from gateway.app import close_state, open_state
    state = await open_state(make_config(dsn))
    try:
        return await bootstrap_token(state)
    finally:
        await close_state(state)


async def _create_and_use(create_url: str, use_urls: list[str], admin: str) -> Counter[str]:
    """ROUNDS times: create a token through ``create_url``, use it at once through the next of
    ``use_urls`` (alternately on the admin API and the data path); count what the uses answered."""
    h = {"Authorization": f"Bearer {admin}"}
    outcomes: Counter[str] = Counter()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s:
        async with s.post(f"{create_url}/api/v1/accesspolicies", headers=h, json={
                "name": "fresh", "scopes": ["accesspolicies:read", "metrics:read"],
                "realms": [{"type": "org", "identifier": "1"}]}) as r:
            assert r.status == 200, await r.text()
            policy = await r.json()
        for i in range(ROUNDS):
            async with s.post(f"{create_url}/api/v1/tokens", headers=h,
                              json={"accessPolicyId": policy["id"], "name": f"t{i}"}) as r:
                assert r.status == 200, await r.text()
                token = (await r.json())["token"]
            url = use_urls[i % len(use_urls)]
            if i % 2:
                basic = base64.b64encode(f"100:{token}".encode()).decode()
                async with s.get(f"{url}/prometheus/api/v1/query?query=up",
                                 headers={"Authorization": f"Basic {basic}"}) as r:
                    # the upstream is a closed port: 502 means authorized and forwarded
                    outcomes["refused" if r.status in (401, 403) else f"data {r.status}"] += 1
            else:
                async with s.get(f"{url}/api/v1/accesspolicies?pageSize=1",
                                 headers={"Authorization": f"Bearer {token}"}) as r:
                    outcomes["refused" if r.status in (401, 403) else f"admin {r.status}"] += 1
    return outcomes


async def test_create_and_use_at_once_against_two_workers(tmp_path: Path, db_dsn: str) -> None:
    admin = await _admin(db_dsn)
    gw = GatewayProcess(tmp_path, db_dsn, "two")
    await asyncio.to_thread(gw.start, 30.0, ("--workers", "2"))
    try:
        outcomes = await _create_and_use(gw.url, [gw.url], admin)
    finally:
        assert gw.stop() == 0
    print(f"create-and-use x{ROUNDS} against 2 workers: {dict(outcomes)}")
    assert outcomes["refused"] == 0, outcomes
    assert outcomes["admin 200"] == ROUNDS // 2 and outcomes["data 502"] == ROUNDS // 2, outcomes


async def test_create_and_use_at_once_against_two_replicas(tmp_path: Path, db_dsn: str) -> None:
    admin = await _admin(db_dsn)
    a = GatewayProcess(tmp_path, db_dsn, "a")
    b = GatewayProcess(tmp_path, db_dsn, "b")
    await asyncio.gather(asyncio.to_thread(a.start), asyncio.to_thread(b.start))
    try:
        outcomes = await _create_and_use(a.url, [b.url], admin)
    finally:
        assert a.stop() == 0
        assert b.stop() == 0
    print(f"create on one replica, use on the other x{ROUNDS}: {dict(outcomes)}")
    assert outcomes["refused"] == 0, outcomes


async def test_database_up_gauge_with_several_workers(tmp_path: Path, db_dsn: str) -> None:
    gw = GatewayProcess(tmp_path, db_dsn, "metrics")
    await asyncio.to_thread(gw.start, 30.0, ("--workers", "2"))
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s:
            for _ in range(20):  # new connections: both workers answer some of the scrapes
                async with s.get(f"{gw.url}/metrics") as r:
                    text = await r.text()
                for name in ("gateway_database_up", "gateway_config_last_reload_successful"):
                    values = re.findall(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M)
                    assert values and all(float(v) == 1.0 for v in values), (name, values)
    finally:
        assert gw.stop() == 0
