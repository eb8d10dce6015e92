"""The data path's decision cache (issue 17, item 2): a decision is reused only while the policy snapshot's
generation, the config object and the token's expiry say it still holds; every key fact counts."""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from gateway.admin.serialize import policy_json, token_json
from gateway.cache import PolicyCache
from gateway.config import Config
from gateway.decision_cache import Decision, DecisionCache, Key
from gateway.lbac.restrict import headers_for
from gateway.policy.decision import Identity
from gateway.policy.model import AccessPolicy, Realm, Token
from gateway.policy.selector import parse_selector
from gateway.store import AdminScope, Snapshot
from tests.conftest import make_config
from tests.test_proxy import Env, _env

ORG = AdminScope("1", True, frozenset())
IP = ipaddress.ip_address("10.1.2.3")
Q = "/prometheus/api/v1/query?query=up"


def _cfg() -> Config:
    return make_config("postgresql://unused/x")


def _decision(cfg: Config, expires_at: datetime | None = None) -> Decision:
    policy = AccessPolicy(id=str(uuid.uuid4()), org_id="1", name="p", display_name="p",
                          scopes=frozenset({"metrics:read"}),
                          realms=(Realm("stack", "100", (parse_selector('{ns="a"}'),)),))
    token = Token(id=str(uuid.uuid4()), access_policy_id=policy.id, name="t", display_name="t",
                  secret_hash=b"\0" * 32, expires_at=expires_at)
    stack = cfg.stack_by_tenant[("metrics", "100")]
    return Decision(Identity(token, policy), stack, "100", policy.realms[0].label_policies)


def _key(**kw: Any) -> Key:
    facts: dict[str, Any] = {"presented": "glc_secret", "user": "100", "org": None, "backend": "metrics",
                             "scope": "metrics:read", "ip": IP, **kw}
    auth = facts.get("auth") or (_basic(facts["user"], facts["presented"])["Authorization"] if facts["user"]
                                 else f"Bearer {facts['presented']}")
    return (auth, facts["org"], facts["backend"], facts["scope"], facts["ip"])


def _basic(user: str, token: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{token}".encode()).decode()}


# ---- the cache on its own -----------------------------------------------------------------------------

def test_a_decision_is_reused_under_the_same_generation_and_config() -> None:
    cfg, dc = _cfg(), DecisionCache()
    d = _decision(cfg)
    assert dc.get(_key(), 7, cfg, time.time()) is None
    dc.put(_key(), 7, cfg, d)
    assert dc.get(_key(), 7, cfg, time.time()) is d
    assert d.label_headers() == headers_for("100", d.policies)
    assert d.label_headers() is d.label_headers()  # computed once
    assert Decision(d.ident, d.stack, d.tenant, d.policies, IP).client_ip() == "10.1.2.3"


def test_any_snapshot_change_or_config_reload_voids_every_decision() -> None:
    cfg, dc = _cfg(), DecisionCache()
    dc.put(_key(), 7, cfg, _decision(cfg))
    dc.put(_key(presented="other"), 7, cfg, _decision(cfg))
    assert dc.get(_key(), 8, cfg, time.time()) is None
    assert len(dc) == 0
    assert dc.get(_key(), 7, cfg, time.time()) is None  # no way back to an older generation
    dc.put(_key(), 8, cfg, _decision(cfg))
    assert dc.get(_key(), 8, _cfg(), time.time()) is None  # a reloaded config (a new object)
    assert len(dc) == 0


def test_a_decision_made_before_a_change_is_not_stored() -> None:
    cfg, dc = _cfg(), DecisionCache()
    assert dc.get(_key(), 8, cfg, time.time()) is None
    dc.put(_key(), 7, cfg, _decision(cfg))
    assert dc.get(_key(), 8, cfg, time.time()) is None


def test_a_decision_does_not_outlive_the_token() -> None:
    cfg, dc = _cfg(), DecisionCache()
    exp = datetime.now(UTC) + timedelta(seconds=60)
    dc.put(_key(), 1, cfg, _decision(cfg, exp))
    assert dc.get(_key(), 1, cfg, exp.timestamp() - 0.001) is not None
    assert dc.get(_key(), 1, cfg, exp.timestamp()) is None  # expiresAt <= now: expired, as identify says
    assert len(dc) == 0


@pytest.mark.parametrize("other", [{"presented": "glc_secreT"}, {"presented": "glc_secret "}, {"user": "200"},
                                   {"user": None}, {"auth": "basic " + base64.b64encode(b"100:glc_secret").decode()},
                                   {"org": "100"}, {"backend": "logs"}, {"scope": "metrics:write"},
                                   {"ip": ipaddress.ip_address("10.1.2.4")}, {"ip": None}])
def test_every_fact_of_the_key_counts(other: dict[str, Any]) -> None:
    cfg, dc = _cfg(), DecisionCache()
    dc.put(_key(), 1, cfg, _decision(cfg))
    assert dc.get(_key(**other), 1, cfg, time.time()) is None
    assert dc.get(_key(), 1, cfg, time.time()) is not None


def test_the_cache_is_bounded_least_recently_used_first() -> None:
    cfg, dc = _cfg(), DecisionCache(maxsize=3)
    for i in range(3):
        dc.put(_key(presented=f"t{i}"), 1, cfg, _decision(cfg))
    assert dc.get(_key(presented="t0"), 1, cfg, time.time()) is not None  # t1 is now the oldest
    dc.put(_key(presented="t3"), 1, cfg, _decision(cfg))
    assert len(dc) == 3
    assert dc.get(_key(presented="t1"), 1, cfg, time.time()) is None
    assert all(dc.get(_key(presented=p), 1, cfg, time.time()) for p in ("t0", "t2", "t3"))


def test_every_change_the_policy_cache_takes_in_moves_its_generation() -> None:
    cache = PolicyCache(store=Any)  # type: ignore[arg-type]  # no I/O below
    d = _decision(_cfg())
    policy, token = d.ident.policy, d.ident.token
    seen = [cache.generation]

    def moved() -> bool:
        seen.append(cache.generation)
        return seen[-1] > seen[-2]
    assert cache._put("access_policies", policy.id, (policy, 1), 0) and moved()
    assert cache._put("tokens", token.id, (token, 2), 0) and moved()
    assert not cache._put("tokens", token.id, (token, 2), 0) and not moved()  # not newer: nothing changed
    cache._epoch += 1
    cache._merge(Snapshot({policy.id: (policy, 1)}, {token.id: (token, 3)}, {}, {}), cache._epoch)
    assert moved()  # a resync (even one that changed nothing would count)
    cache._bury("tokens", token.id)
    assert moved() and token.id not in cache.tokens
    cache._put("access_policies", policy.id, None, cache._epoch)  # gone from the database: buried
    assert moved() and policy.id not in cache.policies


# ---- through the real server ---------------------------------------------------------------------------

@pytest.fixture
async def env(db_dsn: str, aiohttp_client: Any, aiohttp_server: Any) -> Any:
    async with _env(db_dsn, aiohttp_client, aiohttp_server) as e:
        yield e


async def _served(env: Env, token: str, **headers: str) -> int:
    r = await env.gw.client.get(Q, headers={**_basic("100", token), **headers})
    await r.read()
    return r.status


async def _hit(env: Env, token: str) -> bool:
    """Serve one request (it must succeed); True if the decision cache answered it."""
    dc = env.gw.state.decisions
    hits = 0
    real = dc.get

    def counting(*a: Any) -> Decision | None:
        nonlocal hits
        got = real(*a)
        hits += got is not None
        return got
    dc.get = counting  # type: ignore[method-assign]
    try:
        assert await _served(env, token) == 200
    finally:
        del dc.get
    return hits == 1


async def _cached_ok(env: Env, token: str) -> None:
    """Two requests succeed and the second is answered from the decision cache."""
    assert await _served(env, token) == 200
    assert await _hit(env, token)


async def test_a_decision_made_while_the_snapshot_changed_is_not_kept(
        env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    p = await env.gw.policy(f"r{uuid.uuid4().hex[:6]}", ["metrics:read"], [{"type": "stack", "identifier": "100"}])
    t = await env.gw.token(p["id"], "raced")
    cache = env.gw.state.cache
    real = cache.authorize

    async def changing(*a: Any) -> Any:
        got = await real(*a)
        cache.generation += 1  # a change lands while this request decides (as during a read-through)
        return got
    monkeypatch.setattr(cache, "authorize", changing)
    assert await _served(env, t["token"]) == 200
    monkeypatch.undo()
    assert not await _hit(env, t["token"])  # decided again, and kept this time
    assert await _hit(env, t["token"])


async def test_deleting_a_token_refuses_the_very_next_request(env: Env) -> None:
    p = await env.gw.policy(f"d{uuid.uuid4().hex[:6]}", ["metrics:read"], [{"type": "stack", "identifier": "100"}])
    t = await env.gw.token(p["id"], "doomed")
    await _cached_ok(env, t["token"])
    await env.gw.api("DELETE", f"/api/v1/tokens/{t['id']}")
    assert await _served(env, t["token"]) == 401


async def test_removing_a_scope_or_deactivating_refuses_the_very_next_request(env: Env) -> None:
    p = await env.gw.policy(f"s{uuid.uuid4().hex[:6]}", ["metrics:read"], [{"type": "stack", "identifier": "100"}])
    t = await env.gw.token(p["id"], "narrowed")
    await _cached_ok(env, t["token"])
    await env.gw.state.store.update_policy(ORG, p["id"], {"scopes": frozenset({"metrics:write"})}, "test",
                                           policy_json)
    await env.gw.state.cache.apply_change("access_policies", "UPDATE", p["id"])
    assert await _served(env, t["token"]) == 403


async def test_a_change_heard_from_another_replica_voids_the_decision(env: Env) -> None:
    p = await env.gw.policy(f"n{uuid.uuid4().hex[:6]}", ["metrics:read"], [{"type": "stack", "identifier": "100"}])
    t = await env.gw.token(p["id"], "elsewhere")
    await _cached_ok(env, t["token"])
    cache = env.gw.state.cache
    before = cache.generation
    await env.gw.state.store.delete_token(ORG, t["id"], "test", token_json)  # as another replica's API would
    for _ in range(200):  # the NOTIFY arrives
        if cache.generation != before:
            break
        await asyncio.sleep(0.01)
    assert t["id"] not in cache.tokens
    assert await _served(env, t["token"]) == 401


async def test_a_cached_decision_expires_with_its_token(env: Env) -> None:
    p = await env.gw.policy(f"e{uuid.uuid4().hex[:6]}", ["metrics:read"], [{"type": "stack", "identifier": "100"}])
    exp = datetime.now(UTC) + timedelta(seconds=1.5)
    t = await env.gw.token(p["id"], "brief", expiresAt=exp.isoformat())
    await _cached_ok(env, t["token"])
    await asyncio.sleep(max(0.0, exp.timestamp() - time.time()) + 0.05)
    assert await _served(env, t["token"]) == 401


async def test_another_address_tenant_or_credential_is_decided_afresh(env: Env) -> None:
    p = await env.gw.policy(f"k{uuid.uuid4().hex[:6]}", ["metrics:read"], [{"type": "stack", "identifier": "100"}])
    t = await env.gw.token(p["id"], "keyed")
    await _cached_ok(env, t["token"])
    c = env.gw.client
    r = await c.get(Q, headers=_basic("200", t["token"]))  # another tenant: not this policy's stack
    assert r.status == 403
    forged = t["token"][:-2] + ("AA" if not t["token"].endswith("AA") else "BB")
    assert await _served(env, forged) == 401
    r = await c.get(Q, headers={"Authorization": f"Bearer {t['token']}", "X-Scope-OrgID": "200"})
    assert r.status == 403
    r = await c.post("/api/v1/push", data=b"x", headers=_basic("100", t["token"]))  # another scope
    assert r.status == 403


async def test_team_rules_and_client_policies_apply_on_a_cached_decision(env: Env) -> None:
    p = await env.gw.policy(f"c{uuid.uuid4().hex[:6]}", ["metrics:read"], [{"type": "stack", "identifier": "100"}])
    t = await env.gw.token(p["id"], "grafana")
    await _cached_ok(env, t["token"])
    assert await _served(env, t["token"], **{"X-Prom-Label-Policy": "100:%7Bns=%22a%22%7D"}) == 200
    assert env.rec.last.headers.getall("X-Prom-Label-Policy", [])  # the client's policy, applied
    assert await _served(env, t["token"]) == 200
    assert "X-Prom-Label-Policy" not in env.rec.last.headers


def test_the_handler_keeps_no_decision_across_states() -> None:
    from gateway.state import State
    a = State(config=_cfg(), store=Any, cache=Any)  # type: ignore[arg-type]
    b = State(config=_cfg(), store=Any, cache=Any)  # type: ignore[arg-type]
    assert a.decisions is not b.decisions

