"""A per-worker cache of authorization decisions (issue 17): identify + stack + authorize, memoized.

A decision is a pure function of the request facts in its key (the Authorization header exactly as
received, which fixes the presented credential string and the Basic username; X-Scope-OrgID; the
route's backend and scope; the resolved client address), the policy snapshot and the config snapshot,
and of the time only through the token's ``expiresAt``.
So an entry is valid exactly while

* the policy cache's ``generation`` is the one the decision was computed under (it is bumped on every
  change the snapshot takes in: a notification, an API write, a resync, a read-through insert, a
  tombstone), and the handler stores an entry only if the generation did not move while it decided;
* the config object is the one it was computed under (a reload swaps the object whole);
* the token has not expired (``expires`` is its ``expiresAt`` as a POSIX time, checked per hit).

Any other change empties the whole cache at the next lookup: a revoked token is refused at once.

Only successes are stored, and only after the full path parsed that exact header and verified the
credential in it (the secret's hash compared in constant time): a hit proves nothing new about a
string, it only repeats a verified one. The dict compares key strings only after their randomized SipHash matched, so a
lookup is no timing oracle for a cached secret. Team rules (X-Grafana-User) and the client's
X-Prom-Label-Policy headers are not part of the decision kept here: the handler applies them after it,
on every request, as it did before.

Bounded: least recently used entries go first past ``maxsize`` (per worker).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Final

from gateway.config import Config, Stack
from gateway.lbac.restrict import headers_for
from gateway.logfmt import json_string
from gateway.policy.decision import Identity, IPAddress
from gateway.policy.selector import Selector

MAX_DECISIONS: Final = 10_000

#: (Authorization header, X-Scope-OrgID, backend, scope, client address)
Key = tuple[str | None, str | None, str, str, IPAddress | None]


class Decision:
    """What the handler needs after authorizing: who, which stack and tenant, which label policies."""

    __slots__ = ("ident", "stack", "tenant", "policies", "ip", "expires", "_headers", "_ip_text", "_log")

    def __init__(self, ident: Identity, stack: Stack, tenant: str, policies: tuple[Selector, ...],
                 ip: IPAddress | None = None):
        self.ident = ident
        self.stack = stack
        self.tenant = tenant
        self.policies = policies
        self.ip = ip  # the key's client address
        exp = ident.token.expires_at
        self.expires = exp.timestamp() if exp is not None else math.inf
        self._headers: tuple[str, ...] | None = None
        self._ip_text: str | None = None
        self._log: str | None = None

    def expired(self, now: float) -> bool:
        """Whether the token has expired at ``now`` (``time.time()``); identify refuses at expires_at <= now,
        so does every cache of this decision."""
        return now >= self.expires

    def label_headers(self) -> tuple[str, ...]:
        """``headers_for(tenant, policies)``, computed once per decision."""
        if self._headers is None:
            self._headers = headers_for(self.tenant, self.policies)
        return self._headers

    def client_ip(self) -> str | None:
        """The client address as the access log writes it, computed once per decision."""
        if self._ip_text is None and self.ip is not None:
            self._ip_text = str(self.ip)
        return self._ip_text

    def log_fields(self) -> str | None:
        """The access log's JSON fields for who asked (``token_id`` to ``client_ip``), made once per decision;
        None without a client address (the handler's entry then takes the connection's)."""
        if self._log is None:
            ip = self.client_ip()
            if ip is None:
                return None
            ident = self.ident
            self._log = (f'"token_id":{json_string(ident.token.id)},"policy":{json_string(ident.policy.name)},'
                         f'"tenant":{json_string(self.tenant)},"client_ip":{json_string(ip)}')
        return self._log


class DecisionCache:
    """Decisions by key, valid for one (policy generation, config) pair. Event-loop only, no I/O."""

    def __init__(self, maxsize: int = MAX_DECISIONS):
        self.maxsize = maxsize
        self._entries: OrderedDict[Key, Decision] = OrderedDict()
        self._generation = -1
        self._config: Config | None = None

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: Key, generation: int, config: Config, now: float) -> Decision | None:
        """The decision for ``key`` if it still holds (``now``: ``time.time()``), else None."""
        if generation != self._generation or config is not self._config:
            self._reset(generation, config)
            return None
        d = self._entries.get(key)
        if d is None:
            return None
        if d.expired(now):
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return d

    def put(self, key: Key, generation: int, config: Config, decision: Decision) -> None:
        """Store a decision computed entirely under ``generation`` (the caller checks that the
        snapshot's generation did not move while it decided) and ``config``."""
        if generation != self._generation or config is not self._config:
            if generation < self._generation:
                return  # computed before a change this cache has already seen
            self._reset(generation, config)
        entries = self._entries
        entries[key] = decision  # (a key stored meanwhile by a concurrent miss keeps its place: harmless)
        if len(entries) > self.maxsize:
            entries.popitem(last=False)

    def _reset(self, generation: int, config: Config) -> None:
        """Empty the cache: its entries were computed under another generation or config."""
        self._entries.clear()
        self._generation = generation
        self._config = config
