"""Immutable value objects of the domain: access policies, realms and tokens."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal

from gateway.policy.scopes import Scope
from gateway.policy.selector import Selector

RealmType = Literal["org", "stack"]
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Status = Literal["active", "inactive"]


@dataclass(frozen=True, slots=True)
class Realm:
    """Where a policy applies: one org (all its stacks) or one stack, with its label policies.

    ``label_policies`` holds Prometheus-style selectors (metrics, logs) and trace selectors
    (:class:`~gateway.policy.trace_selector.TraceSelector`, traces) alike: see ``decision.for_signal``."""

    type: RealmType
    identifier: str
    label_policies: tuple[Selector, ...] = ()
    #: The identifier as the client wrote it, when that was an org's slug (Terraform's schema text asks for
    #: it): read back as written, enforced by ``identifier``, the org's id, fixed when the policy was written.
    written: str | None = None


@dataclass(frozen=True, slots=True)
class AccessPolicy:
    """A named set of scopes over realms; its tokens carry exactly these rights."""

    id: str
    org_id: str
    name: str
    display_name: str
    scopes: frozenset[Scope]
    realms: tuple[Realm, ...]
    allowed_subnets: tuple[Network, ...] = ()
    status: Status = "active"
    created_at: datetime | None = None
    updated_at: datetime | None = None
    #: ``allowedSubnets`` exactly as written (``10.1.2.3/8`` stays so; enforcement uses the networks).
    #: Only trusted while it still matches ``allowed_subnets`` one for one: see :meth:`subnet_text`.
    subnet_texts: tuple[str, ...] = ()
    #: Cloud's ``attributes`` object (``lokiQueryPolicy``, ``pdcConfiguration``) as canonical JSON
    #: text, or None: stored and returned, not enforced.
    attributes_json: str | None = None

    def subnet_text(self) -> tuple[str, ...]:
        """The subnets as written when ``subnet_texts`` still describes ``allowed_subnets``, else
        their canonical form (a change of the networks alone must never read back stale text)."""
        if len(self.subnet_texts) == len(self.allowed_subnets):
            try:
                if all(ipaddress.ip_network(t.strip(), strict=False) == n
                       for t, n in zip(self.subnet_texts, self.allowed_subnets, strict=True)):
                    return self.subnet_texts
            except ValueError:
                pass
        return tuple(str(n) for n in self.allowed_subnets)

    def ip_allowed(self, ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None) -> bool:
        """True when the policy has no IP ranges or ``ip`` is inside one of them."""
        if not self.allowed_subnets:
            return True
        if ip is None:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip in net for net in self.allowed_subnets if net.version == ip.version)


@dataclass(frozen=True, slots=True)
class Token:
    """A token of a policy. Only the SHA-256 of its secret is ever kept."""

    id: str
    access_policy_id: str
    name: str
    display_name: str
    secret_hash: bytes = field(repr=False)
    expires_at: datetime | None = None
    created_at: datetime | None = None
    updated_at: datetime | None = None
    first_used_at: datetime | None = None
    last_used_at: datetime | None = None
    org_id: str = ""

    def expired(self, now: datetime) -> bool:
        return self.expires_at is not None and self.expires_at <= now
