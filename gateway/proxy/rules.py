"""Rule-group writes: a group's ``source_tenants`` (Mimir federated rules) must stay inside the token's reach."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final

import yaml

from gateway.config import Config
from gateway.policy.decision import Denied, Identity, covering_realms, label_policies
from gateway.policy.selector import Selector
from gateway.proxy.errors import ProxyError

MAX_RULE_BODY: Final = 1024 * 1024


def check_source_tenants(body: bytes, cfg: Config, ident: Identity,
                         team_policies: Callable[[str], tuple[Selector, ...]] | None = None) -> None:
    """Refuse a rule group whose source_tenants names a tenant the token could not read in full.

    A federated rule evaluates queries across ``source_tenants``; without this check a
    ``rules:write`` token could read any tenant of the cluster through the rule's results.
    The ruler evaluates without label policies and writes its results where they can be
    read, so a tenant where the token (or the Grafana user's team rules, ``team_policies``)
    has label policies is refused too.
    """
    try:
        group: Any = yaml.safe_load(body) if body.strip() else None
    except (yaml.YAMLError, RecursionError):
        raise ProxyError(400, "rule group body is not valid YAML", "bad_rule_group") from None
    if not isinstance(group, dict) or group.get("source_tenants") in (None, []):
        return
    tenants = group["source_tenants"]
    if not isinstance(tenants, list) or not all(isinstance(t, str) for t in tenants):
        raise ProxyError(400, "source_tenants must be a list of tenant IDs", "bad_rule_group")
    if "metrics:read" not in ident.policy.scopes:
        raise ProxyError(403, "source_tenants needs the metrics:read scope", "source_tenants")
    for tenant in tenants:
        stack = cfg.stack_by_tenant.get(("metrics", tenant))
        realms = covering_realms(ident.policy, stack) if stack is not None else ()
        if not realms:
            raise ProxyError(403, f"source_tenants names tenant {tenant!r}, which this token cannot read",
                             "source_tenants")
        if label_policies(realms) or _team_restricted(team_policies, tenant):
            raise ProxyError(403, f"source_tenants names tenant {tenant!r}, where label policies restrict what "
                             "you may read: the ruler evaluates without them", "source_tenants")


def _team_restricted(team_policies: Callable[[str], tuple[Selector, ...]] | None, tenant: str) -> bool:
    """Whether Grafana team rules narrow the user on ``tenant`` (rules for other tenants only count too)."""
    if team_policies is None:
        return False
    try:
        return bool(team_policies(tenant))
    except Denied:
        return True
