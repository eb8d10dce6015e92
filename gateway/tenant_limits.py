"""``tenant_limits:`` in the YAML, and a policy's ``attributes.gatewayLimits``: what limits apply.

    tenant_limits:
      write_status: 503              # status of a write past a limit: 503 (every remote-write client
                                     # retries it) or 429 (Prometheus retries it only with retry_on_http_429)
      defaults:                      # every tenant of every signal, per replica; absent or 0: unlimited
        requests_per_second: 100
        burst: 200
        write_bytes_per_second: 10000000
        concurrent_queries: 20
      tenants:
        "100":                       # a tenant ID (of any signal) as in orgs[].stacks[].tenants
          requests_per_second: 10    # overrides the defaults field by field
          block:                     # reads, writes, rules, alerts
            writes: {status: 503, message: "maintenance until 23:00 UTC", retry_after: 600}

Both the file (reloaded without restart) and the policy attributes make a :class:`Rates`; the data path's
limit stage (:mod:`gateway.limits`) applies both, the policy's per policy and the tenant's per tenant.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Final, Protocol

#: ``block`` kinds, and the route role each blocks.
BLOCK_KINDS: Final = {"reads": "read", "writes": "write", "rules": "rules", "alerts": "alertmanager"}
RATE_KEYS: Final = ("requests_per_second", "burst", "write_bytes_per_second", "concurrent_queries")
WRITE_STATUSES: Final = (429, 503)


@dataclass(frozen=True, slots=True)
class Rates:
    """Limits of one policy or tenant; 0 means unlimited. ``burst`` 0 means one second's worth."""

    requests_per_second: float = 0.0
    burst: int = 0
    write_bytes_per_second: int = 0
    concurrent_queries: int = 0

    def __bool__(self) -> bool:
        return bool(self.requests_per_second or self.write_bytes_per_second or self.concurrent_queries)

    def request_burst(self) -> float:
        return float(self.burst) if self.burst else max(1.0, self.requests_per_second)


@dataclass(frozen=True, slots=True)
class Block:
    """A tenant's requests of one kind answered ``status`` with ``message`` (and ``Retry-After``)."""

    status: int
    message: str
    retry_after: int | None = None


@dataclass(frozen=True, slots=True)
class TenantOverride:
    rates: Rates
    blocks: Mapping[str, Block]  # route role -> block


@dataclass(frozen=True, slots=True)
class TenantLimits:
    """The validated ``tenant_limits:`` section; ``active`` is False when it limits nothing."""

    defaults: Rates = field(default_factory=Rates)
    tenants: Mapping[str, TenantOverride] = field(default_factory=dict)
    write_status: int = 503
    active: bool = False

    def rates_for(self, tenant: str) -> Rates:
        o = self.tenants.get(tenant)
        return self.defaults if o is None else o.rates


class Checker(Protocol):
    def add(self, path: str, msg: str) -> None: ...
    def mapping(self, value: Any, path: str, allowed: tuple[str, ...], required: tuple[str, ...] = ()
                ) -> dict[str, Any]: ...


def _number(c: Checker, m: dict[str, Any], key: str, path: str, whole: bool) -> float | None:
    v = m.get(key)
    if v is None:
        return None
    ok = isinstance(v, int | float) and not isinstance(v, bool) and v >= 0 and (not whole or v == int(v))
    if not ok or v > 2**40:
        c.add(f"{path}.{key}", "must be a whole number >= 0" if whole else "must be a number >= 0")
        return None
    return float(v)


def _rates(c: Checker, m: dict[str, Any], path: str, base: Rates) -> Rates:
    got = {k: _number(c, m, k, path, whole=k != "requests_per_second") for k in RATE_KEYS}
    return Rates(
        got["requests_per_second"] if got["requests_per_second"] is not None else base.requests_per_second,
        int(got["burst"]) if got["burst"] is not None else base.burst,
        int(got["write_bytes_per_second"]) if got["write_bytes_per_second"] is not None
        else base.write_bytes_per_second,
        int(got["concurrent_queries"]) if got["concurrent_queries"] is not None else base.concurrent_queries)


def _block(c: Checker, raw: Any, path: str, kind: str, tenant: str) -> Block | None:
    m = c.mapping(raw, path, ("status", "message", "retry_after"))
    status = m.get("status", 503)
    if isinstance(status, bool) or not isinstance(status, int) or not 400 <= status <= 599:
        c.add(f"{path}.status", "must be an HTTP status from 400 to 599")
        return None
    message = m.get("message") or f"{kind} are blocked for tenant {tenant}"
    if not isinstance(message, str) or len(message) > 1024 or any(ch in message for ch in "\r\n\0"):
        c.add(f"{path}.message", "must be one line of text (at most 1024 characters)")
        return None
    after = m.get("retry_after")
    if after is not None and (isinstance(after, bool) or not isinstance(after, int) or not 0 < after <= 86400):
        c.add(f"{path}.retry_after", "must be a whole number of seconds from 1 to 86400")
        return None
    return Block(status, message, after)


def parse(c: Checker, raw: Any) -> TenantLimits:
    """Validate ``tenant_limits:``; problems go to ``c`` as ``path: message``."""
    top = c.mapping(raw, "tenant_limits", ("write_status", "defaults", "tenants"))
    write_status = top.get("write_status", 503)
    if write_status not in WRITE_STATUSES or isinstance(write_status, bool):
        c.add("tenant_limits.write_status", "must be 429 or 503")
        write_status = 503
    defaults = _rates(c, c.mapping(top.get("defaults"), "tenant_limits.defaults", RATE_KEYS),
                      "tenant_limits.defaults", Rates())
    tm = top.get("tenants") or {}
    if not isinstance(tm, dict):
        c.add("tenant_limits.tenants", "must be a mapping of tenant ID to its limits")
        tm = {}
    tenants: dict[str, TenantOverride] = {}
    for tenant, body in tm.items():
        t = str(tenant)
        p = f"tenant_limits.tenants.{t}"
        m = c.mapping(body, p, (*RATE_KEYS, "block"))
        bm = c.mapping(m.get("block"), f"{p}.block", tuple(BLOCK_KINDS))
        blocks = {}
        for kind, raw_block in bm.items():
            if kind in BLOCK_KINDS and (b := _block(c, raw_block, f"{p}.block.{kind}", kind, t)) is not None:
                blocks[BLOCK_KINDS[kind]] = b
        tenants[t] = TenantOverride(_rates(c, m, p, defaults), MappingProxyType(blocks))
    active = bool(defaults) or any(o.rates or o.blocks for o in tenants.values())
    return TenantLimits(defaults, MappingProxyType(tenants), write_status, active)
