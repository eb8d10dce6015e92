"""The callback path's per-worker leases of the shared table (gateway/limits/lease.py): a limit far from
being hit is taken from the worker's lease without touching the table; a small or nearly reached one
exactly as the table counts it."""

from __future__ import annotations

import os

import pytest

from gateway.limits import stage
from gateway.limits.shared import table
from gateway.limits.stage import FastLimits


def _key() -> str:
    return f"p{os.urandom(4).hex()}"


def _tokens(i: int) -> float:
    return table()._f[i]


def test_a_large_rate_is_taken_a_grant_at_a_time_and_an_expired_grant_goes_back(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(stage, "_monotonic", lambda: 1000.0)  # (no refill: exact counts)
    t = table()
    key = _key()
    i = t.bucket(key)
    lim = FastLimits((), ((i, 10_000.0, 6_400.0),), ())  # grant min(6400/64, 10000/100, 1024) = 100
    lease = t.bucket_lease(i, 10_000.0, 6_400.0)
    assert lease.grant == 100.0
    assert lim.acquire() and lease.tokens == 99.0 and _tokens(i) == 6_300.0  # one grant taken, one spent
    assert t._sem.acquire(False)  # the lock held elsewhere: the rest of the grant needs none
    try:
        for _ in range(99):
            assert lim.acquire()
    finally:
        t._sem.release()
    assert not t._unlocked and lease.tokens == 0.0
    lim.give_back()  # (to the lease)
    assert lease.tokens == 1.0
    lease.until = 0.0  # expired: its unspent token back to the bucket, a new grant taken
    assert lim.acquire() and lease.tokens == 99.0 and _tokens(i) == 6_300.0 + 1.0 - 100.0


def test_a_small_rate_takes_one_token_per_request_as_the_table_does() -> None:
    t = table()
    key = _key()
    i = t.bucket(key)
    lim = FastLimits((), ((i, 1.0, 3.0),), ())
    assert t.bucket_lease(i, 1.0, 3.0).grant == 1.0
    assert lim.acquire() and lim.acquire() and lim.acquire()
    assert not lim.acquire()  # the bucket is empty (and no lease holds a token)
    assert t.take(key, 1.0, 3.0, 1.0, debt=False) > 0.5


def test_in_flight_slots_are_reserved_in_chunks_and_given_back_with_hysteresis() -> None:
    t = table()
    key = _key()
    row = t.row(key)
    lim = FastLimits(((row, 100_000),), (), (key,))  # chunk 64: spare slots kept at most 2 x 63
    lease = t.row_lease(row, 100_000)
    lane = sum(t._sums[row::t.slots])
    assert lim.acquire() and lease.reserved == 64 and t.in_flight(key) == 1
    for _ in range(199):
        assert lim.acquire()
    assert lease.used == 200 and lease.reserved == 256 and sum(t._sums[row::t.slots]) - lane == 256
    for _ in range(200):
        lim.release()
        assert lease.reserved - lease.used <= 2 * 63
    assert lease.used == 0 and t.in_flight(key) == 0
    assert sum(t._sums[row::t.slots]) - lane == lease.reserved <= 126  # what other workers see


def test_near_its_limit_a_worker_reserves_one_slot_at_a_time_so_the_limit_holds_across_workers() -> None:
    t = table()
    key = _key()
    row = t.row(key)
    lim = FastLimits(((row, 600),), (), (key,))  # chunk 2
    for _ in range(600):
        assert lim.acquire()
    assert not lim.acquire() and t.in_flight(key) == 600  # exact within one worker
    for _ in range(300):
        lim.release()
    pid = os.fork()
    if pid == 0:  # another worker: admits up to the limit over both, the first one's spare slots included
        child = FastLimits(((row, 600),), (), (key,))
        n = 0
        while n < 1000 and child.acquire():
            n += 1
        spare = table()._row_leases.get(row)
        os._exit(0 if spare is not None and spare.chunk == 2 and 300 - 2 <= n <= 300 else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_a_refusal_gives_back_the_slots_it_reserved() -> None:
    t = table()
    free, full = _key(), _key()
    small = FastLimits(((t.row(full), 1),), (), (full,))
    assert small.acquire()
    both = FastLimits(((t.row(free), 3), (t.row(full), 1)), (), (free, full))
    assert not both.acquire()
    assert t.in_flight(free) == 0 and sum(t._sums[t.row(free)::t.slots]) == 0
    small.release()
    assert both.acquire() and t.in_flight(free) == 1 and t.in_flight(full) == 1
    both.release()
    assert t.in_flight(free) == 0 and t.in_flight(full) == 0


@pytest.mark.parametrize("shape", [(1, 0), (2, 0), (0, 1), (1, 1), (2, 2), (1, 2), (2, 1)])
def test_every_shape_takes_all_or_nothing(shape: tuple[int, int]) -> None:
    """(Each of the loop-free shapes, and the general one.) The last bucket holds one token and the last row
    one slot: one request is admitted, the next takes nothing from the others."""
    t = table()
    nb, nr = shape
    bkeys, rkeys = [_key() for _ in range(nb)], [_key() for _ in range(nr)]
    buckets = tuple((t.bucket(k), 0.001, 1.0 if j == nb - 1 else 10.0) for j, k in enumerate(bkeys))
    rows = tuple((t.row(k), 1 if j == nr - 1 else 10) for j, k in enumerate(rkeys))
    lim = FastLimits(rows, buckets, tuple(rkeys))
    assert lim.acquire() and [t.in_flight(k) for k in rkeys] == [1] * nr
    assert not lim.acquire() and [t.in_flight(k) for k in rkeys] == [1] * nr
    lim.give_back()  # (undoes the first: its token back to the lease, its slots released)
    assert [t.in_flight(k) for k in rkeys] == [0] * nr
    assert lim.acquire() and not lim.acquire()
    # one request spent from each bucket: what is left is in the bucket or (granted, unspent) in the lease
    left = [_tokens(i) + t.bucket_lease(i, r, b).tokens for i, r, b in buckets]
    assert left == pytest.approx([9.0] * (nb - 1) + [0.0] * (nb > 0), abs=0.01)


def test_two_small_concurrency_limits_count_every_request_exactly_and_all_or_nothing() -> None:
    """A policy's and a tenant's concurrency limit under 512 (exact mode: ``Table.admit2``/``give2``): each
    request counts on both rows or on neither, and every release gives both back."""
    t = table()
    pk, tk = _key(), _key()
    rows = ((t.row(pk), 5), (t.row(tk), 3))
    lim = FastLimits(rows, ((t.bucket(pk), 1e6, 1e6), (t.bucket(tk), 1e6, 1e6)), (pk, tk))
    assert [lim.acquire() for _ in range(4)] == [True, True, True, False]  # the tenant's 3
    assert (t.in_flight(pk), t.in_flight(tk)) == (3, 3)  # (the refused one counted on neither)
    lim.release()
    assert (t.in_flight(pk), t.in_flight(tk)) == (2, 2)
    other = FastLimits(((t.row(pk), 5),), (), (pk,))  # another connection on the policy alone
    assert [other.acquire() for _ in range(4)] == [True, True, True, False]  # 2 + 3 = the policy's 5
    for _ in range(2):
        lim.release()
    for _ in range(3):
        other.release()
    assert (t.in_flight(pk), t.in_flight(tk)) == (0, 0)
    assert sum(t._sums[rows[0][0]::t.slots]) == 0 == sum(t._sums[rows[1][0]::t.slots])
