"""Token usage writes (firstUsedAt/lastUsedAt) from several workers at once never deadlock (issue 23).

Every worker of every replica flushes its batch of used tokens every ``usage_flush_interval``; two
batches that share tokens used to lock them in the order of their arrays, and PostgreSQL broke the
resulting cycle by failing one batch (a deadlock, seen once in 10 minutes of churn). Here two writers,
each with its own pool as two workers have, flush overlapping batches in opposite orders in a loop
against the real PostgreSQL.
"""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta

import asyncpg

from gateway.admin.serialize import policy_json, token_json
from gateway.config import DatabaseConfig
from gateway.policy import tokens as tokfmt
from gateway.policy.model import AccessPolicy, Realm, Token
from gateway.store import AdminScope, Store

TABLE = 5000  # tokens in the table: enough that the planner looks each batch's rows up by index, as in production
TOKENS = 200  # tokens both writers' batches name
ROUNDS = 20  # (the old unordered UPDATE deadlocked in about 40 % of such batches, each after deadlock_timeout, 1 s)


async def _tokens(store: Store, n: int) -> list[str]:
    """TABLE tokens (one made through the store's own call); ``n`` of them, at random, are returned."""
    policy = await store.create_policy(AccessPolicy(
        id=str(uuid.uuid4()), org_id="1", name="usage", display_name="usage", scopes=frozenset({"metrics:read"}),
        realms=(Realm("org", "1"),)), "test", policy_json)
    await store.create_token(AdminScope("1", True, frozenset()), Token(
        id=str(uuid.uuid4()), access_policy_id=policy.id, name="t", display_name="t",
        secret_hash=tokfmt.hash_secret(tokfmt.new_secret())), "test", token_json)
    await store.pool.execute(
        "INSERT INTO tokens (id, org_id, access_policy_id, name, display_name, secret_sha256)"
        " SELECT md5(random()::text || i)::uuid, '1', $1, 'bulk' || i, 'bulk', sha256(i::text::bytea)"
        " FROM generate_series(2, $2) i", uuid.UUID(policy.id), TABLE)
    await store.pool.execute("ANALYZE tokens")
    return [r[0] for r in await store.pool.fetch("SELECT id::text FROM tokens ORDER BY random() LIMIT $1", n)]


async def test_two_writers_flushing_overlapping_batches_never_deadlock(db_dsn: str) -> None:
    cfg = DatabaseConfig(url=db_dsn, pool_min=1, pool_max=2)
    a, b = await Store.open(db_dsn, cfg, run_migrations=False), await Store.open(db_dsn, cfg, run_migrations=False)
    try:
        ids = await _tokens(a, TOKENS)
        start = datetime(2026, 1, 1, tzinfo=UTC)
        deadlocks: list[str] = []
        latest: dict[str, datetime] = {}

        async def writer(store: Store, seed: int, reverse: bool) -> None:
            batch_ids = sorted(ids, reverse=reverse)  # the two batches name their tokens in opposite orders
            for n in range(ROUNDS):
                when = start + timedelta(seconds=n * 2 + seed)
                usage = {tid: (when, when) for tid in batch_ids}
                for tid in batch_ids:
                    latest[tid] = max(latest.get(tid, when), when)
                try:
                    await store.flush_usage(usage)
                except asyncpg.DeadlockDetectedError as exc:
                    deadlocks.append(str(exc))

        await asyncio.wait_for(asyncio.gather(writer(a, 0, False), writer(b, 1, True)), 120)
        assert deadlocks == [], f"{len(deadlocks)} of {2 * ROUNDS} usage batches deadlocked: {deadlocks[0]}"
        rows = await a.pool.fetch("SELECT id::text, first_used_at, last_used_at FROM tokens WHERE id = ANY($1::uuid[])",
                                  [uuid.UUID(t) for t in ids])
        assert len(rows) == TOKENS
        for r in rows:  # nothing lost: the extremes of both writers' batches
            assert r["first_used_at"] == start
            assert r["last_used_at"] == latest[r["id"]]
    finally:
        await a.close()
        await b.close()
