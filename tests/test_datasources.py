"""Data sources, teams and the Data Source LBAC rules API (seed 003) against the real database,
and the rules applied at query time through a recording upstream in header mode."""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

from gateway.cache import PolicyCache
from tests.conftest import Gateway, bootstrap_token
from tests.test_proxy import Env, _env, basic

DS = "/api/datasources"
TEAMS = "/api/teams"
HDR = "X-Prom-Label-Policy"
DEV = "100:%7Benv=%22dev%22%7D"
PROD = "100:%7Benv=%22prod%22%7D"
Q = "/prometheus/api/v1/query?query=up"


def rule(value: str) -> dict[str, str]:
    return {"header": HDR, "value": value}


async def reader_policy(gw: Gateway, scopes: list[str] | None = None, realms: list[dict[str, Any]] | None = None,
                        name: str | None = None) -> dict[str, Any]:
    return await gw.policy(name or f"ds-{os.urandom(3).hex()}", scopes or ["metrics:read", "logs:read"],
                           realms or [{"type": "stack", "identifier": "100"}])


async def datasource(gw: Gateway, uid: str, policy_id: str, type_: str = "prometheus", **kw: Any) -> dict[str, Any]:
    return await gw.api("POST", DS, {"uid": uid, "name": kw.pop("name", uid), "type": type_,
                                     "accessPolicyId": policy_id, **kw})


async def team(gw: Gateway, name: str, members: list[str] | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"name": name}
    if members is not None:
        body["members"] = members
    return await gw.api("POST", TEAMS, body)


async def scoped_token(gw: Gateway, scopes: list[str], realms: list[dict[str, Any]] | None = None) -> str:
    p = await gw.policy(f"adm-{os.urandom(3).hex()}", scopes, realms)
    return str((await gw.token(p["id"], p["name"]))["token"])


async def expect_error(gw: Gateway, method: str, path: str, body: Any, status: int, field: str | None = None,
                       token: str | None = None) -> dict[str, Any]:
    resp = await gw.client.request(method, path, json=body, headers=gw.auth(token))
    data = await resp.json()
    assert resp.status == status, (resp.status, data, body)
    if field is not None:
        assert data.get("field") == field, (data, body)
    return data


# ---- data sources -----------------------------------------------------------------------------------

async def test_datasource_crud_round_trip(gw: Gateway) -> None:
    p = await reader_policy(gw)
    created = await datasource(gw, "prom-a", p["id"], name="Prom A")
    assert created["uid"] == "prom-a" and created["name"] == "Prom A" and created["type"] == "prometheus"
    assert created["accessPolicyId"] == p["id"] and created["orgId"] == "1" and isinstance(created["id"], int)
    assert created["createdAt"].endswith("Z")
    assert await gw.api("GET", f"{DS}/uid/prom-a") == created
    loki = await datasource(gw, "loki-a", p["id"], "loki")
    generated = await gw.api("POST", DS, {"name": "No uid", "type": "loki", "accessPolicyId": (
        await reader_policy(gw))["id"]})
    assert generated["uid"] and len(generated["uid"]) <= 40

    page1 = await gw.api("GET", f"{DS}?pageSize=2")
    assert [d["uid"] for d in page1["items"]] == ["prom-a", "loki-a"]
    nxt = page1["metadata"]["pagination"]["nextPage"]
    assert nxt and (await gw.api("GET", nxt))["items"][0]["uid"] == generated["uid"]
    assert [d["uid"] for d in (await gw.api("GET", f"{DS}?type=loki&accessPolicyId={p['id']}"))["items"]] == [
        "loki-a"]
    assert (await gw.api("GET", f"{DS}?name=Prom%20A"))["items"] == [created]

    updated = await gw.api("PUT", f"{DS}/uid/prom-a", {"name": "Prom A2", "uid": "prom-a"})
    assert updated["name"] == "Prom A2" and updated["id"] == created["id"]
    await gw.api("DELETE", f"{DS}/uid/prom-a", expect=204)
    await gw.api("GET", f"{DS}/uid/prom-a", expect=404)
    await gw.api("DELETE", f"{DS}/uid/prom-a", expect=404)
    await gw.api("PUT", f"{DS}/uid/prom-a", {"name": "x"}, expect=404)
    assert loki["type"] == "loki"


async def test_datasource_conflicts_are_409(gw: Gateway) -> None:
    p, q = await reader_policy(gw), await reader_policy(gw)
    await datasource(gw, "a", p["id"], name="A")
    for body, field in (({"uid": "a", "name": "B", "type": "prometheus", "accessPolicyId": q["id"]}, "uid"),
                        ({"uid": "b", "name": "A", "type": "prometheus", "accessPolicyId": q["id"]}, "name"),
                        # one data source per (policy, type): a token must say which data source it is
                        ({"uid": "b", "name": "B", "type": "prometheus", "accessPolicyId": p["id"]},
                         "accessPolicyId")):
        await expect_error(gw, "POST", DS, body, 409, field)
    await datasource(gw, "b", p["id"], "loki", name="B")  # same policy, other type: fine
    await expect_error(gw, "PUT", f"{DS}/uid/b", {"name": "A"}, 409, "name")


async def test_datasource_invalid_bodies_are_400_naming_the_field(gw: Gateway) -> None:
    good = await reader_policy(gw)
    logs_only = await reader_policy(gw, ["logs:read"])
    metrics_only = await reader_policy(gw, ["metrics:read"])
    labelled = await reader_policy(gw, realms=[{"type": "stack", "identifier": "100",
                                                "labelPolicies": [{"selector": '{env="dev"}'}]}])
    other_org_admin = await bootstrap_token(gw.state, "2")
    other = await gw.api("POST", "/api/v1/accesspolicies", {
        "name": "o", "scopes": ["metrics:read"], "realms": [{"type": "org", "identifier": "2"}]},
        token=other_org_admin)
    base = {"uid": "x", "name": "X", "type": "prometheus", "accessPolicyId": good["id"]}
    cases: list[tuple[Any, str | None]] = [
        ([], None),
        ({**base, "url": "http://x"}, "url"),
        ({k: v for k, v in base.items() if k != "name"}, "name"),
        ({**base, "name": ""}, "name"),
        ({**base, "name": "n" * 191}, "name"),
        ({**base, "type": "graphite"}, "type"),
        ({k: v for k, v in base.items() if k != "type"}, "type"),
        ({**base, "uid": "bad uid!"}, "uid"),
        ({**base, "uid": "u" * 41}, "uid"),
        ({**base, "accessPolicyId": "not-a-uuid"}, "accessPolicyId"),
        ({k: v for k, v in base.items() if k != "accessPolicyId"}, "accessPolicyId"),
        ({**base, "accessPolicyId": "00000000-0000-0000-0000-000000000000"}, "accessPolicyId"),
        ({**base, "accessPolicyId": other["id"]}, "accessPolicyId"),  # another org's policy
        ({**base, "accessPolicyId": logs_only["id"]}, "accessPolicyId"),  # prometheus needs metrics:read
        ({**base, "type": "loki", "accessPolicyId": (await reader_policy(gw, ["metrics:read"]))["id"]},
         "accessPolicyId"),  # loki needs logs:read
        ({**base, "accessPolicyId": labelled["id"]}, "accessPolicyId"),  # label policies are not allowed
    ]
    for body, field in cases:
        await expect_error(gw, "POST", DS, body, 400, field)
    assert (await gw.api("GET", DS))["items"] == []
    await datasource(gw, "x", good["id"])
    for body, field in [({"uid": "y"}, "uid"), ({"type": "influx"}, "type"), ({"name": None}, "name"),
                        ({"accessPolicyId": logs_only["id"]}, "accessPolicyId"),
                        ({"accessPolicyId": labelled["id"]}, "accessPolicyId"),
                        ({"type": "loki", "accessPolicyId": metrics_only["id"]}, "accessPolicyId"),
                        ({"bogus": 1}, "bogus")]:
        await expect_error(gw, "PUT", f"{DS}/uid/x", body, 400, field)
    await expect_error(gw, "GET", f"{DS}?type=graphite", None, 400, "type")
    await expect_error(gw, "GET", f"{DS}?pageSize=0", None, 400, "pageSize")
    await expect_error(gw, "GET", f"{DS}?pageCursor=zzz", None, 400, "pageCursor")
    moved = await gw.api("PUT", f"{DS}/uid/x", {"type": "loki", "accessPolicyId": (
        await reader_policy(gw, ["logs:read"]))["id"]})
    assert moved["type"] == "loki"


async def test_datasource_with_rules_cannot_move_and_delete_needs_permissions(gw: Gateway) -> None:
    p = await reader_policy(gw)
    t = await team(gw, "devs", ["alice"])
    await datasource(gw, "a", p["id"])
    await gw.api("PUT", f"{DS}/a/lbac/teams", {"teamId": t["id"], "rules": [rule('100:{env="dev"}')]})
    await expect_error(gw, "PUT", f"{DS}/uid/a", {"accessPolicyId": (await reader_policy(gw))["id"]}, 400,
                       "accessPolicyId")
    await expect_error(gw, "PUT", f"{DS}/uid/a", {"type": "loki"}, 400, "type")
    writer = await scoped_token(gw, ["datasources:read", "datasources:write"])
    await expect_error(gw, "DELETE", f"{DS}/uid/a", None, 403, token=writer)
    await gw.api("PUT", f"{DS}/a/lbac/teams", {"rules": []})
    await gw.api("PUT", f"{DS}/uid/a", {"type": "loki"})
    await gw.api("DELETE", f"{DS}/uid/a", token=writer, expect=204)


async def test_deleting_the_policy_deletes_its_datasources(gw: Gateway) -> None:
    p = await reader_policy(gw)
    created = await datasource(gw, "a", p["id"])
    await gw.api("DELETE", f"/api/v1/accesspolicies/{p['id']}")
    await gw.api("GET", f"{DS}/uid/a", expect=404)
    deadline = time.monotonic() + 1.0  # the NOTIFY of the cascaded delete
    while created["id"] in gw.state.cache.datasources:
        assert time.monotonic() < deadline, "cascaded delete not seen by the cache within 1 s"
        await asyncio.sleep(0.01)


# ---- teams ------------------------------------------------------------------------------------------

async def test_team_crud_and_members(gw: Gateway) -> None:
    t = await team(gw, "Dev Team", ["alice", "bob", "Alice"])
    assert t["name"] == "Dev Team" and t["members"] == ["alice", "bob"] and t["memberCount"] == 2
    assert isinstance(t["id"], int) and t["uid"] and t["message"] == "Team created" and t["teamId"] == t["id"]
    got = await gw.api("GET", f"{TEAMS}/{t['id']}")
    assert got == {k: val for k, val in t.items() if k not in ("message", "teamId")}
    assert await gw.api("GET", f"{TEAMS}/uid/{t['uid']}") == got
    u = await gw.api("POST", TEAMS, {"name": "Ops", "uid": "ops"})
    assert u["uid"] == "ops" and u["members"] == []
    page = await gw.api("GET", f"{TEAMS}?pageSize=1")
    assert [x["id"] for x in page["items"]] == [t["id"]]
    assert [x["id"] for x in (await gw.api("GET", page["metadata"]["pagination"]["nextPage"]))["items"]] == [u["id"]]
    assert [x["id"] for x in (await gw.api("GET", f"{TEAMS}?uid=ops"))["items"]] == [u["id"]]
    assert [m["login"] for m in await gw.api("GET", f"{TEAMS}/{t['id']}/members")] == ["alice", "bob"]
    assert await gw.api("PUT", f"{TEAMS}/{t['id']}/members", {"members": ["carol", " dave "]}) == {
        "message": "Team memberships have been updated", "members": ["carol", "dave"]}
    renamed = await gw.api("PUT", f"{TEAMS}/{t['id']}", {"name": "Developers"})
    assert renamed["name"] == "Developers" and renamed["members"] == ["carol", "dave"]
    await expect_error(gw, "PUT", f"{TEAMS}/{t['id']}", {"name": "Ops"}, 409, "name")
    await expect_error(gw, "POST", TEAMS, {"name": "Ops"}, 409, "name")
    await expect_error(gw, "POST", TEAMS, {"name": "Other", "uid": "ops"}, 409, "uid")
    await gw.api("DELETE", f"{TEAMS}/{t['id']}")
    for method in ("GET", "DELETE"):
        await expect_error(gw, method, f"{TEAMS}/{t['id']}", None, 404)
    await expect_error(gw, "GET", f"{TEAMS}/{t['id']}/members", None, 404)
    await expect_error(gw, "PUT", f"{TEAMS}/{t['id']}/members", {"members": []}, 404)
    await expect_error(gw, "GET", f"{TEAMS}/abc", None, 404)


async def test_team_invalid_bodies_are_400_naming_the_field(gw: Gateway) -> None:
    t = await team(gw, "t")
    for body, field in [({}, "name"), ({"name": ""}, "name"), ({"name": 3}, "name"), ({"name": "x", "bad": 1}, "bad"),
                        ({"name": "x", "uid": "no spaces"}, "uid"), ({"name": "x", "members": "alice"}, "members"),
                        ({"name": "x", "members": ["ok", ""]}, "members[1]"),
                        ({"name": "x", "members": ["a\nb"]}, "members[0]"),
                        ({"name": "x", "members": [7]}, "members[0]")]:
        await expect_error(gw, "POST", TEAMS, body, 400, field)
    for body, field in [({"members": None}, "members"), ({"members": [None]}, "members[0]"), ({"x": 1}, "x"),
                        ({}, "members")]:
        await expect_error(gw, "PUT", f"{TEAMS}/{t['id']}/members", body, 400, field)
    await expect_error(gw, "PUT", f"{TEAMS}/{t['id']}", {"uid": "other"}, 400, "uid")
    await expect_error(gw, "PUT", f"{TEAMS}/{t['id']}", {"name": " "}, 400, "name")


async def test_team_writes_need_both_scopes_and_the_whole_org(gw: Gateway) -> None:
    t = await team(gw, "t")
    reader = await scoped_token(gw, ["datasources:read"])
    writer = await scoped_token(gw, ["datasources:read", "datasources:write"])
    stack_admin = await scoped_token(gw, ["datasources:read", "datasources:write", "datasources.permissions:write"],
                                     [{"type": "stack", "identifier": "100"}])
    assert (await gw.api("GET", f"{TEAMS}/{t['id']}", token=reader))["id"] == t["id"]
    assert (await gw.api("GET", f"{TEAMS}/{t['id']}/members", token=stack_admin)) == []
    for token in (reader, writer, stack_admin):
        await expect_error(gw, "POST", TEAMS, {"name": "n"}, 403, token=token)
        await expect_error(gw, "PUT", f"{TEAMS}/{t['id']}", {"name": "n"}, 403, token=token)
        await expect_error(gw, "PUT", f"{TEAMS}/{t['id']}/members", {"members": ["a"]}, 403, token=token)
        await expect_error(gw, "DELETE", f"{TEAMS}/{t['id']}", None, 403, token=token)
    no_scope = await scoped_token(gw, ["accesspolicies:read"])
    await expect_error(gw, "GET", TEAMS, None, 403, token=no_scope)
    other_org = await bootstrap_token(gw.state, "2")
    await expect_error(gw, "GET", f"{TEAMS}/{t['id']}", None, 404, token=other_org)
    assert (await gw.api("GET", TEAMS, token=other_org))["items"] == []


# ---- the rules API ----------------------------------------------------------------------------------

async def test_rules_put_and_get_in_the_seed_shape(gw: Gateway) -> None:
    p = await reader_policy(gw)
    ds = await datasource(gw, "my_datasource", p["id"], name="My Data Source")
    t1, t2 = await team(gw, "one", ["alice"]), await team(gw, "two", ["bob"])
    empty = await gw.api("GET", f"{DS}/my_datasource/lbac/teams")
    assert empty == {"id": ds["id"], "uid": "my_datasource", "name": "My Data Source", "rules": [], "lbacRules": []}

    seed_rule = rule('100:{ foo="bar" }')
    resp = await gw.client.put(f"{DS}/my_datasource/lbac/teams", json={"teamId": t1["id"], "rules": [seed_rule]},
                               headers=gw.auth())
    assert resp.status == 200 and resp.content_type == "application/json"
    assert await resp.json() == {"message": "Data source LBAC rules updated", "id": ds["id"],
                                 "uid": "my_datasource", "name": "My Data Source",
                                 "rules": [{"teamId": str(t1["id"]), "teamUid": t1["uid"], "rules": ['{ foo="bar" }']}],
                                 "lbacRules": [{"teamId": t1["id"], "rules": [seed_rule]}]}
    for path in (f"{DS}/my_datasource/lbac/teams", f"{DS}/uid/my_datasource/lbac/teams"):
        got = await gw.api("GET", path)
        assert got["lbacRules"] == [{"teamId": t1["id"], "rules": [seed_rule]}] and "message" not in got

    # all teams at once (at the /uid/ path); teams with no rules are dropped, duplicate rules folded
    out = await gw.api("PUT", f"{DS}/uid/my_datasource/lbac/teams", {"rules": [
        {"teamId": t1["id"], "rules": [rule('100:{env="dev"}'), rule('100:{env="dev"}')]},
        {"teamId": str(t2["id"]), "rules": [rule('100:{env="prod"}'), rule('100:{team=~"a|b", env!="x"}')]},
    ]})
    assert out["lbacRules"] == [{"teamId": t1["id"], "rules": [rule('100:{env="dev"}')]},
                                {"teamId": t2["id"], "rules": [rule('100:{env="prod"}'),
                                                               rule('100:{team=~"a|b", env!="x"}')]}]

    # Grafana's newer shape: team uid and bare selectors, for the data source's single tenant
    out = await gw.api("PUT", f"{DS}/my_datasource/lbac/teams", {"rules": [
        {"teamUid": t2["uid"], "rules": ['{ foo="bar" }', '100:{env="x"}']}]})
    assert out["lbacRules"] == [{"teamId": t2["id"], "rules": [rule('100:{ foo="bar" }'), rule('100:{env="x"}')]}]

    # the one-team form replaces the WHOLE set (seed: a team left out loses its rules)
    out = await gw.api("PUT", f"{DS}/my_datasource/lbac/teams", {"teamId": t1["id"], "rules": [rule('100:{a="1"}')]})
    assert out["lbacRules"] == [{"teamId": t1["id"], "rules": [rule('100:{a="1"}')]}]
    out = await gw.api("PUT", f"{DS}/my_datasource/lbac/teams", {"teamId": t1["id"], "rules": []})
    assert out["lbacRules"] == []
    # a percent-encoded selector (as on the wire) is accepted too
    out = await gw.api("PUT", f"{DS}/my_datasource/lbac/teams", {"rules": [
        {"teamId": t1["id"], "teamUid": t1["uid"], "rules": [rule("100:%7Benv=%22dev%22%7D")]}]})
    assert out["lbacRules"][0]["rules"] == [rule("100:%7Benv=%22dev%22%7D")]
    assert gw.state.cache.team_rules[(p["id"], "metrics")]["alice"]["100"][0].matchers[0].value == "dev"


async def test_rules_invalid_bodies_are_400_naming_the_field(gw: Gateway) -> None:
    p = await reader_policy(gw)  # stack 100: metrics tenant "100", logs tenant "100"
    wide = await reader_policy(gw, realms=[{"type": "org", "identifier": "1"}])  # stacks 100 and 101
    dev_stack = await reader_policy(gw, realms=[{"type": "stack", "identifier": "101"}])
    await datasource(gw, "a", p["id"])
    await datasource(gw, "w", wide["id"])
    await datasource(gw, "l", dev_stack["id"], "loki")
    t = await team(gw, "t", ["alice"])
    tid = t["id"]
    cases: list[tuple[str, Any, str | None]] = [
        ("a", [], None),
        ("a", {}, "rules"),
        ("a", {"rules": None}, "rules"),
        ("a", {"rules": {}}, "rules"),
        ("a", {"bogus": []}, "bogus"),
        ("a", {"teamId": tid, "rules": "x"}, "rules"),
        ("a", {"teamId": tid, "rules": [rule('100:{a="b"}')] * 101}, "rules"),
        ("a", {"teamId": tid, "extra": 1, "rules": []}, "extra"),
        ("a", {"teamId": "x", "rules": []}, "teamId"),
        ("a", {"teamId": True, "rules": []}, "teamId"),
        ("a", {"teamId": 0, "rules": []}, "teamId"),
        ("a", {"teamId": 99999, "rules": []}, "teamId"),  # unknown team
        ("a", {"rules": [{"teamUid": "nope", "rules": []}]}, "rules[0].teamUid"),
        ("a", {"rules": [{"teamId": tid, "teamUid": "other", "rules": []}]}, "rules[0].teamUid"),
        ("a", {"rules": [{"rules": []}]}, "rules[0].teamId"),
        ("a", {"rules": ["x"]}, "rules[0]"),
        ("a", {"rules": [{"teamId": tid, "rules": []}, {"teamId": tid, "rules": []}]}, "rules[1].teamId"),
        ("a", {"teamId": tid, "rules": [{"header": "X-Other", "value": '100:{a="b"}'}]}, "rules[0].header"),
        ("a", {"teamId": tid, "rules": [{"value": '100:{a="b"}'}]}, "rules[0].header"),
        ("a", {"teamId": tid, "rules": [{"header": HDR, "value": '100:{a="b"}', "x": 1}]}, "rules[0].x"),
        ("a", {"teamId": tid, "rules": [rule('{a="b"}')]}, "rules[0].value"),  # not <tenant>:<selector>
        ("a", {"teamId": tid, "rules": [rule("100:")]}, "rules[0].value"),
        ("a", {"teamId": tid, "rules": [rule(':{a="b"}')]}, "rules[0].value"),
        ("a", {"teamId": tid, "rules": [{"header": HDR, "value": 5}]}, "rules[0].value"),
        ("a", {"teamId": tid, "rules": [rule('101:{a="b"}')]}, "rules[0].value"),  # stack 101 is not in the realm
        ("a", {"teamId": tid, "rules": [rule('200:{a="b"}')]}, "rules[0].value"),  # another org's tenant
        ("a", {"teamId": tid, "rules": [rule('100:{a="b"')]}, "rules[0].value"),  # does not parse
        ("a", {"teamId": tid, "rules": [rule("100:{}")]}, "rules[0].value"),  # no matcher
        ("a", {"teamId": tid, "rules": [rule('100:{a=~"("}')]}, "rules[0].value"),  # bad regex
        ("a", {"teamId": tid, "rules": [rule('100:rate(x[5m])')]}, "rules[0].value"),  # not a selector
        ("a", {"rules": [{"teamId": tid, "rules": ["", ]}]}, "rules[0].rules[0]"),
        ("a", {"rules": [{"teamId": tid, "rules": [3]}]}, "rules[0].rules[0]"),
        ("a", {"rules": [{"teamId": tid, "rules": ['{a="b"', ]}]}, "rules[0].rules[0]"),
        ("a", {"rules": [{"teamId": tid, "rules": ['x:{a="b"}']}]}, "rules[0].rules[0]"),
        # a bare selector needs a single tenant; the org realm covers 100 and 101
        ("w", {"rules": [{"teamUid": t["uid"], "rules": ['{a="b"}']}]}, "rules[0].rules[0]"),
        # the loki data source on stack 101 has logs tenant "l101"; "101" is its metrics tenant
        ("l", {"teamId": tid, "rules": [rule('101:{a="b"}')]}, "rules[0].value"),
    ]
    for uid, body, field in cases:
        await expect_error(gw, "PUT", f"{DS}/{uid}/lbac/teams", body, 400, field)
    for uid in ("a", "w", "l"):
        assert (await gw.api("GET", f"{DS}/{uid}/lbac/teams"))["lbacRules"] == []
    # what those data sources do accept
    assert (await gw.api("PUT", f"{DS}/w/lbac/teams", {"teamId": tid, "rules": [
        rule('100:{a="b"}'), rule('101:{a="c"}')]}))["lbacRules"][0]["rules"][1]["value"] == '101:{a="c"}'
    assert (await gw.api("PUT", f"{DS}/l/lbac/teams", {"rules": [{"teamId": tid, "rules": ['{app="x"}']}]}))[
        "lbacRules"][0]["rules"] == [rule('l101:{app="x"}')]
    resp = await gw.client.put(f"{DS}/a/lbac/teams", data=b"{", headers={**gw.auth(),
                                                                         "Content-Type": "application/json"})
    assert resp.status == 400


async def test_rules_permissions_and_404(gw: Gateway) -> None:
    p = await reader_policy(gw)
    wide = await reader_policy(gw, realms=[{"type": "org", "identifier": "1"}])
    await datasource(gw, "a", p["id"])
    await datasource(gw, "w", wide["id"])
    t = await team(gw, "t", ["alice"])
    body = {"teamId": t["id"], "rules": [rule('100:{env="dev"}')]}
    reader = await scoped_token(gw, ["datasources:read"])
    writer = await scoped_token(gw, ["datasources:read", "datasources:write"])
    perms_only = await scoped_token(gw, ["datasources:read", "datasources.permissions:write"])
    full = await scoped_token(gw, ["datasources:read", "datasources:write", "datasources.permissions:write"])
    nothing = await scoped_token(gw, ["accesspolicies:read"])
    assert (await gw.api("GET", f"{DS}/a/lbac/teams", token=reader))["lbacRules"] == []
    await expect_error(gw, "GET", f"{DS}/a/lbac/teams", None, 403, token=nothing)
    await expect_error(gw, "GET", f"{DS}/uid/a", None, 403, token=nothing)
    for token in (reader, writer, perms_only):
        await expect_error(gw, "PUT", f"{DS}/a/lbac/teams", body, 403, token=token)
        await expect_error(gw, "PUT", f"{DS}/uid/a/lbac/teams", body, 403, token=token)
    await expect_error(gw, "POST", DS, {"name": "n", "type": "loki", "accessPolicyId": p["id"]}, 403, token=reader)
    assert (await gw.api("PUT", f"{DS}/a/lbac/teams", body, token=full))["lbacRules"][0]["teamId"] == t["id"]
    for path in (f"{DS}/nope/lbac/teams", f"{DS}/uid/nope/lbac/teams"):
        await expect_error(gw, "GET", path, None, 404)
        await expect_error(gw, "PUT", path, body, 404)
    # a stack-100 admin reaches the stack-100 data source but not the org-wide policy's one
    stack_admin = await scoped_token(gw, ["datasources:read", "datasources:write", "datasources.permissions:write"],
                                     [{"type": "stack", "identifier": "100"}])
    assert (await gw.api("GET", f"{DS}/a/lbac/teams", token=stack_admin))["uid"] == "a"
    await expect_error(gw, "GET", f"{DS}/w/lbac/teams", None, 404, token=stack_admin)
    await expect_error(gw, "PUT", f"{DS}/w/lbac/teams", body, 404, token=stack_admin)
    await expect_error(gw, "GET", f"{DS}/uid/w", None, 404, token=stack_admin)
    assert [d["uid"] for d in (await gw.api("GET", DS, token=stack_admin))["items"]] == ["a"]
    await expect_error(gw, "POST", DS, {"name": "n", "type": "loki", "accessPolicyId": wide["id"]}, 400,
                       "accessPolicyId", token=stack_admin)
    # another org sees nothing
    other = await bootstrap_token(gw.state, "2")
    await expect_error(gw, "GET", f"{DS}/a/lbac/teams", None, 404, token=other)
    await expect_error(gw, "PUT", f"{DS}/a/lbac/teams", body, 404, token=other)
    assert (await gw.api("GET", DS, token=other))["items"] == []
    resp = await gw.client.get(f"{DS}/a/lbac/teams")
    assert resp.status == 401


async def test_deleting_a_team_removes_its_rules(gw: Gateway) -> None:
    p = await reader_policy(gw)
    await datasource(gw, "a", p["id"])
    t1, t2 = await team(gw, "one", ["alice"]), await team(gw, "two", ["bob"])
    await gw.api("PUT", f"{DS}/a/lbac/teams", {"rules": [{"teamId": t1["id"], "rules": [rule('100:{env="dev"}')]},
                                                         {"teamId": t2["id"], "rules": [rule('100:{env="prod"}')]}]})
    assert set(gw.state.cache.team_rules[(p["id"], "metrics")]) == {"alice", "bob"}
    await gw.api("DELETE", f"{TEAMS}/{t1['id']}")
    assert [e["teamId"] for e in (await gw.api("GET", f"{DS}/a/lbac/teams"))["lbacRules"]] == [t2["id"]]
    assert set(gw.state.cache.team_rules[(p["id"], "metrics")]) == {"bob"}


async def test_every_change_is_audited(gw: Gateway) -> None:
    p = await reader_policy(gw)
    await datasource(gw, "a", p["id"])
    await gw.api("PUT", f"{DS}/uid/a", {"name": "A"})
    t = await team(gw, "t")
    await gw.api("PUT", f"{TEAMS}/{t['id']}", {"name": "t2"})
    await gw.api("PUT", f"{TEAMS}/{t['id']}/members", {"members": ["alice"]})
    await gw.api("PUT", f"{DS}/a/lbac/teams", {"teamId": t["id"], "rules": [rule('100:{env="dev"}')]})
    await gw.api("PUT", f"{DS}/a/lbac/teams", {"rules": []})
    await gw.api("PUT", f"{DS}/a/lbac/teams", {"teamId": t["id"], "rules": [rule('100:{env="x"}')]})
    await gw.api("DELETE", f"{TEAMS}/{t['id']}")
    await gw.api("DELETE", f"{DS}/uid/a", expect=204)
    await expect_error(gw, "PUT", f"{DS}/a/lbac/teams", {"rules": [3]}, 400, "rules[0]")  # failures write nothing
    log = (await gw.api("GET", "/api/v1/auditlog?pageSize=11"))["items"]
    assert [(e["action"], e["resourceType"]) for e in reversed(log)] == [
        ("accesspolicy.create", "accesspolicy"),
        ("datasource.create", "datasource"), ("datasource.update", "datasource"), ("team.create", "team"),
        ("team.update", "team"), ("team.members.update", "team"),
        ("datasource.lbacrules.update", "datasource"), ("datasource.lbacrules.update", "datasource"),
        ("datasource.lbacrules.update", "datasource"),
        ("datasource.lbacrules.update", "datasource"),  # the team's deletion strips its rules
        ("team.delete", "team"), ("datasource.delete", "datasource")][-11:]
    by_action = [e for e in log if e["action"] == "datasource.lbacrules.update"]
    assert by_action[-1]["before"] == {"uid": "a", "name": "A", "lbacRules": []}
    assert by_action[-1]["after"]["lbacRules"] == [{"teamId": t["id"], "rules": ['100:{env="dev"}']}]
    assert by_action[0]["before"]["lbacRules"] == [{"teamId": t["id"], "rules": ['100:{env="x"}']}]
    assert by_action[0]["after"]["lbacRules"] == []
    assert all(e["resourceId"] == "a" for e in by_action)
    members = next(e for e in log if e["action"] == "team.members.update")
    assert members["before"]["members"] == [] and members["after"]["members"] == ["alice"]
    assert log[0]["before"]["uid"] == "a" and log[0]["after"] is None


# ---- query time: a recording upstream in header mode -------------------------------------------------

async def _setup(env: Env, realms: list[dict[str, Any]] | None = None) -> tuple[str, dict[str, Any], dict[str, Any],
                                                                                  dict[str, Any]]:
    """Policy + token + prometheus data source ``a``; team one {env="dev"}: alice, carol; two {env="prod"}: carol."""
    gw = env.gw
    p = await reader_policy(gw, realms=realms)
    tok = str((await gw.token(p["id"], "grafana"))["token"])
    await datasource(gw, "a", p["id"])
    one, two = await team(gw, "one", ["alice", "carol"]), await team(gw, "two", ["carol"])
    await gw.api("PUT", f"{DS}/a/lbac/teams", {"rules": [
        {"teamId": one["id"], "rules": [rule('100:{env="dev"}')]},
        {"teamId": two["id"], "rules": [rule('100:{env="prod"}')]}]})
    return tok, p, one, two


async def sent(env: Env, token: str, user: str | None, path: str = Q, tenant: str = "100") -> list[str]:
    headers = basic(tenant, token)
    if user is not None:
        headers["X-Grafana-User"] = user
    r = await env.gw.client.get(path, headers=headers)
    assert r.status == 200, await r.text()
    assert env.rec.last.headers["X-Scope-OrgID"] == tenant
    return list(env.rec.last.headers.getall(HDR, []))


async def test_team_rules_become_label_policies(db_dsn: str, aiohttp_client: Any, aiohttp_server: Any) -> None:
    async with _env(db_dsn, aiohttp_client, aiohttp_server) as env:
        tok, *_ = await _setup(env)
        assert await sent(env, tok, "alice") == [DEV]
        assert await sent(env, tok, "ALICE ") == [DEV]  # Grafana logins are case-insensitive
        assert sorted(await sent(env, tok, "carol")) == sorted([DEV, PROD])  # two teams: the union
        assert await sent(env, tok, "dave") == []  # in no team: the token's full access
        assert await sent(env, tok, None) == []
        assert env.rec.last.query == [("query", "up")]  # header mode leaves the query alone
        # a client header may only narrow: intersected with the team rule
        r = await env.gw.client.get(Q, headers={**basic("100", tok), "X-Grafana-User": "alice",
                                                HDR: "100:%7Bteam=%22a%22%7D"})
        assert r.status == 200
        assert env.rec.last.headers.getall(HDR) == ["100:%7Benv=%22dev%22%2C%20team=%22a%22%7D"]  # "," as %2C
        # writes are never filtered, and the rules are for metrics only
        write_tok = str((await env.gw.token((await reader_policy(env.gw, ["metrics:write"]))["id"], "w"))["token"])
        await env.gw.client.post("/api/v1/push", data=b"x", headers={**basic("100", write_tok),
                                                                      "X-Grafana-User": "alice"})
        assert HDR not in env.rec.last.headers
        assert await sent(env, tok, "alice", '/loki/api/v1/query_range?query={app="x"}') == []


async def test_rules_of_datasource_a_do_not_touch_datasource_b(db_dsn: str, aiohttp_client: Any,
                                                               aiohttp_server: Any) -> None:
    async with _env(db_dsn, aiohttp_client, aiohttp_server) as env:
        tok_a, _, one, _ = await _setup(env)
        q = await reader_policy(env.gw)
        tok_b = str((await env.gw.token(q["id"], "grafana-b"))["token"])
        await datasource(env.gw, "b", q["id"])
        assert await sent(env, tok_b, "alice") == [] and await sent(env, tok_b, "carol") == []
        await env.gw.api("PUT", f"{DS}/b/lbac/teams", {"teamId": one["id"], "rules": [rule('100:{env="b"}')]})
        assert await sent(env, tok_b, "alice") == ["100:%7Benv=%22b%22%7D"]
        assert await sent(env, tok_b, "carol") == ["100:%7Benv=%22b%22%7D"]
        assert await sent(env, tok_a, "alice") == [DEV]
        # a loki data source on the same policy has its own rules
        await datasource(env.gw, "logs-b", q["id"], "loki")
        await env.gw.api("PUT", f"{DS}/logs-b/lbac/teams", {"rules": [{"teamUid": one["uid"],
                                                                       "rules": ['{app="x"}']}]})
        assert await sent(env, tok_b, "alice", '/loki/api/v1/query_range?query={job="y"}') == [
            "100:%7Bapp=%22x%22%7D"]
        assert await sent(env, tok_b, "alice") == ["100:%7Benv=%22b%22%7D"]


async def test_rules_apply_only_to_the_tenant_they_name(db_dsn: str, aiohttp_client: Any,
                                                        aiohttp_server: Any) -> None:
    async with _env(db_dsn, aiohttp_client, aiohttp_server) as env:
        tok, p, one, _ = await _setup(env, realms=[{"type": "org", "identifier": "1"}])
        assert await sent(env, tok, "alice") == [DEV]
        # alice's teams have rules on this data source, but none for tenant 101: refused, not unrestricted
        n = len(env.rec.seen)
        r = await env.gw.client.get(Q, headers={**basic("101", tok), "X-Grafana-User": "alice"})
        body = await r.json()
        assert r.status == 403 and "none for tenant '101'" in body["error"]
        assert len(env.rec.seen) == n
        assert await sent(env, tok, "dave", tenant="101") == []  # in no team: the token's full access
        await env.gw.api("PUT", f"{DS}/a/lbac/teams", {"teamId": one["id"], "rules": [rule('101:{env="dev"}')]})
        assert await sent(env, tok, "alice", tenant="101") == ["101:%7Benv=%22dev%22%7D"]
        r = await env.gw.client.get(Q, headers={**basic("100", tok), "X-Grafana-User": "alice"})
        assert r.status == 403
        # team two lost its rules with the whole-set PUT: carol now has team one's rule for 101 only
        assert await sent(env, tok, "carol", tenant="101") == ["101:%7Benv=%22dev%22%7D"]


async def test_a_put_leaving_a_team_out_lifts_its_restriction_at_once(db_dsn: str, aiohttp_client: Any,
                                                                      aiohttp_server: Any) -> None:
    async with _env(db_dsn, aiohttp_client, aiohttp_server) as env:
        tok, _, one, two = await _setup(env)
        assert await sent(env, tok, "alice") == [DEV]
        await env.gw.api("PUT", f"{DS}/a/lbac/teams", {"teamId": two["id"], "rules": [rule('100:{env="prod"}')]})
        assert await sent(env, tok, "alice") == []
        assert await sent(env, tok, "carol") == [PROD]
        # membership changes apply at once too
        await env.gw.api("PUT", f"{TEAMS}/{two['id']}/members", {"members": ["alice"]})
        assert await sent(env, tok, "alice") == [PROD] and await sent(env, tok, "carol") == []
        await env.gw.api("DELETE", f"{DS}/uid/a", expect=204)
        assert await sent(env, tok, "alice") == []
        assert one["id"] != two["id"]


async def test_rule_changes_reach_another_replica_within_a_second(db_dsn: str, aiohttp_client: Any,
                                                                  aiohttp_server: Any) -> None:
    from gateway.policy.datasource import user_policies

    async with _env(db_dsn, aiohttp_client, aiohttp_server) as env:
        tok, p, one, two = await _setup(env)
        other = PolicyCache(env.gw.state.store, resync_interval=3600)
        await other.start()
        try:
            assert [str(s) for s in user_policies(other, p["id"], "metrics", "100", "alice")] == ['{env="dev"}']

            async def wait_for(expect: list[str]) -> float:
                started = time.monotonic()
                while [str(s) for s in user_policies(other, p["id"], "metrics", "100", "alice")] != expect:
                    assert time.monotonic() - started < 1.0, "change not seen by the other cache within 1 s"
                    await asyncio.sleep(0.005)
                return time.monotonic() - started

            await env.gw.api("PUT", f"{DS}/a/lbac/teams", {"teamId": two["id"], "rules": [rule('100:{env="p"}')]})
            await wait_for([])
            await env.gw.api("PUT", f"{TEAMS}/{two['id']}/members", {"members": ["alice"]})
            await wait_for(['{env="p"}'])
            await env.gw.api("DELETE", f"{TEAMS}/{two['id']}")
            await wait_for([])
        finally:
            await other.stop()
        assert one["id"]


async def test_resync_rebuilds_the_same_index(db_dsn: str, aiohttp_client: Any, aiohttp_server: Any) -> None:
    async with _env(db_dsn, aiohttp_client, aiohttp_server) as env:
        await _setup(env)
        cache = env.gw.state.cache
        before = cache.team_rules
        await cache.resync()
        assert cache.team_rules == before and before



async def test_a_datasource_policy_cannot_lose_its_read_scope_or_gain_label_policies(gw: Gateway) -> None:
    p = await reader_policy(gw, ["metrics:read"])
    await datasource(gw, "keep", p["id"])
    err = await expect_error(gw, "POST", f"/api/v1/accesspolicies/{p['id']}", {"scopes": ["logs:read"]}, 409, "scopes")
    assert "metrics:read" in err["message"]
    await expect_error(gw, "POST", f"/api/v1/accesspolicies/{p['id']}", {"realms": [
        {"type": "stack", "identifier": "100", "labelPolicies": [{"selector": '{env="dev"}'}]}]}, 409, "realms")
    ok = await gw.api("POST", f"/api/v1/accesspolicies/{p['id']}", {"displayName": "still fine"})
    assert ok["displayName"] == "still fine"
