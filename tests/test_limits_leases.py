"""The callback path's per-worker leases of the shared table (gateway/limits/lease.py): a limit far from
being hit is taken from the worker's lease without touching the table; a small or nearly reached one
exactly as the table counts it."""

from __future__ import annotations

import asyncio
import os
import random

import pytest

from gateway.limits import shared, stage
from gateway.limits.lease import SHARE
from gateway.limits.shared import table
from gateway.limits.stage import FastLimits


def _key() -> str:
    return f"p{os.urandom(4).hex()}"


def _tokens(i: int) -> float:
    return table()._f[i]


def test_a_large_rate_is_taken_a_grant_at_a_time_and_an_expired_grant_goes_back(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(stage, "_monotonic", lambda: 1000.0)  # (no refill: exact counts)
    monkeypatch.setattr(shared, "_monotonic", lambda: 1000.0)
    t = table()
    key = _key()
    i = t.bucket(key)
    buckets = ((i, 10_000.0, 6_400.0),)
    lim = FastLimits((), buckets, ())  # grant min(6400/64, 10000/100, 1024) = 100
    lease = t.lease(buckets, ())
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
    lease.until = 1000.0  # expired: the sweep gives its unspent token back to the bucket
    t.sweep()
    assert lease.tokens == 0.0 and _tokens(i) == 6_301.0
    assert lim.acquire() and lease.tokens == 99.0 and _tokens(i) == 6_201.0  # a new grant


def test_one_lease_takes_the_same_grant_from_every_bucket_of_its_set(monkeypatch: pytest.MonkeyPatch) -> None:
    """A policy's and a tenant's rate: one count in the lease stands for both buckets, and a renewal takes the
    tightest one's grant from each (all or none: an empty bucket leaves the other as it was)."""
    monkeypatch.setattr(stage, "_monotonic", lambda: 2000.0)
    monkeypatch.setattr(shared, "_monotonic", lambda: 2000.0)
    t = table()
    a, b = t.bucket(_key()), t.bucket(_key())
    buckets = ((a, 1e6, 1e6), (b, 500.0, 640.0))  # grants 1,024 and min(10, 5) = 5
    lim = FastLimits((), buckets, ())
    assert lim.acquire() and t.lease(buckets, ()).grant == 5.0
    assert (_tokens(a), _tokens(b)) == (1e6 - 5, 640.0 - 5)
    t._f[b] = 0.5  # (the tenant's bucket nearly empty)
    for _ in range(4):
        assert lim.acquire()
    assert not lim.acquire() and (_tokens(a), _tokens(b)) == (1e6 - 5, 0.5)


def test_a_small_rate_takes_one_token_per_request_as_the_table_does() -> None:
    t = table()
    key = _key()
    i = t.bucket(key)
    lim = FastLimits((), ((i, 1.0, 3.0),), ())
    assert t.lease(((i, 1.0, 3.0),), ()).grant == 1.0
    assert lim.acquire() and lim.acquire() and lim.acquire()
    assert not lim.acquire()  # the bucket is empty (and no lease holds a token)
    assert t.take(key, 1.0, 3.0, 1.0, debt=False) > 0.5


def test_in_flight_slots_are_reserved_in_chunks_and_given_back_with_hysteresis() -> None:
    t = table()
    key = _key()
    row = t.row(key)
    lim = FastLimits(((row, 100_000),), (), (key,))  # chunk 64: spare slots kept at most 2 x 63
    lease = t.lease((), ((row, 100_000),))
    lane = t.total(row)
    assert lim.acquire() and lease.reserved == 64 and t.in_flight(key) == 1
    for _ in range(199):
        assert lim.acquire()
    assert lease.used == 200 and lease.reserved == 256 and t.total(row) - lane == 256
    for _ in range(200):
        lim.release()
        assert lease.reserved - lease.used <= 2 * 63
    assert lease.used == 0 and t.in_flight(key) == 0
    assert t.total(row) - lane == lease.reserved <= 126  # what other workers see


def test_chunks_shrink_with_the_headroom_and_near_the_limit_count_every_request_across_workers() -> None:
    t = table()
    key = _key()
    row = t.row(key)
    lim = FastLimits(((row, 600),), (), (key,))
    lease = t.lease((), ((row, 600),))
    chunks = []
    for _ in range(600):
        before = lease.reserved
        assert lim.acquire()
        if lease.reserved != before:
            chunks.append(lease.chunk)
    workers = t._counts[t._stop_at]  # (lanes claimed in this table so far)
    assert chunks[0] == min(64, 600 // (SHARE * workers)) and chunks == sorted(chunks, reverse=True)
    assert chunks[-SHARE * workers:] == [1] * (SHARE * workers)  # the last free slots one request at a time
    assert not lim.acquire() and t.in_flight(key) == 600 and lease.reserved == 600  # exact within one worker
    for _ in range(300):
        lim.release()
    assert lease.reserved == 300  # (its last chunks were single slots: nothing kept spare)
    pid = os.fork()
    if pid == 0:  # another worker: admits what the first one left free, exactly
        child = FastLimits(((row, 600),), (), (key,))
        n = 0
        while n < 1000 and child.acquire():
            n += 1
        os._exit(0 if n == 300 else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_a_limit_of_200_with_50_in_flight_touches_the_table_once_per_several_requests() -> None:
    """Issue 28: a limit that is configured but not near (here 4 x the requests in flight) costs a table
    call per chunk, not per request; a fixed chunk of 1 under 512 (the code before) made one per request."""
    t = table()
    keys = [_key(), _key()]
    rows = tuple((t.row(k), 200) for k in keys)
    lim = FastLimits(rows, ((t.bucket(keys[0]), 1e6, 1e6), (t.bucket(keys[1]), 1e6, 1e6)), tuple(keys))
    def lanes() -> list[int]:  # what the other workers see of this one
        return [t._counts[t._own + row] for row, _ in rows]

    writes = 0
    rnd = random.Random(28)
    held = 0
    for _ in range(10_000):  # a random walk of the requests in flight between 0 and 50
        seen = lanes()
        if held < 50 and (held == 0 or rnd.random() < 0.5):
            assert lim.acquire()
            held += 1
        else:
            lim.release()
            held -= 1
        writes += sum(a != b for a, b in zip(seen, lanes(), strict=True))
        assert [t.in_flight(k) for k in keys] == [held, held]
    assert writes < 20_000 / 3, writes  # single slots: 20,000 (two rows, every request)
    for _ in range(held):
        lim.release()


def test_a_sweep_gives_back_every_spare_slot_and_runs_in_the_workers_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    t = table()
    key = _key()
    row = t.row(key)
    lim = FastLimits(((row, 100_000),), (), (key,))
    lease = t.lease((), ((row, 100_000),))
    lane = t.total(row) - lease.reserved

    def run() -> None:
        for _ in range(100):
            assert lim.acquire()
        for _ in range(100):
            lim.release()

    run()
    assert lease.reserved > 0 and t.total(row) - lane == lease.reserved  # spare, seen by others
    t.sweep()
    assert lease.reserved == 0 and t.total(row) == lane
    monkeypatch.setattr(shared, "TERM", 0.01)

    async def in_a_loop() -> int:
        run()
        for _ in range(200):  # (a bound, not a timing: the sweep is due after 10 ms)
            if lease.reserved == 0:
                break
            await asyncio.sleep(0.01)
        return lease.reserved

    t._sweeping = False
    assert asyncio.run(in_a_loop()) == 0 and t.total(row) == lane


def test_a_refusal_gives_back_the_slots_it_reserved() -> None:
    t = table()
    free, full = _key(), _key()
    small = FastLimits(((t.row(full), 1),), (), (full,))
    assert small.acquire()
    both = FastLimits(((t.row(free), 3), (t.row(full), 1)), (), (free, full))
    assert not both.acquire()
    assert t.in_flight(free) == 0 and t.total(t.row(free)) == 0
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
    left = [_tokens(i) + t.lease(buckets, rows).tokens for i, _, _ in buckets]
    assert left == pytest.approx([9.0] * (nb - 1) + [0.0] * (nb > 0), abs=0.01)


def test_two_small_concurrency_limits_count_every_request_exactly_and_all_or_nothing() -> None:
    """A policy's and a tenant's concurrency limit with fewer free slots than ``SHARE x workers`` (one slot
    per request): each request counts on both rows or on neither, and every release gives both back."""
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
    assert t.total(rows[0][0]) == 0 == t.total(rows[1][0])


def test_leases_of_one_worker_on_one_key_divide_its_grant_and_its_chunk(monkeypatch: pytest.MonkeyPatch) -> None:
    """One policy's limits taken with two tenants' (two sets, two leases): together they hold what one lease
    would, so neither the rate bound (workers x grant) nor the spare slots grow with the tenants."""
    monkeypatch.setattr(stage, "_monotonic", lambda: 3000.0)
    t = table()
    pk, t1, t2 = _key(), _key(), _key()
    policy_b, policy_r = (t.bucket(pk), 10_000.0, 6_400.0), (t.row(pk), 100_000)
    one = FastLimits((policy_r, (t.row(t1), 100_000)), (policy_b, (t.bucket(t1), 1e6, 1e6)), (pk, t1))
    two = FastLimits((policy_r, (t.row(t2), 100_000)), (policy_b, (t.bucket(t2), 1e6, 1e6)), (pk, t2))
    assert one.acquire() and two.acquire()
    a, b = t.lease(one.buckets, one.rows), t.lease(two.buckets, two.rows)
    assert a.grant == b.grant == 100.0  # (alone: the policy's 6400/64)
    assert a.tokens + 1 == b.tokens + 1 == 50.0  # each took half
    assert a.reserved == b.reserved == 32  # half of the 64 a lone lease takes
    assert _tokens(policy_b[0]) == 6_400.0 - 100.0 and t.in_flight(pk) == 2


def test_a_worker_sharing_a_lane_reserves_and_gives_back_in_it() -> None:
    """More workers than lanes: the second shares the first one's lane and its leases count there, under the
    lock, on top of the first one's slots (and give back only their own)."""
    t = shared.Table(slots=64, lanes=1)
    row = t.row("c")
    rows = ((row, 100_000),)
    mine = t.lease((), rows)
    assert t.reserve(mine) and t.total(row) == mine.reserved == 64
    pid = os.fork()
    if pid == 0:
        lease = t.lease((), rows)
        ok = t.reserve(lease) and t._lane_shared and t.total(row) == 64 + lease.reserved
        t.unreserve(lease, 0)
        os._exit(0 if ok and t.total(row) == 64 and not t._unlocked else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0 and t.total(row) == 64
