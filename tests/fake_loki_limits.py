"""A fake Loki query frontend that applies the query limits the way Loki does, written from
grafana/loki: pkg/util/querylimits (the ``X-Loki-Query-Limits`` JSON, each field used only where it is
stricter than the tenant's; one unreadable value and the whole header is ignored), pkg/loghttp/params.go
(``limit`` defaults to 100; the range: ``end`` now, ``start`` min(end, now) - ``since``, ``since`` 1h),
pkg/querier/queryrange/limits.go (``limitsMiddleware.Do``, on range queries, ``labels`` and ``series``: the
lookback clamps the start, or gives an empty answer when the whole range is before it; a longer range is a
400; ``validateMaxEntriesLimits`` and ``validateMatchers``, checked in that order on range queries) and
pkg/logql/engine.go (``checkIntervalLimit``: a metric query's ``[range]`` above ``maxQueryInterval``).
Errors are Loki's plain-text bodies. It records what it was asked. ``maxQueryBytesRead`` (Loki's index
statistics) and the timeout (the query's execution) are not modelled: tests/e2e/test_real_loki.py checks
them against a real Loki, and every answer here against the real one."""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from gateway.limits.lokiquery import _loki_time_ns, go_duration, model_duration, parse_duration_ms, size_bytes

_SELECTOR = re.compile(r"\{([^}]*)\}")
_MATCHER = re.compile(r'([A-Za-z_]\w*)\s*(?:=~|!~|!=|=)\s*"(?:[^"\\]|\\.)*"')
_RANGE = re.compile(r"\[(\w+)\]")
_INSTANT_LOG = "log queries are not supported as an instant query type, please change your query to a range query type"


@dataclass
class TenantLimits:  # Loki's defaults (pkg/validation/limits.go)
    max_entries: int = 5000
    max_query_length_ms: int = 721 * 3600_000
    max_query_lookback_ms: int = 0


def _stricter(tenant: int, request: int) -> int:
    """querylimits.Limiter: the request's value unless it is 0, or looser than a set tenant value."""
    if request == 0 or (tenant != 0 and request > tenant):
        return tenant
    return request


def _read(raw: str | None) -> dict[str, Any]:
    """The header as Loki's JSON decoding reads it: nothing at all when one value does not parse."""
    try:
        limits = json.loads(raw) if raw else {}
        for key in ("maxQueryLength", "maxQueryInterval", "maxQueryLookback", "maxQueryTime"):
            if key in limits and parse_duration_ms(limits[key]) is None:
                return {}
        if "maxQueryBytesRead" in limits and size_bytes(limits["maxQueryBytesRead"].upper()) is None:
            return {}
    except (ValueError, AttributeError, TypeError):
        return {}
    return limits if isinstance(limits, dict) else {}


def _duration(limits: dict[str, Any], key: str) -> int:
    return parse_duration_ms(limits.get(key, "0")) or 0


@dataclass
class FakeLokiLimits:
    tenant: TenantLimits = field(default_factory=TenantLimits)
    seen: list[dict[str, Any]] = field(default_factory=list)

    def answer(self, path: str, q: dict[str, str], raw: str | None, tenant: str | None = None
               ) -> tuple[int, Any]:
        """Loki's status and body (text for an error) for a read of ``path`` with the query ``q`` and the
        header ``raw``; the body of a 200 is an empty answer of the right type."""
        limits = _read(raw)
        self.seen.append({"path": path, "query": q, "limits": raw, "tenant": tenant})
        query = q.get("query", "")
        log_query = query.lstrip().startswith("{")
        is_range = path.endswith("/query_range") or path.endswith("/api/prom/query")
        if path.endswith("/query") and not is_range:
            if log_query:
                return 400, _INSTANT_LOG
        elif is_range and log_query:
            max_entries = _stricter(self.tenant.max_entries, int(limits.get("maxEntriesLimitPerQuery", 0)))
            n = int(q.get("limit") or "100")
            if max_entries and n > max_entries:
                return 400, ("max entries limit per query exceeded, limit > "
                             f"max_entries_limit_per_query ({n} > {max_entries})")
        if path.endswith("/query") or is_range:
            if (refusal := self._matchers(query, limits)) is not None:
                return 400, refusal
            interval = _duration(limits, "maxQueryInterval")
            for r in _RANGE.findall(query) if interval and not log_query else ():
                if (ms := parse_duration_ms(r) or 0) > interval:
                    return 400, f"[interval] value exceeds limit: [{model_duration(ms)}] > [{model_duration(interval)}]"
        if not (is_range or path.endswith(("/labels", "/series")) or "/label/" in path):
            return 200, {"status": "success", "data": {"resultType": "vector", "result": []}}
        now = time.time_ns()
        end = _loki_time_ns(q.get("end"), now)
        since = parse_duration_ms(q["since"]) if q.get("since") else 3600_000
        start = _loki_time_ns(q.get("start"), min(end, now) - (since or 0) * 10**6)
        empty: Any = ({"status": "success", "data": {"resultType": "streams" if log_query else "matrix",
                                                     "result": [], "stats": {}}}
                      if is_range else {"status": "success"})  # (NewEmptyResponse: labels, series)
        lookback = _stricter(self.tenant.max_query_lookback_ms, _duration(limits, "maxQueryLookback"))
        if lookback:
            min_start = now - lookback * 10**6
            if end < min_start:
                return 200, empty
            start = max(start, min_start)
        length = _stricter(self.tenant.max_query_length_ms, _duration(limits, "maxQueryLength"))
        got = end // 10**6 - start // 10**6
        if length and got > length:
            return 400, ("the query time range exceeds the limit (query length: "
                         f"{go_duration(got)}, limit: {model_duration(length)})")
        self.seen[-1]["effective_start"] = start
        return 200, empty

    @staticmethod
    def _matchers(query: str, limits: dict[str, Any]) -> str | None:
        """validateMatchers on each selector: required labels first, then their number."""
        required = limits.get("requiredLabels") or []
        at_least = int(limits.get("minimumLabelsNumber", 0))
        for selector in _SELECTOR.findall(query):
            present = _MATCHER.findall(selector)
            if missing := [name for name in required if name not in present]:
                return (f"stream selector is missing required matchers [{', '.join(missing)}], labels present in "
                        f"the query were [{', '.join(present)}]")
            if at_least and len(present) < at_least:
                return (f"stream selector has less label matchers than required: (present: [{', '.join(present)}], "
                        f"number_present: {len(present)}, required_number_label_matchers: {at_least})")
        return None

    async def handle(self, request: web.Request) -> web.Response:
        status, body = self.answer(request.path, dict(request.rel_url.query),
                                   request.headers.get("X-Loki-Query-Limits"), request.headers.get("X-Scope-OrgID"))
        if isinstance(body, str):
            return web.Response(status=status, text=body)
        return web.json_response(body, status=status)

    def app(self) -> web.Application:
        a = web.Application()
        a.router.add_route("*", "/{tail:.*}", self.handle)
        return a
