"""A worker's fan-out budget: the bytes every concurrent fan-out holds, and merges kept off the event loop.

A fan-out reads each leg's answer whole before merging, so sixteen legs of a large answer each, times
any number of concurrent fan-outs, could grow a worker without bound (issue 22: +920 MB) and the
merge (``json.loads`` and the fold, a C call that holds the GIL) stalled every other request on the
worker for seconds. So:

* every fan-out charges what it holds to one per-worker :class:`Budget` (``limits.fanout_memory``): the
  answers as they arrive (decompressed) and what merging them will take (:func:`merge_cost`); past it
  the request gets a 503 with ``Retry-After``, at once, and gives back what it held; a request that
  starts while others hold some of it may take at most half of what is left, so newcomers cannot
  starve the fan-outs under way;
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
import ctypes
import multiprocessing
import os
import tempfile
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
        # a request that starts while others hold some of the budget may take half of what is left, so a
        # stream of newcomers cannot starve the fan-outs already under way (which would all end in 503s)
        share = Held(self, limit, limit if self.held == 0 else max(0, limit - self.held) // 2)
        try:
            yield share
        finally:
            self.held -= share.taken
            share.taken = 0


class Held:
    """One request's bytes in the worker's :class:`Budget`."""

    __slots__ = ("budget", "limit", "cap", "taken")

    def __init__(self, budget: Budget, limit: int, cap: int) -> None:
        self.budget, self.limit, self.cap, self.taken = budget, limit, cap, 0

    def room(self) -> int:
        """Bytes this request could still take now."""
        return max(0, min(self.limit - self.budget.held, self.cap - self.taken))

    def take(self, n: int) -> None:
        """Charge ``n`` more bytes, or refuse the request (503, Retry-After) past the worker's budget."""
        b = self.budget
        if b.held + n > self.limit or self.taken + n > self.cap:
            raise ProxyError(503, f"the gateway worker's fan-out memory budget ({self.limit} bytes, shared by "
                             "every concurrent request under several label policies) is spent; retry shortly",
                             "fanout_budget", {"Retry-After": RETRY_AFTER})
        b.held += n
        b.peak = max(b.peak, b.held)
        self.taken += n


def merge_cost(piece: bytes, json: bool) -> int:
    """Bytes merging an answer may take per ``piece`` of it, beyond the piece itself: the copy sent to the
    merge process, the parsed objects and the merge's own index. Fitted on Loki streams answers with lines
    of 0 to 1,000 bytes (merges peaked at 16 down to 3 times the answer; this says 18 down to 4.4): one
    pass over the piece (about 0.25 ms per 256 KiB), counted piece by piece as the answer arrives."""
    if json:
        return 4 * len(piece) + 400 * piece.count(b"[")
    return 4 * len(piece)  # remote read (protobuf): decoded samples


def _fixed_mmap_threshold() -> None:
    """Make glibc hand freed answer buffers back to the system at once.

    glibc raises its mmap threshold each time a large block is freed (up to 32 MiB), after which
    blocks of that size come from the heap and stay resident once freed: a worker that read a
    fan-out kept its size in RSS, and the budget would bound the bytes held but not the worker's
    size. A fixed threshold (what setting it explicitly does) keeps every block over 256 KiB mapped.
    """
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)


_M_MMAP_THRESHOLD: Final = -3
MMAP_THRESHOLD: Final = 256 * 1024
_fixed_mmap_threshold()


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


#: Where answers wait for the merge process: memory-backed where the system has it (files made by mkstemp:
#: O_EXCL, mode 0600, unlinked once merged).
_SHM: Final = "/dev/shm"  # noqa: S108
_SPOOL: Final = _SHM if os.access(_SHM, os.W_OK) else None


def _spool_one(data: bytes) -> str:
    fd, path = tempfile.mkstemp(prefix="gateway-fanout-", dir=_SPOOL)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return path


async def spool(parts: list[bytes]) -> list[str]:
    """Each part in a file of its own, written by a thread: a write releases the GIL, while pickling megabytes
    to the merge process would hold it (and this event loop) for tens of milliseconds."""
    loop = asyncio.get_running_loop()
    paths: list[str] = []
    try:
        for part in parts:
            paths.append(await loop.run_in_executor(None, _spool_one, part))
    except BaseException:
        unlink(paths)
        raise
    return paths


def read_spooled(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def unlink(paths: list[str]) -> None:
    for path in paths:
        with contextlib.suppress(OSError):
            os.unlink(path)


async def merge_off_loop(fn: Callable[..., _T], *args: Any) -> _T:
    """``fn(*args)`` in the merge process (its exceptions are raised here); 503 if that process died."""
    loop = asyncio.get_running_loop()
    try:
        # submitted from a thread: starting the merge process (a round trip to the forkserver, and its
        # start-up the first time) happens in ``submit``, which must not hold up this event loop
        started = await loop.run_in_executor(None, _get_pool().submit, fn, *args)
        return await asyncio.wrap_future(started)
    except BrokenProcessPool:
        global _pool
        pool, _pool = _pool, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
        raise ProxyError(503, "the fan-out merge process restarted; retry the request", "fanout_budget",
                         {"Retry-After": RETRY_AFTER}) from None
