"""The scale run: 100,000 tokens and 10,000 policies written straight into PostgreSQL (COPY), then a
gateway started on that database: seconds to /ready and resident memory."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import asyncpg

from bench.micro import basic, make_policy, make_token
from bench.servers import GatewayServer, memory
from gateway.store import realms_to_json
from gateway.store.migrate import apply


def with_db(dsn: str, name: str) -> str:
    base, _, query = dsn.partition("?")
    return f"{base.rsplit('/', 1)[0]}/{name}" + (f"?{query}" if query else "")


async def populate(dsn: str, db: str, n_tokens: int, n_policies: int) -> tuple[str, list[str], float]:
    """Create database ``db``, migrate it, COPY the rows in; returns (its DSN, a few presented tokens,
    seconds spent writing)."""
    admin = await asyncpg.connect(dsn)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
        await admin.execute(f'CREATE DATABASE "{db}"')
    finally:
        await admin.close()
    url = with_db(dsn, db)
    conn = await asyncpg.connect(url)
    try:
        await apply(conn)
        await conn.set_type_codec("jsonb", encoder=lambda v: b"\x01" + json.dumps(v).encode(),
                                  decoder=lambda b: json.loads(b[1:]), schema="pg_catalog", format="binary")
        started = time.perf_counter()
        policies = [make_policy(i) for i in range(n_policies)]
        prows = [(uuid.UUID(p.id), p.org_id, p.name, p.display_name, sorted(p.scopes),
                  realms_to_json(p.realms)) for p in policies]
        trows: list[tuple[Any, ...]] = []
        sample: list[str] = []
        for i in range(n_tokens):
            tok, text = make_token(i, policies[i % n_policies].id)
            trows.append((uuid.UUID(tok.id), "1", uuid.UUID(tok.access_policy_id), tok.name, tok.display_name,
                          tok.secret_hash))
            if i % (max(1, n_tokens // 5)) == 0:
                sample.append(text)
        async with conn.transaction():
            try:  # no NOTIFY per row: nobody listens yet
                await conn.execute("SET LOCAL session_replication_role = replica")
            except asyncpg.PostgresError:
                pass
            await conn.copy_records_to_table(
                "access_policies", records=prows,
                columns=["id", "org_id", "name", "display_name", "scopes", "realms"])
            await conn.copy_records_to_table(
                "tokens", records=trows,
                columns=["id", "org_id", "access_policy_id", "name", "display_name", "secret_sha256"])
        await conn.execute("ANALYZE")
        return url, sample, time.perf_counter() - started
    finally:
        await conn.close()


def run(workdir: Path, dsn: str, upstream_url: str, workers: int, n_tokens: int = 100_000,
        n_policies: int = 10_000) -> dict[str, Any]:
    url, sample, written = asyncio.run(populate(dsn, "bench_scale", n_tokens, n_policies))
    gw = GatewayServer(workdir, "gateway-scale", url, upstream_url, "header", workers)
    try:
        first_ready = gw.start(timeout=120)
        all_ready = gw.wait_all_listening(timeout=120)
        time.sleep(0.5)
        mem = memory(gw)
        ok = 0
        for tok in sample:  # tokens from the COPY authorize (their SHA-256 hashes are right)
            req = urllib.request.Request(f"{gw.url}/prometheus/api/v1/query?query=up",  # noqa: S310 - loopback
                                         headers={"Authorization": basic("100", tok)})
            with urllib.request.urlopen(req, timeout=5) as r:  # noqa: S310 - loopback
                ok += r.status == 200
        return {"tokens": n_tokens, "policies": n_policies, "copy_s": round(written, 2),
                "ready_s": round(first_ready, 2), "all_workers_ready_s": round(all_ready, 2),
                "rss_mb": mem.rss_mb, "pss_mb": mem.pss_mb, "worker_rss_mb": mem.worker_rss_mb,
                "max_worker_rss_mb": max(mem.worker_rss_mb, default=0.0),
                "sample_tokens_ok": f"{ok}/{len(sample)}"}
    finally:
        gw.stop()
