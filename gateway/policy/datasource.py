"""Grafana data-source team LBAC rules applied at query time (placeholder until it lands)."""

from __future__ import annotations

from typing import Any

from gateway.policy.selector import Selector


def user_policies(cache: Any, policy_id: str, backend: str, tenant: str, user: str | None) -> tuple[Selector, ...]:
    """The union of the rules of ``user``'s teams on the data sources using ``policy_id``; () = none."""
    return ()
