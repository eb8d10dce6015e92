"""The limit stage: after ``decide``, before anything is read or forwarded.

    held = admit(cfg, route, decision, request.content_length, entry)  # refusals raise ProxyError
    ...  # serve
    release(entry)  # in the handler's finally: the in-flight counts this request held

In order: a tenant's ``block`` for the route's role (its status, message and Retry-After); then the policy's
and the tenant's concurrent queries (reads), requests per second (all requests) and write bytes per second
(writes, by Content-Length), each shared by all workers (:mod:`gateway.limits.shared`). Past a limit: 429
with Retry-After and an error naming the limit; a write gets ``tenant_limits.write_status`` (503 by default:
Prometheus retries any 5xx, but a 429 only with ``retry_on_http_429``, storage/remote/client.go).

A request of a policy without limits on a tenant without limits costs one attribute read and one dict lookup
(the policy's parsed attributes are cached by their text). :func:`fast_plan` tells the protocol server's
callback path (``gateway.proxy.fastpath``) which requests it may still serve (request rates, and the
concurrent queries of a read, taken in one call per request) and which it leaves to the handler (a tenant
block, the Loki query policy, a body under a write-byte rate).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, Final

from prometheus_client import Counter

from gateway.config import Config
from gateway.decision_cache import Decision
from gateway.errors import ProxyError
from gateway.limits import lokiquery
from gateway.limits.lease import Buckets, Lease, Rows
from gateway.limits.shared import Table, table
from gateway.metrics import REGISTRY
from gateway.routes import Role, Route
from gateway.tenant_limits import Rates

LIMITED: Final = Counter(
    "gateway_limited_requests_total",
    "Requests refused by a limit or a tenant block, by limit, by whom it is set (policy or tenant) and name "
    "(the policy's name or the tenant ID: only policies and tenants that have limits appear).",
    ["limit", "by", "name"], registry=REGISTRY)
HELD_KEY: Final = "_limits_held"  # (an entry key the handler pops before the access log writes the entry)
_monotonic = time.monotonic
#: Policy attributes extension (ours, not Cloud's): ``attributes.gatewayLimits``.
ATTRIBUTE: Final = "gatewayLimits"
ATTRIBUTE_FIELDS: Final = {"requestsPerSecond": "requests_per_second", "burst": "burst",
                           "writeBytesPerSecond": "write_bytes_per_second",
                           "concurrentQueries": "concurrent_queries"}


@dataclass(frozen=True, slots=True)
class PolicyLimits:
    rates: Rates
    loki: lokiquery.LokiPolicy | None


_NONE: Final = PolicyLimits(Rates(), None)
_PARSED: dict[str | None, PolicyLimits] = {None: _NONE}


def policy_limits(attributes_json: str | None) -> PolicyLimits:
    """A policy's limits from its attributes text (parsed once per distinct text)."""
    got = _PARSED.get(attributes_json)
    if got is not None:
        return got
    try:
        attrs = json.loads(attributes_json or "null")
    except ValueError:
        attrs = None
    attrs = attrs if isinstance(attrs, dict) else {}
    got_raw = attrs.get(ATTRIBUTE)
    raw: dict[str, Any] = got_raw if isinstance(got_raw, dict) else {}
    vals = {ours: raw[theirs] for theirs, ours in ATTRIBUTE_FIELDS.items()
            if isinstance(raw.get(theirs), int | float) and not isinstance(raw.get(theirs), bool)
            and raw[theirs] >= 0}
    rates = Rates(float(vals.get("requests_per_second", 0)), int(vals.get("burst", 0)),
                  int(vals.get("write_bytes_per_second", 0)), int(vals.get("concurrent_queries", 0)))
    got = PolicyLimits(rates, lokiquery.parse(attrs.get("lokiQueryPolicy")))
    if len(_PARSED) > 10_000:  # (policies change rarely; bound it anyway)
        _PARSED.clear()
        _PARSED[None] = _NONE
    _PARSED[attributes_json] = got
    return got


def describe(attributes_json: str | None) -> list[tuple[str, str]]:
    """The policy's limits as the page lists them: (field, value), ours then Cloud's lokiQueryPolicy."""
    try:
        attrs = json.loads(attributes_json or "null")
    except ValueError:
        return []
    if not isinstance(attrs, dict):
        return []
    out: list[tuple[str, str]] = []
    for key in (ATTRIBUTE, "lokiQueryPolicy"):
        sub = attrs.get(key)
        if isinstance(sub, dict):
            out += [(f"{key}.{k}", json.dumps(v) if not isinstance(v, str) else v) for k, v in sorted(sub.items())
                    if v not in (None, "", [])]
    return out


class FastLimits:
    """The limit stage's share of a request on the callback path (``gateway.proxy.fastpath``), resolved
    once per connection, header set and route: the in-flight rows it counts (concurrent queries of a read:
    (row, limit)) and the request-rate buckets it takes from ((bucket, rate, burst)), in the shared table,
    through this worker's lease of that set (:mod:`gateway.limits.lease`: the table is touched once per
    grant or chunk, not per request). ``acquire`` takes all of them or none (False: a limit is reached; the
    handler then refuses the request and counts it exactly as it refuses any other); ``release`` gives the
    in-flight counts back (once per acquired request, however it ends); ``give_back`` undoes an ``acquire``
    for a request the callback path then leaves to the handler (which takes them again)."""

    __slots__ = ("rows", "buckets", "keys", "acquire", "release", "_lease")

    def __init__(self, rows: Rows = (), buckets: Buckets = (), keys: tuple[str, ...] = ()):
        self.rows, self.buckets, self.keys = rows, buckets, keys
        t = table() if rows or buckets else None
        self._lease = lease = t.lease(buckets, rows) if t is not None else None
        # (closures over the lease, none over self: no reference cycle to leave to the collector)
        self.acquire: Callable[[], bool] = (
            _admitted if t is None or lease is None else _both(t, lease) if rows and buckets
            else _rates(t, lease) if buckets else _slots(t, lease))
        self.release: Callable[[], None] = _nothing if t is None or lease is None or not rows else _release(t, lease)

    def give_back(self) -> None:
        self.release()
        lease = self._lease
        if lease is not None and self.buckets:  # (to this worker's lease: the handler takes it again)
            lease.tokens += 1.0


def _renew(t: Table, lease: Lease) -> bool:
    """``acquire`` when the lease runs short: its tokens renewed (or expired ones), then slots reserved,
    then the request taken from both."""
    if lease.buckets:
        now = _monotonic()
        if (lease.tokens < 1.0 or lease.until <= now) and not t.renew(lease, now):
            return False
    if lease.rows:
        if lease.used >= lease.reserved and not t.reserve(lease):
            return False  # (a renewed grant stays with the lease: its tokens were debited already)
        lease.used += 1
    if lease.buckets:
        lease.tokens -= 1.0
    return True


# ---- FastLimits.acquire and .release: a request's share of the lease, or the renewal -------------------------

def _both(t: Table, lease: Lease) -> Callable[[], bool]:
    renew = partial(_renew, t, lease)

    def acquire() -> bool:
        if lease.tokens >= 1.0 and lease.used < lease.reserved:
            lease.tokens -= 1.0
            lease.used += 1
            return True
        return renew()
    return acquire


def _rates(t: Table, lease: Lease) -> Callable[[], bool]:
    renew = partial(_renew, t, lease)

    def acquire() -> bool:
        if lease.tokens >= 1.0:
            lease.tokens -= 1.0
            return True
        return renew()
    return acquire


def _slots(t: Table, lease: Lease) -> Callable[[], bool]:
    renew = partial(_renew, t, lease)

    def acquire() -> bool:
        if lease.used < lease.reserved:
            lease.used += 1
            return True
        return renew()
    return acquire


def _release(t: Table, lease: Lease) -> Callable[[], None]:
    def release() -> None:
        lease.used -= 1
        if lease.reserved - lease.used > lease.slack:
            t.unreserve(lease, lease.chunk - 1)
    return release


def _admitted() -> bool:
    return True


def _nothing() -> None:
    pass


#: What :func:`fast_plan` answers when no limit applies (the callback path then takes nothing).
UNLIMITED: Final = FastLimits()


def fast_plan(cfg: Config, route: Route, decision: Decision, body: bool = False) -> FastLimits | None:
    """For the callback path (decided once per connection and header set): the limits it takes per request
    (:data:`UNLIMITED` when none apply), or None when only the handler's stage can serve it (a tenant block,
    the Loki query policy, a ``body`` under a write-byte rate)."""
    tl = cfg.tenant_limits
    pl = policy_limits(decision.ident.policy.attributes_json)
    if not tl.active and pl is _NONE:
        return UNLIMITED
    reads = route.role is Role.READ
    if pl.loki is not None and route.backend == "logs" and reads:
        return None
    tenant_rates = Rates()
    if tl.active:
        o = tl.tenants.get(decision.tenant)
        if o is not None and route.role.value in o.blocks:
            return None
        tenant_rates = tl.defaults if o is None else o.rates
    t = table()
    rows: list[tuple[int, int]] = []
    buckets: list[tuple[int, float, float]] = []
    keys: list[str] = []
    for rates, key in ((pl.rates, f"p{decision.ident.policy.id}"),
                       (tenant_rates, f"t{route.backend}|{decision.tenant}")):
        if body and rates.write_bytes_per_second and route.role is Role.WRITE:
            return None
        if rates.concurrent_queries and reads:
            rows.append((t.row(key), rates.concurrent_queries))
            keys.append(key)
        if rates.requests_per_second:
            buckets.append((t.bucket(key), rates.requests_per_second, float(rates.request_burst())))
    if not rows and not buckets:
        return UNLIMITED
    return FastLimits(tuple(rows), tuple(buckets), tuple(keys))


def _retry_after(seconds: float) -> str:
    return str(max(1, math.ceil(seconds)))


def _refuse(limit: str, by: str, name: str, status: int, message: str, entry: dict[str, object],
            retry_after: str | None, reason: str = "rate_limited") -> ProxyError:
    LIMITED.labels(limit, by, name).inc()
    entry["limit"] = f"{by}:{limit}"
    return ProxyError(status, message, reason, {"Retry-After": retry_after} if retry_after else None)


def admit(cfg: Config, route: Route, decision: Decision, content_length: int | None, entry: dict[str, object],
          forward_auth: bool = False) -> PolicyLimits | None:
    """Apply the limits; refusals raise. Returns the policy's limits (for the Loki query policy) or None.
    For ``forward_auth`` (another proxy forwards the request: the gateway sees neither its body nor its end)
    only blocks and request rates apply."""
    tl = cfg.tenant_limits
    policy = decision.ident.policy
    pl = policy_limits(policy.attributes_json)
    if not tl.active and pl is _NONE:
        return None
    role = route.role
    tenant = decision.tenant
    tenant_rates = Rates()
    if tl.active:
        o = tl.tenants.get(tenant)
        if o is not None:
            block = o.blocks.get(role.value)
            if block is not None:
                after = str(block.retry_after) if block.retry_after else None
                raise _refuse(f"blocked_{role.value}", "tenant", tenant, block.status, block.message, entry, after,
                              "tenant_blocked")
            tenant_rates = o.rates
        else:
            tenant_rates = tl.defaults
    checks = [(r, by, name, key) for r, by, name, key in (
        (pl.rates, "policy", policy.name, f"p{policy.id}"),
        (tenant_rates, "tenant", tenant, f"t{route.backend}|{tenant}")) if r]
    if not checks:
        return pl
    t = table()
    writes = role is Role.WRITE
    limited_status = tl.write_status if writes else 429
    held: list[str] = []
    try:
        for rates, by, name, key in checks:
            if rates.concurrent_queries and role is Role.READ and not forward_auth:
                if not t.enter(key, rates.concurrent_queries):
                    raise _refuse("concurrent_queries", by, name, limited_status,
                                  f"concurrent_queries limit reached for {by} {name!r}: "
                                  f"{rates.concurrent_queries} queries already running; retry when one has finished",
                                  entry, "1")
                held.append(key)
            if rates.requests_per_second:
                wait = t.take(key, rates.requests_per_second, rates.request_burst(), 1.0, debt=False)
                if wait:
                    raise _refuse("requests_per_second", by, name, limited_status,
                                  f"requests_per_second limit exceeded for {by} {name!r}: "
                                  f"{rates.requests_per_second:g} requests per second, burst "
                                  f"{rates.request_burst():g}", entry, _retry_after(wait))
            if rates.write_bytes_per_second and writes and not forward_auth:
                if content_length is None:
                    raise ProxyError(411, f"a write under a byte-rate limit ({by} {name!r}) must send "
                                     "Content-Length", "length_required")
                bps = float(rates.write_bytes_per_second)
                wait = t.take(key, bps, bps, float(content_length), debt=True, kind=1)
                if wait:
                    raise _refuse("write_bytes_per_second", by, name, limited_status,
                                  f"write_bytes_per_second limit exceeded for {by} {name!r}: "
                                  f"{rates.write_bytes_per_second} bytes per second", entry, _retry_after(wait))
    except ProxyError:
        for key in held:
            t.leave(key)
        raise
    if held:
        entry[HELD_KEY] = held
    return pl


def release(entry: dict[str, Any]) -> None:
    """Give back the in-flight counts ``admit`` took for this request (always called, once)."""
    held = entry.pop(HELD_KEY, None)
    if held:
        t = table()
        for key in held:
            t.leave(key)
