"""Read-through on a snapshot miss (issue 12, item 2): a token the snapshot does not know is looked up
in the database before the request is refused; single-flight per id, a negative cache, a rate limit,
and only for well-formed tokens with a well-formed id."""

from __future__ import annotations

import asyncio
import base64
import uuid
from datetime import UTC, datetime
from typing import Any

import pytest

from gateway.admin.serialize import policy_json, token_json
from gateway.policy import tokens as tokfmt
from gateway.policy.decision import Denied
from gateway.policy.model import AccessPolicy, Realm, Token
from gateway.store import CHANNEL, AdminScope
from tests.conftest import Gateway

ORG = AdminScope("1", True, frozenset())


def _count_lookups(gw: Gateway, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    calls: list[str] = []
    store: Any = gw.state.store
    real = store.lookup_token

    async def counted(token_id: str) -> Any:
        calls.append(token_id)
        await asyncio.sleep(0.02)  # a lookup that takes a while: concurrent misses must share it
        return await real(token_id)
    monkeypatch.setattr(store, "lookup_token", counted)
    return calls


async def _deaf(gw: Gateway) -> None:
    """This replica stops hearing notifications: only a read-through can tell it about new rows."""
    cache: Any = gw.state.cache
    await cache._listener.remove_listener(CHANNEL, cache._on_notify)


async def _created_elsewhere(gw: Gateway, scopes: frozenset[str]) -> tuple[str, str]:
    """A policy and token written straight to the database, as another replica's API would."""
    store = gw.state.store
    policy = await store.create_policy(AccessPolicy(
        id=str(uuid.uuid4()), org_id="1", name=f"p-{uuid.uuid4().hex[:6]}", display_name="p", scopes=scopes,
        realms=(Realm("org", "1"),)), "test", policy_json)
    secret = tokfmt.new_secret()
    tok = await store.create_token(ORG, Token(id=str(uuid.uuid4()), access_policy_id=policy.id,
                                              name=f"t-{policy.id[:8]}",
                                              display_name="t", secret_hash=tokfmt.hash_secret(secret)),
                                   "test", token_json)
    return tok.id, tokfmt.encode("1", tok.id, secret, "local")


async def test_a_token_created_elsewhere_works_at_once_with_its_new_policy(
        gw: Gateway, monkeypatch: pytest.MonkeyPatch) -> None:
    await _deaf(gw)
    calls = _count_lookups(gw, monkeypatch)
    tid, presented = await _created_elsewhere(gw, frozenset({"accesspolicies:read", "metrics:read"}))
    assert tid not in gw.state.cache.tokens
    # the admin API (sync check behind the middleware) and the data path (502: the upstream port is closed)
    r = await gw.client.get("/api/v1/accesspolicies", headers={"Authorization": f"Bearer {presented}"})
    assert r.status == 200, await r.text()
    assert tid in gw.state.cache.tokens and calls == [tid]
    tid2, presented2 = await _created_elsewhere(gw, frozenset({"metrics:read"}))
    basic = base64.b64encode(f"100:{presented2}".encode()).decode()
    r = await gw.client.get("/prometheus/api/v1/query?query=up", headers={"Authorization": f"Basic {basic}"})
    assert r.status == 502, await r.text()
    assert calls == [tid, tid2]


async def test_concurrent_misses_share_one_lookup_and_misses_are_remembered(
        gw: Gateway, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _count_lookups(gw, monkeypatch)
    cache = gw.state.cache
    unknown = tokfmt.encode("1", str(uuid.uuid4()), tokfmt.new_secret(), "local")
    now = datetime.now(UTC)

    async def attempt() -> str:
        try:
            await cache.identify(unknown, now)
        except Denied as exc:
            return exc.reason
        return "accepted"
    assert await asyncio.gather(*(attempt() for _ in range(50))) == ["unknown_token"] * 50
    assert len(calls) == 1  # single-flight
    assert await asyncio.gather(*(attempt() for _ in range(50))) == ["unknown_token"] * 50
    assert len(calls) == 1  # the negative cache answered
    cache.negative_ttl = 0.0
    cache._negative.clear()
    await attempt()
    assert len(calls) == 2


async def test_random_token_ids_cannot_turn_into_database_load(gw: Gateway, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _count_lookups(gw, monkeypatch)
    cache = gw.state.cache
    cache.read_through_rate, cache.read_through_burst = 5.0, 10
    cache._bucket = 10.0
    now = datetime.now(UTC)
    for _ in range(200):
        with pytest.raises(Denied):
            await cache.identify(tokfmt.encode("1", str(uuid.uuid4()), "x", "local"), now)
    assert 10 <= len(calls) <= 15  # the burst, plus what the rate refilled meanwhile
    # ids that are not of the shape the gateway mints are never looked up, nor is junk
    before = len(calls)
    cache._bucket = 10.0
    for bad_id in ("1", "abc", str(uuid.uuid4()).upper(), str(uuid.uuid4()).replace("-", ""), "x" * 36):
        with pytest.raises(Denied):
            await cache.identify(tokfmt.encode("1", bad_id, "x", "local"), now)
    for junk in ("glc_!!!", "glc_", "nonsense"):
        with pytest.raises(Denied):
            await cache.identify(junk, now)
    assert len(calls) == before


async def test_a_deleted_token_is_not_read_back(gw: Gateway, monkeypatch: pytest.MonkeyPatch) -> None:
    p = await gw.policy("gone", ["accesspolicies:read"])
    t = await gw.token(p["id"], "gone")
    await gw.api("DELETE", f"/api/v1/tokens/{t['id']}", expect=200)
    calls = _count_lookups(gw, monkeypatch)
    r = await gw.client.get("/api/v1/accesspolicies", headers={"Authorization": f"Bearer {t['token']}"})
    assert r.status == 401
    assert calls == []  # the tombstone answers: deleted ids never come back


async def test_a_scope_widened_elsewhere_works_at_once(gw: Gateway, monkeypatch: pytest.MonkeyPatch) -> None:
    p = await gw.policy("widen", ["accesspolicies:read"])
    t = await gw.token(p["id"], "widen")
    await _deaf(gw)
    basic = {"Authorization": "Basic " + base64.b64encode(f"100:{t['token']}".encode()).decode()}
    store: Any = gw.state.store
    reads: list[str] = []
    real = store.load_versioned

    async def counted(table: str, row_id: str) -> Any:
        reads.append(row_id)
        return await real(table, row_id)
    monkeypatch.setattr(store, "load_versioned", counted)
    # refused, and refusals do not turn into a re-read each: at most one a second per policy
    for _ in range(20):
        r = await gw.client.get("/prometheus/api/v1/query?query=up", headers=basic)
        assert r.status == 403
    assert reads == [p["id"]]
    # another replica adds the scope; this (deaf) one re-reads the policy on the next refusal
    await store.update_policy(ORG, p["id"], {"scopes": frozenset({"accesspolicies:read", "metrics:read"})},
                              "test", policy_json)
    gw.state.cache._rechecked.clear()  # as if the second had passed
    r = await gw.client.get("/prometheus/api/v1/query?query=up", headers=basic)
    assert r.status == 502, await r.text()  # authorized: the upstream is a closed port
    assert "metrics:read" in gw.state.cache.policies[p["id"]].scopes


async def test_no_lookup_while_the_database_is_down(gw: Gateway, monkeypatch: pytest.MonkeyPatch) -> None:
    """Refuse at once rather than make each unknown token wait for a connect timeout."""
    calls = _count_lookups(gw, monkeypatch)
    gw.state.cache.db_ok = False
    with pytest.raises(Denied):
        await gw.state.cache.identify(tokfmt.encode("1", str(uuid.uuid4()), "x", "local"), datetime.now(UTC))
    assert calls == []
