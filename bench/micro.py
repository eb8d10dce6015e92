"""Micro-benchmarks of the hot path without the network: the real functions the handler calls, on a
snapshot of (by default) 100,000 tokens and 10,000 policies, and the PromQL/LogQL rewrites cold and cached.

Each figure is the best of several batches of the mean µs per call (timeit's convention: the least
disturbed batch is the closest to the code's own cost on a noisy machine).
"""

from __future__ import annotations

import base64
import gc
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from multidict import CIMultiDict, CIMultiDictProxy

from bench.payloads import LOGQL, PROMQL, query_path
from bench.servers import BENCH_ORGS
from gateway import heap
from gateway.clientip import client_ip
from gateway.config import Config, parse_config
from gateway.decision_cache import Decision, DecisionCache
from gateway.lbac import restrict as lbac
from gateway.lbac.logql import restrict_logql
from gateway.lbac.promql import restrict_promql
from gateway.policy import tokens as tokfmt
from gateway.policy.decision import authorize, identify
from gateway.policy.model import AccessPolicy, Realm, Token
from gateway.policy.selector import Selector, parse_selector
from gateway.proxy.headers import upstream_headers
from gateway.proxy.identify import credentials
from gateway.routes import Kind, match

READ_PATH = "/prometheus/api/v1/query"
RESTRICTION: Selector = parse_selector('{namespace="team-a"}')


@dataclass
class Snapshot:
    """What the cache holds, plus the presented token strings (only the client knows those)."""

    tokens: dict[str, Token]
    policies: dict[str, AccessPolicy]
    presented: list[str]  # presented[i] is token i's string
    open_token: str  # a token of an unrestricted read/write policy
    restricted_token: str  # a token of a policy restricted to RESTRICTION on stack 100
    config: Config
    generation: int = 0  # the PolicyCache's generation: what the decision cache's entries are valid for


def bench_config() -> Config:
    return parse_config({"listen": "127.0.0.1:0", "region": "local", "orgs": BENCH_ORGS,
                         "upstreams": {"metrics": {"url": "http://127.0.0.1:9"},
                                       "logs": {"url": "http://127.0.0.1:9"}},
                         "database": {"url": "postgresql://unused/x"}}, env={})


def make_policy(i: int, org: str = "1") -> AccessPolicy:
    """Policy i: every fourth one is restricted to RESTRICTION on stack 100, the others cover the org."""
    restricted = i % 4 == 3
    realm = Realm("stack", "100", (RESTRICTION,)) if restricted else Realm("org", org)
    scopes = frozenset({"metrics:read"}) if restricted else frozenset(
        {"metrics:read", "metrics:write", "logs:read", "logs:write"})
    return AccessPolicy(id=str(uuid.UUID(int=i + 1)), org_id=org, name=f"bench-policy-{i}",
                        display_name=f"bench policy {i}", scopes=scopes, realms=(realm,))


def make_token(i: int, policy_id: str, org: str = "1") -> tuple[Token, str]:
    """Token i of ``policy_id``, with a real secret: (the stored row, the string a client presents)."""
    secret = tokfmt.new_secret()
    tid = str(uuid.UUID(int=(1 << 64) + i))
    tok = Token(id=tid, access_policy_id=policy_id, name=f"bench-token-{i}", display_name=f"bench token {i}",
                secret_hash=tokfmt.hash_secret(secret))
    return tok, tokfmt.encode(org, tid, secret, "local")


def build_snapshot(n_tokens: int = 100_000, n_policies: int = 10_000) -> Snapshot:
    policies = [make_policy(i) for i in range(n_policies)]
    tokens: dict[str, Token] = {}
    presented: list[str] = []
    for i in range(n_tokens):
        tok, text = make_token(i, policies[i % n_policies].id)
        tokens[tok.id] = tok
        presented.append(text)
    restricted = next(i for i in range(n_tokens) if i % n_policies % 4 == 3)
    return Snapshot(tokens, {p.id: p for p in policies}, presented, presented[0], presented[restricted],
                    bench_config())


def _incoming(auth: str) -> CIMultiDictProxy[str]:
    """Headers a Prometheus or Grafana client sends with a query."""
    return CIMultiDictProxy(CIMultiDict({
        "Host": "127.0.0.1:8080", "User-Agent": "Grafana/11.3.0", "Accept": "application/json",
        "Accept-Encoding": "gzip", "Authorization": auth, "X-Grafana-Org-Id": "1", "Connection": "keep-alive"}))


def basic(user: str, token: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{token}".encode()).decode()


def decide(snap: Snapshot, headers: CIMultiDictProxy[str], method: str, path: str, peer: str,
           decisions: DecisionCache | None = None) -> CIMultiDict[str]:
    """The handler's pure per-request work, in its order: route match, client IP, then (on a miss of
    ``decisions``, or always without one) credentials, token decode and lookup (identify), tenant,
    authorize; label-policy headers, upstream header build."""
    m = match(method, path)
    assert m is not None
    auth = headers.get("Authorization")
    route = m.route
    cfg = snap.config
    org = headers.get("X-Scope-OrgID")
    ip = client_ip(peer, headers.getall("X-Forwarded-For", []), cfg.trusted_proxies)
    key = (auth, org, route.backend, route.scope, ip)
    d = decisions.get(key, snap.generation, cfg, time.time()) if decisions is not None else None
    if d is None:
        presented, user = credentials(auth)
        ident = identify(presented, snap.tokens, snap.policies, datetime.now(UTC))
        stack = cfg.stack_by_tenant[(route.backend, user or "100")]
        d = Decision(ident, stack, stack.tenants[route.backend], authorize(ident, route.scope, stack, ip), ip)
        if decisions is not None:
            decisions.put(key, snap.generation, cfg, d)
    label_headers = d.label_headers() if d.policies and route.kind in lbac.RESTRICTED_KINDS else ()
    return upstream_headers(headers, d.tenant, peer, label_headers)


def per_call_us(fn: Callable[[], Any], n: int, repeat: int = 5) -> float:
    """Best-of-``repeat`` mean µs per call over batches of ``n`` calls."""
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter_ns()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter_ns() - t0) / n / 1000)
    return round(best, 3)


def per_item_us(fn: Callable[[int], Any], start: int, n: int, repeat: int = 3) -> float:
    """Like per_call_us, but each call gets a fresh index (for cold caches); indexes never repeat."""
    best = float("inf")
    for r in range(repeat):
        base = start + r * n
        t0 = time.perf_counter_ns()
        for i in range(base, base + n):
            fn(i)
        best = min(best, (time.perf_counter_ns() - t0) / n / 1000)
    return round(best, 3)


def hot_path(snap: Snapshot, n: int) -> dict[str, float]:
    """µs per request of the decision and of its parts."""
    h_open = _incoming(basic("100", snap.open_token))
    h_restricted = _incoming(basic("100", snap.restricted_token))
    now = datetime.now(UTC)
    m = match("GET", READ_PATH)
    assert m is not None
    stack = snap.config.stack_by_tenant[("metrics", "100")]
    ident = identify(snap.open_token, snap.tokens, snap.policies, now)
    presented = snap.presented
    count = len(presented)

    decisions = DecisionCache()  # one worker's, as the handler keeps it
    # What the clients send, encoded before the clock starts (a client's base64, not the gateway's work).
    sent = [basic("100", text) for text in presented]

    def rotating(i: int) -> None:  # every request a different token: decode and decision caches cold
        decide(snap, _incoming(sent[i % count]), "GET", READ_PATH, "127.0.0.1", decisions)

    out = {
        # warm: the decision cache answers (the same token, address, tenant and route again)
        "decision_us": per_call_us(lambda: decide(snap, h_open, "GET", READ_PATH, "127.0.0.1", decisions), n),
        "decision_restricted_us": per_call_us(
            lambda: decide(snap, h_restricted, "GET", READ_PATH, "127.0.0.1", decisions), n),
        # first use: a miss of both caches, the decision then stored (evicting the least recently used)
        "decision_token_cold_us": per_item_us(rotating, 10_000_000, max(1, min(n, count // 3))),
        # the decision made afresh each time (no decision cache; the decode cache warm)
        "decision_uncached_us": per_call_us(lambda: decide(snap, h_open, "GET", READ_PATH, "127.0.0.1"), n),
        "decision_restricted_uncached_us": per_call_us(
            lambda: decide(snap, h_restricted, "GET", READ_PATH, "127.0.0.1"), n),
        "route_match_us": per_call_us(lambda: match("GET", READ_PATH), n),
        "credentials_us": per_call_us(lambda: credentials(h_open["Authorization"]), n),
        "token_decode_cached_us": per_call_us(lambda: tokfmt.decode(snap.open_token), n),
        # The uncached body of decode: base64 + JSON + SHA-256 of the secret.
        "token_decode_cold_us": per_call_us(lambda: tokfmt._decode(snap.open_token), n),
        "identify_us": per_call_us(lambda: identify(snap.open_token, snap.tokens, snap.policies, now), n),
        "authorize_us": per_call_us(lambda: authorize(ident, "metrics:read", stack, None), n),
        "client_ip_us": per_call_us(lambda: client_ip("127.0.0.1", [], ()), n),
        "upstream_headers_us": per_call_us(lambda: upstream_headers(h_open, "100", "127.0.0.1", ()), n),
        "now_utc_us": per_call_us(lambda: datetime.now(UTC), n),
    }
    return out


def rewrites(n: int) -> dict[str, float]:
    """PromQL and LogQL rewrites, cold (a query not seen before) and cached (the same query again)."""
    pols = (RESTRICTION,)
    restrict_promql(PROMQL, pols)
    restrict_logql(LOGQL, pols)
    raw_query = query_path(PROMQL).split("?", 1)[1]
    cold_n = max(1, n // 20)
    return {
        "promql_cold_us": per_item_us(
            lambda i: restrict_promql(PROMQL.replace('image!=""', f'image!="c{i}"'), pols), 0, cold_n),
        "promql_cached_us": per_call_us(lambda: restrict_promql(PROMQL, pols), n),
        "promql_enforce_cached_us": per_call_us(lambda: lbac.enforce(Kind.PROMQL, "GET", raw_query, None, pols), n),
        "logql_cold_us": per_item_us(
            lambda i: restrict_logql(LOGQL.replace('|= "error"', f'|= "e{i}"'), pols), 0, cold_n),
        "logql_cached_us": per_call_us(lambda: restrict_logql(LOGQL, pols), n),
    }


def run(n_tokens: int = 100_000, n_policies: int = 10_000, n: int = 20_000) -> dict[str, Any]:
    """All micro-benchmarks; ``n`` calls per batch."""
    t0 = time.perf_counter()
    snap = build_snapshot(n_tokens, n_policies)
    built = time.perf_counter() - t0
    out: dict[str, Any] = {"snapshot_tokens": len(snap.tokens), "snapshot_policies": len(snap.policies),
                           "snapshot_build_s": round(built, 2)}
    # As a worker does with its first snapshot (gateway/server.py, gateway/heap.py): frozen, so that a full
    # collection does not walk the 100,000 tokens (about 60 ms, once in the first-use loop, a cost no worker
    # pays), and young objects collected every heap.YOUNG_THRESHOLD allocations.
    threshold = gc.get_threshold()
    heap.settle()
    try:
        out.update(hot_path(snap, n))
        out.update(rewrites(n))
    finally:
        gc.unfreeze()
        gc.set_threshold(*threshold)
    return out
