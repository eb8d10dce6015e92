"""Grafana data sources, teams and their team LBAC rules, applied at query time.

Grafana Cloud keeps per-team rules on a data source and sends them as ``X-Prom-Label-Policy``
headers with the queries of the team's members; Grafana OSS cannot, so the gateway holds the
rules and applies them to requests made with the data source's token. The cache precomputes
:data:`RuleIndex` so that the hot path (:func:`user_policies`) is three dict lookups.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final
from urllib.parse import unquote

from gateway.policy.decision import Denied
from gateway.policy.selector import Selector, SelectorError
from gateway.policy.trace_selector import TraceSelector, parse_label_policy

HEADER: Final = "X-Prom-Label-Policy"
#: Grafana data-source type → the gateway backend (signal) its queries go to.
BACKEND_OF_TYPE: Final[Mapping[str, str]] = {"prometheus": "metrics", "loki": "logs", "tempo": "traces"}
#: The scope a data source's access policy needs to read its signal.
READ_SCOPE_OF_TYPE: Final[Mapping[str, str]] = {"prometheus": "metrics:read", "loki": "logs:read",
                                                "tempo": "traces:read"}


@dataclass(frozen=True, slots=True)
class TeamRule:
    """One rule ``<tenant>:<selector>``; ``text`` is the value as the admin wrote it (echoed back)."""

    tenant: str
    selector: Selector
    text: str


@dataclass(frozen=True, slots=True)
class DataSource:
    """A Grafana data source whose queries arrive with tokens of ``access_policy_id``."""

    id: int
    uid: str
    org_id: str
    name: str
    type: str
    access_policy_id: str
    lbac_rules: tuple[tuple[int, tuple[TeamRule, ...]], ...] = ()  # (team id, its rules), in API order
    created_at: datetime | None = None
    updated_at: datetime | None = None

    @property
    def backend(self) -> str:
        return BACKEND_OF_TYPE[self.type]


@dataclass(frozen=True, slots=True)
class Team:
    """A Grafana team; ``members`` are Grafana user logins, as sent in ``X-Grafana-User``."""

    id: int
    uid: str
    org_id: str
    name: str
    members: tuple[str, ...] = ()
    created_at: datetime | None = None
    updated_at: datetime | None = None
    email: str = ""  # Grafana's team email: stored and returned, no meaning here


#: (access policy id, backend) → login (folded) → tenant → the union of that user's team rules.
RuleIndex = dict[tuple[str, str], dict[str, dict[str, tuple[Selector, ...]]]]


def fold_login(login: str) -> str:
    """Grafana logins are case-insensitive; folding makes 'Alice' meet the rules of 'alice'
    (a case mismatch must never let a team member escape its restriction)."""
    return login.strip().casefold()


def parse_rule(text: str, backend: str | None = None) -> TeamRule:
    """``<tenant>:<selector>`` (selector plain or PathEscape-d) → TeamRule; ValueError/SelectorError.

    A Tempo data source's rules are trace selectors (``18042:{ resource.env="dev" }``, Grafana Cloud's
    team LBAC for traces); Prometheus' and Loki's are label selectors: with ``backend`` the kind is checked."""
    tenant, sep, sel = text.partition(":")
    tenant, sel = tenant.strip(), sel.strip()
    if not sep or not tenant or not sel:
        raise ValueError("must be <tenant>:<selector>, e.g. 18042:{env=\"dev\"}")
    if sel[:3].upper() == "%7B":
        sel = unquote(sel)
    selector = parse_label_policy(sel)
    if backend is not None and isinstance(selector, TraceSelector) != (backend == "traces"):
        raise SelectorError('a Tempo data source takes trace selectors such as {resource.env="dev"}'
                            if backend == "traces" else
                            f'a {backend} data source takes label selectors such as {{env="dev"}}, not trace selectors')
    return TeamRule(tenant, selector, text)


def rules_from_json(raw: Any) -> tuple[tuple[int, tuple[TeamRule, ...]], ...]:
    """The stored form ``[{"teamId": 1, "rules": ["18042:{...}"]}]`` → domain tuples."""
    return tuple((int(e["teamId"]), tuple(parse_rule(r) for r in e["rules"])) for e in raw or ())


def rules_to_json(rules: Iterable[tuple[int, Iterable[TeamRule]]]) -> list[dict[str, Any]]:
    return [{"teamId": tid, "rules": [r.text for r in rs]} for tid, rs in rules]


def build_index(datasources: Iterable[DataSource], teams: Mapping[int, Team]) -> RuleIndex:
    """Precompute, per (policy, backend) and user, the union of the user's team rules per tenant.

    Rules naming a team of another org, or a team that no longer exists, are ignored.
    """
    acc: dict[tuple[str, str], dict[str, dict[str, dict[Selector, None]]]] = {}
    for ds in datasources:
        by_user = acc.setdefault((ds.access_policy_id, ds.backend), {})
        for team_id, rules in ds.lbac_rules:
            team = teams.get(team_id)
            if team is None or team.org_id != ds.org_id or not rules:
                continue
            for login in team.members:
                by_tenant = by_user.setdefault(fold_login(login), {})
                for rule in rules:
                    by_tenant.setdefault(rule.tenant, {}).setdefault(rule.selector, None)
    return {key: {user: {tenant: tuple(sels) for tenant, sels in by_tenant.items()}
                  for user, by_tenant in by_user.items() if by_tenant}
            for key, by_user in acc.items() if by_user}


def user_policies(cache: Any, policy_id: str, backend: str, tenant: str, user: str | None) -> tuple[Selector, ...]:
    """The union of the rules of ``user``'s teams on the data sources using ``policy_id``; () = none.

    Only rules naming exactly ``tenant`` count (a rule for another tenant must not touch this one);
    a user in no team with rules, or no user at all, keeps the token's full access, as on Grafana Cloud.
    A user whose teams have rules on this data source, but none for ``tenant``, is refused (Denied 403)
    rather than given the token's full access there: Grafana Cloud's backends would fail open.
    """
    if not user:
        return ()
    by_user: dict[str, dict[str, tuple[Selector, ...]]] | None = cache.team_rules.get((policy_id, backend))
    if not by_user:
        return ()
    rules = by_user.get(fold_login(user))
    if not rules:
        return ()
    found = rules.get(tenant)
    if not found:
        raise Denied(403, "datasource_rules", f"your Grafana teams have label rules on this data source, "
                     f"but none for tenant {tenant!r}")
    return found
