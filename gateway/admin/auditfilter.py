"""The audit log's filters, shared by ``GET /api/v1/auditlog`` and the page: who, what kind, which, when."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any, Final

from gateway.admin import validate as v
from gateway.admin.errors import ApiError

RESOURCE_TYPES: Final = ("accesspolicy", "token", "datasource", "team")


def audit_filters(query: Mapping[str, str]) -> dict[str, Any]:
    """``actor`` (token ids, comma-separated, or ``cli``), ``resourceType``, ``resource`` (an id or a name),
    ``since`` and ``until`` (RFC 3339; since inclusive, until exclusive) → the store's filters."""
    out: dict[str, Any] = {}
    actor = query.get("actor", "").strip()
    if actor:
        out["actor"] = [a.strip() for a in actor.split(",") if a.strip()]
    rtype = query.get("resourceType", "").strip()
    if rtype:
        if rtype not in RESOURCE_TYPES:
            raise ApiError(400, "invalid_argument", f"resourceType must be one of {', '.join(RESOURCE_TYPES)}",
                           "resourceType")
        out["resourceType"] = rtype
    resource = query.get("resource", "").strip()
    if resource:
        out["resource"] = resource
    for key in ("since", "until"):
        raw = query.get(key, "").strip()
        if raw:
            out[key] = v.timestamp(raw, key)
    if isinstance(out.get("since"), datetime) and isinstance(out.get("until"), datetime) \
            and out["since"] >= out["until"]:
        raise ApiError(400, "invalid_argument", "since must be before until", "since")
    return out
