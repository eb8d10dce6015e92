"""Token buckets and in-flight counts shared by every worker of a process, in one mmap'd table.

The supervisor creates the table before it forks (:func:`init`), so all workers see the same memory
(``MAP_SHARED``): a limit holds for the process as a whole, not per worker, without any I/O on the
request path. Each key (``p<policy id>``, ``t<signal>|<tenant>``) owns one slot, found by a stable hash
with linear probing; slots are updated under one process-shared semaphore, held for a few instructions
(uncontended it is taken in user space: about 0.2 µs, against 3.6 µs for a pair of ``lockf`` calls). A
worker killed inside that window would leave it held: the others then wait for it once (50 ms), log it and
go on without the lock, so limits stay approximately right instead of stopping the data path.

In-flight counts are kept per worker (a lane per process id), so the counts of a worker that died
mid-request are dropped when its replacement claims the lane, instead of leaking forever. They are laid out
key by key, a key's lanes side by side, so adding them up reads one cache line of one page: the leases'
reservations come to the table cold (one per chunk of requests), so the fewer lines and pages they touch
the better; the workers' counts of one key share that line, which each writes once per chunk. A key's count
is the sum over the lanes claimed so far (the table keeps how many: with N workers, about N). They take no
lock: only its worker writes a lane (aligned 32-bit stores), and an admission reads every lane, compares and
adds one to its own without yielding, so workers admitting at the same moment can each see the others'
counts before their increment: a concurrency limit of L holds to L + (workers - 1) at worst (one admission
in progress per other worker), exactly within one worker. A worker sharing a lane (more workers than lanes)
counts under the lock.

The protocol server's callback path resolves its keys once per connection and header set (``row``,
``bucket``) and then takes a request's whole share in one call (``acquire``: all or nothing; the buckets
under one lock), and gives its in-flight counts back in one (``release``). The callback path itself
(:class:`gateway.limits.stage.FastLimits`) goes through per-worker leases of tokens and slots instead
(:mod:`gateway.limits.lease`: :meth:`Table.renew`, :meth:`Table.reserve`), touching the table once per grant.

    t = table()
    wait = t.take("pabc", rate=10.0, burst=20.0, n=1.0, debt=False)  # 0.0: admitted; else seconds to wait
    if t.enter("pabc", 4):  # False: 4 already in flight
        ...
        t.leave("pabc")
"""

from __future__ import annotations

import asyncio
import ctypes
import hashlib
import logging
import mmap
import multiprocessing
import os
import time
import weakref
from typing import Final

from gateway.limits.lease import SHARE, TERM, Buckets, Lease, Rows
from gateway.runfile import pid_alive

log = logging.getLogger("gateway.limits")
_monotonic = time.monotonic  # CLOCK_MONOTONIC: one clock for every process of the machine

SLOTS: Final = 4096  # keys (policies with limits, tenants with limits) per process
LANES: Final = 64  # worker processes whose in-flight counts are kept apart
_FIELDS: Final = 5  # tag, request tokens, request stamp, byte tokens, byte stamp
_PROBES: Final = 32  # slots tried per key; past that keys share the last one (stricter, never looser)


def _refilled(f: memoryview[float], i: int, rate: float, burst: float, now: float) -> float:
    """Bucket ``i``'s tokens refilled at ``rate`` up to ``now``, at most ``burst`` (stamp 0.0: an unused bucket,
    full). The caller holds the table's lock."""
    stamp = f[i + 1]
    if stamp == 0.0:
        return burst
    tokens = f[i] + (now - stamp) * rate if now > stamp else f[i]
    return burst if tokens > burst else tokens


class Table:
    """The shared table; see the module docstring."""

    def __init__(self, slots: int = SLOTS, lanes: int = LANES):
        self.slots, self.lanes = slots, lanes
        floats = slots * _FIELDS + lanes  # slot fields, the lane registry (process ids)
        self._ints_at = floats * 8  # then the in-flight counts, row by row, and how many lanes are claimed
        size = floats * 8 + (slots * lanes + 1) * 4
        size += -size % 8
        self._mm = mmap.mmap(-1, size)  # anonymous and MAP_SHARED: forked workers write the same pages
        self._sem = multiprocessing.Lock()  # (created before the fork too: one semaphore for all workers)
        self._unlocked = False  # set when a holder died inside the lock (see the module docstring)
        self._f = memoryview(self._mm).cast("d")[:floats]
        # count of slot s in lane l at s * lanes + l (a row's lanes side by side: one cache line to add up, the
        # row handle s * lanes); at slots * lanes, the lanes claimed so far
        self._counts = memoryview(self._mm)[self._ints_at:self._ints_at + (slots * lanes + 1) * 4].cast("i")
        self._sums = (ctypes.c_int32 * (slots * lanes)).from_buffer(self._mm, self._ints_at)  # (sliced faster)
        self._stop_at = slots * lanes
        self._index: dict[str, int] = {}  # key -> slot, per process
        self._lane_pid = 0  # set once this process has a lane; 0 again in a forked child (_TABLES)
        self._lane = 0
        self._lane_shared = False  # (more workers than lanes: this one shares its lane with another)
        self._own = -1  # this process's lane (its count's offset in a row); -1 until claimed, or when shared
        self._leases: dict[tuple[Buckets, Rows], Lease] = {}  # this worker's (gateway.limits.lease), by set
        self._sharers_b: dict[int, int] = {}  # its leases per bucket
        self._sharers_r: dict[int, int] = {}  # and per row
        self._sweeping = False  # a sweep of the leases is due (_sweep_soon)
        _TABLES.add(self)

    # ---- locking -------------------------------------------------------------------------------

    def _wait(self) -> bool:
        """The lock after waiting for it; False (from then on, no lock) when its holder seems dead."""
        if self._sem.acquire(True, 0.05):
            return True
        log.error("limits: the shared table's lock has been held for 50 ms (a worker died holding it?); "
                  "going on without it: limits now hold approximately")
        self._unlocked = True
        return False

    def _lock(self) -> bool:
        return not self._unlocked and (self._sem.acquire(False) or self._wait())

    def _unlock(self, locked: bool) -> None:
        if locked:
            self._sem.release()

    # ---- slots ---------------------------------------------------------------------------------

    def _slot(self, key: str) -> int:
        known = self._index.get(key)
        if known is not None:
            return known
        tag = float(int.from_bytes(hashlib.blake2b(key.encode(), digest_size=6).digest(), "big") | 1)
        start = int(tag) % self.slots
        f = self._f
        slot = start
        for i in range(_PROBES):
            slot = (start + i) % self.slots
            base = slot * _FIELDS
            locked = self._lock()
            try:
                if f[base] == 0.0:
                    f[base] = tag  # (its buckets' stamps are 0.0: unused, full on first use)
                if f[base] == tag:
                    break
            finally:
                self._unlock(locked=locked)
        self._index[key] = slot
        return slot

    def take(self, key: str, rate: float, burst: float, n: float, debt: bool, kind: int = 0) -> float:
        """Take ``n`` tokens from the key's bucket ``kind`` (0 requests, 1 bytes) refilled at ``rate``/s up
        to ``burst``. Returns 0.0 when admitted, else the seconds until it would be. With ``debt`` a request
        bigger than the bucket passes when the bucket is not in debt, and the bucket goes negative."""
        slot = self._index.get(key)
        i = (self._slot(key) if slot is None else slot) * _FIELDS + 1 + 2 * kind
        f = self._f
        now = _monotonic()
        sem = self._sem
        locked = not self._unlocked and (sem.acquire(False) or self._wait())  # (inline: the hot path)
        try:
            tokens = _refilled(f, i, rate, burst, now)
            if tokens >= n or (debt and tokens >= 0.0 and n > burst):
                f[i] = tokens - n
                f[i + 1] = now
                return 0.0
            f[i] = tokens
            f[i + 1] = now
        finally:
            if locked:
                sem.release()
        need = 0.0 if debt and n > burst else n  # (too big for the bucket: wait until out of debt)
        return (need - tokens) / rate

    def refund(self, key: str, burst: float, n: float = 1.0, kind: int = 0) -> None:
        """Give back ``n`` tokens taken for a request that was then not served by the one who took them."""
        slot = self._slot(key)
        base = slot * _FIELDS + 1 + 2 * kind
        locked = self._lock()
        try:
            if self._f[base + 1] != 0.0:
                self._f[base] = min(burst, self._f[base] + n)
        finally:
            self._unlock(locked=locked)

    # ---- in-flight counts ----------------------------------------------------------------------

    def _my_lane(self) -> int:
        if self._lane_pid:  # (reset in a forked child: no getpid() per call, a syscall on Python 3.11)
            return self._lane
        pid = os.getpid()
        reg = self.slots * _FIELDS
        f = self._f
        counts = self._counts
        locked = self._lock()
        try:
            chosen = -1
            for lane in range(self.lanes):
                owner = int(f[reg + lane])
                if owner == pid:
                    chosen = lane
                    break
                if chosen < 0 and (owner == 0 or not pid_alive(owner)):
                    chosen = lane
            self._lane_shared = chosen < 0
            if chosen < 0:
                chosen = pid % self.lanes  # more workers than lanes: share one (counts stay right, only
            elif int(f[reg + chosen]) != pid:  # a dead sharer's counts would linger)
                # a dead worker's requests are no longer in flight
                counts[chosen:self._stop_at:self.lanes] = memoryview(bytes(self.slots * 4)).cast("i")
                f[reg + chosen] = float(pid)
            if counts[self._stop_at] < chosen + 1:
                counts[self._stop_at] = chosen + 1
        finally:
            self._unlock(locked=locked)
        self._lane_pid, self._lane = pid, chosen
        self._own = -1 if self._lane_shared else chosen
        return chosen

    def enter(self, key: str, limit: int) -> bool:
        """Count one more request in flight for ``key`` unless ``limit`` already are (all workers)."""
        return self.acquire(((self.row(key), limit),), ())

    def leave(self, key: str) -> None:
        self.release(((self.row(key), 0),))

    # ---- the callback path: keys resolved once, a request's share in one call ---------------------

    def row(self, key: str) -> int:
        """The key's in-flight row (where its lanes start), for :meth:`acquire` and :meth:`release`."""
        return self._slot(key) * self.lanes

    def bucket(self, key: str, kind: int = 0) -> int:
        """The index of the key's bucket ``kind``, for :meth:`acquire`."""
        return self._slot(key) * _FIELDS + 1 + 2 * kind

    def acquire(self, rows: tuple[tuple[int, int], ...], buckets: tuple[tuple[int, float, float], ...]) -> bool:
        """All or nothing: one more request in flight on each ``(row, limit)`` unless ``limit`` already are
        (all workers; read without the lock, see the module docstring), and one request from each ``(bucket,
        rate, burst)`` unless it is empty (under the lock). False leaves every count and bucket as it was."""
        own = self._own
        if own < 0 and rows:  # no lane yet (a new worker), or a shared one
            return self._acquire_shared(rows, buckets)
        counts = self._counts
        if rows:
            sums = self._sums
            claimed = counts[self._stop_at]
            for row, limit in rows:
                if sum(sums[row:row + claimed]) >= limit:
                    return False
        if buckets:
            f = self._f
            now = _monotonic()
            sem = self._sem
            locked = not self._unlocked and (sem.acquire(False) or self._wait())  # (inline: the hot path)
            try:
                for k, (i, rate, burst) in enumerate(buckets):
                    tokens = _refilled(f, i, rate, burst, now)
                    if tokens < 1.0:
                        for j, _, _ in buckets[:k]:  # (refilled to now and taken from: one more is as before)
                            f[j] += 1.0
                        return False
                    f[i] = tokens - 1.0
                    f[i + 1] = now
            finally:
                if locked:
                    sem.release()
        for row, _ in rows:
            counts[own + row] += 1
        return True

    def _acquire_shared(self, rows: tuple[tuple[int, int], ...],
                        buckets: tuple[tuple[int, float, float], ...]) -> bool:
        """:meth:`acquire` for a process without a lane of its own yet (claimed here), or sharing one
        (then its counts are added under the lock: another process writes the same lane)."""
        self._my_lane()
        if not self._lane_shared:
            return self.acquire(rows, buckets)
        counts = self._counts
        claimed = counts[self._stop_at]
        if any(sum(self._sums[row:row + claimed]) >= limit for row, limit in rows):
            return False
        if not self.acquire((), buckets):
            return False
        own = self._lane
        locked = self._lock()
        try:
            for row, _ in rows:
                counts[own + row] += 1
        finally:
            self._unlock(locked=locked)
        return True

    def release(self, rows: tuple[tuple[int, int], ...]) -> None:
        """One request fewer in flight on each row (what :meth:`acquire` counted). Without the lock: only
        this process writes its lane (readers see the count before or after the store), unless it shares
        its lane."""
        own = self._own
        if own < 0:
            self._release_shared(rows)
            return
        counts = self._counts
        for row, _ in rows:
            i = own + row
            if counts[i] > 0:
                counts[i] -= 1

    def _release_shared(self, rows: tuple[tuple[int, int], ...]) -> None:
        self._my_lane()
        if not self._lane_shared:
            self.release(rows)
            return
        counts = self._counts
        own = self._lane
        locked = self._lock()
        try:
            for row, _ in rows:
                if counts[own + row] > 0:
                    counts[own + row] -= 1
        finally:
            self._unlock(locked=locked)

    # ---- leases (gateway.limits.lease): the callback path's share, taken a grant at a time -----------

    def lease(self, buckets: Buckets, rows: Rows) -> Lease:
        """This worker's lease of a set of limits (one per set, shared by its connections)."""
        key = (buckets, rows)
        got = self._leases.get(key)
        if got is None:
            got = self._leases[key] = Lease(buckets, rows)
            for i, _, _ in buckets:  # (leases on one bucket or row divide its share: see gateway.limits.lease)
                self._sharers_b[i] = self._sharers_b.get(i, 0) + 1
            for row, _ in rows:
                self._sharers_r[row] = self._sharers_r.get(row, 0) + 1
            mine = {row for row, _ in rows}
            for lease in self._leases.values():  # (a new lease on a row divides every lease's chunk there)
                if any(row in mine for row, _ in lease.rows):
                    lease.size(self._sharers_r)
        return got

    def renew(self, lease: Lease, now: float) -> bool:
        """Under the lock: the lease's unspent tokens back to its buckets, then up to its grant taken from
        every one (the same number: a request takes one from each), for :data:`~gateway.limits.lease.TERM`.
        False when a bucket has less than one (then every bucket keeps what it had, and the lease none)."""
        f = self._f
        back = lease.tokens
        locked = self._lock()
        try:
            have = [min(burst, _refilled(f, i, rate, burst, now) + back) for i, rate, burst in lease.buckets]
            least = min(have)
            sharers = self._sharers_b
            grant = min(max(1, g // sharers[i]) for g, (i, _, _) in zip(lease.grants, lease.buckets, strict=True))
            got = 0.0 if least < 1.0 else float(min(grant, int(least)))
            for (i, _, _), tokens in zip(lease.buckets, have, strict=True):
                f[i] = tokens - got
                f[i + 1] = now
        finally:
            self._unlock(locked=locked)
        lease.tokens = got
        lease.until = now + TERM
        self._sweep_soon()
        return got > 0.0

    def reserve(self, lease: Lease) -> bool:
        """More in-flight slots on every row of the lease, in this worker's lane: a chunk sized from the
        least headroom (see :mod:`gateway.limits.lease`), unless a row's count over every worker has reached
        its limit (read without the lock, as :meth:`acquire`). All rows or none.

        (Written to touch few objects: it runs once per chunk of requests, so it finds them cold, and on a
        busy worker the cache misses, not the bytecodes, were most of its cost.)"""
        cells = lease.cells
        if cells is None:  # (the lane claimed here, on the lease's first reservation in this process)
            self._my_lane()
            cells = lease.cells = tuple(row + self._lane for row, _ in lease.rows)
        counts = self._counts
        sums = self._sums
        claimed = counts[self._stop_at]
        share = SHARE * claimed
        n = lease.cap
        for row, limit, div in lease.sizing:
            free = limit - sum(sums[row:row + claimed])
            if free <= 0:
                return False
            k = free // (share * div)
            if k < n:
                n = k
        if n < 1:
            n = 1
        locked = self._lane_shared and self._lock()  # (a shared lane: another process writes it too)
        try:
            for i in cells:
                counts[i] += n
        finally:
            self._unlock(locked=locked)
        lease.reserved += n
        lease.chunk = n
        lease.slack = 2 * (n - 1)
        if not self._sweeping:
            self._sweep_soon()
        return True

    def unreserve(self, lease: Lease, keep: int) -> None:
        """Give back the lease's spare slots beyond ``keep`` on every row (cells :meth:`reserve` counted)."""
        n = lease.reserved - lease.used - keep
        if n <= 0:
            return
        lease.reserved -= n
        counts = self._counts
        locked = self._lane_shared and self._lock()
        try:
            for i in lease.cells or ():
                c = counts[i] - n
                counts[i] = c if c > 0 else 0
        finally:
            self._unlock(locked=locked)

    def in_flight(self, key: str) -> int:
        """The key's count over all workers, less this worker's spare reserved slots on it (other workers'
        are counted: see :mod:`gateway.limits.lease`)."""
        row = self.row(key)
        spare = sum(lease.reserved - lease.used for lease in self._leases.values()
                    if any(r == row for r, _ in lease.rows))
        return self.total(row) - spare

    def total(self, row: int) -> int:
        """The row's count over every lane (what an admission compares with the limit)."""
        return sum(self._sums[row:row + self.lanes])

    def _sweep_soon(self) -> None:
        """:meth:`sweep` after :data:`~gateway.limits.lease.TERM`, once, in this worker's event loop (none
        outside a loop: a process with no loop serves no callback path)."""
        if self._sweeping:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self._sweeping = True
        loop.call_later(TERM, self.sweep)

    def sweep(self) -> None:
        """Every lease's spare in-flight slots back to the table, and an expired lease's unspent tokens to its
        buckets (a quiet worker holds neither for long: they make the limits stricter for the others);
        again after TERM while a lease has requests in flight or tokens left."""
        self._sweeping = False
        now = _monotonic()
        again = False
        f = self._f
        for lease in self._leases.values():
            if lease.reserved > lease.used:
                self.unreserve(lease, 0)
            if lease.tokens and lease.until <= now:
                back, lease.tokens = lease.tokens, 0.0
                locked = self._lock()
                try:
                    for i, rate, burst in lease.buckets:
                        f[i] = min(burst, _refilled(f, i, rate, burst, now) + back)
                        f[i + 1] = now
                finally:
                    self._unlock(locked=locked)
            again = again or lease.used > 0 or lease.tokens > 0
        if again:
            self._sweep_soon()


_TABLE: Table | None = None
_TABLES: weakref.WeakSet[Table] = weakref.WeakSet()


def _forked() -> None:
    for t in _TABLES:  # a forked worker claims a lane of its own on its first in-flight count
        t._lane_pid = 0
        t._own = -1
        t._leases, t._sharers_b, t._sharers_r = {}, {}, {}
        t._sweeping = False


os.register_at_fork(after_in_child=_forked)


def init() -> Table:
    """Create the process's table; ``gateway serve`` calls it before forking its workers."""
    global _TABLE
    if _TABLE is None:
        _TABLE = Table()
    return _TABLE


def table() -> Table:
    """The table (created on first use in a process that did not call :func:`init`)."""
    return _TABLE if _TABLE is not None else init()
