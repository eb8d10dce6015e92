"""The data path's own counts as plain per-worker integers, moved into the Prometheus series on scrape
and at least every second.

With several workers the series live in prometheus_client's multiprocess files: every ``inc`` and
``observe`` there takes a lock and writes an mmap (a histogram observation, two), which cost about a
tenth of a proxied request's CPU. Here a request adds to dicts of ints; ``flush`` (on every /metrics
scrape, and a second after the first count since the last one) adds the deltas to the real series,
so a scrape of one worker shows the others' counts at most a second late.
"""

from __future__ import annotations

import asyncio
import contextlib
from bisect import bisect_left
from typing import Final

from prometheus_client import Counter, Gauge, Histogram

from gateway.metrics import ADDED_SECONDS, IN_FLIGHT, REFUSALS, REQUESTS, UPSTREAM_SECONDS

FLUSH_SECONDS: Final = 1.0


class _Observed:
    """One histogram child's pending observations: a count per bucket and the sum."""

    __slots__ = ("counts", "total")

    def __init__(self, n: int):
        self.counts = [0] * n
        self.total = 0.0


class Tally:
    """Counts of one worker: ``request``, ``refusal``, ``added``, ``upstream``; ``in_flight`` is a gauge."""

    def __init__(self, requests: Counter = REQUESTS, refusals: Counter = REFUSALS, added: Histogram = ADDED_SECONDS,
                 upstream: Histogram = UPSTREAM_SECONDS, in_flight: Gauge = IN_FLIGHT):
        self._requests_metric, self._refusals_metric, self._in_flight_metric = requests, refusals, in_flight
        self._added_metric, self._upstream_metric = added, upstream
        self._requests: dict[tuple[str, str, str], int] = {}
        self._refusals: dict[str, int] = {}
        # per histogram: label -> pending observations; its bucket bounds (both looked up once per call)
        self._added: dict[str, _Observed] = {}
        self._upstream: dict[str, _Observed] = {}
        self._added_bounds: list[float] = list(added._upper_bounds)  # noqa: SLF001 - its buckets
        self._upstream_bounds: list[float] = list(upstream._upper_bounds)  # noqa: SLF001
        self.in_flight = 0
        self._flushed_in_flight = 0
        self._timer: asyncio.TimerHandle | None = None

    # These run once or twice per request: one dict update each, no call made for the flush timer once it is set.

    def request(self, backend: str, scope: str, code: int) -> None:
        key = (backend, scope, str(code))
        requests = self._requests
        requests[key] = requests.get(key, 0) + 1
        if self._timer is None:
            self._soon()

    def refusal(self, reason: str) -> None:
        self._refusals[reason] = self._refusals.get(reason, 0) + 1

    def added(self, backend: str, seconds: float) -> None:
        o = self._added.get(backend)
        if o is None:
            o = self._added[backend] = _Observed(len(self._added_bounds))
        o.counts[bisect_left(self._added_bounds, seconds)] += 1  # the first bucket with value <= bound
        o.total += seconds

    def upstream(self, backend: str, seconds: float) -> None:
        o = self._upstream.get(backend)
        if o is None:
            o = self._upstream[backend] = _Observed(len(self._upstream_bounds))
        o.counts[bisect_left(self._upstream_bounds, seconds)] += 1
        o.total += seconds

    # The callback exchange's two (gateway/dataplane/exchange.py): a request's counts in one call at its start
    # and one at its answer, the steps of ``added``, ``request`` and ``upstream`` written out.

    def begun(self, backend: str, added_seconds: float) -> None:
        """A request is in flight: ``in_flight`` and ``added``."""
        self.in_flight += 1
        o = self._added.get(backend)
        if o is None:
            o = self._added[backend] = _Observed(len(self._added_bounds))
        o.counts[bisect_left(self._added_bounds, added_seconds)] += 1
        o.total += added_seconds

    def answered(self, backend: str, scope: str, code: int, upstream_seconds: float) -> None:
        """A request answered: no longer in flight, ``request`` and ``upstream``."""
        self.in_flight -= 1
        key = (backend, scope, str(code))
        requests = self._requests
        requests[key] = requests.get(key, 0) + 1
        o = self._upstream.get(backend)
        if o is None:
            o = self._upstream[backend] = _Observed(len(self._upstream_bounds))
        o.counts[bisect_left(self._upstream_bounds, upstream_seconds)] += 1
        o.total += upstream_seconds
        if self._timer is None:
            self._soon()

    def _soon(self) -> None:
        if self._timer is None:
            with contextlib.suppress(RuntimeError):  # no loop: the next scrape flushes
                self._timer = asyncio.get_running_loop().call_later(FLUSH_SECONDS, self.flush)

    def flush(self) -> None:
        """Move the pending counts into the Prometheus series."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        requests, self._requests = self._requests, {}
        for labels, n in requests.items():
            self._requests_metric.labels(*labels).inc(n)
        refusals, self._refusals = self._refusals, {}
        for reason, n in refusals.items():
            self._refusals_metric.labels(reason).inc(n)
        added, self._added = self._added, {}
        upstream, self._upstream = self._upstream, {}
        for hist, observed in ((self._added_metric, added), (self._upstream_metric, upstream)):
            for label, o in observed.items():
                child = hist.labels(label)
                child._sum.inc(o.total)  # noqa: SLF001 - Histogram.observe's own steps, n at a time
                for i, n in enumerate(o.counts):
                    if n:
                        child._buckets[i].inc(n)  # noqa: SLF001
        if self.in_flight != self._flushed_in_flight:
            self._in_flight_metric.set(self.in_flight)
            self._flushed_in_flight = self.in_flight


TALLY: Final = Tally()
