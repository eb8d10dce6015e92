"""Run enforce-mode rewrites within bounds: cheap ones inline, possibly slow ones in a process pool.

The PromQL parser holds the GIL, so a thread would still stall the event loop; a separate
process (one per gateway worker, started on first need) does not. Each pooled rewrite has
a time limit; past it the pool's process is killed and the request refused, so one query
can never hold up other tenants' requests by more than the bounded inline budget.

    r = pool.rewrite_inline(args) or await pool.rewrite_off_loop(args)
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

from gateway.errors import ProxyError
from gateway.lbac import RewriteError, bounds, fanout, tracereads
from gateway.lbac import restrict as lbac
from gateway.lbac.fanout import Plan
from gateway.lbac.restrict import Restriction
from gateway.policy.selector import Selector
from gateway.routes import Kind

log = logging.getLogger("gateway.lbac")

TIME_LIMIT: Final = 5.0  # seconds a pooled rewrite may take (the worst allowed: ~0.2 s idle, ~1 s loaded)
_PROMQL: Final = frozenset({Kind.PROMQL})
_LOGQL: Final = frozenset({Kind.LOGQL, Kind.LOGQL_OPTIONAL, Kind.LOGQL_TAIL, Kind.LOGQL_DELETE})
_MATCHES: Final[dict[Kind, tuple[str, ...]]] = {Kind.MATCH: ("match[]",), Kind.LOGQL_SERIES: ("match", "match[]")}
_INLINE_MATCH_PRODUCT: Final = 64

POOLED_KINDS: Final = _PROMQL | _LOGQL | frozenset(_MATCHES)  # rewrites that may be heavy: weighed first
#: ``rewrite``'s arguments: kind, upstream path, method, raw query, form body, policies, fan out or not.
RewriteArgs = tuple[Kind, str, str, str, bytes | None, tuple[Selector, ...], bool]
Rewritten = Plan | Restriction
_HEAVY: Final[bounds.SizedLRU[RewriteArgs, Rewritten]] = bounds.SizedLRU(512)
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


def rewrite(kind: Kind, path: str, method: str, raw_query: str, form: bytes | None, policies: tuple[Selector, ...],
            fan_out: bool) -> Rewritten:
    """The enforce-mode rewrite of a query: a fan-out plan (when ``fan_out`` and one is needed), else the one
    restricted request (:func:`gateway.lbac.restrict.enforce`). Pure: the pool's process runs it as is."""
    if kind in tracereads.KINDS:  # Tempo: one rewritten URL, or tag look-ups per selector (gateway.lbac.tracereads)
        url = tracereads.restrict_url(kind, path, raw_query, policies)
        return url if isinstance(url, Plan) else Restriction(query=url)
    if fan_out:
        fan = fanout.plan(kind, path, method, raw_query, form, policies)
        if fan is not None:
            return fan
    return lbac.enforce(kind, method, raw_query, form, policies)


def rewrite_inline(args: RewriteArgs) -> Rewritten | None:
    """``rewrite(*args)`` when it may run on the event loop (light, or its heavy result is kept), else None:
    run :func:`rewrite_off_loop`. Refuses (400) past the bounds before any parsing."""
    kind, _, _, raw_query, form, policies, _ = args
    if kind in POOLED_KINDS and bounds.INLINE_WEIGHT < weigh(kind, raw_query, form, len(policies)):
        return _HEAVY.get(args)
    if kind in tracereads.KINDS and len(raw_query) > tracereads.INLINE_CHARS:
        return _HEAVY.get(args)
    return rewrite(*args)


async def rewrite_off_loop(args: RewriteArgs) -> Rewritten:
    """``rewrite(*args)`` in the pool's process, within the time limit; the result is kept for the next time."""
    out = await _off_loop(rewrite, *args)
    raw_query, form = args[3], args[4]
    if len(raw_query) + len(form or b"") <= bounds.MAX_CACHED_RESULT:
        size = sum(len(leg.query) + len(leg.body or b"") for leg in out.legs) if isinstance(out, Plan) \
            else len(out.query or "") + len(out.body or b"")
        _HEAVY.put(args, out, size)
    return out


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
