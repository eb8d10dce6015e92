"""The policy snapshot: usage batches from several replicas, staleness bound, resync."""

from __future__ import annotations

import asyncio
import time
import uuid
from datetime import datetime
from typing import Any

from tests.conftest import Gateway, make_config


async def test_usage_batches_from_replicas_keep_earliest_and_latest(gw: Gateway, db_dsn: str) -> None:
    from gateway.app import close_state, open_state

    p = await gw.policy("u", ["metrics:read"])
    t = await gw.token(p["id"], "u")
    other = await open_state(make_config(db_dsn))
    try:
        now = time.time()
        # replica A saw the token early and late; replica B in between, then much later
        gw.state.cache._usage[t["id"]] = (now - 100, now - 50)
        other.cache._usage[t["id"]] = (now - 80, now - 10)
        await other.cache.flush_usage()
        await gw.state.cache.flush_usage()
        got = await gw.api("GET", f"/api/v1/tokens/{t['id']}")
        first = datetime.fromisoformat(got["firstUsedAt"].replace("Z", "+00:00"))
        last = datetime.fromisoformat(got["lastUsedAt"].replace("Z", "+00:00"))
        assert abs(first.timestamp() - (now - 100)) < 0.01
        assert abs(last.timestamp() - (now - 10)) < 0.01
        # a later flush with older values changes nothing
        gw.state.cache._usage[t["id"]] = (now - 60, now - 40)
        await gw.state.cache.flush_usage()
        again = await gw.api("GET", f"/api/v1/tokens/{t['id']}")
        assert (again["firstUsedAt"], again["lastUsedAt"]) == (got["firstUsedAt"], got["lastUsedAt"])
    finally:
        await close_state(other)


async def _no_more_notifications(cache: Any) -> None:
    """As with a database that is down: stop listening, then let what already arrived be applied."""
    from gateway.store import CHANNEL

    await cache._listener.remove_listener(CHANNEL, cache._on_notify)
    await cache._listener.execute("SELECT 1")  # notifications sent before this are delivered first
    for _ in range(200):
        if cache._queue.empty():
            break
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.05)  # the last one's row read


async def test_a_stale_snapshot_is_refused_not_trusted(gw: Gateway) -> None:
    p = await gw.policy("s", ["metrics:read"])
    tok = (await gw.token(p["id"], "s"))["token"]
    cache: Any = gw.state.cache
    await _no_more_notifications(cache)  # a late NOTIFY of the writes above would refresh last_sync
    cache.db_ok = False
    cache.max_staleness = 5.0
    cache.last_sync = time.monotonic() - 3  # within the bound: still serving
    r = await gw.client.get("/ready")
    assert r.status == 200 and (await r.json())["database"] == "unreachable"
    r = await gw.client.get("/prometheus/api/v1/query?query=up", headers={"Authorization": f"Bearer {tok}"})
    assert r.status != 503
    cache.last_sync = time.monotonic() - 10  # past max_staleness
    r = await gw.client.get("/prometheus/api/v1/query?query=up", headers={"Authorization": f"Bearer {tok}"})
    body = await r.json()
    assert r.status == 503 and "too old" in body["error"]
    r = await gw.client.get("/ready")
    assert r.status == 503
    r = await gw.client.get("/api/v1/accesspolicies", headers=gw.auth())
    assert r.status == 503 and (await r.json())["code"] == "ServiceUnavailable"
    await cache.resync()
    assert (await gw.client.get("/ready")).status == 200


async def test_resync_replaces_the_snapshot_whole(gw: Gateway, db_dsn: str) -> None:
    import asyncpg

    p = await gw.policy("r", ["metrics:read"])
    t = await gw.token(p["id"], "r")
    conn = await asyncpg.connect(db_dsn)
    try:
        # a change that bypasses NOTIFY (as if notifications were missed during a reconnect)
        await conn.execute("ALTER TABLE tokens DISABLE TRIGGER tokens_notify_insert_delete")
        await conn.execute("DELETE FROM tokens WHERE id = $1", uuid.UUID(t["id"]))
    finally:
        await conn.close()
    assert t["id"] in gw.state.cache.tokens
    await gw.state.cache.resync()
    assert t["id"] not in gw.state.cache.tokens


async def test_a_snapshot_reads_every_token_across_cursor_batches(gw: Gateway, monkeypatch: Any) -> None:
    """Tokens are read by a cursor a batch at a time (memory, bench scale run): every row arrives once, with
    its policy's id string shared."""
    import gateway.store as store_mod

    monkeypatch.setattr(store_mod, "_TOKEN_BATCH", 7)
    p = await gw.policy("batched", ["metrics:read"])
    made = {(await gw.token(p["id"], f"b{i}"))["id"] for i in range(23)}
    snap = await gw.state.cache.store.load_snapshot()
    assert made <= set(snap.tokens)
    mine = [tok for tok, _version in snap.tokens.values() if tok.id in made]
    assert len(mine) == 23 and all(tok.access_policy_id is mine[0].access_policy_id for tok in mine)
    assert {tok.name for tok in mine} == {f"b{i}" for i in range(23)}


async def test_a_resync_keeps_the_objects_of_unchanged_rows_and_takes_changed_ones(gw: Gateway) -> None:
    """(The first snapshot is frozen out of the collector's way in a worker: a resync must not replace it.)"""
    p = await gw.policy("kept-objects", ["metrics:read"])
    t = await gw.token(p["id"], "kept")
    cache: Any = gw.state.cache
    await cache.resync(quiet=True)
    before_token, before_policy = cache.tokens[t["id"]], cache.policies[p["id"]]
    await cache.resync(quiet=True)
    assert cache.tokens[t["id"]] is before_token and cache.policies[p["id"]] is before_policy
    await gw.api("POST", f"/api/v1/accesspolicies/{p['id']}", {"scopes": ["metrics:read", "logs:read"],
                                                               "realms": [{"type": "org", "identifier": "1"}]})
    await cache.resync(quiet=True)
    assert cache.policies[p["id"]] is not before_policy and "logs:read" in cache.policies[p["id"]].scopes
    assert cache.tokens[t["id"]] is before_token
