"""The JSON shapes of REFERENCE.md section 1 (camelCase, RFC 3339), field for field as Grafana
Cloud's OpenAPI spec names them (``AuthAccessPolicy``, ``AuthToken``)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from gateway.policy.model import AccessPolicy, Realm, Token

#: ``AuthAccessPolicy.source``: every policy here is made by a user (``cloud`` needs a system token).
POLICY_SOURCE = "user"


def rfc3339(dt: datetime | None) -> str | None:
    if dt is None:
        return None
    return dt.astimezone(UTC).isoformat().replace("+00:00", "Z")


def realm_json(r: Realm) -> dict[str, Any]:
    """A realm as the client wrote it: an org given by its slug reads back as that slug."""
    return {"type": r.type, "identifier": r.written if r.written is not None else r.identifier,
            "labelPolicies": [{"selector": s.text} for s in r.label_policies]}


def _updated(created: datetime | None, updated: datetime | None) -> dict[str, Any]:
    """``updatedAt`` only once the object was updated, as on the Cloud (the provider's tests expect none before)."""
    return {} if updated is None or updated == created else {"updatedAt": rfc3339(updated)}


def policy_json(p: AccessPolicy) -> dict[str, Any]:
    """Selectors and subnets come back exactly as written; ``attributes`` only when set."""
    out: dict[str, Any] = {
        "id": p.id, "orgId": p.org_id, "name": p.name, "displayName": p.display_name,
        "scopes": sorted(p.scopes), "realms": [realm_json(r) for r in p.realms],
        "conditions": {"allowedSubnets": list(p.subnet_text())},
        "status": p.status, "source": POLICY_SOURCE,
        "createdAt": rfc3339(p.created_at), **_updated(p.created_at, p.updated_at),
    }
    if p.attributes_json is not None:
        out["attributes"] = json.loads(p.attributes_json)
    return out


def token_json(t: Token) -> dict[str, Any]:
    return {
        "id": t.id, "accessPolicyId": t.access_policy_id, "orgId": t.org_id, "name": t.name,
        "displayName": t.display_name,
        "expiresAt": rfc3339(t.expires_at), "firstUsedAt": rfc3339(t.first_used_at),
        "lastUsedAt": rfc3339(t.last_used_at), "createdAt": rfc3339(t.created_at),
        **_updated(t.created_at, t.updated_at),
    }


def audit_json(row: dict[str, Any]) -> dict[str, Any]:
    return {"id": row["id"], "at": rfc3339(row["at"]), "orgId": row["org_id"], "actor": row["actor"],
            "action": row["action"], "resourceType": row["resource_type"], "resourceId": row["resource_id"],
            "before": row["before"], "after": row["after"]}
