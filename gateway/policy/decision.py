"""The authorization decision: a pure function of (request facts, policy snapshot, config).

Identify (which token, which policy) and authorize (scope, realm, IP, expiry) are kept
apart so the admin API and the data path share the first and differ in the second.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from datetime import datetime
from hmac import compare_digest as _compare_digest
from itertools import islice
from typing import Final, NamedTuple, Protocol

from gateway.policy import tokens
from gateway.policy.model import AccessPolicy, Realm, Token
from gateway.policy.selector import Selector
from gateway.policy.trace_selector import TraceSelector

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
_NEW: Final = tuple.__new__


class StackLike(Protocol):
    @property
    def id(self) -> str: ...
    @property
    def org_id(self) -> str: ...


class Denied(Exception):
    """A refusal; ``status`` is 401 (who are you) or 403 (not allowed), ``reason`` a metric label."""

    def __init__(self, status: int, reason: str, message: str):
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.message = message


class Identity(NamedTuple):
    """Who asks: the token and its policy (a tuple: built on every token's first use, on the hot path)."""

    token: Token
    policy: AccessPolicy


def identify(presented: str, token_index: Mapping[str, Token], policy_index: Mapping[str, AccessPolicy],
             now: datetime) -> Identity:
    """Find the token and its policy; 401 for anything that does not prove who the caller is."""
    try:
        decoded = tokens.decode(presented)
    except tokens.TokenFormatError as exc:
        raise Denied(401, "malformed_token", f"invalid token: {exc}") from None
    token = token_index.get(decoded.token_id)
    if token is None or not _compare_digest(decoded.secret_hash, token.secret_hash):  # (tokens.secret_matches)
        raise Denied(401, "unknown_token", "invalid token: unknown or revoked")
    tokens.remember(presented, decoded)
    policy = policy_index.get(token.access_policy_id)
    if policy is None or policy.org_id != decoded.org_id:
        raise Denied(401, "unknown_token", "invalid token: unknown or revoked")
    expires = token.expires_at  # (Token.expired)
    if expires is not None and expires <= now:
        raise Denied(401, "expired_token", "token expired")
    return _NEW(Identity, (token, policy))  # (Identity(token, policy) without the Python-level __new__)


def covering_realms(policy: AccessPolicy, stack: StackLike) -> tuple[Realm, ...]:
    """The realms of ``policy`` that cover ``stack`` (its own stack realm, or its org's realm)."""
    if policy.org_id != stack.org_id:
        return ()
    return tuple(r for r in policy.realms
                 if (r.type == "stack" and r.identifier == stack.id)
                 or (r.type == "org" and r.identifier == stack.org_id))


def label_policies(realms: tuple[Realm, ...]) -> tuple[Selector, ...]:
    """The selectors restricting reads; empty = unrestricted.

    Realms are OR-ed like selectors: one covering realm without label policies grants all.
    """
    if not realms or any(not r.label_policies for r in realms):
        return ()
    seen: dict[Selector, None] = {}
    for r in realms:
        for s in r.label_policies:
            seen.setdefault(s, None)
    return tuple(seen)


#: Scopes that only ingest: label policies restrict no write, whatever signal they are for.
INGEST_SCOPES: Final = frozenset({"metrics:write", "logs:write", "traces:write", "profiles:write"})
#: The backend whose requests trace selectors restrict; every other backend takes the Prometheus-style ones.
TRACES: Final = "traces"


def for_signal(policies: tuple[Selector, ...], backend: str, scope: str) -> tuple[Selector, ...]:
    """The label policies that apply to a request for ``backend``: trace selectors for traces, the
    Prometheus-style selectors for metrics, logs and profiles. Fails closed: a token restricted by
    selectors of the other kind only would otherwise read this signal whole, so anything but an
    ingest is refused (Denied 403, ``lbac_unfilterable``).
    """
    if not policies:
        return ()
    traces = backend == TRACES
    mine = tuple(p for p in policies if isinstance(p, TraceSelector) is traces)
    if not mine and scope not in INGEST_SCOPES:
        have, need = ("label selectors ({env=\"dev\"})", "trace selectors ({resource.env=\"dev\"})") if traces \
            else ("trace selectors ({resource.env=\"dev\"})", "label selectors ({env=\"dev\"})")
        raise Denied(403, "lbac_unfilterable", f"your label policies hold only {have}, which cannot restrict "
                     f"{backend}; {backend} need {need}")
    return mine


def authorize(identity: Identity, scope: str, stack: StackLike, client_ip: IPAddress | None
              ) -> tuple[Selector, ...]:
    """Check scope, status, realm and IP; return the label policies that apply. Raises Denied (403)."""
    policy = identity.policy
    if policy.status != "active":
        raise Denied(403, "inactive_policy", "access policy is inactive")
    if scope not in policy.scopes:
        raise Denied(403, "missing_scope", f"token lacks the {scope} scope")
    hit = _COVERAGE.get((id(policy), id(stack)))
    if hit is not None and hit[0] is policy and hit[1] is stack:
        selectors = hit[2]
    else:
        selectors = _cover(policy, stack)
    if selectors is None:
        raise Denied(403, "wrong_realm", f"token's access policy does not cover stack {stack.id}")
    if policy.allowed_subnets and not policy.ip_allowed(client_ip):
        raise Denied(403, "ip_not_allowed", f"client address {client_ip} is outside the allowed ranges")
    return selectors


#: ``label_policies(covering_realms(policy, stack))`` (None: no covering realm) by the objects' identities.
#: Policies, their realms and stacks are immutable snapshots: an edited policy or a reloaded config is a new
#: object, never found here, so no entry needs invalidating. Each entry holds its policy and stack (an id is
#: not reused while they live); bounded: full, the oldest sixteenth goes (as ``tokens.remember`` does).
_COVERAGE: dict[tuple[int, int], tuple[AccessPolicy, StackLike, tuple[Selector, ...] | None]] = {}
MAX_COVERAGE: Final = 16384


def _cover(policy: AccessPolicy, stack: StackLike) -> tuple[Selector, ...] | None:
    realms = covering_realms(policy, stack)
    selectors = label_policies(realms) if realms else None
    if len(_COVERAGE) >= MAX_COVERAGE:
        for old in list(islice(_COVERAGE, MAX_COVERAGE // 16)):
            del _COVERAGE[old]
    _COVERAGE[(id(policy), id(stack))] = (policy, stack, selectors)
    return selectors
