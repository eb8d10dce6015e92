"""A policy's ``attributes.lokiQueryPolicy`` (Grafana Cloud) applied to Loki reads.

Cloud's fields are Loki's own per-request limits: grafana/loki ``pkg/util/querylimits`` reads them as JSON
from the ``X-Loki-Query-Limits`` header (``maxQueryLength``, ``maxQueryInterval``, ``maxQueryLookback``,
``maxEntriesLimitPerQuery``, ``maxQueryTime``, ``requiredLabels``, ``minimumLabelsNumber``,
``maxQueryBytesRead``) and applies each where it is stricter than the tenant's limit. So the gateway sends
the policy as that header on every Loki read (the client's own is always dropped), and Loki enforces every
field, ``maxQueryBytesRead`` (which needs Loki's index statistics) and the timeout included.

The checks Loki makes from the request alone the gateway also makes itself, with Loki's status and text
(``pkg/querier/queryrange/limits.go``, ``pkg/validation``), so they hold against a Loki that ignores the
header and the client sees the same answer either way:

* ``maxEntriesLimitPerQuery``: a log query whose ``limit`` exceeds it: 400 ``max entries limit per query
  exceeded, limit > max_entries_limit_per_query (N > M)``;
* ``maxQueryLookback``: a ``query_range`` starting earlier than now - lookback starts at now - lookback;
  one ending before it gets Loki's empty answer;
* ``maxQueryLength``: a ``query_range`` longer than it: 400 ``the query time range exceeds the limit
  (query length: 721h0m0s, limit: 30d)``.
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import parse_qsl, quote

from gateway.errors import ProxyError

HEADER: Final = "X-Loki-Query-Limits"
_DURATION: Final = re.compile(r"^(?:(\d+)y)?(?:(\d+)w)?(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?(?:(\d+)ms)?$")
_UNITS_MS: Final = (365 * 86400_000, 7 * 86400_000, 86400_000, 3600_000, 60_000, 1000, 1)
#: Loki's JSON tags (pkg/util/querylimits QueryLimits); older Lokis read the timeout as ``queryTimeout``.
_DURATION_FIELDS: Final = ("maxQueryLength", "maxQueryInterval", "maxQueryLookback", "maxQueryTime", "queryTimeout")
_BYTES: Final = re.compile(r"^\s*\d+(?:\.\d+)?\s*(?:[kKmMgGtTpPeE]i?[bB]?|[bB])?\s*$")


def parse_duration_ms(text: str) -> int | None:
    """Prometheus' ``model.ParseDuration`` (``30d``, ``1h30m``, ``0``) in milliseconds; None if malformed."""
    if text == "0":
        return 0
    m = _DURATION.match(text)
    if not text or m is None:
        return None
    return sum(int(g) * unit for g, unit in zip(m.groups(), _UNITS_MS, strict=True) if g)


def valid_bytes(text: str) -> bool:
    """The sizes Loki's ``flagext.ByteSize`` (go-humanize ParseBytes) reads: ``500MB``, ``1GiB``, ``1024``."""
    return _BYTES.match(text) is not None


def model_duration(ms: int) -> str:
    """Prometheus' ``model.Duration.String``: ``30d``, ``1h30m``, ``12w``."""
    if ms == 0:
        return "0s"
    out = ""
    for unit, mult, exact in (("y", _UNITS_MS[0], True), ("w", _UNITS_MS[1], True), ("d", _UNITS_MS[2], False),
                              ("h", 3600_000, False), ("m", 60_000, False), ("s", 1000, False),
                              ("ms", 1, False)):
        if exact and ms % mult:
            continue
        if (v := ms // mult) > 0:
            out += f"{v}{unit}"
            ms -= v * mult
    return out


def go_duration(ms: int) -> str:
    """Go's ``time.Duration.String`` of a whole number of milliseconds: ``721h0m0s``, ``1.5s``, ``250ms``."""
    if ms == 0:
        return "0s"
    sign, ms = ("-" if ms < 0 else ""), abs(ms)
    if ms < 1000:
        return f"{sign}{ms}ms"
    h, rem = divmod(ms, 3600_000)
    m, rem = divmod(rem, 60_000)
    s, frac = divmod(rem, 1000)
    secs = f"{s}" + (f".{frac:03d}".rstrip("0") if frac else "")
    return sign + (f"{h}h" if h else "") + (f"{m}m" if h or m else "") + f"{secs}s"


@dataclass(frozen=True, slots=True)
class LokiPolicy:
    """A policy's lokiQueryPolicy: the header sent to Loki and the limits the gateway checks itself."""

    header: str
    max_entries: int = 0
    lookback_ms: int = 0
    length_ms: int = 0


def parse(obj: Any) -> LokiPolicy | None:
    """From the ``lokiQueryPolicy`` object (validated by the admin API); None when it sets nothing."""
    if not isinstance(obj, dict):
        return None
    sent: dict[str, Any] = {}
    for key in _DURATION_FIELDS:
        v = obj.get(key)
        if isinstance(v, str) and (ms := parse_duration_ms(v.strip())) is not None and ms > 0:
            sent[key] = v.strip()
    if "queryTimeout" in sent or "maxQueryTime" in sent:  # the timeout under both names, the stricter one
        given = [sent[k] for k in ("queryTimeout", "maxQueryTime") if k in sent]
        t = min(given, key=lambda d: parse_duration_ms(d) or 0)
        sent["queryTimeout"] = sent["maxQueryTime"] = t
    for key in ("maxEntriesLimitPerQuery", "minimumLabelsNumber"):
        v = obj.get(key)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            sent[key] = v
    labels = obj.get("requiredLabels")
    if isinstance(labels, list) and labels and all(isinstance(x, str) for x in labels):
        sent["requiredLabels"] = labels
    size = obj.get("maxQueryBytesRead")
    if isinstance(size, str) and size.strip() and valid_bytes(size) and size.strip() not in ("0", "0B"):
        sent["maxQueryBytesRead"] = size.strip()
    if not sent:
        return None
    return LokiPolicy(json.dumps(sent, separators=(",", ":"), sort_keys=True), sent.get("maxEntriesLimitPerQuery", 0),
                      parse_duration_ms(sent.get("maxQueryLookback", "0")) or 0,
                      parse_duration_ms(sent.get("maxQueryLength", "0")) or 0)


def _loki_time_ns(value: str | None, default_ns: int) -> int:
    """Loki's ``loghttp`` timestamps: float seconds, integer seconds (<= 10 digits) or nanoseconds, RFC 3339."""
    if value is None or value == "":
        return default_ns
    try:
        if "." in value:
            f = float(value)
            if math.isfinite(f):
                return int(f * 1e9)
        n = int(value)
        return n * 1_000_000_000 if len(value) <= 10 else n
    except ValueError:
        pass
    from datetime import datetime
    try:
        dt = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise ProxyError(400, f'cannot parse "{value}" to a valid timestamp', "bad_data") from None
    return int(dt.timestamp() * 1e9)


def _empty(log_query: bool) -> dict[str, Any]:
    """Loki's answer to a range wholly before the lookback (``NewEmptyResponse``)."""
    return {"status": "success", "data": {"resultType": "streams" if log_query else "matrix", "result": [],
                                          "stats": {}}}


def apply(lp: LokiPolicy, upstream_path: str, raw_query: str, now: float | None = None
          ) -> tuple[str, dict[str, Any] | None]:
    """The query string to send (``start`` clamped), and Loki's own empty answer when nothing is left to
    ask; refusals raise ProxyError with Loki's status and text. Only the URL's parameters are read: a
    form body is left to Loki, which reads the header."""
    is_range = upstream_path.endswith("/query_range") or upstream_path.endswith("/api/prom/query")
    if not (is_range or upstream_path.endswith("/query")):
        return raw_query, None
    params = parse_qsl(raw_query, keep_blank_values=True)
    got = dict(params)
    log_query = got.get("query", "").lstrip().startswith("{")
    if lp.max_entries and log_query and (limit := got.get("limit")) not in (None, ""):
        try:
            n = int(limit)
        except ValueError:
            n = 0  # Loki refuses it itself
        if n > lp.max_entries:
            raise ProxyError(400, "max entries limit per query exceeded, limit > max_entries_limit_per_query "
                             f"({n} > {lp.max_entries})", "loki_query_policy")
    if not is_range or not (lp.lookback_ms or lp.length_ms):
        return raw_query, None
    now_ns = int((time.time() if now is None else now) * 1e9)
    end = _loki_time_ns(got.get("end"), now_ns)
    start = _loki_time_ns(got.get("start"), end - 3600 * 1_000_000_000)  # Loki's default: the last hour
    changed = False
    if lp.lookback_ms:
        min_start = now_ns - lp.lookback_ms * 1_000_000
        if end < min_start:
            return raw_query, _empty(log_query)
        if start < min_start:
            start, changed = min_start, True
    if lp.length_ms:
        length_ms = end // 1_000_000 - start // 1_000_000
        if length_ms > lp.length_ms:
            raise ProxyError(400, f"the query time range exceeds the limit (query length: {go_duration(length_ms)}, "
                             f"limit: {model_duration(lp.length_ms)})", "loki_query_policy")
    if not changed:
        return raw_query, None
    out = [(k, str(start) if k == "start" else v) for k, v in params]
    if "start" not in got:
        out.append(("start", str(start)))
    return "&".join(f"{quote(k, safe='')}={quote(v, safe='')}" for k, v in out), None
