"""The client address: the peer, or behind trusted proxies the right-most untrusted X-Forwarded-For hop."""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from functools import lru_cache

from gateway.policy.model import Network

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class _HashedOnce:
    """An address that hashes once: the address is in every decision-cache key, and the standard classes
    hash in Python on each lookup (``hash(hex(int(ip)))``). Equal to, and hashing like, the standard
    class's object for the same address."""

    __slots__ = ()
    _hash: int

    def __init__(self, address: object):
        super().__init__(address)  # type: ignore[call-arg]
        self._hash = super().__hash__()  # type: ignore[misc]  # (the slot is each concrete class's: one layout per base)

    def __hash__(self) -> int:
        return self._hash

    def __repr__(self) -> str:
        return f"{type(self).__mro__[2].__name__}({str(self)!r})"


class _IPv4(_HashedOnce, ipaddress.IPv4Address):
    __slots__ = ("_hash",)


class _IPv6(_HashedOnce, ipaddress.IPv6Address):
    __slots__ = ("_hash",)


@lru_cache(maxsize=4096)
def _parse(value: str) -> IPAddress | None:
    value = value.strip()
    if value.startswith("[") and "]" in value:  # [v6]:port
        value = value[1:value.index("]")]
    elif value.count(":") == 1:  # v4:port
        value = value.split(":", 1)[0]
    try:  # (ipaddress.ip_address's order: IPv4 first)
        return _IPv4(value)
    except ValueError:
        pass
    try:
        ip = _IPv6(value)
    except ValueError:
        return None
    mapped = ip.ipv4_mapped
    return _IPv4(int(mapped)) if mapped is not None else ip


def _trusted(ip: IPAddress, trusted: Sequence[Network]) -> bool:
    return any(ip.version == n.version and ip in n for n in trusted)


def client_ip(peer: str | None, forwarded_for: Sequence[str], trusted: Sequence[Network]) -> IPAddress | None:
    """Resolve the address IP conditions are checked against.

    ``X-Forwarded-For`` is believed only when the direct peer is a trusted proxy, and then
    only up to the first hop (from the right) that is not itself trusted: everything left of
    it was written by the client and may be forged. An unparsable hop yields None (unknown).
    """
    ip = _parse(peer) if peer else None
    if ip is None or not trusted or not _trusted(ip, trusted):
        return ip
    hops = [h for value in forwarded_for for h in value.split(",") if h.strip()]
    for hop in reversed(hops):
        hop_ip = _parse(hop)
        if hop_ip is None:
            return None  # a malformed hop: the address is unknown, so IP conditions fail closed
        ip = hop_ip
        if not _trusted(ip, trusted):
            return ip
    return ip
