"""The in-memory policy snapshot the hot path reads: every policy and token hash.

Loaded whole at start, updated row by row from PostgreSQL NOTIFY, resynced whole
periodically and after any reconnect (notifications may have been missed). While the
database is unreachable it keeps serving the last good snapshot, and says so.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from datetime import UTC, datetime
from typing import Any

import asyncpg

from gateway.policy.datasource import DataSource, RuleIndex, Team, build_index
from gateway.policy.model import AccessPolicy, Token
from gateway.store import CHANNEL, Store
from gateway.store import datasources as ds_store

log = logging.getLogger("gateway.cache")


class PolicyCache:
    """Policies and tokens by id. Mutated only by this class, from the event loop."""

    def __init__(self, store: Store, resync_interval: float = 60.0, usage_flush_interval: float = 10.0,
                 max_staleness: float = 3600.0, reconnect_max_backoff: float = 10.0):
        self.store = store
        self.policies: dict[str, AccessPolicy] = {}
        self.tokens: dict[str, Token] = {}
        # Grafana data sources and teams, and the team LBAC rules index built from them (issue 5).
        self.datasources: dict[int, DataSource] = {}
        self.teams: dict[int, Team] = {}
        self.team_rules: RuleIndex = {}
        self.loaded = False
        self.db_ok = False
        self.last_sync = 0.0  # time.monotonic() of the last full or incremental confirmation
        self.detail = "not loaded"
        self.resync_interval = resync_interval
        self.usage_flush_interval = usage_flush_interval
        self.max_staleness = max_staleness
        self.reconnect_max_backoff = reconnect_max_backoff
        self._usage: dict[str, tuple[float, float]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._listener: asyncpg.Connection | None = None
        self._lost = asyncio.Event()
        self._queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    # ---- lifecycle ----------------------------------------------------------------------------------

    async def start(self) -> None:
        """Load the snapshot and subscribe; returns once the snapshot is loaded."""
        await self._connect_listener()
        await self.resync()
        self._tasks = [asyncio.create_task(self._supervise(), name="cache-supervise"),
                       asyncio.create_task(self._apply_changes(), name="cache-apply"),
                       asyncio.create_task(self._flush_loop(), name="cache-usage")]

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        with contextlib.suppress(Exception):
            await self.flush_usage()
        if self._listener is not None:
            with contextlib.suppress(Exception):
                await self._listener.close()

    async def resync(self, quiet: bool = False) -> None:
        """Replace the snapshot with the database's state, in one step (``quiet``: log at DEBUG)."""
        started = time.monotonic()
        policies, tokens = await self.store.load_all()
        datasources, teams = await ds_store.load_all(self.store)
        self.policies = {p.id: p for p in policies}
        self.tokens = {t.id: t for t in tokens}
        self.datasources = {d.id: d for d in datasources}
        self.teams = {t.id: t for t in teams}
        self.team_rules = build_index(self.datasources.values(), self.teams)
        self.loaded = True
        self.db_ok = True
        self.last_sync = time.monotonic()
        self.detail = "ok"
        log.log(logging.DEBUG if quiet else logging.INFO, "policy snapshot loaded: %d policies, %d tokens in %.0f ms",
                len(self.policies), len(self.tokens), (self.last_sync - started) * 1000)

    @property
    def age(self) -> float:
        return time.monotonic() - self.last_sync if self.loaded else float("inf")

    @property
    def stale(self) -> bool:
        """True when the snapshot is too old to trust (database down past max_staleness)."""
        return not self.loaded or (not self.db_ok and self.age > self.max_staleness)

    # ---- change feed --------------------------------------------------------------------------------

    async def _connect_listener(self) -> None:
        conn = await self.store.connect_listener()
        self._lost.clear()
        conn.add_termination_listener(lambda _c: self._lost.set())
        await conn.add_listener(CHANNEL, self._on_notify)
        self._listener = conn

    def _on_notify(self, _conn: object, _pid: int, _channel: str, payload: str) -> None:
        try:
            self._queue.put_nowait(json.loads(payload))
        except ValueError:
            log.warning("ignoring malformed change notification")

    async def _apply_changes(self) -> None:
        while True:
            change = await self._queue.get()
            try:
                await self._apply(change)
            except Exception:
                log.exception("applying change %s failed; scheduling a full resync", change)
                self._lost.set()

    async def apply_change(self, table: str, op: str, row_id: str) -> None:
        """Apply one change now (the API calls this after a write so its own replica never lags)."""
        await self._apply({"table": table, "op": op, "id": row_id})

    async def _apply(self, change: dict[str, Any]) -> None:
        table, op, rid = change.get("table"), change.get("op"), str(change.get("id"))
        if table == "access_policies":
            if op == "DELETE":
                self.policies.pop(rid, None)
                for tid in [t.id for t in self.tokens.values() if t.access_policy_id == rid]:
                    self.tokens.pop(tid, None)
            else:
                p = await self.store.load_policy(rid)
                if p is None:
                    self.policies.pop(rid, None)
                else:
                    self.policies[rid] = p
        elif table == "tokens":
            if op == "DELETE":
                self.tokens.pop(rid, None)
            else:
                t = await self.store.load_token(rid)
                if t is None:
                    self.tokens.pop(rid, None)
                else:
                    self.tokens[rid] = t
        elif table in ("datasources", "teams"):
            await self._apply_datasource_change(table, op, int(rid))
        self.last_sync = time.monotonic()

    async def _apply_datasource_change(self, table: str, op: str | None, rid: int) -> None:
        """Reload one data source or team, then rebuild the rules index (small; rebuilt whole so the
        hot path reads one consistent dict)."""
        if table == "datasources":
            ds = None if op == "DELETE" else await ds_store.load_datasource(self.store, rid)
            if ds is None:
                self.datasources.pop(rid, None)
            else:
                self.datasources[rid] = ds
        else:
            team = None if op == "DELETE" else await ds_store.load_team(self.store, rid)
            if team is None:
                self.teams.pop(rid, None)
            else:
                self.teams[rid] = team
        self.team_rules = build_index(self.datasources.values(), self.teams)

    async def _supervise(self) -> None:
        """Periodic resync; on a lost listener, reconnect with backoff and resync before trusting."""
        backoff = min(0.5, self.reconnect_max_backoff)
        while True:
            lost_wait = asyncio.ensure_future(self._lost.wait())
            try:
                await asyncio.wait_for(asyncio.shield(lost_wait), timeout=self.resync_interval)
            except TimeoutError:
                pass
            finally:
                lost_wait.cancel()
            if not self._lost.is_set():
                try:
                    await self.resync(quiet=True)  # the periodic one: not worth an INFO line a minute
                    continue
                except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
                    self._degrade(f"periodic resync failed: {exc}")
                    self._lost.set()
            self._degrade("lost the database connection; serving the last snapshot")
            while True:
                try:
                    if self._listener is not None:
                        with contextlib.suppress(Exception):
                            await self._listener.close()
                    await self._connect_listener()
                    await self.resync()
                    log.info("database connection restored; snapshot resynced")
                    backoff = min(0.5, self.reconnect_max_backoff)
                    break
                except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
                    self._degrade(f"database unreachable ({exc.__class__.__name__}); retrying in {backoff:.1f}s")
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, self.reconnect_max_backoff)

    def _degrade(self, detail: str) -> None:
        if self.db_ok or detail != self.detail:
            log.warning("%s (snapshot age %.1fs)", detail, self.age)
        self.db_ok = False
        self.detail = detail

    # ---- usage --------------------------------------------------------------------------------------

    def record_use(self, token_id: str) -> None:
        """Hot path: remember the first and last use in this flush window (no I/O)."""
        now = time.time()
        seen = self._usage.get(token_id)
        self._usage[token_id] = (seen[0] if seen else now, now)

    async def flush_usage(self) -> None:
        if not self._usage:
            return
        batch, self._usage = self._usage, {}
        try:
            await self.store.flush_usage({k: (datetime.fromtimestamp(f, UTC), datetime.fromtimestamp(la, UTC))
                                          for k, (f, la) in batch.items()})
        except Exception:
            for k, (f, la) in batch.items():  # put back, merged, for the next try
                cur = self._usage.get(k)
                self._usage[k] = (min(f, cur[0]), max(la, cur[1])) if cur else (f, la)
            raise

    async def _flush_loop(self) -> None:
        while True:
            await asyncio.sleep(self.usage_flush_interval)
            try:
                await self.flush_usage()
            except Exception as exc:
                log.warning("writing token usage failed, will retry: %s", exc)
