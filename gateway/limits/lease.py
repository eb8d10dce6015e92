"""Per-worker leases of the shared table, so a request far from its limits touches no shared memory.

The callback path (:class:`gateway.limits.stage.FastLimits`) takes a request's share of its limits from one
lease its worker holds per set of limits (the request-rate buckets and in-flight rows of a policy and a
tenant, say), shared by every connection of the worker that takes from the same set: a request takes one
token from every bucket and one slot on every row, so one count of each stands for all of them, and the
common request costs two attribute tests and two stores.

* Tokens: a renewal takes ``grant`` tokens from every bucket of the set under the table's lock (the same
  number from each, for :data:`TERM`) and the lease spends them locally. ``grant`` is ``min(burst / 64,
  rate / 100, 1024)`` of the tightest bucket, at least 1: a small limit (burst under 128) takes one token
  per request exactly as the table does; a large one locks once per ``grant`` requests. Tokens are debited
  from the shared buckets when granted, so over any window the admitted requests stay within ``rate x window
  + burst + workers x grant`` (a worker may spend a grant while the shared bucket has refilled behind it), and
  a worker's unspent grants are missing from the others' (stricter, by at most ``workers x grant``). Where
  a worker holds several leases on one bucket (one policy, several tenants), each takes the grant divided by
  their number (at least 1), so together they hold what one would. Every :data:`TERM`
  (:meth:`gateway.limits.shared.Table.sweep`, in the worker's loop) an expired lease's unspent tokens go back
  to the buckets. The bound does not depend on the term: a grant is at most 10 ms of refill.
* Slots: a lease reserves in-flight slots a chunk at a time on every row of the set, in the worker's lane
  of the table (the per-worker counts of :mod:`gateway.limits.shared`: what other workers see is what a
  worker reserved), and admits locally while its requests in flight are fewer than its reserved slots. The
  chunk is sized from the headroom: ``(limit - total) // (SHARE x workers)`` on the row with the least, at
  most :data:`CHUNK_MAX`, at least 1. So a limit far from being hit (200 with 50 queries in flight: chunks
  of 9 with 2 workers) touches the table once per chunk, and one close to it (free slots under ``SHARE x
  workers``) counts every request there, exactly. Workers that race add at most ``1/SHARE`` of the free
  slots together, or one slot each, so the bound stays ``limit + workers - 1`` (only single-slot
  reservations can race past it). A release gives back the slots above ``chunk - 1`` spare once more than
  ``2 x (chunk - 1)`` are spare (hysteresis: at most one table call per ``chunk - 1`` requests), and every
  :data:`TERM` the sweep gives back every spare slot, so a quiet worker holds none for long. Several leases
  of a worker on one row divide its share by their number, as grants are divided. Spare slots make the
  limit stricter for the others while they are held: a worker's at most ``2 / (SHARE x workers)`` of the
  slots that were free when they were taken (all workers' together a quarter), fewer the nearer the limit
  is, and none a second after the worker's requests there have ended.

``SHARE`` trades that strictness against the table calls: on a busy worker a reservation took 5.3 µs and a
give-back 1.8 µs (they come to the table cold; 1.3 and 0.5 µs in a loop), and the bench's limit of 200 with
50 in flight made 0.3 of them per request with ``SHARE`` 16: CPU per request x1.05-1.07 against no limits;
with 8, x1.04 (2026-12-06).

A dead worker's reserved slots are dropped with its lane (the replacement zeroes it), its grants are
debited already. A fork starts with no leases (:func:`gateway.limits.shared.Table`'s fork hook).
"""

from __future__ import annotations

from typing import Final

TERM: Final = 1.0  # seconds a lease's tokens stay spendable; how often spare slots and expired tokens go back
SHARE: Final = 8  # an in-flight chunk is at most 1/(SHARE x workers) of the free slots
CHUNK_MAX: Final = 64


Buckets = tuple[tuple[int, float, float], ...]  # (bucket index, rate, burst)
Rows = tuple[tuple[int, int], ...]  # (row, limit)


class Lease:
    """A worker's share of one set of limits: ``tokens`` requests it may still admit by every bucket's rate
    (until ``until``), ``reserved`` in-flight slots on every row, ``used`` of them by its requests in flight.
    ``chunk`` is the size of its last reservation (1 before the first), ``slack`` the spare slots kept before
    any go back."""

    __slots__ = ("buckets", "rows", "grants", "tokens", "until", "used", "reserved", "chunk", "slack",
                 "sizing", "cap", "cells")

    def __init__(self, buckets: Buckets, rows: Rows):
        self.buckets, self.rows = buckets, rows
        self.grants = tuple(max(1, int(min(burst / 64, rate / 100, 1024))) for _, rate, burst in buckets)
        self.tokens = 0.0
        self.until = 0.0
        self.used = 0
        self.reserved = 0
        self.chunk = 1
        self.slack = 0
        self.sizing: tuple[tuple[int, int, int], ...] = ()  # (row, limit, this worker's leases on the row)
        self.cap = CHUNK_MAX  # the largest chunk: CHUNK_MAX divided by those leases
        self.size({})
        self.cells: tuple[int, ...] | None = None  # its rows' counts in this worker's own lane, once claimed

    @property
    def grant(self) -> float:
        """The tokens a renewal takes with no other lease of the worker on its buckets."""
        return float(min(self.grants, default=0))

    def size(self, sharers: dict[int, int]) -> None:
        """(Again whenever another lease of the worker takes one of its rows: they divide the chunk.)"""
        self.sizing = tuple((row, limit, sharers.get(row, 1)) for row, limit in self.rows)
        self.cap = min((CHUNK_MAX // div for _, _, div in self.sizing), default=CHUNK_MAX)
