"""The scope vocabulary: `service:action`, exactly one colon (REFERENCE.md section 3)."""

from __future__ import annotations

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

ALL_SCOPES: Final[frozenset[Scope]] = frozenset(
    f"{service}:{action}" for service, actions in SCOPE_GROUPS.items() for action in actions
)


def scope(service: str, action: str) -> Scope:
    """Build a scope string; raises ValueError for one outside the vocabulary."""
    s = f"{service}:{action}"
    if s not in ALL_SCOPES:
        raise ValueError(f"unknown scope {s!r}")
    return s


def is_valid_scope(value: object) -> bool:
    return isinstance(value, str) and value in ALL_SCOPES
