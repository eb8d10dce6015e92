"""Cloud's open scope catalogue and its naming, as the Terraform provider uses them: any ``service:permission``
scope (granting nothing here unless the gateway serves it), token and policy names as the spec leaves them
(the rotating-token resource's ``<name_prefix>-<unix expiry>``), org realms by slug, ``updatedAt`` only after
an update, and ``/api/orgs/{slug}/instances``."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

import pytest

from tests.conftest import Gateway
from tests.test_cloud_contract import REGION, Provider
from tests.test_page import Browser
from tests.test_proxy import basic

P = "/api/v1/accesspolicies"
#: Scopes Cloud accepts that the gateway has no route for (the provider's acceptance tests use datadog:validate).
NEW_SCOPES = ["stacks:read", "datadog:validate", "fleet-management:read", "pdc-signing:write", "stack-dashboards:read"]


async def test_any_scope_of_clouds_syntax_is_accepted_and_grants_nothing(gw: Gateway) -> None:
    p = await gw.policy("cloudish", ["metrics:read", *NEW_SCOPES])
    assert set(p["scopes"]) == {"metrics:read", *NEW_SCOPES}
    assert set((await gw.api("GET", f"{P}/{p['id']}"))["scopes"]) == set(p["scopes"])
    only = await gw.policy("only-new", NEW_SCOPES)
    token = (await gw.token(only["id"], "t"))["token"]
    r = await gw.client.get("/prometheus/api/v1/query?query=up", headers=basic("100", token))
    assert r.status == 403 and "metrics:read" in (await r.json())["error"]
    assert (await gw.client.get(P, headers=gw.auth(token))).status == 403
    upd = await gw.api("POST", f"{P}/{only['id']}", {"scopes": ["datadog:validate"]})
    assert upd["scopes"] == ["datadog:validate"]


@pytest.mark.parametrize("scope", ["metrics", "a:b:c", "Metrics:Read", "metrics:read\n", ":read", "metrics:",
                                   "1metrics:read", "metrics:*", "x" * 130 + ":read"])
async def test_scopes_outside_clouds_syntax_are_refused(gw: Gateway, scope: str) -> None:
    resp = await gw.client.post(P, json={"name": "x", "scopes": ["metrics:read", scope],
                                         "realms": [{"type": "org", "identifier": "1"}]}, headers=gw.auth())
    body = await resp.json()
    assert resp.status == 409 and body["field"] == "scopes[1]", body


async def test_the_api_documents_which_scopes_grant_nothing(gw: Gateway) -> None:
    doc = await (await gw.client.get("/api/openapi.json")).json()
    scope = doc["components"]["schemas"]["postAccessPolicies_request"]["properties"]["scopes"]["items"]
    assert re.fullmatch(scope["pattern"].strip("^$"), "fleet-management:read")
    assert "metrics:read" in scope["description"] and "grants nothing" in scope["description"]
    config = await (await gw.client.get(f"/api/v1/accesspolicies/config?region={REGION}")).json()
    described = {s["name"]: s["description"] for s in config["scopes"]}
    assert "grants nothing" in described["stacks:read"] and "grants nothing" not in described["metrics:read"]


async def test_the_page_shows_and_removes_every_scope(gw: Gateway) -> None:
    p = await gw.policy("pg", ["metrics:read", "datadog:validate", "stacks:read"])
    b = Browser(gw)
    await b.sign_in()
    view = await b.get(f"/ui/policies/{p['id']}")
    assert re.search(r"<code>datadog:validate</code> <span class=\"muted\">\(not enforced here\)</span>", view)
    edit = await b.get(f"/ui/policies/{p['id']}/edit")
    for s in ("datadog:validate", "stacks:read"):
        assert f'<input type="checkbox" name="scope" value="{s}" checked>' in edit
    form = [("displayName", "pg"), ("status", "active"), ("scope", "metrics:read"), ("scope", "stacks:read"),
            ("realm", "org:1"), ("selectors:org:1", ""), ("subnets", ""), ("moreScopes", "fleet-management:read")]
    await b.post(f"/ui/policies/{p['id']}/edit", form, form_page=f"/ui/policies/{p['id']}/edit")
    got = await gw.api("GET", f"{P}/{p['id']}")
    assert got["scopes"] == ["fleet-management:read", "metrics:read", "stacks:read"]  # datadog:validate unticked


async def test_rotating_token_names_and_names_as_the_spec_leaves_them(gw: Gateway) -> None:
    """``grafana_cloud_access_policy_rotating_token`` names its tokens
    ``fmt.Sprintf("%s-%d", name_prefix, expiresAt.Unix())``."""
    tf = Provider(gw)
    p = await tf.call("POST", "/v1/accesspolicies", {"name": "My Policy", "displayName": "", "scopes": ["logs:read"],
                                                     "realms": [{"type": "org", "identifier": "1"}]})
    assert p["name"] == "My Policy"
    expires = (datetime.now(UTC) + timedelta(hours=24)).replace(microsecond=0)
    name = f"MyToken-{int(expires.timestamp())}"
    t = await tf.call("POST", "/v1/tokens", {"accessPolicyId": p["id"], "name": name, "displayName": "",
                                             "expiresAt": expires.isoformat().replace("+00:00", "Z")})
    assert t["name"] == name and t["displayName"] == name
    for bad in ("", " lead", "trail ", "tab\there", "new\nline", "x" * 256):
        resp = await tf.call("POST", "/v1/tokens", {"accessPolicyId": p["id"], "name": bad}, expect=409)
        assert resp["field"] == "name", bad
    await tf.call("POST", "/v1/accesspolicies", {"name": "My Policy", "scopes": ["logs:read"],
                                                 "realms": [{"type": "org", "identifier": "1"}]}, expect=409)


async def test_an_org_realm_by_slug_reads_back_as_written_and_is_enforced_by_id(gw: Gateway) -> None:
    tf = Provider(gw)
    p = await tf.call("POST", "/v1/accesspolicies", {"name": "by-slug", "scopes": ["metrics:read"],
                                                     "realms": [{"type": "org", "identifier": "acme"}]})
    assert p["realms"] == [{"type": "org", "identifier": "acme", "labelPolicies": []}]
    assert (await tf.call("GET", f"/v1/accesspolicies/{p['id']}"))["realms"] == p["realms"]
    found = await tf.call("GET", "/v1/accesspolicies", query={"realmType": "org", "realmIdentifier": "acme"})
    assert p["id"] in [i["id"] for i in found["items"]]
    token = (await gw.token(p["id"], "t"))["token"]
    r = await gw.client.get("/prometheus/api/v1/query?query=up", headers=basic("100", token))
    assert r.status == 502, await r.text()  # authorized (org 1 holds stack 100); no Mimir on 127.0.0.1:9
    r = await gw.client.get("/prometheus/api/v1/query?query=up", headers=basic("200", token))
    assert r.status == 403  # stack 200 is org 2's
    bad = await tf.call("POST", "/v1/accesspolicies", {"name": "twice", "scopes": ["metrics:read"], "realms": [
        {"type": "org", "identifier": "acme"}, {"type": "org", "identifier": "1"}]}, expect=409)
    assert bad["field"] == "realms[1]"
    other = await tf.call("POST", "/v1/accesspolicies", {"name": "other", "scopes": ["metrics:read"], "realms": [
        {"type": "org", "identifier": "other"}]}, expect=403)
    assert other["field"] == "realms[0].identifier"
    b = Browser(gw)  # a page edit keeps the slug: no diff for the next terraform plan
    await b.sign_in()
    edit = await b.get(f"/ui/policies/{p['id']}/edit")
    assert re.search(r'value="org:1" id="realm-[^"]*" checked', edit)
    await b.post(f"/ui/policies/{p['id']}/edit", [
        ("displayName", "Edited"), ("status", "active"), ("scope", "metrics:read"), ("realm", "org:1"),
        ("selectors:org:1", ""), ("subnets", "")], form_page=f"/ui/policies/{p['id']}/edit")
    got = await tf.call("GET", f"/v1/accesspolicies/{p['id']}")
    assert got["displayName"] == "Edited" and got["realms"] == p["realms"]


async def test_updated_at_is_absent_until_the_first_update(gw: Gateway) -> None:
    tf = Provider(gw)
    p = await tf.call("POST", "/v1/accesspolicies", {"name": "fresh", "scopes": ["logs:read"],
                                                     "realms": [{"type": "org", "identifier": "1"}]})
    t = await tf.call("POST", "/v1/tokens", {"accessPolicyId": p["id"], "name": "fresh-token"})
    assert "updatedAt" not in p and "updatedAt" not in t
    assert "updatedAt" not in await tf.call("GET", f"/v1/accesspolicies/{p['id']}")
    assert "updatedAt" not in (await tf.call("GET", "/v1/tokens", query={"accessPolicyId": p["id"]}))["items"][0]
    p2 = await tf.call("POST", f"/v1/accesspolicies/{p['id']}", {"displayName": "Fresh"})
    t2 = await tf.call("POST", f"/v1/tokens/{t['id']}", {"displayName": "Fresh token"})
    assert p2["updatedAt"] >= p2["createdAt"] and t2["updatedAt"] >= t2["createdAt"]
    assert (await tf.call("GET", f"/v1/tokens/{t['id']}"))["updatedAt"] == t2["updatedAt"]


async def test_org_instances_list_the_orgs_stacks(gw: Gateway) -> None:
    tf = Provider(gw)
    stacks = await tf.call("GET", "/orgs/acme/instances")
    assert [s["slug"] for s in stacks["items"]] == ["acme-prod", "acme-dev"] and stacks["total"] == 2
    assert stacks == await tf.call("GET", "/orgs/1/instances")
    assert stacks["items"] == (await tf.call("GET", "/instances"))["items"]
    assert [s["id"] for s in (await tf.call("GET", "/orgs/acme/instances", query={"slug": "acme-dev"}))["items"]] \
        == [101]
    assert [s["id"] for s in (await tf.call("GET", "/orgs/acme/instances", query={"id": "100"}))["items"]] == [100]
    await tf.call("GET", "/orgs/other/instances", expect=404)
