"""The in-memory policy snapshot the hot path reads: every policy and token hash.

Loaded whole at start, updated row by row from PostgreSQL NOTIFY, resynced whole
periodically and after any reconnect (notifications may have been missed). While the
database is unreachable it keeps serving the last good snapshot, and says so.

It never goes back in time (issue 12). Every row carries a version from one database sequence;
a row is replaced only by a newer version of itself, a deleted id is buried (ids are never
reused) and its tombstone outlives the next full load, and a full load is merged into the live
maps rather than swapped in: a row the load did not see survives only if it was written after
the load began. A read that began before a full load that has since been merged is dropped
(the load saw that row or a newer one). A token id the snapshot does not know is read through
from the database before the request is refused: single-flight per id, a negative cache, and a
rate limit, for well-formed ids only. ``generation`` moves on every change the snapshot takes in
(a merge, a stored row, a buried one): what is derived from the snapshot is keyed on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from datetime import UTC, datetime
from typing import Any, Final

import asyncpg

from gateway.metrics import CACHE_AGE, CACHE_POLICIES, CACHE_TOKENS, DB_UP
from gateway.policy import tokens as tokfmt
from gateway.policy.datasource import DataSource, RuleIndex, Team, build_index
from gateway.policy.decision import Denied, Identity, IPAddress, StackLike, authorize, identify
from gateway.policy.model import AccessPolicy, Token
from gateway.policy.selector import Selector
from gateway.store import CHANNEL, Snapshot, Store

log = logging.getLogger("gateway.cache")
TABLES: Final = ("access_policies", "tokens", "datasources", "teams")
_DB_ERRORS: Final = (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError)
MAX_NEGATIVE: Final = 65536
GAUGE_INTERVAL: Final = 1.0
POLICY_RECHECK: Final = 1.0  # seconds: a refused policy is re-read at most this often
# Seconds before the first reconnect attempt; later ones double up to reconnect_max_backoff (default 0.5 s).
# A worker hears a write made while its listener is down only once it has reconnected and resynced, and
# the database may return at any moment of a wait: the wait bounds that delay (issue 23).
RECONNECT_FIRST: Final = 0.1


class PolicyCache:
    """Policies and tokens by id. Mutated only by this class, from the event loop."""

    def __init__(self, store: Store, resync_interval: float = 60.0, usage_flush_interval: float = 10.0,
                 max_staleness: float = 3600.0, reconnect_max_backoff: float = 0.5,
                 read_through_rate: float = 50.0, read_through_burst: int = 100, negative_ttl: float = 10.0):
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
        self._was_stale = False  # what the last staleness log line said (one line per change, not per request)
        self._usage: dict[str, tuple[float, float]] = {}
        self._flushing = asyncio.Lock()  # one usage write at a time: a flush returns once what it saw is written
        self._tasks: list[asyncio.Task[None]] = []
        self._listener: asyncpg.Connection | None = None
        self._lost = asyncio.Event()
        self._queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        # Versions and tombstones per table (ids as text); see the module docstring.
        self._ver: dict[str, dict[str, int]] = {t: {} for t in TABLES}
        self._tombs: dict[str, dict[str, int]] = {t: {} for t in TABLES}  # id -> epoch it was buried in
        self._epoch = 0  # bumped when a full load begins
        self._merged = 0  # epoch of the last full load merged
        self._touched: set[tuple[str, str]] = set()  # rows written since the running load began
        # Bumped on every change the snapshot takes in (merge, row stored, row buried): whatever was
        # derived from the snapshot under an older generation (the data path's decision cache) is void.
        self.generation = 0
        self._load_lock = asyncio.Lock()
        # Read-through (a token the snapshot does not know yet).
        self.read_through_rate = read_through_rate
        self.read_through_burst = read_through_burst
        self.negative_ttl = negative_ttl
        self._bucket = float(read_through_burst)
        self._bucket_at = time.monotonic()
        self._negative: dict[str, float] = {}
        self._inflight: dict[str, asyncio.Future[None]] = {}
        self._rechecked: dict[str, float] = {}  # policy id -> until when a refusal needs no re-read

    # ---- lifecycle ----------------------------------------------------------------------------------

    async def start(self) -> None:
        """Load the snapshot and subscribe; returns once the snapshot is loaded."""
        await self._connect_listener()
        await self.resync()
        self._tasks = [asyncio.create_task(self._supervise(), name="cache-supervise"),
                       asyncio.create_task(self._apply_changes(), name="cache-apply"),
                       asyncio.create_task(self._flush_loop(), name="cache-usage"),
                       asyncio.create_task(self._gauge_loop(), name="cache-gauges")]

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
        """Merge a full, consistent load of the database into the snapshot (``quiet``: log at DEBUG)."""
        async with self._load_lock:
            started = time.monotonic()
            self._epoch += 1
            epoch = self._epoch
            self._touched = set()
            snap = await self.store.load_snapshot()
            self._merge(snap, epoch)
        self.loaded = True
        self.db_ok = True
        self.last_sync = time.monotonic()
        self.detail = "ok"
        self.publish_gauges()
        self.note_staleness()
        log.log(logging.DEBUG if quiet else logging.INFO, "policy snapshot loaded: %d policies, %d tokens in %.0f ms",
                len(self.policies), len(self.tokens), (self.last_sync - started) * 1000)

    def _merge(self, snap: Snapshot, epoch: int) -> None:
        """Per row, keep the newer of the live and the loaded version; drop a live row the load did not
        see unless it was written after the load began; then forget tombstones older than the load."""
        loaded: dict[str, dict[str, tuple[Any, int]]] = {
            "access_policies": snap.policies, "tokens": snap.tokens, "datasources": snap.datasources,
            "teams": snap.teams}
        for table in TABLES:
            live, vers, tombs = self._map(table), self._ver[table], self._tombs[table]
            key = _int_key if table in ("datasources", "teams") else str
            new_map: dict[Any, Any] = {}
            new_ver: dict[str, int] = {}
            for rid, (obj, v) in loaded[table].items():
                if rid in tombs:
                    continue
                held = vers.get(rid)
                if held is not None and held >= v:  # (the same version: keep the object already held)
                    new_map[key(rid)], new_ver[rid] = live[key(rid)], held
                else:
                    new_map[key(rid)], new_ver[rid] = obj, v
            for rid, held in vers.items():
                if rid not in new_ver and (table, rid) in self._touched:
                    new_map[key(rid)], new_ver[rid] = live[key(rid)], held
            self._set_map(table, new_map)
            self._ver[table] = new_ver
            self._tombs[table] = {rid: e for rid, e in tombs.items() if e >= epoch}
        self.generation += 1
        self._merged = epoch
        self._touched = set()
        self.team_rules = build_index(self.datasources.values(), self.teams)

    def _map(self, table: str) -> dict[Any, Any]:
        maps: dict[str, dict[Any, Any]] = {"access_policies": self.policies, "tokens": self.tokens,
                                           "datasources": self.datasources, "teams": self.teams}
        return maps[table]

    def _set_map(self, table: str, new: dict[Any, Any]) -> None:
        if table == "access_policies":
            self.policies = new
        elif table == "tokens":
            self.tokens = new
        elif table == "datasources":
            self.datasources = new
        else:
            self.teams = new

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
        table, op, rid, v = change.get("table"), change.get("op"), str(change.get("id")), change.get("v")
        if table not in TABLES:
            return
        assert isinstance(table, str)
        if op == "DELETE":
            self._bury(table, rid)
        elif rid not in self._tombs[table] and not (isinstance(v, int) and self._ver[table].get(rid, -1) >= v):
            epoch = self._epoch
            got = await self.store.load_versioned(table, rid)
            self._put(table, rid, got, epoch)
        self.last_sync = time.monotonic()

    def _put(self, table: str, rid: str, got: tuple[Any, int] | None, epoch: int) -> bool:
        """Store a row read while ``epoch`` was current, if nothing newer is known; True if stored."""
        if self._merged > epoch or rid in self._tombs[table]:
            return False  # a full load that began after this read has been merged, or the row is gone
        if got is None:
            self._bury(table, rid)  # no longer in the database: deleted for good
            return False
        obj, version = got
        if self._ver[table].get(rid, -1) >= version:
            return False
        if epoch == self._epoch and self._load_lock.locked():
            self._touched.add((table, rid))  # written after the running load began: the merge keeps it
        self.generation += 1
        self._ver[table][rid] = version
        if table in ("datasources", "teams"):
            self._map(table)[int(rid)] = obj
            self.team_rules = build_index(self.datasources.values(), self.teams)
        else:
            self._map(table)[rid] = obj
        return True

    def _bury(self, table: str, rid: str) -> None:
        self.generation += 1
        self._tombs[table][rid] = self._epoch
        self._ver[table].pop(rid, None)
        if table in ("datasources", "teams"):
            self._map(table).pop(_int_key(rid), None)
            self.team_rules = build_index(self.datasources.values(), self.teams)
            return
        self._map(table).pop(rid, None)
        if table == "access_policies":  # its tokens went with it (ON DELETE CASCADE)
            for tid in [t.id for t in self.tokens.values() if t.access_policy_id == rid]:
                self._bury("tokens", tid)

    # ---- read-through -------------------------------------------------------------------------------

    async def identify(self, presented: str, now: datetime) -> Identity:
        """``identify`` against the snapshot; a well-formed token it does not know is looked up in the
        database first (a token created a moment ago on another worker or replica works at once)."""
        try:
            return identify(presented, self.tokens, self.policies, now)
        except Denied as exc:
            if exc.reason != "unknown_token" or not await self.read_through(presented):
                raise
        return identify(presented, self.tokens, self.policies, now)  # after the lookup (or a NOTIFY meanwhile)

    async def read_through(self, presented: str) -> bool:
        """Look up the token's id (and its policy) in the database; True if it was looked up (by this
        call or a concurrent one) and the snapshot now knows it."""
        try:
            tid = tokfmt.decode(presented).token_id
        except tokfmt.TokenFormatError:
            return False
        token = self.tokens.get(tid)
        if token is not None and token.access_policy_id in self.policies:
            return False  # known: the secret or the org was wrong
        if not tokfmt.well_formed_id(tid) or tid in self._tombs["tokens"] or not self.db_ok:
            return False  # (database down: refuse now rather than wait for a connect timeout)
        now = time.monotonic()
        if self._negative.get(tid, 0.0) > now:
            return False
        running = self._inflight.get(tid)
        if running is not None:
            await asyncio.shield(running)
            return tid in self.tokens
        if not self._take(now):
            log.warning("token read-through rate limit reached; refusing an unknown token without a lookup")
            return False
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._inflight[tid] = done
        try:
            await self._look_up(tid, now)
            return tid in self.tokens
        finally:
            del self._inflight[tid]
            done.set_result(None)

    async def _look_up(self, tid: str, now: float) -> None:
        epoch = self._epoch
        try:
            got = await self.store.lookup_token(tid)
        except _DB_ERRORS as exc:
            log.warning("token read-through failed (%s); refusing", exc.__class__.__name__)
            return
        if got is None:
            if len(self._negative) >= MAX_NEGATIVE:
                self._negative = {k: t for k, t in self._negative.items() if t > now}
                if len(self._negative) >= MAX_NEGATIVE:
                    self._negative.clear()
            self._negative[tid] = now + self.negative_ttl
            return
        token, tv, policy, pv = got
        self._put("access_policies", policy.id, (policy, pv), epoch)
        self._put("tokens", tid, (token, tv), epoch)

    async def authorize(self, ident: Identity, scope: str, stack: StackLike, ip: IPAddress | None
                        ) -> tuple[Identity, tuple[Selector, ...]]:
        """``authorize``; on a refusal, re-read the policy once in a while first: it may have been widened
        (a scope added, reactivated) a moment ago through another replica."""
        try:
            return ident, authorize(ident, scope, stack, ip)
        except Denied:
            if not await self.refresh_policy(ident.policy.id):
                raise
        policy = self.policies.get(ident.policy.id)
        if policy is None:
            raise Denied(401, "unknown_token", "invalid token: unknown or revoked")
        fresh = Identity(ident.token, policy)
        return fresh, authorize(fresh, scope, stack, ip)

    async def refresh_policy(self, policy_id: str) -> bool:
        """Re-read one policy (single-flight, at most once a second per policy, within the read-through
        rate limit); True if a newer version is now in the snapshot."""
        now = time.monotonic()
        if self._rechecked.get(policy_id, 0.0) > now or policy_id in self._tombs["access_policies"] \
                or not self.db_ok:
            return False
        before = self._ver["access_policies"].get(policy_id)
        key = "policy:" + policy_id
        running = self._inflight.get(key)
        if running is not None:
            await asyncio.shield(running)
            return self._ver["access_policies"].get(policy_id) != before
        if not self._take(now):
            return False
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._inflight[key] = done
        try:
            epoch = self._epoch
            try:
                got = await self.store.load_versioned("access_policies", policy_id)
            except _DB_ERRORS as exc:
                log.warning("policy re-check failed (%s); refusing", exc.__class__.__name__)
                return False
            self._put("access_policies", policy_id, got, epoch)
            if len(self._rechecked) >= MAX_NEGATIVE:
                self._rechecked.clear()
            self._rechecked[policy_id] = now + POLICY_RECHECK
            return self._ver["access_policies"].get(policy_id) != before
        finally:
            del self._inflight[key]
            done.set_result(None)

    def _take(self, now: float) -> bool:
        """Token bucket: ``read_through_rate`` lookups a second, bursts of ``read_through_burst``."""
        self._bucket = min(float(self.read_through_burst),
                           self._bucket + (now - self._bucket_at) * self.read_through_rate)
        self._bucket_at = now
        if self._bucket < 1.0:
            return False
        self._bucket -= 1.0
        return True

    async def _supervise(self) -> None:
        """Periodic resync; on a lost listener, reconnect with backoff and resync before trusting."""
        first = min(RECONNECT_FIRST, self.reconnect_max_backoff)
        backoff = first
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
                except _DB_ERRORS as exc:
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
                    backoff = first
                    break
                except _DB_ERRORS as exc:
                    self._degrade(f"database unreachable ({exc.__class__.__name__}); retrying in {backoff:.1f}s")
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, self.reconnect_max_backoff)

    def _degrade(self, detail: str) -> None:
        if self.db_ok or detail != self.detail:
            log.warning("%s (snapshot age %.1fs)", detail, self.age)
        self.db_ok = False
        self.detail = detail
        self.publish_gauges()

    def publish_gauges(self) -> None:
        """Write this process's view to its gauges. Every worker does so (not only the one a scrape
        reaches), so the merged multi-worker view describes all workers."""
        CACHE_POLICIES.set(len(self.policies))
        CACHE_TOKENS.set(len(self.tokens))
        CACHE_AGE.set(self.age if self.loaded else -1)
        DB_UP.set(1 if self.db_ok else 0)

    def note_staleness(self) -> None:
        """Log once when the snapshot passes max_staleness (every request now answers 503) and once
        when it is fresh again; called every GAUGE_INTERVAL and after every load."""
        stale = self.loaded and self.stale
        if stale == self._was_stale:
            return
        self._was_stale = stale
        if stale:
            log.error("policy snapshot is %.0fs old, past database.max_staleness (%.0fs), with the database "
                      "unreachable (%s): the data path, the admin API and the page answer 503 until it is back",
                      self.age, self.max_staleness, self.detail)
        else:
            log.warning("policy snapshot fresh again (database reachable, resynced): serving resumes")

    async def _gauge_loop(self) -> None:
        while True:
            self.publish_gauges()
            self.note_staleness()
            await asyncio.sleep(GAUGE_INTERVAL)

    # ---- usage --------------------------------------------------------------------------------------

    def record_use(self, token_id: str) -> None:
        """Hot path: remember the first and last use in this flush window (no I/O)."""
        now = time.time()
        seen = self._usage.get(token_id)
        self._usage[token_id] = (seen[0] if seen else now, now)

    async def flush_usage(self) -> None:
        """Write the uses seen so far. Waits for a write already under way (the periodic one), so when it
        returns every use recorded before the call is in the database (shutdown and tests rely on it)."""
        async with self._flushing:
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


def _int_key(rid: str) -> int:
    return int(rid)
