"""The scope vocabulary: `service:action`, exactly one colon (REFERENCE.md section 3).

Grafana Cloud adds scopes at any time (``datadog:validate``, ``fleet-management:read``,
``pdc-signing:write``, ...) and the Terraform provider checks only the syntax (one colon), so a policy
may hold any scope of that syntax: those the gateway has no route for grant nothing here.
"""

from __future__ import annotations

import re
from typing import Final

Scope = str
"""A scope such as ``metrics:read``: the service, a colon, the action."""

#: Every scope the gateway knows, grouped by service for the API and the page.
SCOPE_GROUPS: Final[dict[str, tuple[str, ...]]] = {
    "metrics": ("read", "write", "delete"),
    "logs": ("read", "write", "delete"),
    "traces": ("read", "write"),
    "profiles": ("read", "write"),
    "alerts": ("read", "write"),
    "rules": ("read", "write"),
    "accesspolicies": ("read", "write", "delete"),
    "datasources": ("read", "write"),
    "datasources.permissions": ("write",),
}

#: The scopes the gateway has routes for: only these can grant anything on the data path.
SERVED_SCOPES: Final[frozenset[Scope]] = frozenset(
    f"{service}:{action}" for service, actions in SCOPE_GROUPS.items() for action in actions
)

#: Grafana Cloud's scope catalogue as its OpenAPI spec lists it (``grafana-com-public-clients``,
#: ``go/gcom/api/openapi.yaml``: the ``AuthAccessPolicy.scopes`` enum and every ``x-permissions``).
#: Policies may carry them so that Cloud policies and Terraform plans apply unchanged; a scope
#: no route asks for grants nothing here.
CLOUD_SCOPES: Final[frozenset[Scope]] = frozenset({
    "accesspolicies:read", "accesspolicies:write", "accesspolicies:delete", "billing-metrics:read",
    "metrics:read", "metrics:write", "metrics:delete", "metrics:import",
    "logs:read", "logs:write", "logs:delete", "traces:read", "traces:write", "traces:delete",
    "alerts:read", "alerts:write", "rules:read", "rules:write",
    "org-billing-info:read", "org-members:read", "org-members:write", "org-members:delete",
    "orgs:read", "orgs:write", "stack-config:read", "stack-regions:read",
    "stack-plugins:read", "stack-plugins:write", "stack-plugins:delete", "stack-service-accounts:write",
    "stack-users:read", "stacks:read", "stacks:write", "stacks:delete", "staff-org-members:write",
})

#: The scopes the gateway knows by name: the served ones and the Cloud catalogue (the config endpoint's list).
ALL_SCOPES: Final[frozenset[Scope]] = SERVED_SCOPES | CLOUD_SCOPES

#: Cloud's scope syntax: a service and a permission, each lowercase letters, digits, '-', '_' and '.',
#: starting with a letter (``stacks:read``, ``fleet-management:read``, ``datasources.permissions:write``).
MAX_SCOPE_LEN: Final = 128
SCOPE_PATTERN: Final = r"[a-z][a-z0-9._-]*:[a-z][a-z0-9._-]*"
_SCOPE_RE: Final = re.compile(SCOPE_PATTERN)

#: One-line descriptions for ``GET /api/v1/accesspolicies/config``, by service.
SERVICE_DESCRIPTIONS: Final[dict[str, str]] = {
    "metrics": "metrics (Mimir)", "logs": "logs (Loki)", "traces": "traces (Tempo)",
    "profiles": "profiles", "alerts": "the Alertmanager", "rules": "recording and alerting rules",
    "accesspolicies": "access policies and tokens", "datasources": "data sources and their team LBAC rules",
    "datasources.permissions": "the team LBAC rules of data sources",
}


def scope(service: str, action: str) -> Scope:
    """Build a scope string; raises ValueError for one outside the vocabulary."""
    s = f"{service}:{action}"
    if s not in ALL_SCOPES:
        raise ValueError(f"unknown scope {s!r}")
    return s


def is_valid_scope(value: object) -> bool:
    """Any scope of Cloud's syntax, served or not (matched whole: no trailing newline)."""
    return isinstance(value, str) and len(value) <= MAX_SCOPE_LEN and _SCOPE_RE.fullmatch(value) is not None


def enforced(scope_: Scope) -> bool:
    """Whether the gateway grants anything for ``scope_`` (a route or admin call asks for it)."""
    return scope_ in SERVED_SCOPES
