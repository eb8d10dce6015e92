"""A fake Loki query frontend that applies the query limits the way Loki does, written from
grafana/loki: pkg/util/querylimits (the ``X-Loki-Query-Limits`` JSON, each field used only where it is
stricter than the tenant's), pkg/querier/queryrange/limits.go (``limitsMiddleware.Do``: the lookback clamps
the start, or gives an empty answer when the whole range is before it; a longer range is a 400) and the
querier's ``validateEntriesLimits`` (a log query's ``limit`` above the maximum is a 400; metric queries are
not checked). Errors are Loki's plain-text bodies. It records what it was asked."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from gateway.limits.lokiquery import _loki_time_ns, go_duration, model_duration, parse_duration_ms


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


@dataclass
class FakeLokiLimits:
    tenant: TenantLimits = field(default_factory=TenantLimits)
    seen: list[dict[str, Any]] = field(default_factory=list)

    async def handle(self, request: web.Request) -> web.Response:
        q = dict(request.rel_url.query)
        raw = request.headers.get("X-Loki-Query-Limits")
        limits = json.loads(raw) if raw else {}
        self.seen.append({"path": request.path, "query": q, "limits": raw, "tenant": request.headers.get(
            "X-Scope-OrgID")})
        max_entries = _stricter(self.tenant.max_entries, int(limits.get("maxEntriesLimitPerQuery", 0)))
        query = q.get("query", "")
        log_query = query.lstrip().startswith("{")
        if log_query and int(q.get("limit", "100")) > max_entries:
            return web.Response(status=400, text="max entries limit per query exceeded, limit > "
                                f"max_entries_limit_per_query ({int(q['limit'])} > {max_entries})")
        if request.path.endswith("/query_range"):
            now = time.time_ns()
            end = _loki_time_ns(q.get("end"), now)
            start = _loki_time_ns(q.get("start"), end - 3600 * 10**9)
            lookback = _stricter(self.tenant.max_query_lookback_ms,
                                 parse_duration_ms(limits.get("maxQueryLookback", "0")) or 0)
            if lookback:
                min_start = now - lookback * 10**6
                if end < min_start:
                    return web.json_response({"status": "success", "data": {
                        "resultType": "streams" if log_query else "matrix", "result": [], "stats": {}}})
                start = max(start, min_start)
            length = _stricter(self.tenant.max_query_length_ms,
                               parse_duration_ms(limits.get("maxQueryLength", "0")) or 0)
            got = end // 10**6 - start // 10**6
            if length and got > length:
                return web.Response(status=400, text="the query time range exceeds the limit (query length: "
                                    f"{go_duration(got)}, limit: {model_duration(length)})")
            self.seen[-1]["effective_start"] = start
        return web.json_response({"status": "success", "data": {"resultType": "streams", "result": []}})

    def app(self) -> web.Application:
        a = web.Application()
        a.router.add_route("*", "/{tail:.*}", self.handle)
        return a
