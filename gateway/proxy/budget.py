"""A worker's fan-out budget: the bytes every concurrent fan-out holds, and merges kept off the event loop.

A fan-out reads each leg's answer whole before merging, so sixteen legs of a large answer each, times
any number of concurrent fan-outs, could grow a worker without bound (issue 22: +920 MB) and the
merge (``json.loads`` and the fold, a C call that holds the GIL) stalled every other request on the
worker for seconds. So:

* every fan-out charges what it holds to one per-worker :class:`Budget` (``limits.fanout_memory``): the
  answers as they arrive (decompressed) and what merging them will take (:func:`merge_cost`); past it
  the request gets a 503 with ``Retry-After``, at once, and gives back what it held;
* a merge of more than :data:`INLINE_MERGE` bytes runs in a separate process (one per worker,
  merges queued, a fresh process each time, at a lower CPU priority), so the event loop only copies
  bytes; smaller ones run inline (a few ms at most).

    with BUDGET.hold(cfg.limits.fanout_memory) as held:
        held.take(len(chunk) + merge_cost(chunk, True))  # 503 past the budget
        out = await merge_off_loop(fn, *args)
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Final, TypeVar

from gateway.proxy.errors import ProxyError

#: Default of ``limits.fanout_memory``: bytes of fan-out answers one worker holds at once.
DEFAULT_FANOUT_MEMORY: Final = 256 * 1024 * 1024
#: Merges of at most this many answer bytes run on the event loop (~2 ms of JSON parsing).
INLINE_MERGE: Final = 256 * 1024
RETRY_AFTER: Final = "1"
MERGE_NICE: Final = 10
_T = TypeVar("_T")


class Budget:
    """Bytes held by the fan-outs of this worker, against a limit read from the config per request."""

    def __init__(self) -> None:
        self.held = 0
        self.peak = 0

    @contextlib.contextmanager
    def hold(self, limit: int) -> Iterator[Held]:
        """A request's share: everything it took is given back when the block ends, however it ends."""
        share = Held(self, limit)
        try:
            yield share
        finally:
            self.held -= share.taken
            share.taken = 0


class Held:
    """One request's bytes in the worker's :class:`Budget`."""

    __slots__ = ("budget", "limit", "taken")

    def __init__(self, budget: Budget, limit: int) -> None:
        self.budget, self.limit, self.taken = budget, limit, 0

    def room(self) -> int:
        """Bytes this request could still take now."""
        return max(0, self.limit - self.budget.held)

    def take(self, n: int) -> None:
        """Charge ``n`` more bytes, or refuse the request (503, Retry-After) past the worker's budget."""
        b = self.budget
        if b.held + n > self.limit:
            raise ProxyError(503, f"the gateway worker's fan-out memory budget ({self.limit} bytes, shared by "
                             "every concurrent request under several label policies) is spent; retry shortly",
                             "fanout_budget", {"Retry-After": RETRY_AFTER})
        b.held += n
        b.peak = max(b.peak, b.held)
        self.taken += n


def merge_cost(piece: bytes, json: bool) -> int:
    """Bytes merging an answer may take per ``piece`` of it, beyond the piece itself: the copy sent to the
    merge process, the parsed objects and the merge's own index (fitted on Loki streams answers with
    lines of 0 to 1,000 bytes, whose merges peaked at 16 down to 3 times the answer's size). Counted
    piece by piece as the answer arrives (about 1 ms per 256 KiB), never over a whole answer at once."""
    if json:
        return 3 * len(piece) + 32 * piece.count(b'"') + 300 * piece.count(b"[") + 232 * piece.count(b"{")
    return 4 * len(piece)  # remote read (protobuf): decoded samples


#: The worker's budget (one event loop per process).
BUDGET: Final = Budget()
_pool: ProcessPoolExecutor | None = None


def _get_pool() -> ProcessPoolExecutor:
    global _pool
    if _pool is None:
        # forkserver, as the rewrite pool: never fork the running event loop's process
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(["gateway.lbac.restrict", "gateway.lbac.fanout", "gateway.proxy.fanout"])
        # a fresh process per merge (forked from the preloaded forkserver: ~20 ms) gives its memory back to
        # the system at once; at a lower CPU priority, so tenants' requests on this machine come first
        _pool = ProcessPoolExecutor(max_workers=1, mp_context=ctx, max_tasks_per_child=1, initializer=os.nice,
                                    initargs=(MERGE_NICE,))
    return _pool


def shutdown() -> None:
    """Let the merge process exit (the application is closing)."""
    global _pool
    pool, _pool = _pool, None
    if pool is not None:
        pool.shutdown(wait=False, cancel_futures=True)


async def merge_off_loop(fn: Callable[..., _T], *args: Any) -> _T:
    """``fn(*args)`` in the merge process (its exceptions are raised here); 503 if that process died."""
    loop = asyncio.get_running_loop()
    try:
        return await loop.run_in_executor(_get_pool(), fn, *args)
    except BrokenProcessPool:
        global _pool
        pool, _pool = _pool, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
        raise ProxyError(503, "the fan-out merge process restarted; retry the request", "fanout_budget",
                         {"Retry-After": RETRY_AFTER}) from None
