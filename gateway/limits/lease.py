"""Per-worker leases of the shared table, so a request far from its limits touches no shared memory.

The callback path (:class:`gateway.limits.stage.FastLimits`) takes a request's share from leases its
worker holds, one per key and kind, shared by every connection of the worker:

* a request-rate bucket lease holds ``grant`` tokens taken from the shared bucket under its lock and spends
  them locally. ``grant`` is ``min(burst / 64, rate / 100, 1024)``, at least 1: a small limit (burst under
  128) takes one token per request exactly as before; a large one locks once per ``grant`` requests.
  Tokens are debited from the shared bucket when granted, so over any window the admitted requests stay
  within ``rate x window + burst + workers x grant`` (a worker may spend a grant while the shared bucket
  has refilled behind it), and a worker's unspent grant is missing from the others' (stricter, by at most
  ``workers x grant``). A lease expires after :data:`TERM` (its unspent tokens then go back to the shared
  bucket, on the worker's next request of that key). The bound does not depend on the term: a grant is
  at most 10 ms of refill, so an idle worker holding one for a second costs the others little, and a
  short term would renew a quiet key's lease on nearly every request.
* an in-flight lease reserves slots a chunk at a time in the worker's lane of the table (the lane-by-lane
  counts of :mod:`gateway.limits.shared`: what other workers see is what a worker reserved) and admits
  locally while its requests in flight are fewer than its reserved slots. The chunk is sized from the
  headroom it sees: ``(limit - total) // (SHARE x workers)``, at most :data:`CHUNK_MAX`, at least 1, so a
  limit far from being hit (a limit of 200 with 50 queries in flight: chunks of 4 with 2 workers) touches
  the table once per chunk, and one close to it (free slots under ``SHARE x workers``) counts every
  request there, exactly. Workers that race add at most ``1/SHARE`` of the free slots together, or one
  slot each, so the bound stays ``limit + workers - 1`` (only single-slot reservations can race past it).
  A release gives back the slots above ``chunk - 1`` spare once more than ``2 x (chunk - 1)`` are spare
  (hysteresis: at most one table call per ``chunk - 1`` requests), and every :data:`TERM` a worker gives
  back all of its spare slots (:meth:`gateway.limits.shared.Table.sweep`), so a quiet worker holds none
  for long. Spare slots make the limit stricter for the others while they are held: at most
  ``2 x (chunk - 1)`` per worker, together at most ``2 / SHARE`` (1/8) of the slots that were free when they
  were taken, and fewer the nearer the limit is.

A dead worker's reserved slots are dropped with its lane (the replacement zeroes it), its grants are
debited already. A fork starts with no leases (:func:`gateway.limits.shared.Table`'s fork hook).
"""

from __future__ import annotations

import time
from typing import Final

TERM: Final = 1.0  # seconds a bucket lease's tokens stay spendable; how often spare in-flight slots go back
SHARE: Final = 16  # an in-flight chunk is at most 1/SHARE of the free slots per worker
CHUNK_MAX: Final = 64
_monotonic = time.monotonic


class BucketLease:
    """A worker's tokens from one shared request-rate bucket (index ``i`` in the table)."""

    __slots__ = ("i", "rate", "burst", "grant", "tokens", "until")

    def __init__(self, i: int, rate: float, burst: float):
        self.i = i
        self.tokens = 0.0
        self.until = 0.0
        self.set(rate, burst)

    def set(self, rate: float, burst: float) -> None:
        """(The latest config's rate and burst: a reload may change them.)"""
        self.rate, self.burst = rate, burst
        self.grant = float(max(1, int(min(burst / 64, rate / 100, 1024))))


class RowLease:
    """A worker's reserved in-flight slots on one key's row, and its requests in flight there. ``chunk`` is
    the size of its last reservation (1 before the first), ``slack`` the spare slots kept before any go back."""

    __slots__ = ("row", "limit", "chunk", "slack", "used", "reserved")

    def __init__(self, row: int, limit: int):
        self.row = row
        self.limit = limit
        self.used = 0
        self.reserved = 0
        self.chunk = 1
        self.slack = 0

    def set(self, limit: int) -> None:
        self.limit = limit
