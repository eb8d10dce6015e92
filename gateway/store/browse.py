"""Numbered pages of access policies for the page: the total count and previous/next, which the API's
forward-only cursors cannot give. Offsets are fine here: a person pages through tens of pages, not
millions of rows, and the filters are the page's own (text, realm, status).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from gateway.policy.model import AccessPolicy
from gateway.store import AdminScope, Store, _like, _scope_sql, policy_from_row


def _conditions(scope: AdminScope, filters: Mapping[str, str]) -> tuple[list[str], list[Any]]:
    args: list[Any] = []
    conds = [_scope_sql(scope, args)]
    if filters.get("text"):
        args.append(_like(filters["text"]))
        conds.append(f"(p.name ILIKE ${len(args)} OR p.display_name ILIKE ${len(args)})")
    if filters.get("status"):
        args.append(filters["status"])
        conds.append(f"p.status = ${len(args)}")
    if filters.get("realmType"):
        realm = {"type": filters["realmType"]}
        if filters.get("realmIdentifier"):
            realm["identifier"] = filters["realmIdentifier"]
        args.append([realm])
        conds.append(f"p.realms @> ${len(args)}::jsonb")
    return conds, args


async def policy_page(store: Store, scope: AdminScope, filters: Mapping[str, str], size: int, offset: int
                      ) -> tuple[list[AccessPolicy], int]:
    """One page of the policies matching ``filters`` (oldest first, as the API lists them) and how many match."""
    conds, args = _conditions(scope, filters)
    where = " AND ".join(conds)
    rows = await store.pool.fetch(
        f"SELECT p.*, count(*) OVER () AS total FROM access_policies p WHERE {where}"
        f" ORDER BY p.created_at, p.id LIMIT ${len(args) + 1} OFFSET ${len(args) + 2}", *args, size, offset)
    if rows:
        return [policy_from_row(r) for r in rows], int(rows[0]["total"])
    total = await store.pool.fetchval(f"SELECT count(*) FROM access_policies p WHERE {where}", *args)
    return [], int(total)
