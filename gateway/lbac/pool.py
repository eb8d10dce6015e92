"""Run enforce-mode rewrites within bounds: cheap ones inline, possibly slow ones in a process pool.

The PromQL parser holds the GIL, so a thread would still stall the event loop; a separate
process (one per gateway worker, started on first need) does not. Each pooled rewrite has
a time limit; past it the pool's process is killed and the request refused, so one query
can never hold up other tenants' requests by more than the bounded inline budget.

    r = await enforce_bounded(kind, method, raw_query, body, policies)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Final, TypeVar

from gateway.lbac import RewriteError, bounds, fanout
from gateway.lbac import restrict as lbac
from gateway.lbac.fanout import Plan
from gateway.lbac.restrict import Restriction
from gateway.policy.selector import Selector
from gateway.proxy.errors import ProxyError
from gateway.routes import Kind

log = logging.getLogger("gateway.lbac")

TIME_LIMIT: Final = 5.0  # seconds a pooled rewrite may take (the worst allowed: ~0.2 s idle, ~1 s loaded)
_PROMQL: Final = frozenset({Kind.PROMQL})
_LOGQL: Final = frozenset({Kind.LOGQL, Kind.LOGQL_OPTIONAL, Kind.LOGQL_TAIL, Kind.LOGQL_DELETE})
_MATCHES: Final[dict[Kind, tuple[str, ...]]] = {Kind.MATCH: ("match[]",), Kind.LOGQL_SERIES: ("match", "match[]")}
_INLINE_MATCH_PRODUCT: Final = 64

_Key = tuple[Kind, str, str, bytes | None, tuple[Selector, ...]]
_HEAVY: Final[bounds.SizedLRU[_Key, Restriction]] = bounds.SizedLRU(512)
_pool: ProcessPoolExecutor | None = None
_T = TypeVar("_T")


def _refused(exc: RewriteError) -> ProxyError:
    return ProxyError(400, f"query refused by label-based access control: {exc}", "lbac_refused")


#: Weights of requests seen: the same query (a dashboard's refresh, a cached rewrite) is measured once.
_WEIGHTS: Final[bounds.SizedLRU[tuple[Kind, str, bytes | None, int], int]] = bounds.SizedLRU(1024)


def weigh(kind: Kind, raw_query: str, body: bytes | None, policies: int) -> int:
    """Check the bounds (400 past them) and return the rewrite's weight, before any parsing.

    A pure function of its arguments: successes are kept (a refusal is measured again each time)."""
    key = (kind, raw_query, body, policies)
    hit = _WEIGHTS.get(key)
    if hit is not None:
        return hit
    weight = _weigh(kind, raw_query, body, policies)
    _WEIGHTS.put(key, weight, len(raw_query) + len(body or b""))
    return weight


def _weigh(kind: Kind, raw_query: str, body: bytes | None, policies: int) -> int:
    pairs = lbac._pairs(raw_query, body)
    try:
        if kind in _MATCHES:
            n = sum(1 for k, _ in pairs if k in _MATCHES[kind])
            bounds.check_matches(n, policies)
            for k, v in pairs:
                if k in _MATCHES[kind]:
                    bounds.check_nesting(v)
            return 0 if max(n, 1) * policies <= _INLINE_MATCH_PRODUCT else bounds.INLINE_WEIGHT + 1
        weight = 0
        for k, v in pairs:
            if k == "query" and (kind in _PROMQL or kind in _LOGQL):
                cost = bounds.check_query(v, policies)
                if kind in _PROMQL:
                    w = bounds.promql_weight(cost, policies)
                    bounds.check_weight(w, cost, policies)
                else:
                    w = bounds.logql_weight(cost, policies)
                weight = max(weight, w)
        bounds.check_policies(policies)
        return weight
    except RewriteError as exc:
        raise _refused(exc) from None


def check_nesting(kind: Kind, raw_query: str, body: bytes | None) -> None:
    """Header mode's parse bound: the query and selectors the backend will parse, refused past MAX_DEPTH.

    The gateway parses nothing there, but the same bound holds in both modes (and a planner that
    looks at the query later never meets deep nesting).
    """
    names = _MATCHES.get(kind, ("query",))
    for k, v in lbac._pairs(raw_query, body):
        if k in names and bounds.nesting_exceeds(v):
            raise _refused(RewriteError(f"the query nests deeper than {bounds.MAX_DEPTH} levels of brackets"))


def _run(fn: Callable[..., _T], *args: Any) -> _T | tuple[int, str, str]:
    """In the pool's process: ``fn(*args)``, or a refusal as plain data (ProxyError does not pickle)."""
    try:
        return fn(*args)
    except ProxyError as exc:
        return exc.status, exc.message, exc.reason


def _get_pool() -> ProcessPoolExecutor:
    global _pool
    if _pool is None:
        # forkserver: never fork the running event loop's process (its threads and sockets); the server
        # preloads the rewriters once, so a new worker costs a fork, not an interpreter start.
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(["gateway.lbac.restrict", "gateway.lbac.fanout"])
        _pool = ProcessPoolExecutor(max_workers=1, mp_context=ctx)
    return _pool


def _kill_pool() -> None:
    """Stop a rewrite that ran past its time limit: the only way is to end its process."""
    global _pool
    pool, _pool = _pool, None
    if pool is None:
        return
    for proc in list(getattr(pool, "_processes", {}).values()):  # no public API kills a running task
        with contextlib.suppress(Exception):
            proc.kill()
    pool.shutdown(wait=False, cancel_futures=True)


def shutdown() -> None:
    """Let the rewrite process exit (the application is closing)."""
    global _pool
    pool, _pool = _pool, None
    if pool is not None:
        pool.shutdown(wait=False, cancel_futures=True)


async def warm_up() -> None:
    """Start the pool's process ahead of the first slow rewrite (tests and benchmarks)."""
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(_get_pool(), _run, lbac.enforce, Kind.PROMQL, "GET", "query=up", None,
                               (Selector(()),))


async def enforce_bounded(kind: Kind, method: str, raw_query: str, body: bytes | None,
                          policies: tuple[Selector, ...]) -> Restriction:
    """:func:`gateway.lbac.restrict.enforce`, refused past the bounds and moved off the loop when heavy."""
    if kind not in _PROMQL and kind not in _LOGQL and kind not in _MATCHES:
        return lbac.enforce(kind, method, raw_query, body, policies)  # refusals for other kinds
    if bounds.INLINE_WEIGHT >= weigh(kind, raw_query, body, len(policies)):
        return lbac.enforce(kind, method, raw_query, body, policies)
    key: _Key = (kind, method, raw_query, body, policies)
    cacheable = len(raw_query) + len(body or b"") <= bounds.MAX_CACHED_RESULT
    hit = _HEAVY.get(key) if cacheable else None
    if hit is not None:
        return hit
    out = await _off_loop(lbac.enforce, kind, method, raw_query, body, policies)
    if cacheable:
        _HEAVY.put(key, out, len(out.query or "") + len(out.body or b""))
    return out


async def plan_bounded(kind: Kind, path: str, method: str, raw_query: str, body: bytes | None,
                       policies: tuple[Selector, ...]) -> Plan | None:
    """:func:`gateway.lbac.fanout.plan` under the same bounds: each leg is a rewrite of its own."""
    if kind not in _PROMQL and kind not in _LOGQL and kind not in _MATCHES:
        return fanout.plan(kind, path, method, raw_query, body, policies)
    if bounds.INLINE_WEIGHT >= weigh(kind, raw_query, body, len(policies)):
        return fanout.plan(kind, path, method, raw_query, body, policies)
    return await _off_loop(fanout.plan, kind, path, method, raw_query, body, policies)


async def _off_loop(fn: Callable[..., _T], *args: Any) -> _T:
    """Run ``fn`` in the pool's process within the time limit; refusals come back as ProxyError."""
    loop = asyncio.get_running_loop()
    try:
        out = await asyncio.wait_for(loop.run_in_executor(_get_pool(), _run, fn, *args), TIME_LIMIT)
    except TimeoutError:
        log.warning("LBAC rewrite ran past %.1fs; its process was stopped", TIME_LIMIT)
        _kill_pool()
        raise ProxyError(400, f"query refused by label-based access control: rewriting it took longer than "
                         f"{TIME_LIMIT:g}s; simplify the query", "lbac_refused") from None
    except BrokenProcessPool:
        _kill_pool()
        raise ProxyError(503, "the query rewriter restarted; retry the request", "lbac_unavailable") from None
    if isinstance(out, tuple):
        raise ProxyError(*out)
    return out
