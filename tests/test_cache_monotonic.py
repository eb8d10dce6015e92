"""The policy cache never goes back in time (issue 12, item 1).

A property test over random schedules against the real database: API changes (token create and
delete, policy updates that add a label policy, policy deletes) interleave with full resyncs and
lost listener connections, and every read of the store lands after a random delay (a load or row
read that completes late is exactly what used to resurrect rows). After every 2xx the replica that
answered must reflect it at once and ever after; a second replica, fed only by notifications, may
lag but must never move backwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import random
import re
from collections.abc import Callable
from typing import Any

import pytest

from gateway.cache import PolicyCache
from gateway.store import Store
from gateway.store import datasources as ds_store
from tests.conftest import Gateway, make_config

P = "/api/v1/accesspolicies"
T = "/api/v1/tokens"
_LEVEL = re.compile(r'env="v(\d+)"')


def _slow_reads(monkeypatch: pytest.MonkeyPatch, rng: random.Random) -> None:
    """Every snapshot and row read of the store returns after a random delay (0-40 ms)."""
    def slow(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        async def run(*args: Any, **kwargs: Any) -> Any:
            got = await fn(*args, **kwargs)
            await asyncio.sleep(rng.random() * 0.04)
            return got
        return run
    for name in ("load_all", "load_snapshot", "load_policy", "load_token", "load_versioned", "lookup_token"):
        if hasattr(Store, name):
            monkeypatch.setattr(Store, name, slow(getattr(Store, name)))
    for name in ("load_all", "load_datasource", "load_team"):
        if hasattr(ds_store, name):
            monkeypatch.setattr(ds_store, name, slow(getattr(ds_store, name)))


def _level(cache: PolicyCache, pid: str) -> int | None:
    """The label-policy level a cache holds for a policy (None: policy absent)."""
    p = cache.policies.get(pid)
    if p is None:
        return None
    found = [int(m) for r in p.realms for s in r.label_policies for m in _LEVEL.findall(str(s))]
    return max(found, default=0)


class World:
    """What the API acknowledged, and what the lagging replica has been seen to hold."""

    def __init__(self) -> None:
        self.policies: dict[str, int] = {}  # policy id -> acknowledged label level
        self.status: dict[str, str] = {}  # policy id -> acknowledged status (only this test writes)
        self.deleted_policies: set[str] = set()
        self.tokens: dict[str, str] = {}  # token id -> policy id
        self.deleted_tokens: set[str] = set()
        self.seen_level: dict[str, int] = {}
        self.seen_gone: set[str] = set()
        # Rows the lagging replica has been seen to hold: a row it never knew (its creation not yet seen)
        # is absent for lack of news, not because of the delete, so only a row it held can go "back".
        self.seen_held: set[str] = set()

    def check_acknowledged(self, cache: PolicyCache, when: str) -> None:
        for tid in self.deleted_tokens:
            assert tid not in cache.tokens, f"{when}: deleted token {tid} is back"
        for pid in self.deleted_policies:
            assert pid not in cache.policies, f"{when}: deleted policy {pid} is back"
        for tid in self.tokens:
            assert tid in cache.tokens, f"{when}: acknowledged token {tid} is missing"
        for pid, level in self.policies.items():
            held = _level(cache, pid)
            assert held is not None and held >= level, f"{when}: policy {pid} at level {held}, acknowledged {level}"
            assert cache.policies[pid].status == self.status.get(pid, "active"), f"{when}: policy {pid} status"

    def check_monotonic(self, cache: PolicyCache, when: str) -> None:
        for pid in [*self.policies, *self.deleted_policies]:
            held = _level(cache, pid)
            if held is None:
                if pid in self.deleted_policies and pid in self.seen_held:
                    self.seen_gone.add(pid)
                continue
            self.seen_held.add(pid)
            assert pid not in self.seen_gone, f"{when}: replica resurrected deleted policy {pid}"
            assert held >= self.seen_level.get(pid, 0), f"{when}: replica went back on policy {pid}"
            self.seen_level[pid] = held
        self.seen_held.update(tid for tid in self.tokens if tid in cache.tokens)
        for tid in self.deleted_tokens:
            if tid not in cache.tokens:
                if tid in self.seen_held:
                    self.seen_gone.add(tid)
            else:
                assert tid not in self.seen_gone, f"{when}: replica resurrected deleted token {tid}"
                self.seen_held.add(tid)


async def _drop_listener(cache: PolicyCache) -> None:
    """Kill the cache's LISTEN connection: it must reconnect and resync before trusting itself again."""
    conn: Any = cache._listener
    if conn is not None and not conn.is_closed():
        conn.terminate()
        for _ in range(200):  # until the cache has noticed (the API refuses writes from then on until it is back)
            if cache._lost.is_set() or not cache.db_ok:
                break
            await asyncio.sleep(0.005)


async def _step(gw: Gateway, rng: random.Random, world: World, n: int) -> None:
    alive = list(world.policies)
    op = rng.choice(["token", "token", "delete_token", "delete_token", "label", "label", "status", "policy",
                     "delete_policy"])
    if op == "policy" or not alive:
        p = await gw.policy(f"p{n}", ["metrics:read"])
        world.policies[p["id"]] = 0
    elif op == "token":
        pid = rng.choice(alive)
        t = await gw.token(pid, f"t{n}")
        world.tokens[t["id"]] = pid
    elif op == "delete_token" and world.tokens:
        tid = rng.choice(list(world.tokens))
        await gw.api("DELETE", f"{T}/{tid}", expect=200)
        del world.tokens[tid]
        world.deleted_tokens.add(tid)
    elif op == "label":
        pid = rng.choice(alive)
        level = n
        await gw.api("POST", f"{P}/{pid}", {"realms": [{"type": "org", "identifier": "1", "labelPolicies": [
            {"selector": f'{{env="v{level}"}}'}]}]})
        world.policies[pid] = level
    elif op == "status":  # deactivate or reactivate, and bump the level so the lagging replica is checked too
        pid = rng.choice(alive)
        status = "inactive" if world.status.get(pid, "active") == "active" else "active"
        await gw.api("POST", f"{P}/{pid}", {"status": status, "realms": [
            {"type": "org", "identifier": "1", "labelPolicies": [{"selector": f'{{env="v{n}"}}'}]}]})
        world.policies[pid] = n
        world.status[pid] = status
    elif op == "delete_policy" and len(alive) > 1:
        pid = rng.choice(alive)
        await gw.api("DELETE", f"{P}/{pid}", expect=200)
        del world.policies[pid]
        world.deleted_policies.add(pid)
        for tid in [t for t, owner in world.tokens.items() if owner == pid]:
            del world.tokens[tid]
            world.deleted_tokens.add(tid)


@pytest.mark.parametrize("seed", range(3))
async def test_the_cache_never_answers_older_than_acknowledged(gw: Gateway, db_dsn: str, seed: int,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from gateway.app import close_state, open_state

    rng = random.Random(seed)
    other = await open_state(make_config(db_dsn))  # a second replica: fed by notifications only
    _slow_reads(monkeypatch, rng)
    world = World()
    background: list[asyncio.Task[Any]] = []
    try:
        for n in range(1, 61):
            for cache in (gw.state.cache, other.cache):
                roll = rng.random()
                if roll < 0.35:
                    background.append(asyncio.create_task(cache.resync(quiet=True)))
                elif roll < 0.45:
                    await _drop_listener(cache)
            await asyncio.sleep(rng.random() * 0.01)  # let a resync get its snapshot in flight
            # The API answers 503 while its worker's listener is down (issue 23): a client retries; here, wait.
            for _ in range(400):
                if gw.state.cache.db_ok:
                    break
                await asyncio.sleep(0.005)
            await _step(gw, rng, world, n)
            world.check_acknowledged(gw.state.cache, f"seed {seed} step {n}, right after the 2xx")
            world.check_monotonic(other.cache, f"seed {seed} step {n}")
            if rng.random() < 0.3:
                for task in background:
                    with contextlib.suppress(Exception):
                        await task
                background.clear()
                world.check_acknowledged(gw.state.cache, f"seed {seed} step {n}, after the resyncs")
                world.check_monotonic(other.cache, f"seed {seed} step {n}, after the resyncs")
        for task in background:
            with contextlib.suppress(Exception):
                await task
        world.check_acknowledged(gw.state.cache, f"seed {seed}: the end")
        # The lagging replica catches up (notifications, or its next resync) and then agrees.
        for _ in range(200):
            try:
                world.check_acknowledged(other.cache, "replica")
                break
            except AssertionError:
                await asyncio.sleep(0.05)
        await other.cache.resync()
        world.check_acknowledged(other.cache, f"seed {seed}: the replica after a resync")
        world.check_monotonic(other.cache, f"seed {seed}: the replica at the end")
    finally:
        for task in background:
            task.cancel()
        await close_state(other)


async def test_a_late_row_read_does_not_overwrite_a_newer_version(gw: Gateway) -> None:
    """Two applies of the same policy finish in the wrong order: the older read is dropped."""
    p = await gw.policy("late", ["metrics:read"])
    cache: Any = gw.state.cache
    old = await gw.state.store.load_versioned("access_policies", p["id"])
    await gw.api("POST", f"{P}/{p['id']}", {"displayName": "newer"})
    assert cache.policies[p["id"]].display_name == "newer"
    assert not cache._put("access_policies", p["id"], old, cache._epoch)
    assert cache.policies[p["id"]].display_name == "newer"
