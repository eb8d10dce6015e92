"""A restricted token's Tempo search answer: the trace-level fields that could describe hidden spans removed.

After the rewrite (:mod:`gateway.lbac.traceql`) every span in ``spanSets`` matches the policy. Each trace's
summary also describes the trace as a whole (Tempo's ``TraceSearchMetadata``, ``pkg/tempopb``):

* ``rootServiceName``: the root span's ``service.name``, a resource attribute of a span that may be hidden;
* ``serviceStats``: span and error counts per service over *all* the trace's spans.

Both are kept only where provably visible: a service is visible when some selector constrains nothing but
``resource.service.name`` and matches it (then every span of that service is visible, and its counts count
visible spans only). Anything else is removed, as Tempo omits an empty field. ``rootTraceName`` (the root
span's name), ``startTimeUnixNano`` and ``durationMs`` stay: a trace fetched by ID keeps those intrinsic
fields of hidden spans too (issue 27's rule, ``gateway.lbac.traces``).

The answer's ``metrics`` count what Tempo scanned, hidden spans included (``inspectedTraces``,
``inspectedSpans``, ``inspectedBytes``, ``totalBlockBytes``: the tenant's volume, not the result's): removed;
the job and block counts (progress) stay.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final

from gateway.policy.selector import Selector
from gateway.policy.trace_selector import TraceSelector

SERVICE: Final = "service.name"
_SCAN_TOTALS: Final = ("inspectedTraces", "inspectedSpans", "inspectedBytes", "totalBlockBytes")


def service_visible(selectors: Sequence[Selector], service: object) -> bool:
    """Whether every span of ``service`` is visible: a selector on ``service.name`` alone matches it."""
    if not isinstance(service, str):
        return False
    return any(isinstance(s, TraceSelector) and s.matchers and all(m.name == SERVICE for m in s.matchers)
               and s.matches({SERVICE: service}) for s in selectors)


def filter_answer(doc: Any, selectors: Sequence[Selector]) -> Any:
    """The search answer with each trace's hidden root service and service stats removed (ValueError if
    ``doc`` is not a search answer)."""
    if not isinstance(doc, dict):
        raise ValueError("not a search answer")
    traces = doc.get("traces", [])
    if not isinstance(traces, list):
        raise ValueError("not a search answer")
    for t in traces:
        if not isinstance(t, dict):
            raise ValueError("not a search answer")
        if "rootServiceName" in t and not service_visible(selectors, t["rootServiceName"]):
            del t["rootServiceName"]
        stats = t.get("serviceStats")
        if stats is not None:
            kept = {k: v for k, v in stats.items() if service_visible(selectors, k)} if isinstance(stats, dict) else {}
            if kept:
                t["serviceStats"] = kept
            else:
                del t["serviceStats"]
    metrics = doc.get("metrics")
    if isinstance(metrics, dict):
        for k in _SCAN_TOTALS:
            metrics.pop(k, None)
    return doc
