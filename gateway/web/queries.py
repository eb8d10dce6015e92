"""The one query the page needs that the store lacks: policies whose name or display name contain a text.

Same keyset pagination (created_at, id) and cursor format as ``Store.list_policies``, and the
store's own scope condition, so a page of search results is exactly what that admin may see.
"""

from __future__ import annotations

import uuid
from typing import Any

from gateway.store import AdminScope, BadCursor, Page, Store, _scope_sql, decode_cursor, encode_cursor, policy_from_row


def _like(text: str) -> str:
    """A LIKE pattern matching ``text`` anywhere, its own % and _ taken literally."""
    return "%" + text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


async def search_policies(store: Store, scope: AdminScope, text: str, filters: dict[str, str], page_size: int,
                          cursor: str | None) -> Page:
    """Like ``Store.list_policies`` (filters ``realmType``, ``realmIdentifier``, ``status``) plus a text match."""
    args: list[Any] = []
    conds = [_scope_sql(scope, args)]
    args.append(_like(text))
    conds.append(f"(p.name ILIKE ${len(args)} OR p.display_name ILIKE ${len(args)})")
    if "status" in filters:
        args.append(filters["status"])
        conds.append(f"p.status = ${len(args)}")
    if "realmType" in filters:
        realm = {"type": filters["realmType"]}
        if "realmIdentifier" in filters:
            realm["identifier"] = filters["realmIdentifier"]
        args.append([realm])
        conds.append(f"p.realms @> ${len(args)}::jsonb")
    if cursor:
        at, rid = decode_cursor(cursor)
        if not isinstance(rid, uuid.UUID):
            raise BadCursor("pageCursor is not a cursor this page issued")
        args += [at, rid]
        conds.append(f"(p.created_at, p.id) > (${len(args) - 1}, ${len(args)})")
    args.append(page_size + 1)
    rows = await store.pool.fetch(
        f"SELECT p.* FROM access_policies p WHERE {' AND '.join(conds)} ORDER BY p.created_at, p.id"  # noqa: S608
        f" LIMIT ${len(args)}", *args)
    more = len(rows) > page_size
    rows = rows[:page_size]
    nxt = encode_cursor(rows[-1]["created_at"], rows[-1]["id"]) if more else None
    return Page([policy_from_row(r) for r in rows], nxt)
