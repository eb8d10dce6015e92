"""The contract of Terraform's Grafana provider and Grafana's own clients, replayed against the gateway.

Every request below is what ``grafana/terraform-provider-grafana`` sends through the generated
grafana.com client (``grafana/grafana-com-public-clients``, ``go/gcom``): its bodies as the Go models'
``ToMap`` serialise them (``displayName`` always present, ``"displayName": ""`` for an unset token
name, ``conditions: {}`` without subnets, ``labelPolicies: []``), ``?region=`` on every call and an
``x-request-id`` on mutations. Every read-back is compared the way the provider's ``read*`` functions
compare it with the plan: strings byte for byte, so any difference would be a perpetual diff.
"""

from __future__ import annotations

import html
import re
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import unquote, urlencode

from gateway.policy.scopes import ALL_SCOPES, CLOUD_SCOPES
from tests.conftest import Gateway
from tests.test_datasources import DS, datasource, reader_policy, scoped_token
from tests.test_proxy import _env, basic

REGION = "local"
API = "/api"  # the provider's cloud_api_url is the gateway's address + /api, as for grafana.com


class Provider:
    """The provider's calls, as the gcom client makes them."""

    def __init__(self, gw: Gateway, token: str | None = None):
        self.gw = gw
        self.token = token or gw.admin_token

    def headers(self, mutation: bool) -> dict[str, str]:
        h = {"Authorization": f"Bearer {self.token}", "Accept": "application/json",
             "User-Agent": "terraform-provider-grafana/test"}
        if mutation:
            h["x-request-id"] = f"tf-{uuid.uuid4()}"
        return h

    async def call(self, method: str, path: str, body: Any = None, query: dict[str, str] | None = None,
                   expect: int = 200) -> Any:
        q = {"region": REGION, **(query or {})}
        sep = "&" if "?" in path else "?"
        resp = await self.gw.client.request(method, f"{API}{path}{sep}{urlencode(q)}", json=body,
                                            headers=self.headers(method != "GET"))
        data = await resp.json()
        assert resp.status == expect, (method, path, resp.status, data)
        return data

    # ---- resource grafana_cloud_access_policy ----------------------------------------------------

    @staticmethod
    def policy_body(plan: dict[str, Any], create: bool) -> dict[str, Any]:
        """``createCloudAccessPolicy``/``updateCloudAccessPolicy``: display name defaults to the name."""
        body: dict[str, Any] = {
            "displayName": plan.get("display_name") or plan["name"],
            "scopes": plan["scopes"],
            "realms": [{"identifier": r["identifier"], "labelPolicies": [{"selector": s} for s in r["label_policy"]],
                        "type": r["type"]} for r in plan["realm"]],
            "conditions": {"allowedSubnets": plan["allowed_subnets"]} if plan.get("allowed_subnets") else {},
        }
        if create:
            body["name"] = plan["name"]
        return body

    @staticmethod
    def policy_state(region: str, p: dict[str, Any]) -> dict[str, Any]:
        """``readCloudAccessPolicy`` + ``flattenCloudAccessPolicy*``: what lands in the Terraform state."""
        subnets = (p.get("conditions") or {}).get("allowedSubnets") or []
        return {"id": f"{region}:{p['id']}", "name": p["name"], "display_name": p["displayName"],
                "scopes": set(p["scopes"]),
                "realm": [{"type": r["type"], "identifier": r["identifier"],
                           "label_policy": {lp["selector"] for lp in r.get("labelPolicies") or []}}
                          for r in p["realms"]],
                "allowed_subnets": set(subnets),
                "created_at": _go_rfc3339(p["createdAt"]),
                "updated_at": _go_rfc3339(p["updatedAt"]) if p.get("updatedAt") else ""}  # set when not nil

    # ---- resource grafana_cloud_access_policy_token ----------------------------------------------

    @staticmethod
    def token_body(plan: dict[str, Any]) -> dict[str, Any]:
        body = {"accessPolicyId": plan["access_policy_id"], "name": plan["name"],
                "displayName": plan.get("display_name", "")}  # common.Ref(""): always sent
        if plan.get("expires_at"):
            body["expiresAt"] = plan["expires_at"]
        return body

    @staticmethod
    def token_state(t: dict[str, Any]) -> dict[str, Any]:
        return {"access_policy_id": t["accessPolicyId"], "name": t["name"], "display_name": t["displayName"],
                "expires_at": _go_rfc3339(t["expiresAt"]) if t.get("expiresAt") else ""}


def _go_rfc3339(value: str) -> str:
    """Go's ``time.Parse`` then ``Format(time.RFC3339)``, as the provider stores times."""
    return datetime.fromisoformat(value.replace("Z", "+00:00")).astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _plan_state(plan: dict[str, Any]) -> dict[str, Any]:
    """The plan in the state's form, for the fields the API owns."""
    return {"name": plan["name"], "display_name": plan.get("display_name") or plan["name"],
            "scopes": set(plan["scopes"]),
            "realm": [{"type": r["type"], "identifier": r["identifier"], "label_policy": set(r["label_policy"])}
                      for r in plan["realm"]],
            "allowed_subnets": set(plan.get("allowed_subnets") or [])}


def _converged(state: dict[str, Any], plan: dict[str, Any]) -> bool:
    """No diff: the state's API-owned fields equal the plan's (the provider's DiffSuppress for an
    unset display name: state = name)."""
    return {k: state[k] for k in _plan_state(plan)} == _plan_state(plan)


PLAN: dict[str, Any] = {
    "name": "tf-stack-readers",
    "scopes": ["metrics:read", "logs:read", "traces:read", "metrics:import", "traces:delete", "stacks:read",
               "billing-metrics:read"],
    "realm": [
        {"type": "org", "identifier": "1", "label_policy": ['{env != "dev"}', '{ team=~"a|b", env="prod" }']},
        {"type": "stack", "identifier": "100", "label_policy": ['{namespace="default"}']},
    ],
    "allowed_subnets": ["127.0.0.1/8", "2001:db8::1/32"],  # host bits set, as Go's ParseCIDR allows
}


async def test_the_whole_provider_sequence_converges(gw: Gateway) -> None:
    tf = Provider(gw)
    # provider-side look-ups: the regions (data source, lister) and the org (lister: org id for orgId=)
    regions = await tf.call("GET", "/stack-regions")
    assert [r["slug"] for r in regions["items"]] == [REGION]
    org = await tf.call("GET", "/orgs/acme")
    assert org["id"] == 1 and org["slug"] == "acme"

    # create: 200 with the policy; then the provider reads it back
    created = await tf.call("POST", "/v1/accesspolicies", Provider.policy_body(PLAN, create=True))
    assert created["source"] == "user" and created["orgId"] == "1" and created["status"] == "active"
    state = Provider.policy_state(REGION, await tf.call("GET", f"/v1/accesspolicies/{created['id']}"))
    assert _converged(state, PLAN), state
    assert state["display_name"] == PLAN["name"]

    # import (ImportStatePassthrough: the id "<region>:<policyId>" alone, then read)
    region, _, pid = state["id"].partition(":")
    imported = Provider.policy_state(region, await tf.call("GET", f"/v1/accesspolicies/{pid}"))
    assert imported == state

    # list, as the data source and the lister do: region, orgId (the id from /orgs), name; and pages
    listed = await tf.call("GET", "/v1/accesspolicies", query={"orgId": str(org["id"]), "name": PLAN["name"]})
    assert [p["id"] for p in listed["items"]] == [created["id"]]
    others = [await gw.policy(f"more-{i}", ["metrics:read"]) for i in range(3)]
    seen: list[str] = []
    page = await tf.call("GET", "/v1/accesspolicies", query={"pageSize": "2"})
    while True:
        seen += [p["id"] for p in page["items"]]
        nxt = page["metadata"]["pagination"]["nextPage"]
        if nxt is None:
            break
        assert nxt.startswith("/v1/accesspolicies?") and "region=local" in nxt
        resp = await gw.client.get(API + nxt, headers=tf.headers(False))  # joined to the /api base
        assert resp.status == 200
        page = await resp.json()
    assert set(seen) >= {created["id"], *(o["id"] for o in others)} and len(seen) == len(set(seen))
    by_stack = await tf.call("GET", "/v1/accesspolicies", query={"realmType": "stack", "realmIdentifier": "100"})
    assert [p["id"] for p in by_stack["items"]] == [created["id"]]

    # update: a display name, one more selector, no more IP ranges (conditions: {})
    plan2 = {**PLAN, "display_name": "Stack readers", "allowed_subnets": [],
             "realm": [{**PLAN["realm"][0], "label_policy": [*PLAN["realm"][0]["label_policy"], '{app!~"test.*"}']},
                       PLAN["realm"][1]]}
    updated = await tf.call("POST", f"/v1/accesspolicies/{pid}", Provider.policy_body(plan2, create=False))
    assert updated["name"] == PLAN["name"]
    state = Provider.policy_state(REGION, await tf.call("GET", f"/v1/accesspolicies/{pid}"))
    assert _converged(state, plan2), state
    # a second apply of the same plan changes nothing
    again = await tf.call("POST", f"/v1/accesspolicies/{pid}", Provider.policy_body(plan2, create=False))
    assert Provider.policy_state(REGION, again)["realm"] == state["realm"]

    # token without display_name: "displayName": "" means "use the name"
    tplan = {"access_policy_id": pid, "name": "tf-token"}
    made = await tf.call("POST", "/v1/tokens", Provider.token_body(tplan))
    assert made["token"].startswith("glc_") and made["orgId"] == "1" and made["displayName"] == "tf-token"
    tstate = Provider.token_state(await tf.call("GET", f"/v1/tokens/{made['id']}"))
    assert tstate == {"access_policy_id": pid, "name": "tf-token", "display_name": "tf-token", "expires_at": ""}
    # update (the provider sends the name when display_name is unset), then a real display name
    await tf.call("POST", f"/v1/tokens/{made['id']}", {"displayName": "tf-token"})
    await tf.call("POST", f"/v1/tokens/{made['id']}", {"displayName": "Terraform token"})
    assert (await tf.call("GET", f"/v1/tokens/{made['id']}"))["displayName"] == "Terraform token"
    # the token works on the data path's admin API for what its policy allows
    assert (await gw.api("GET", "/api/v1/accesspolicies", token=made["token"], expect=403))["code"] == "Forbidden"

    # grafana_cloud_access_policy_rotating_token: "<prefix>-<unix expiry>", rotated by create + delete
    first_exp = (datetime.now(UTC) + timedelta(days=30)).replace(microsecond=0)
    rot = await tf.call("POST", "/v1/tokens", Provider.token_body(
        {"access_policy_id": pid, "name": f"rot-{int(first_exp.timestamp())}",
         "expires_at": first_exp.strftime("%Y-%m-%dT%H:%M:%SZ")}))
    rstate = Provider.token_state(await tf.call("GET", f"/v1/tokens/{rot['id']}"))
    assert rstate["expires_at"] == first_exp.strftime("%Y-%m-%dT%H:%M:%SZ")
    next_exp = first_exp + timedelta(days=30)
    rot2 = await tf.call("POST", "/v1/tokens", Provider.token_body(
        {"access_policy_id": pid, "name": f"rot-{int(next_exp.timestamp())}",
         "expires_at": next_exp.strftime("%Y-%m-%dT%H:%M:%SZ")}))
    assert await tf.call("DELETE", f"/v1/tokens/{rot['id']}") == {}
    assert (await tf.call("GET", f"/v1/tokens/{rot['id']}", expect=404))["code"] == "NotFound"
    listed_t = await tf.call("GET", "/v1/tokens", query={"accessPolicyIds": f"{pid},{others[0]['id']}"})
    assert {t["id"] for t in listed_t["items"]} == {made["id"], rot2["id"]}

    # delete the token, read after delete (404: the provider drops it from the state), delete again
    assert await tf.call("DELETE", f"/v1/tokens/{made['id']}") == {}
    assert (await tf.call("GET", f"/v1/tokens/{made['id']}", expect=404))["code"] == "NotFound"
    # destroy the policy: 200, then 404 on read and on a second delete (AcceptNotFound)
    assert await tf.call("DELETE", f"/v1/accesspolicies/{pid}") == {}
    gone = await tf.call("GET", f"/v1/accesspolicies/{pid}", expect=404)
    assert gone["code"] == "NotFound" and gone["message"]
    await tf.call("DELETE", f"/v1/accesspolicies/{pid}", expect=404)
    assert (await tf.call("GET", f"/v1/tokens/{rot2['id']}", expect=404))["code"] == "NotFound"


async def test_read_back_is_exact_for_spellings_the_gateway_would_print_otherwise(gw: Gateway) -> None:
    tf = Provider(gw)
    odd = {"name": "odd", "scopes": ["logs:read"],
           "realm": [{"type": "stack", "identifier": "100",
                      "label_policy": ['{ namespace = "a" }', '{namespace="a"}', 'up{job!~"x|y"}',
                                       '{env!="dev",team="a"}', "{app=~'single'}"]}],
           "allowed_subnets": ["10.1.2.3/8", "10.0.0.0/8", "192.168.1.7", "2001:DB8::/32"]}
    p = await tf.call("POST", "/v1/accesspolicies", Provider.policy_body(odd, create=True))
    got = await tf.call("GET", f"/v1/accesspolicies/{p['id']}")
    assert [lp["selector"] for lp in got["realms"][0]["labelPolicies"]] == odd["realm"][0]["label_policy"]
    assert got["conditions"]["allowedSubnets"] == odd["allowed_subnets"]
    assert _converged(Provider.policy_state(REGION, got), odd)
    # enforcement uses the networks: 10.1.2.3/8 is 10.0.0.0/8, and the test client (127.0.0.1) is outside
    enforced = gw.state.cache.policies[p["id"]]
    assert [str(n) for n in enforced.allowed_subnets] == ["10.0.0.0/8", "10.0.0.0/8", "192.168.1.7/32",
                                                           "2001:db8::/32"]
    token = (await gw.token(p["id"], "t"))["token"]
    outside = await gw.api("GET", "/api/v1/accesspolicies", token=token, expect=403)
    assert outside["code"] == "Forbidden"


async def test_attributes_are_stored_and_returned(gw: Gateway) -> None:
    tf = Provider(gw)
    attrs = {"lokiQueryPolicy": {"maxQueryLength": "7d", "maxEntriesLimitPerQuery": 20, "requiredLabels": ["ns"]},
             "pdcConfiguration": {"limitedHosts": ["mysql.example.com:3306"]}}
    body = {**Provider.policy_body(PLAN, create=True), "attributes": attrs}
    p = await tf.call("POST", "/v1/accesspolicies", body)
    assert p["attributes"] == attrs
    assert (await tf.call("GET", f"/v1/accesspolicies/{p['id']}"))["attributes"] == attrs
    changed = await tf.call("POST", f"/v1/accesspolicies/{p['id']}", {"attributes": {"pdcConfiguration": None}})
    assert changed["attributes"] == {"pdcConfiguration": None}
    cleared = await tf.call("POST", f"/v1/accesspolicies/{p['id']}", {"attributes": None})
    assert "attributes" not in cleared and cleared["realms"] == p["realms"]
    for bad, field in [({"lokiQueryPolicy": {"maxEntriesLimitPerQuery": "20"}},
                        "attributes.lokiQueryPolicy.maxEntriesLimitPerQuery"),
                       ({"other": {}}, "attributes.other"), ([], "attributes"),
                       ({"pdcConfiguration": {"limitedHosts": [1]}}, "attributes.pdcConfiguration.limitedHosts")]:
        err = await tf.call("POST", f"/v1/accesspolicies/{p['id']}", {"attributes": bad}, expect=409)
        assert err["code"] == "Conflict" and err["field"] == field


async def test_subnets_are_as_lenient_as_gos_parsecidr(gw: Gateway) -> None:
    tf = Provider(gw)
    body = Provider.policy_body({**PLAN, "allowed_subnets": []}, create=True)
    for bad in ("10.0.0.0/255.0.0.0", "10.0.0.0/33", "10.0.0.0/", "10.0.0.0/ 8", "300.0.0.0/8", "fe80::/129"):
        err = await tf.call("POST", "/v1/accesspolicies", {**body, "conditions": {"allowedSubnets": [bad]}},
                            expect=409)
        assert err["field"] == "conditions.allowedSubnets[0]", bad
    ok = ["10.0.0.0/08", "10.255.255.255/8", "::ffff:10.0.0.1/104"]
    p = await tf.call("POST", "/v1/accesspolicies", {**body, "conditions": {"allowedSubnets": ok}})
    assert p["conditions"]["allowedSubnets"] == ok


async def test_errors_carry_the_specs_codes_and_statuses(gw: Gateway) -> None:
    tf = Provider(gw)
    bad = await tf.call("POST", "/v1/accesspolicies", {"name": "x", "scopes": ["nope"],
                                                       "realms": [{"type": "org", "identifier": "1"}]}, expect=409)
    assert bad["code"] == "Conflict" and bad["field"] == "scopes[0]" and bad["message"]
    await tf.call("POST", "/v1/accesspolicies", Provider.policy_body(PLAN, create=True))
    dup = await tf.call("POST", "/v1/accesspolicies", Provider.policy_body(PLAN, create=True), expect=409)
    assert dup["code"] == "Conflict" and dup["field"] == "name"
    missing = await tf.call("GET", f"/v1/accesspolicies/{uuid.uuid4()}", expect=404)
    assert missing == {"code": "NotFound", "message": "access policy not found"}
    resp = await gw.client.get(f"{API}/v1/accesspolicies?region={REGION}")
    assert resp.status == 401 and (await resp.json())["code"] == "InvalidCredentials"
    weak = await scoped_token(gw, ["metrics:read"])
    assert (await Provider(gw, weak).call("GET", "/v1/tokens", expect=403))["code"] == "Forbidden"
    assert (await tf.call("GET", "/v1/accesspolicies", query={"orgId": "2"}, expect=403))["code"] == "Forbidden"
    assert (await tf.call("GET", "/v1/accesspolicies", query={"region": "mars"}, expect=409))["field"] == "region"
    # the gateway's own and Grafana's APIs keep 400 for invalid arguments
    assert (await gw.client.get("/api/datasources?pageSize=0", headers=gw.auth())).status == 400


async def test_token_lists_leave_expired_tokens_out_unless_asked(gw: Gateway) -> None:
    p = await gw.policy("exp", ["metrics:read"])
    live = await gw.token(p["id"], "live")
    soon = await gw.token(p["id"], "soon", expiresAt=(datetime.now(UTC) + timedelta(seconds=1)).isoformat())
    await gw.state.store.pool.execute("UPDATE tokens SET expires_at = now() - interval '1 hour' WHERE id = $1",
                                      uuid.UUID(soon["id"]))
    tf = Provider(gw)
    assert [t["id"] for t in (await tf.call("GET", "/v1/tokens", query={"accessPolicyId": p["id"]}))["items"]] == [
        live["id"]]
    both = await tf.call("GET", "/v1/tokens", query={"accessPolicyId": p["id"], "includeExpired": "true"})
    assert {t["id"] for t in both["items"]} == {live["id"], soon["id"]}
    assert (await tf.call("GET", f"/v1/tokens/{soon['id']}"))["expiresAt"] is not None  # still readable by id
    await tf.call("GET", "/v1/tokens", query={"includeExpired": "maybe"}, expect=409)
    await tf.call("GET", "/v1/tokens", query={"accessPolicyIds": "x,y"}, expect=409)


async def test_every_catalogue_scope_is_accepted_and_those_without_routes_grant_nothing(gw: Gateway) -> None:
    resp = await gw.client.get(f"{API}/v1/accesspolicies/config?region={REGION}")  # no token, as on the Cloud
    assert resp.status == 200
    config = await resp.json()
    names = {s["name"] for s in config["scopes"]}
    assert names == set(ALL_SCOPES) and CLOUD_SCOPES <= names
    assert all(s["description"] for s in config["scopes"]) and {r["type"] for r in config["realms"]} == {"org", "stack"}
    assert all({"name", "scopes"} <= set(s) for s in config["sets"])
    p = await gw.policy("everything", sorted(CLOUD_SCOPES))
    assert set(p["scopes"]) == CLOUD_SCOPES
    importer = await gw.policy("importer", ["metrics:import", "traces:delete", "stacks:read"])
    token = (await gw.token(importer["id"], "imp"))["token"]
    r = await gw.client.get("/prometheus/api/v1/query?query=up", headers=basic("100", token))
    assert r.status == 403 and "metrics:read" in (await r.json())["error"]  # metrics:import is no metrics:read


async def test_read_only_cloud_views(gw: Gateway) -> None:
    tf = Provider(gw)
    stacks = await tf.call("GET", "/instances")
    assert stacks["total"] == 2 and [s["slug"] for s in stacks["items"]] == ["acme-prod", "acme-dev"]
    dev = await tf.call("GET", "/instances/acme-dev")
    assert dev == stacks["items"][1] and dev == await tf.call("GET", "/instances/101")
    base = str(gw.client.make_url("/")).rstrip("/")
    assert (dev["id"], dev["orgId"], dev["orgSlug"], dev["regionSlug"]) == (101, 1, "acme", REGION)
    assert (dev["hmInstancePromId"], dev["hlInstanceId"], dev["htInstanceId"]) == (101, "l101", "t101")
    assert dev["hmInstancePromUrl"] == dev["hlInstanceUrl"] == dev["htInstanceUrl"] == base
    await tf.call("GET", "/instances/other-prod", expect=404)
    await tf.call("GET", "/orgs/other", expect=404)
    assert (await tf.call("GET", "/orgs/1"))["slug"] == "acme"
    # a stack-realm token sees its stack only; a token without accesspolicies:read sees nothing
    stack_token = await scoped_token(gw, ["accesspolicies:read"], [{"type": "stack", "identifier": "100"}])
    assert [s["id"] for s in (await Provider(gw, stack_token).call("GET", "/instances"))["items"]] == [100]
    await Provider(gw, stack_token).call("GET", "/instances/acme-dev", expect=404)
    weak = await scoped_token(gw, ["metrics:read"])
    for path in ("/instances", "/stack-regions", "/orgs/acme"):
        assert (await Provider(gw, weak).call("GET", path, expect=403))["code"] == "Forbidden"
    resp = await gw.client.get(f"{API}/stack-regions")
    assert resp.status == 401 and (await resp.json())["code"] == "InvalidCredentials"


# ---- grafana_data_source_config_lbac_rules ---------------------------------------------------------------

async def _rules_map(gw: Gateway, uid: str) -> dict[str, list[str]]:
    """The resource's Read: ``rulesMap[rule.TeamUID] = rule.Rules`` from Grafana's ``rules`` shape."""
    got = await gw.api("GET", f"{DS}/{uid}/lbac/teams")
    return {r["teamUid"]: r["rules"] for r in got["rules"]}


async def test_lbac_rules_resource_sequence_converges(gw: Gateway) -> None:
    p = await reader_policy(gw, ["logs:read"])
    await datasource(gw, "loki-from-terraform", p["id"], "loki")
    team = await gw.api("POST", "/api/teams", {"name": "Team Name", "email": ""})  # grafana_team
    other = await gw.api("POST", "/api/teams", {"name": "Other", "email": "other@example.com"})

    async def apply(rules: dict[str, list[str]]) -> None:
        """updateRules: ``UpdateTeamLBACCommand{Rules: [{teamUid, rules}]}`` (teamId omitted)."""
        body = {"rules": [{"teamUid": uid, "rules": rs} for uid, rs in rules.items()]}
        out = await gw.api("PUT", f"{DS}/loki-from-terraform/lbac/teams", body)
        assert out["message"] == "Data source LBAC rules updated"

    plan = {team["uid"]: ['{ cluster = "dev-us-central-0", namespace = "hosted-grafana" }', '{ foo = "qux" }']}
    await apply(plan)  # Create
    assert await _rules_map(gw, "loki-from-terraform") == plan  # Read: no diff
    # the seed's shape carries the same rules with their tenant, for the seed's clients
    seed = (await gw.api("GET", f"{DS}/loki-from-terraform/lbac/teams"))["lbacRules"]
    assert seed == [{"teamId": team["teamId"], "rules": [{"header": "X-Prom-Label-Policy", "value": f"100:{r}"}
                                                         for r in plan[team["uid"]]]}]
    rules = (await gw.api("GET", f"{DS}/loki-from-terraform/lbac/teams"))["rules"]
    assert rules[0]["teamId"] == str(team["teamId"])  # Grafana's TeamLBACRule.teamId is a string
    plan2 = {team["uid"]: ['{ foo = "qux" }'], other["uid"]: ['{env!="prod"}']}
    await apply(plan2)  # Update
    assert await _rules_map(gw, "loki-from-terraform") == plan2
    assert await _rules_map(gw, "loki-from-terraform") == plan2  # Import: the same Read by uid
    await apply({})  # Delete: an empty rules list clears them
    assert await _rules_map(gw, "loki-from-terraform") == {}
    assert (await gw.api("GET", f"{DS}/loki-from-terraform/lbac/teams"))["lbacRules"] == []
    # enforcement follows the parsed selectors, not the text
    await apply({team["uid"]: ['{ foo = "qux" }']})
    assert (p["id"], "logs") not in gw.state.cache.team_rules  # the team has no members yet
    await gw.api("PUT", f"/api/teams/{team['teamId']}/members", {"members": ["alice"]})
    sel = gw.state.cache.team_rules[(p["id"], "logs")]["alice"]["100"][0]
    assert str(sel) == '{foo="qux"}' and sel.text == '{ foo = "qux" }'


async def test_lbac_rules_in_the_seeds_shape_read_back_in_both(gw: Gateway) -> None:
    p = await reader_policy(gw)
    await datasource(gw, "my_datasource", p["id"])
    t = await gw.api("POST", "/api/teams", {"name": "seeded"})
    value = '100:{ foo="bar" }'
    out = await gw.api("PUT", f"{DS}/my_datasource/lbac/teams",
                       {"teamId": t["teamId"], "rules": [{"header": "X-Prom-Label-Policy", "value": value}]})
    assert out["lbacRules"] == [{"teamId": t["teamId"], "rules": [{"header": "X-Prom-Label-Policy", "value": value}]}]
    assert out["rules"] == [{"teamId": str(t["teamId"]), "teamUid": t["uid"], "rules": ['{ foo="bar" }']}]
    got = await gw.api("GET", f"{DS}/my_datasource/lbac/teams")
    assert (got["rules"], got["lbacRules"]) == (out["rules"], out["lbacRules"])
    # teamId as Grafana's string, with an empty teamUid beside it
    out = await gw.api("PUT", f"{DS}/my_datasource/lbac/teams",
                       {"rules": [{"teamId": str(t["teamId"]), "teamUid": "", "rules": ['{a!="b"}']}]})
    assert out["rules"][0]["rules"] == ['{a!="b"}']


# ---- teams, as Grafana's HTTP API shapes them ---------------------------------------------------------------

async def test_teams_in_grafanas_shapes(gw: Gateway) -> None:
    created = await gw.api("POST", "/api/teams", {"name": "MyTestTeam", "email": "email@test.com"})
    assert created["message"] == "Team created" and isinstance(created["teamId"], int) and created["uid"]
    tid = created["teamId"]
    await gw.api("POST", "/api/teams", {"name": "Another"})
    team = await gw.api("GET", f"/api/teams/{tid}")
    for key, want in (("id", tid), ("uid", created["uid"]), ("orgId", 1), ("name", "MyTestTeam"),
                      ("email", "email@test.com"), ("memberCount", 0)):
        assert team[key] == want, key
    assert {"avatarUrl", "permission"} <= set(team)
    assert await gw.api("GET", f"/api/teams/uid/{created['uid']}") == team
    found = await gw.api("GET", "/api/teams/search?perpage=10&page=1&query=mytest")
    assert found["totalCount"] == 1 and found["page"] == 1 and found["perPage"] == 10
    assert [x["id"] for x in found["teams"]] == [tid]
    assert (await gw.api("GET", "/api/teams/search?name=Another"))["teams"][0]["name"] == "Another"
    everyone = await gw.api("GET", "/api/teams/search?perpage=1&page=2")
    assert everyone["totalCount"] == 2 and [x["id"] for x in everyone["teams"]] == [tid]  # by name
    upd = await gw.api("PUT", f"/api/teams/{tid}", {"name": "MyTestTeam", "email": "new@test.com"})
    assert upd["message"] == "Team updated" and upd["email"] == "new@test.com"
    set_members = await gw.api("PUT", f"/api/teams/{tid}/members", {"members": ["alice"], "admins": ["bob"]})
    assert set_members["message"] == "Team memberships have been updated"
    members = await gw.api("GET", f"/api/teams/{tid}/members")
    assert [(m["login"], m["teamId"], m["teamUID"], m["orgId"]) for m in members] == [
        ("alice", tid, created["uid"], 1), ("bob", tid, created["uid"], 1)]
    assert await gw.api("DELETE", f"/api/teams/{tid}/members/Bob") == {"message": "Team Member removed"}
    assert [m["login"] for m in await gw.api("GET", f"/api/teams/{tid}/members")] == ["alice"]
    await gw.api("DELETE", f"/api/teams/{tid}/members/bob", expect=404)
    assert await gw.api("DELETE", f"/api/teams/{tid}") == {"message": "Team deleted"}
    await gw.api("GET", f"/api/teams/{tid}", expect=404)
    await gw.api("GET", f"/api/teams/uid/{created['uid']}", expect=404)


# ---- a negative-only label policy, enforced ------------------------------------------------------------------

async def test_negative_only_label_policy_is_enforced_in_both_modes(db_dsn: str, aiohttp_client: Any,
                                                                    aiohttp_server: Any) -> None:
    """``{env != "dev"}`` restricts reads like any policy: the header carries it (header mode), the
    rewritten query ANDs it in (enforce mode); the text as written is what the API returns."""
    for mode in ("header", "enforce"):
        async with _env(db_dsn, aiohttp_client, aiohttp_server, lbac=mode) as env:
            p = await env.gw.policy(f"neg-{mode}", ["metrics:read"], [
                {"type": "stack", "identifier": "100", "labelPolicies": [{"selector": '{ env != "dev" }'}]}])
            assert p["realms"][0]["labelPolicies"] == [{"selector": '{ env != "dev" }'}]
            tok = str((await env.gw.token(p["id"], f"reader-{mode}"))["token"])
            r = await env.gw.client.get("/prometheus/api/v1/query?query=up", headers=basic("100", tok))
            assert r.status == 200, await r.text()
            seen = env.rec.last
            if mode == "header":
                values = seen.headers.getall("X-Prom-Label-Policy")
                assert [unquote(v) for v in values] == ['100:{env!="dev"}'] and seen.query == [("query", "up")]
            else:
                assert "X-Prom-Label-Policy" not in seen.headers
                assert seen.query == [("query", 'up{env!="dev"}')]


async def test_a_page_edit_keeps_what_terraform_wrote(gw: Gateway) -> None:
    """The page shows selectors and subnets as written and every scope (those it does not enforce ticked
    among "other Grafana Cloud scopes"), so changing only the display name there leaves no diff for the
    next ``terraform plan``."""
    from tests.test_page import Browser

    tf = Provider(gw)
    plan = {"name": "tf-paged", "scopes": ["metrics:read", "metrics:import"],
            "realm": [{"type": "stack", "identifier": "100", "label_policy": ['{ env != "dev" }']}],
            "allowed_subnets": ["10.1.2.3/8"]}
    p = await tf.call("POST", "/v1/accesspolicies", Provider.policy_body(plan, create=True))
    b = Browser(gw)
    await b.sign_in()
    edit = await b.get(f"/ui/policies/{p['id']}/edit")

    def area(name: str) -> str:
        m = re.search(rf'<textarea[^>]*name="{re.escape(name)}"[^>]*>(.*?)</textarea>', edit, re.S)
        assert m, name
        return html.unescape(m.group(1))

    assert area("selectors:stack:100") == '{ env != "dev" }' and area("subnets") == "10.1.2.3/8"
    assert '<input type="checkbox" name="scope" value="metrics:import" checked>' in edit
    await b.post(f"/ui/policies/{p['id']}/edit", [
        ("displayName", "Edited in the page"), ("status", "active"), ("scope", "metrics:read"),
        ("scope", "metrics:import"),
        ("realm", "stack:100"), ("selectors:stack:100", area("selectors:stack:100")),
        ("subnets", area("subnets"))])
    state = Provider.policy_state(REGION, await tf.call("GET", f"/v1/accesspolicies/{p['id']}"))
    assert state["display_name"] == "Edited in the page"
    assert state["realm"] == _plan_state(plan)["realm"] and state["allowed_subnets"] == {"10.1.2.3/8"}
    assert state["scopes"] == set(plan["scopes"])
