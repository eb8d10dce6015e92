"""The decide stage: who asks, for which stack and tenant, under which label policies.

One function for every caller that needs the data path's authorization decision: the data-path
handler (``handler._serve``, before it restricts and forwards) and forward-auth (``gateway.forwardauth``,
which answers another proxy's sub-request with it). Both take the same refusals from the same code.

    decision, policies = await decide(st, cfg, route, headers, ip, entry)

Takes: the state (policy snapshot, decision cache), the config snapshot the request runs under, the
matched route (its backend, scope and kind), the request's headers (``Authorization``, ``X-Scope-OrgID``,
the Grafana user header and, for reads, ``X-Prom-Label-Policy``), and the client address already resolved
(``gateway.clientip``: X-Forwarded-For only from trusted proxies). Gives: the cached or new
:class:`~gateway.decision_cache.Decision` (token, policy, stack, tenant, the token's label policies)
and the effective label policies of this request (the token's, or else the Grafana team rules and the
client's own ``X-Prom-Label-Policy``, intersected). Raises the refusal as a :class:`ProxyError` (401 with the
challenge, 403, 400, 404, 503 for a stale snapshot).

On a decision-cache hit it is pure and synchronous (dict lookups, no await reached); only a miss awaits,
for the snapshot's read-through of a token it does not know yet. Token use (first and last) is recorded
on every decision, cached or not. ``entry`` (the access-log entry) receives who asked.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Protocol, overload

from gateway.config import Config, Stack
from gateway.decision_cache import Decision
from gateway.lbac import RewriteError, bounds
from gateway.lbac import restrict as lbac
from gateway.policy.datasource import user_policies
from gateway.policy.decision import Denied, Identity, IPAddress, covering_realms, for_signal
from gateway.policy.selector import Selector
from gateway.proxy.errors import ProxyError
from gateway.proxy.identify import CHALLENGE, credentials
from gateway.routes import Route
from gateway.state import State

Policies = tuple[Selector, ...]


class Headers(Protocol):
    """A request's case-insensitive headers (aiohttp's and the protocol server's multidicts)."""

    @overload
    def get(self, key: str, /) -> str | None: ...
    @overload
    def get(self, key: str, default: str, /) -> str: ...
    def getall(self, key: str, default: list[str], /) -> list[str]: ...


def resolve_stack(cfg: Config, ident: Identity, backend: str, basic_user: str | None, org_header: str | None
                  ) -> Stack:
    """The stack a request is for: the Basic username's, or with Bearer the realm's single stack
    or the one named in X-Scope-OrgID (allowed only inside the realm)."""
    if basic_user is not None:
        stack = cfg.stack_by_tenant.get((backend, basic_user))
        if stack is None:
            raise ProxyError(401, f"unknown {backend} tenant {basic_user!r}: the Basic-auth username must be a "
                             "configured tenant ID", "unknown_tenant", CHALLENGE)
        return stack
    if org_header:
        stack = cfg.stack_by_tenant.get((backend, org_header.strip()))
        if stack is None:
            raise ProxyError(403, f"X-Scope-OrgID {org_header.strip()!r} is not a {backend} tenant of any stack",
                             "wrong_tenant")
        return stack
    org = cfg.orgs_by_id.get(ident.policy.org_id)
    covered = [s for s in (org.stacks if org else ()) if covering_realms(ident.policy, s)]
    if len(covered) != 1:
        raise ProxyError(400, "the tenant is ambiguous: the token's realm covers several stacks; name one in "
                         "X-Scope-OrgID or use Basic auth with the tenant ID", "ambiguous_tenant")
    return covered[0]


def refused(exc: Denied, headers: dict[str, str] | None = None) -> ProxyError:
    """The domain's refusal as a data-path error (same status, reason and message)."""
    return ProxyError(exc.status, exc.message, exc.reason, headers)


async def _decide(st: State, cfg: Config, backend: str, scope: str, presented: str, basic_user: str | None,
                  org_header: str | None, ip: IPAddress | None, entry: dict[str, object]) -> Decision:
    """Identify, resolve the stack and tenant, authorize: the uncached decision (refusals raise)."""
    try:
        ident = await st.cache.identify(presented, datetime.now(UTC))
    except Denied as exc:
        raise refused(exc, CHALLENGE) from None
    entry.update(token_id=ident.token.id, policy=ident.policy.name)
    stack = resolve_stack(cfg, ident, backend, basic_user, org_header)
    tenant = stack.tenants.get(backend)
    if tenant is None:
        raise ProxyError(404, f"stack {stack.id} has no {backend} tenant", "no_tenant")
    entry["tenant"] = tenant
    try:
        ident, policies = await st.cache.authorize(ident, scope, stack, ip)
        policies = for_signal(policies, backend, scope)  # trace selectors for traces, the others elsewhere
    except Denied as exc:
        raise refused(exc) from None
    return Decision(ident, stack, tenant, policies, ip)


def fresh(st: State) -> bool:
    """Whether the policy snapshot may be trusted (loaded, and not too old while the database is down)."""
    return not st.cache.stale


def check_fresh(st: State) -> None:
    """Refuse (503) while the policy snapshot is missing or too old: never trust a stale one."""
    if not fresh(st):
        raise ProxyError(503, "policy snapshot unavailable or too old; refusing rather than trusting it",
                         "stale_snapshot")


def holds(st: State, decision: Decision, now: float) -> bool:
    """Whether a decision kept by a cache in front of this stage may still be used (``now``: ``time.time()``):
    the snapshot is fresh and the token has not expired."""
    return fresh(st) and not decision.expired(now)


def decided(st: State, cfg: Config, route: Route, headers: Headers, ip: IPAddress | None
            ) -> tuple[Decision, Policies] | None:
    """:func:`decide`'s answer when the decision cache holds it, else None; synchronous, records nothing
    (the per-connection memo ``gateway.proxy.fastpath`` calls it). Refusals raise."""
    check_fresh(st)
    key = (headers.get("Authorization"), headers.get("X-Scope-OrgID"), route.backend, route.scope, ip)
    decision = st.decisions.get(key, st.cache.generation, cfg, time.time())
    if decision is None:
        return None
    return decision, effective_policies(st, cfg, route, decision, headers)


async def decide(st: State, cfg: Config, route: Route, headers: Headers, ip: IPAddress | None,
                 entry: dict[str, object]) -> tuple[Decision, Policies]:
    """The request's decision and effective label policies (see the module docstring); refusals raise."""
    check_fresh(st)
    auth = headers.get("Authorization")
    org_header = headers.get("X-Scope-OrgID")
    generation = st.cache.generation  # read before any await: a change meanwhile voids what is decided
    key = (auth, org_header, route.backend, route.scope, ip)
    decision = st.decisions.get(key, generation, cfg, time.time())
    if decision is None:
        presented, basic_user = credentials(auth)  # refuses a missing or malformed header: never stored
        decision = await _decide(st, cfg, route.backend, route.scope, presented, basic_user, org_header, ip,
                                 entry)
        if st.cache.generation == generation:
            st.decisions.put(key, generation, cfg, decision)
    ident = decision.ident
    entry.update(token_id=ident.token.id, policy=ident.policy.name, tenant=decision.tenant,
                 client_ip=decision.client_ip())
    st.cache.record_use(ident.token.id)
    return decision, effective_policies(st, cfg, route, decision, headers)


def effective_policies(st: State, cfg: Config, route: Route, decision: Decision, headers: Headers) -> Policies:
    """The token's label policies, or else the Grafana team rules and the client's X-Prom-Label-Policy,
    intersected."""
    policies = decision.policies
    reads = route.kind in lbac.RESTRICTED_KINDS
    if not policies and (reads or route.scope == "rules:write"):
        # A token without label policies may be narrowed by Grafana team rules: those the gateway holds
        # for the data source using this policy, and (for reads) those Grafana sends as X-Prom-Label-Policy.
        # A rule write by a narrowed user is refused by the plan, like any label-restricted one.
        ident, tenant = decision.ident, decision.tenant
        try:
            team = user_policies(st.cache, ident.policy.id, route.backend, tenant,
                                 headers.get(cfg.grafana_user_header))
        except Denied as exc:
            raise refused(exc) from None
        client_policies = headers.getall("X-Prom-Label-Policy", []) if reads else []
        sent = lbac.parse_client_policies(client_policies, tenant) if client_policies else ()
        try:  # Grafana sends trace selectors for Tempo in the same header: each signal takes its own kind
            team, sent = for_signal(team, route.backend, route.scope), for_signal(sent, route.backend, route.scope)
        except Denied as exc:
            raise refused(exc) from None
        policies = lbac.intersect(team, sent) if team and sent else (team or sent)
        try:  # client-sent selectors count against the bounds of a token's own
            bounds.check_policies(len(policies))
        except RewriteError as exc:
            raise ProxyError(400, f"query refused by label-based access control: {exc}", "lbac_refused") from None
    return policies
