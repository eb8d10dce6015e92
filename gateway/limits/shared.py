"""Token buckets and in-flight counts shared by every worker of a process, in one mmap'd table.

The supervisor creates the table before it forks (:func:`init`), so all workers see the same memory
(``MAP_SHARED``): a limit holds for the process as a whole, not per worker, without any I/O on the
request path. Each key (``p<policy id>``, ``t<signal>|<tenant>``) owns one slot, found by a stable hash
with linear probing; a slot is updated under a POSIX record lock (``lockf``) on its own byte of the
table's file, which the kernel releases if a worker dies holding it (no stuck lock).

In-flight counts are kept per worker (a lane per process id), so the counts of a worker that died
mid-request are dropped when its replacement claims the lane, instead of leaking forever.

    t = table()
    wait = t.take("pabc", rate=10.0, burst=20.0, n=1.0, debt=False)  # 0.0: admitted; else seconds to wait
    if t.enter("pabc", 4):  # False: 4 already in flight
        ...
        t.leave("pabc")
"""

from __future__ import annotations

import ctypes
import fcntl
import hashlib
import mmap
import os
import tempfile
import time
from typing import IO, Final

SLOTS: Final = 4096  # keys (policies with limits, tenants with limits) per process
LANES: Final = 64  # worker processes whose in-flight counts are kept apart
_FIELDS: Final = 5  # tag, request tokens, request stamp, byte tokens, byte stamp
_PROBES: Final = 32  # slots tried per key; past that keys share the last one (stricter, never looser)


class Table:
    """The shared table; see the module docstring."""

    def __init__(self, slots: int = SLOTS, lanes: int = LANES):
        self.slots, self.lanes = slots, lanes
        floats = slots * _FIELDS + lanes  # slot fields, then the lane registry (process ids)
        size = floats * 8 + slots * lanes * 4
        self._file: IO[bytes] = tempfile.TemporaryFile(prefix="gateway-limits-")
        self._file.truncate(size)
        self._fd = self._file.fileno()
        self._mm = mmap.mmap(self._fd, size)  # MAP_SHARED: forked workers write the same pages
        self._f = (ctypes.c_double * floats).from_buffer(self._mm)
        self._inflight = (ctypes.c_int32 * (slots * lanes)).from_buffer(self._mm, floats * 8)
        self._index: dict[str, int] = {}  # key -> slot, per process
        self._lane_pid = 0
        self._lane = 0

    # ---- locking -------------------------------------------------------------------------------

    def _lock(self, byte: int) -> None:
        fcntl.lockf(self._fd, fcntl.LOCK_EX, 1, byte)

    def _unlock(self, byte: int) -> None:
        fcntl.lockf(self._fd, fcntl.LOCK_UN, 1, byte)

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
            self._lock(slot)
            try:
                if f[base] == 0.0:
                    f[base] = tag  # (its buckets' stamps are 0.0: unused, full on first use)
                if f[base] == tag:
                    break
            finally:
                self._unlock(slot)
        self._index[key] = slot
        return slot

    def take(self, key: str, rate: float, burst: float, n: float, debt: bool, kind: int = 0) -> float:
        """Take ``n`` tokens from the key's bucket ``kind`` (0 requests, 1 bytes) refilled at ``rate``/s up
        to ``burst``. Returns 0.0 when admitted, else the seconds until it would be. With ``debt`` a request
        bigger than the bucket passes when the bucket is not in debt, and the bucket goes negative."""
        slot = self._slot(key)
        base = slot * _FIELDS + 1 + 2 * kind
        f = self._f
        now = time.monotonic()  # CLOCK_MONOTONIC: one clock for every process of the machine
        self._lock(slot)
        try:
            tokens, stamp = f[base], f[base + 1]
            if stamp == 0.0:  # unused bucket: full
                tokens = burst
            else:
                tokens = min(burst, tokens + max(0.0, now - stamp) * rate)
            if tokens >= n or (debt and tokens >= 0.0 and n > burst):
                f[base], f[base + 1] = tokens - n, now
                return 0.0
            f[base], f[base + 1] = tokens, now
            need = 0.0 if debt and n > burst else n  # (too big for the bucket: wait until out of debt)
            return (need - tokens) / rate
        finally:
            self._unlock(slot)

    def refund(self, key: str, burst: float, n: float = 1.0, kind: int = 0) -> None:
        """Give back ``n`` tokens taken for a request that was then not served by the one who took them."""
        slot = self._slot(key)
        base = slot * _FIELDS + 1 + 2 * kind
        self._lock(slot)
        try:
            if self._f[base + 1] != 0.0:
                self._f[base] = min(burst, self._f[base] + n)
        finally:
            self._unlock(slot)

    # ---- in-flight counts ----------------------------------------------------------------------

    def _my_lane(self) -> int:
        pid = os.getpid()
        if self._lane_pid == pid:
            return self._lane
        reg = self.slots * _FIELDS
        lock = self.slots  # the registry's byte (slot bytes are 0 .. slots-1)
        f = self._f
        self._lock(lock)
        try:
            chosen = -1
            for lane in range(self.lanes):
                owner = int(f[reg + lane])
                if owner == pid:
                    chosen = lane
                    break
                if chosen < 0 and (owner == 0 or not _alive(owner)):
                    chosen = lane
            if chosen < 0:
                chosen = pid % self.lanes  # more workers than lanes: share one (counts stay right, only
            elif int(f[reg + chosen]) != pid:  # a dead sharer's counts would linger)
                for slot in range(self.slots):  # a dead worker's requests are no longer in flight
                    self._inflight[slot * self.lanes + chosen] = 0
                f[reg + chosen] = float(pid)
        finally:
            self._unlock(lock)
        self._lane_pid, self._lane = pid, chosen
        return chosen

    def enter(self, key: str, limit: int) -> bool:
        """Count one more request in flight for ``key`` unless ``limit`` already are (all workers)."""
        slot = self._slot(key)
        lane = self._my_lane()
        row = slot * self.lanes
        counts = self._inflight
        self._lock(slot)
        try:
            total = sum(counts[row:row + self.lanes])
            if total >= limit:
                return False
            counts[row + lane] += 1
            return True
        finally:
            self._unlock(slot)

    def leave(self, key: str) -> None:
        slot = self._slot(key)
        i = slot * self.lanes + self._my_lane()
        self._lock(slot)
        try:
            if self._inflight[i] > 0:
                self._inflight[i] -= 1
        finally:
            self._unlock(slot)

    def in_flight(self, key: str) -> int:
        slot = self._slot(key)
        row = slot * self.lanes
        return sum(self._inflight[row:row + self.lanes])


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


_TABLE: Table | None = None


def init() -> Table:
    """Create the process's table; ``gateway serve`` calls it before forking its workers."""
    global _TABLE
    if _TABLE is None:
        _TABLE = Table()
    return _TABLE


def table() -> Table:
    """The table (created on first use in a process that did not call :func:`init`)."""
    return _TABLE if _TABLE is not None else init()
