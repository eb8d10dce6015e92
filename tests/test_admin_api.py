"""The Access Policies and Tokens API against the real database, every call and error."""

from __future__ import annotations

import asyncio
import io
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest

from tests.conftest import Gateway

P = "/api/v1/accesspolicies"
T = "/api/v1/tokens"


async def test_policy_crud_round_trip(gw: Gateway) -> None:
    created = await gw.policy("readers", ["metrics:read", "logs:read"], [
        {"type": "stack", "identifier": "100", "labelPolicies": [{"selector": '{env="dev"}'}]}],
        subnets=["10.0.0.0/8", "2001:db8::/32"])
    assert created["name"] == "readers" and created["displayName"] == "readers"
    assert created["orgId"] == "1" and created["status"] == "active"
    assert created["realms"] == [{"type": "stack", "identifier": "100",
                                  "labelPolicies": [{"selector": '{env="dev"}'}]}]
    assert created["conditions"] == {"allowedSubnets": ["10.0.0.0/8", "2001:db8::/32"]}
    assert created["createdAt"].endswith("Z")
    got = await gw.api("GET", f"{P}/{created['id']}")
    assert got == created
    updated = await gw.api("POST", f"{P}/{created['id']}", {"displayName": "Readers", "conditions": None,
                                                             "status": "inactive"})
    assert updated["displayName"] == "Readers" and updated["conditions"] == {"allowedSubnets": []}
    assert updated["status"] == "inactive" and updated["scopes"] == ["logs:read", "metrics:read"]
    await gw.api("DELETE", f"{P}/{created['id']}", expect=200)
    await gw.api("GET", f"{P}/{created['id']}", expect=404)


async def test_token_crud_and_secret_shown_once(gw: Gateway) -> None:
    p = await gw.policy("writers", ["metrics:write"])
    expires = (datetime.now(UTC) + timedelta(days=1)).replace(microsecond=0)
    t = await gw.token(p["id"], "agent-1", displayName="Agent", expiresAt=expires.isoformat())
    assert t["token"].startswith("glc_") and t["accessPolicyId"] == p["id"]
    assert t["expiresAt"] == expires.isoformat().replace("+00:00", "Z")
    got = await gw.api("GET", f"{T}/{t['id']}")
    assert "token" not in got and got["name"] == "agent-1" and got["firstUsedAt"] is None
    listed = await gw.api("GET", f"{T}?accessPolicyId={p['id']}")
    assert [i["id"] for i in listed["items"]] == [t["id"]] and "token" not in listed["items"][0]
    upd = await gw.api("POST", f"{T}/{t['id']}", {"expiresAt": None, "displayName": "A2"})
    assert upd["expiresAt"] is None and upd["displayName"] == "A2"
    await gw.api("DELETE", f"{T}/{t['id']}", expect=200)
    await gw.api("GET", f"{T}/{t['id']}", expect=404)


async def test_no_plaintext_secret_in_database(gw: Gateway, db_dsn: str) -> None:
    p = await gw.policy("s", ["metrics:read"])
    t = await gw.token(p["id"], "tok")
    import base64
    import json
    raw = t["token"][4:]
    secret = json.loads(base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)))["k"]
    conn = await asyncpg.connect(db_dsn)
    try:
        tables = [r["tablename"] for r in await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname='public'")]
        for table in tables:
            dump = await conn.fetchval(f"SELECT coalesce(string_agg(x::text, ''), '') FROM {table} x")
            assert secret not in dump and t["token"] not in dump, table
            assert raw[:40] not in dump
    finally:
        await conn.close()


async def test_expired_tokens_stay_visible(gw: Gateway, db_dsn: str) -> None:
    p = await gw.policy("e", ["metrics:read"])
    t = await gw.token(p["id"], "soon", expiresAt=(datetime.now(UTC) + timedelta(seconds=1)).isoformat())
    await asyncio.sleep(1.2)
    got = await gw.api("GET", f"{T}/{t['id']}")
    assert got["expiresAt"] is not None
    resp = await gw.client.get(P, headers=gw.auth(t["token"]))
    assert resp.status == 401 and (await resp.json())["message"] == "token expired"


async def test_pagination_across_pages(gw: Gateway) -> None:
    ids = [(await gw.policy(f"p{i:02d}", ["metrics:read"]))["id"] for i in range(7)]
    seen: list[str] = []
    url: str | None = f"{P}?pageSize=3&region=local"
    pages = 0
    while url:
        page = await gw.api("GET", url)
        assert page["metadata"]["pagination"]["pageSize"] == 3
        seen += [i["id"] for i in page["items"]]
        url = page["metadata"]["pagination"]["nextPage"]
        pages += 1
        assert url is None or "region=local" in url
    assert pages == 3
    assert [s for s in seen if s in ids] == ids  # the bootstrap policy comes first, then ours in order
    assert len(seen) == 8


async def test_token_pagination_and_filters(gw: Gateway) -> None:
    p1 = await gw.policy("a", ["metrics:read"], [{"type": "stack", "identifier": "100"}])
    p2 = await gw.policy("b", ["metrics:read"], [{"type": "stack", "identifier": "101"}])
    for i in range(4):
        await gw.token(p1["id"], f"a{i}")
    await gw.token(p2["id"], "b0", expiresAt="2099-01-01T00:00:00Z")
    page = await gw.api("GET", f"{T}?accessPolicyName=a&pageSize=3")
    assert len(page["items"]) == 3 and page["metadata"]["pagination"]["nextPage"]
    page2 = await gw.api("GET", page["metadata"]["pagination"]["nextPage"])
    assert len(page2["items"]) == 1 and page2["metadata"]["pagination"]["nextPage"] is None
    by_realm = await gw.api("GET", f"{T}?accessPolicyRealmType=stack&accessPolicyRealmIdentifier=101")
    assert [i["name"] for i in by_realm["items"]] == ["b0"]
    exp = await gw.api("GET", f"{T}?expiresAfter=2098-01-01T00:00:00Z")
    assert [i["name"] for i in exp["items"]] == ["b0"]
    assert (await gw.api("GET", f"{T}?name=a2"))["items"][0]["name"] == "a2"


async def test_policy_filters(gw: Gateway) -> None:
    await gw.policy("s100", ["metrics:read"], [{"type": "stack", "identifier": "100"}])
    await gw.policy("s101", ["metrics:read"], [{"type": "stack", "identifier": "101"}])
    names = lambda page: sorted(i["name"] for i in page["items"])  # noqa: E731
    assert names(await gw.api("GET", f"{P}?realmType=stack&realmIdentifier=101")) == ["s101"]
    assert names(await gw.api("GET", f"{P}?realmType=stack")) == ["s100", "s101"]
    assert names(await gw.api("GET", f"{P}?name=s100")) == ["s100"]
    assert names(await gw.api("GET", f"{P}?status=inactive")) == []


async def test_stack_realm_admin_is_confined_to_its_stack(gw: Gateway) -> None:
    other = await gw.policy("on-101", ["metrics:read"], [{"type": "stack", "identifier": "101"}])
    admin_p = await gw.policy("stack-admin", ["accesspolicies:read", "accesspolicies:write",
                                              "accesspolicies:delete"], [{"type": "stack", "identifier": "100"}])
    admin = (await gw.token(admin_p["id"], "sa"))["token"]
    mine = await gw.policy("mine", ["metrics:read"], [{"type": "stack", "identifier": "100"}], token=admin)
    listed = await gw.api("GET", P, token=admin)
    assert sorted(i["name"] for i in listed["items"]) == ["mine", "stack-admin"]
    await gw.api("GET", f"{P}/{other['id']}", token=admin, expect=404)
    await gw.api("DELETE", f"{P}/{other['id']}", token=admin, expect=404)
    err = await gw.api("POST", P, {"name": "x", "scopes": ["metrics:read"],
                                   "realms": [{"type": "org", "identifier": "1"}]}, token=admin, expect=403)
    assert err["field"] == "realms[0].identifier"
    err = await gw.api("POST", f"{P}/{mine['id']}", {"realms": [{"type": "stack", "identifier": "101"}]},
                       token=admin, expect=403)
    await gw.api("POST", T, {"accessPolicyId": other["id"], "name": "steal"}, token=admin, expect=409)
    await gw.api("GET", "/api/v1/auditlog", token=admin, expect=403)
    await gw.api("DELETE", f"{P}/{mine['id']}", token=admin, expect=200)


async def test_other_org_is_invisible(gw: Gateway) -> None:
    err = await gw.api("POST", P, {"name": "x", "scopes": ["metrics:read"],
                                   "realms": [{"type": "stack", "identifier": "200"}]}, expect=403)
    assert "another org" in err["message"]


async def test_scopes_required_per_call(gw: Gateway) -> None:
    ro = await gw.policy("ro", ["accesspolicies:read"])
    tok = (await gw.token(ro["id"], "ro"))["token"]
    await gw.api("GET", P, token=tok)
    err = await gw.api("POST", P, {"name": "x", "scopes": ["metrics:read"],
                                   "realms": [{"type": "org", "identifier": "1"}]}, token=tok, expect=403)
    assert "accesspolicies:write" in err["message"]
    await gw.api("DELETE", f"{P}/{ro['id']}", token=tok, expect=403)
    data_only = await gw.policy("data", ["metrics:read"])
    dtok = (await gw.token(data_only["id"], "d"))["token"]
    await gw.api("GET", P, token=dtok, expect=403)


async def test_audit_log_records_every_mutation(gw: Gateway) -> None:
    p = await gw.policy("aud", ["metrics:read"])
    t = await gw.token(p["id"], "t1")
    await gw.api("POST", f"{P}/{p['id']}", {"displayName": "Audited"})
    await gw.api("DELETE", f"{T}/{t['id']}", expect=200)
    await gw.api("DELETE", f"{P}/{p['id']}", expect=200)
    log = await gw.api("GET", "/api/v1/auditlog?pageSize=5")
    actions = [e["action"] for e in log["items"]]
    assert actions == ["accesspolicy.delete", "token.delete", "accesspolicy.update", "token.create",
                       "accesspolicy.create"]
    upd = log["items"][2]
    assert upd["before"]["displayName"] == "aud" and upd["after"]["displayName"] == "Audited"
    assert upd["actor"] and upd["resourceId"] == p["id"]
    assert "token" not in (log["items"][3]["after"] or {})
    nxt = await gw.api("GET", log["metadata"]["pagination"]["nextPage"])
    assert nxt["items"]  # the bootstrap entries


async def test_usage_is_tracked_in_batches(gw: Gateway) -> None:
    p = await gw.policy("use", ["accesspolicies:read"])
    t = await gw.token(p["id"], "u")
    for _ in range(3):
        await gw.api("GET", P, token=t["token"])
    await gw.state.cache.flush_usage()
    got = await gw.api("GET", f"{T}/{t['id']}")
    assert got["firstUsedAt"] and got["lastUsedAt"] and got["firstUsedAt"] <= got["lastUsedAt"]


# ---- errors ------------------------------------------------------------------------------------------

BAD_POLICY_BODIES: list[tuple[Any, int, str | None]] = [
    ({"scopes": ["metrics:read"], "realms": [{"type": "org", "identifier": "1"}]}, 409, "name"),
    ({"name": "x" * 256, "scopes": ["metrics:read"], "realms": [{"type": "org", "identifier": "1"}]}, 409, "name"),
    ({"name": "bad\tname", "scopes": ["metrics:read"], "realms": [{"type": "org", "identifier": "1"}]}, 409, "name"),
    ({"name": "x", "scopes": [], "realms": [{"type": "org", "identifier": "1"}]}, 409, "scopes"),
    ({"name": "x", "scopes": ["Metrics:Read"], "realms": [{"type": "org", "identifier": "1"}]}, 409, "scopes[0]"),
    ({"name": "x", "scopes": "metrics:read", "realms": [{"type": "org", "identifier": "1"}]}, 409, "scopes"),
    ({"name": "x", "scopes": ["metrics:read"], "realms": []}, 409, "realms"),
    ({"name": "x", "scopes": ["metrics:read"], "realms": [{"type": "galaxy", "identifier": "1"}]}, 409,
     "realms[0].type"),
    ({"name": "x", "scopes": ["metrics:read"], "realms": [{"type": "stack", "identifier": "999"}]}, 409,
     "realms[0].identifier"),
    ({"name": "x", "scopes": ["metrics:read"], "realms": [{"type": "org", "identifier": "1",
                                                           "labelPolicies": [{"selector": "{env="}]}]}, 409,
     "realms[0].labelPolicies[0].selector"),
    ({"name": "x", "scopes": ["metrics:read"], "realms": [{"type": "org", "identifier": "1",
                                                           "labelPolicies": [{"selector": '{a=~"("}'}]}]}, 409,
     "realms[0].labelPolicies[0].selector"),
    ({"name": "x", "scopes": ["metrics:read"], "realms": [{"type": "org", "identifier": "1"}],
      "conditions": {"allowedSubnets": ["10.0.0.0/33"]}}, 409, "conditions.allowedSubnets[0]"),
    ({"name": "x", "scopes": ["metrics:read"], "realms": [{"type": "org", "identifier": "1"}],
      "conditions": {"allowedSubnets": ["not-an-ip"]}}, 409, "conditions.allowedSubnets[0]"),
    ({"name": "x", "scopes": ["metrics:read"], "realms": [{"type": "org", "identifier": "1"}], "extra": 1},
     409, "extra"),
    ([1, 2], 409, None),
    ("just a string", 409, None),
]


@pytest.mark.parametrize("body, status, field", BAD_POLICY_BODIES)
async def test_invalid_policy_bodies(gw: Gateway, body: Any, status: int, field: str | None) -> None:
    err = await gw.api("POST", P, body, expect=status)
    assert err["code"] == "Conflict" and err["message"]  # the spec's "Invalid arguments" answer
    assert err.get("field") == field


async def test_duplicate_name_is_409(gw: Gateway) -> None:
    await gw.policy("dup", ["metrics:read"])
    err = await gw.api("POST", P, {"name": "dup", "scopes": ["metrics:read"],
                                   "realms": [{"type": "org", "identifier": "1"}]}, expect=409)
    assert err["code"] == "Conflict" and err["field"] == "name"
    p = await gw.policy("t", ["metrics:read"])
    await gw.token(p["id"], "same")
    await gw.api("POST", T, {"accessPolicyId": p["id"], "name": "same"}, expect=409)


async def test_name_cannot_change(gw: Gateway) -> None:
    p = await gw.policy("fixed", ["metrics:read"])
    err = await gw.api("POST", f"{P}/{p['id']}", {"name": "renamed"}, expect=409)
    assert err["field"] == "name"


async def test_raw_body_errors(gw: Gateway) -> None:
    h = gw.auth()
    r = await gw.client.post(P, data=b"{not json", headers={**h, "Content-Type": "application/json"})
    assert r.status == 409 and (await r.json())["message"] == "request body is not valid JSON"
    r = await gw.client.post(P, data=b"name=x", headers={**h, "Content-Type": "application/x-www-form-urlencoded"})
    assert r.status == 415 and (await r.json())["code"] == "unsupported_media_type"
    big = b'{"name": "' + b"x" * (10 * 1024 * 1024) + b'"}'
    r = await gw.client.post(P, data=io.BytesIO(big), headers={**h, "Content-Type": "application/json"})
    assert r.status == 413 and (await r.json())["code"] == "payload_too_large"


@pytest.mark.parametrize("header, message", [
    (None, "missing Authorization: Bearer <token>"),
    ("Basic abc", "missing Authorization: Bearer <token>"),
    ("Bearer glc_!!!", "invalid token: malformed token"),
    ("Bearer not-a-token", "invalid token: malformed token"),
])
async def test_unauthenticated(gw: Gateway, header: str | None, message: str) -> None:
    r = await gw.client.get(P, headers={"Authorization": header} if header else {})
    assert r.status == 401 and r.headers["WWW-Authenticate"].startswith("Bearer")
    body = await r.json()
    assert body == {"code": "InvalidCredentials", "message": message}


async def test_unknown_and_malformed_ids(gw: Gateway) -> None:
    await gw.api("GET", f"{P}/00000000-0000-0000-0000-000000000000", expect=404)
    await gw.api("GET", f"{P}/not-a-uuid", expect=404)
    await gw.api("GET", f"{T}/not-a-uuid", expect=404)
    err = await gw.api("POST", T, {"accessPolicyId": "nope", "name": "x"}, expect=409)
    assert err["field"] == "accessPolicyId"
    err = await gw.api("POST", T, {"accessPolicyId": "00000000-0000-0000-0000-000000000000", "name": "x"},
                       expect=409)


@pytest.mark.parametrize("query, field", [("pageSize=0", "pageSize"), ("pageSize=501", "pageSize"),
                                          ("pageSize=abc", "pageSize"), ("pageCursor=%%%", "pageCursor"),
                                          ("realmIdentifier=1", "realmIdentifier"), ("realmType=x", "realmType"),
                                          ("region=mars", "region"), ("status=sleepy", "status")])
async def test_bad_list_parameters(gw: Gateway, query: str, field: str) -> None:
    err = await gw.api("GET", f"{P}?{query}", expect=409)
    assert err["field"] == field


@pytest.mark.parametrize("body, field", [
    ({"accessPolicyId": "00000000-0000-0000-0000-000000000000", "name": "x", "expiresAt": "tomorrow"}, "expiresAt"),
    ({"accessPolicyId": "00000000-0000-0000-0000-000000000000", "name": "x",
      "expiresAt": "2001-01-01T00:00:00Z"}, "expiresAt"),
    ({"accessPolicyId": "00000000-0000-0000-0000-000000000000", "name": "x",
      "expiresAt": "2099-01-01T00:00:00"}, "expiresAt"),
    ({"name": "x"}, "accessPolicyId"),
    ({"accessPolicyId": "00000000-0000-0000-0000-000000000000", "name": "x", "scopes": []}, "scopes"),
])
async def test_invalid_token_bodies(gw: Gateway, body: Any, field: str) -> None:
    err = await gw.api("POST", T, body, expect=409)
    assert err["field"] == field


async def test_deleting_a_policy_revokes_its_tokens_at_once(gw: Gateway) -> None:
    p = await gw.policy("gone", ["accesspolicies:read"])
    t = (await gw.token(p["id"], "t"))["token"]
    await gw.api("GET", P, token=t)
    await gw.api("DELETE", f"{P}/{p['id']}", expect=200)
    r = await gw.client.get(P, headers=gw.auth(t))
    assert r.status == 401


async def test_health_and_ready(gw: Gateway) -> None:
    r = await gw.client.get("/health")
    assert r.status == 200
    r = await gw.client.get("/ready")
    body = await r.json()
    assert r.status == 200 and body["status"] == "ready" and body["database"] == "ok"
    assert body["policies"] >= 1 and body["tokens"] >= 1
