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

* ``maxEntriesLimitPerQuery``: a log ``query_range`` whose ``limit`` (Loki's default: 100) exceeds it:
  400 ``max entries limit per query exceeded, limit > max_entries_limit_per_query (N > M)``;
* ``maxQueryLookback``: a ``query_range``, ``labels``, ``label/<name>/values`` or ``series`` read starting
  earlier than now - lookback starts at now - lookback; one ending before it gets Loki's empty answer;
* ``maxQueryLength``: such a read longer than it: 400 ``the query time range exceeds the limit
  (query length: 721h0m0s, limit: 30d)``.

The range is read as Loki reads it (``pkg/loghttp/params.go`` ``determineBounds``: ``end`` defaults to now,
``start`` to min(end, now) - ``since``, ``since`` to 1h). Loki reads the header only with
``querier.per_request_limits_enabled: true``, and drops the whole header when one value fails to parse, so
every value sent is one Loki's JSON decoding reads (checked against a real Loki, tests/e2e/test_real_loki.py).
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
#: What Loki's ``flagext.ByteSize`` reads (c2h5oh/datasize ``UnmarshalText`` of the upper-cased text): digits,
#: then a unit; K, M, G, ... are powers of 1024. ``1GiB`` or ``1.5GB`` fail, and with them the whole header.
_BYTES: Final = re.compile(r"^(\d+)\s*(|b|byte|k|kb|kilo|kilobytes?|m|mb|mega|megabytes?|g|gb|giga|gigabytes?|t|tb|"
                           r"tera|terabytes?|p|pb|peta|petabytes?|e|eb)\s*$", re.IGNORECASE)
#: Sizes stored before the admin API checked Loki's grammar (``1GiB``, ``1.5 GB``): sent as a byte count.
_LEGACY_BYTES: Final = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kKmMgGtTpPeE]?)(?:i?[bB])?\s*$")
_DEFAULT_LIMIT: Final = 100  # pkg/loghttp/params.go defaultQueryLimit, defaultSince
_DEFAULT_SINCE_MS: Final = 3600_000
_RANGE_PATHS: Final = ("/query_range", "/api/prom/query")
_META_PATHS: Final = ("/labels", "/label", "/series")
_LABEL_VALUES: Final = re.compile(r"/label/[^/]+/values$")
_POWERS: Final = {"": 0, "b": 0, "k": 1, "m": 2, "g": 3, "t": 4, "p": 5, "e": 6}
_MAX_INT64: Final = 2**63 - 1


def parse_duration_ms(text: str) -> int | None:
    """Prometheus' ``model.ParseDuration`` (``30d``, ``1h30m``, ``0``) in milliseconds; None if malformed."""
    if text == "0":
        return 0
    m = _DURATION.match(text)
    if not text or m is None:
        return None
    ms = sum(int(g) * unit for g, unit in zip(m.groups(), _UNITS_MS, strict=True) if g)
    return ms if ms * 1_000_000 <= _MAX_INT64 else None  # Loki refuses what overflows a Go duration


def size_bytes(text: str) -> int | None:
    """The byte count Loki's ``flagext.ByteSize`` reads from ``text`` (``500MB``, ``1gb``, ``1024``);
    None if Loki cannot read it."""
    m = _BYTES.match(text)
    if m is None:
        return None
    n = int(m.group(1)) << 10 * _POWERS[m.group(2)[:1].lower()]
    return n if n <= _MAX_INT64 else None  # (a larger one is read, as a negative int: no limit)


def valid_bytes(text: str) -> bool:
    """A size Loki reads: ``500MB``, ``1GB`` (GiB), ``1024``."""
    return size_bytes(text) is not None


def _sendable_bytes(text: str) -> str | None:
    """The size as sent in the header: as given when Loki reads it, a stored legacy form as a byte count."""
    if size_bytes(text) is not None:
        return text
    m = _LEGACY_BYTES.match(text)
    if m is None:
        return None
    n = int(float(m.group(1)) * (1 << 10 * _POWERS[m.group(2).lower()]))
    return str(n) if 0 <= n <= _MAX_INT64 else None


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
    if isinstance(size, str) and (b := _sendable_bytes(size.strip())) is not None and size_bytes(b):
        sent["maxQueryBytesRead"] = b
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


def _empty(is_range: bool, log_query: bool) -> dict[str, Any]:
    """Loki's answer to a range wholly before the lookback (``NewEmptyResponse``; labels and series: no data)."""
    if not is_range:
        return {"status": "success"}
    return {"status": "success", "data": {"resultType": "streams" if log_query else "matrix", "result": [],
                                          "stats": {}}}


def apply(lp: LokiPolicy, upstream_path: str, raw_query: str, now: float | None = None
          ) -> tuple[str, dict[str, Any] | None]:
    """The query string to send (``start`` clamped), and Loki's own empty answer when nothing is left to
    ask; refusals raise ProxyError with Loki's status and text. Only the URL's parameters are read: a
    form body is left to Loki, which reads the header."""
    # Range queries, labels and series (Loki's limitsMiddleware); not an instant query: a log one is refused by
    # Loki whatever its limit ("log queries are not supported as an instant query type"), a metric one has
    # no range of its own.
    is_range = upstream_path.endswith(_RANGE_PATHS)
    if not (is_range or upstream_path.endswith(_META_PATHS) or _LABEL_VALUES.search(upstream_path)):
        return raw_query, None
    params = parse_qsl(raw_query, keep_blank_values=True)
    got = dict(params)
    log_query = got.get("query", "").lstrip().startswith("{")
    if lp.max_entries and log_query and is_range:
        try:
            n = int(got.get("limit") or _DEFAULT_LIMIT)
        except ValueError:
            n = 0  # Loki refuses it itself
        if n > lp.max_entries:
            raise ProxyError(400, "max entries limit per query exceeded, limit > max_entries_limit_per_query "
                             f"({n} > {lp.max_entries})", "loki_query_policy")
    if not (lp.lookback_ms or lp.length_ms):
        return raw_query, None
    since_ms = parse_duration_ms(got["since"]) if got.get("since") else _DEFAULT_SINCE_MS
    if since_ms is None:
        return raw_query, None  # Loki refuses it: "could not parse 'since' parameter"
    now_ns = int((time.time() if now is None else now) * 1e9)
    end = _loki_time_ns(got.get("end"), now_ns)
    start = _loki_time_ns(got.get("start"), min(end, now_ns) - since_ms * 1_000_000)
    changed = False
    if lp.lookback_ms:
        min_start = now_ns - lp.lookback_ms * 1_000_000
        if end < min_start:
            return raw_query, _empty(is_range, log_query)
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
