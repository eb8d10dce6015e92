"""What every fan-out merge shares: the error for an answer it cannot read, the success check, the stats rule.

Kept apart from ``gateway.proxy.fanout`` (which runs the legs) so that the merges in
``gateway.lbac.counts``, ``gateway.proxy.metric_merge`` and ``gateway.proxy.detected`` use one
definition of each without importing the runner.
"""

from __future__ import annotations

from typing import Any, Final

__all__ = ["Unmergeable", "merge_stats", "success"]

_MAX_STATS: Final = frozenset({"execTime", "queueTime"})


class Unmergeable(ValueError):
    """A leg answered 200 with something the merge does not understand (answered 502)."""


def success(doc: Any) -> Any:
    """``doc`` if it is a JSON object whose ``status`` (when present) is ``success``."""
    if not isinstance(doc, dict) or doc.get("status", "success") != "success":
        raise Unmergeable("an answer is not a success")
    return doc


def merge_stats(stats: list[Any]) -> Any:
    """Counters summed; wall-clock times and per-second rates: the largest (legs run side by side)."""
    def fold(key: str, values: list[Any]) -> Any:
        values = [v for v in values if v is not None]
        if not values:
            return None
        if all(isinstance(v, dict) for v in values):
            keys = list(dict.fromkeys(k for v in values for k in v))
            return {k: fold(k, [v.get(k) for v in values]) for k in keys}
        if all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
            return max(values) if key in _MAX_STATS or key.endswith("PerSecond") else sum(values)
        return values[0]
    return fold("", stats)
