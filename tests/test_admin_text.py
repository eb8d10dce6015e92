"""Text the store cannot hold (NUL, lone surrogates) and names with a trailing newline: a 4xx naming the
field on every API field, filter and path parameter and on the page; a token whose secret is a lone
surrogate is a 401 like any malformed token, on the data path and on the admin API."""

from __future__ import annotations

import base64
import copy
import json
import uuid
from typing import Any

import pytest

from gateway.admin.errors import is_cloud_path
from tests.conftest import Gateway
from tests.test_page import Browser, policy_form

P = "/api/v1/accesspolicies"
T = "/api/v1/tokens"
NUL, SURROGATE = "\x00", "\ud800"
BAD = [NUL, SURROGATE]


async def _refused(gw: Gateway, method: str, path: str, body: Any, field: str) -> None:
    """400 ``invalid_argument`` (409 ``Conflict`` on Cloud paths) whose ``field`` is ``field``."""
    resp = await gw.client.request(method, path, json=body, headers=gw.auth())
    data = await resp.json()
    cloud = is_cloud_path(path)
    assert (resp.status, data["code"]) == ((409, "Conflict") if cloud else (400, "invalid_argument")), data
    assert data.get("field") == field, data
    assert field.rsplit(".", 1)[-1].split("[")[0] in data["message"] or "parameter" in data["message"], data


def _policy(**over: Any) -> dict[str, Any]:
    return {"name": "p", "scopes": ["metrics:read"], "realms": [{"type": "org", "identifier": "1"}], **over}


@pytest.mark.parametrize("bad", BAD, ids=["nul", "surrogate"])
async def test_policy_and_token_fields_refuse_unstorable_text(gw: Gateway, bad: str) -> None:
    await _refused(gw, "POST", P, _policy(displayName=f"a{bad}b"), "displayName")
    await _refused(gw, "POST", P, _policy(name=f"p{bad}"), "name")
    await _refused(gw, "POST", P, _policy(realms=[{"type": "stack", "identifier": "100", "labelPolicies": [
        {"selector": f'{{env="a{bad}"}}'}]}]), "realms[0].labelPolicies[0].selector")
    p = await gw.policy("ok", ["metrics:read"])
    await _refused(gw, "POST", f"{P}/{p['id']}", {"displayName": bad}, "displayName")
    await _refused(gw, "POST", T, {"accessPolicyId": p["id"], "name": "t", "displayName": bad}, "displayName")
    await _refused(gw, "POST", T, {"accessPolicyId": p["id"], "name": f"t{bad}"}, "name")
    await _refused(gw, "POST", P, {**_policy(), f"k{bad}": 1}, f"k{bad}")
    assert [i["name"] for i in (await gw.api("GET", P))["items"]] == ["bootstrap-admin", "ok"]


@pytest.mark.parametrize("bad", BAD, ids=["nul", "surrogate"])
async def test_datasource_and_team_fields_refuse_unstorable_text(gw: Gateway, bad: str) -> None:
    p = await gw.policy("ds", ["metrics:read"])
    await _refused(gw, "POST", "/api/datasources", {"name": f"m{bad}", "type": "prometheus",
                                                    "accessPolicyId": p["id"]}, "name")
    await _refused(gw, "POST", "/api/teams", {"name": f"team{bad}"}, "name")
    await _refused(gw, "POST", "/api/teams", {"name": "t", "email": f"a{bad}@b"}, "email")
    await _refused(gw, "POST", "/api/teams", {"name": "t", "members": [f"bob{bad}"]}, "members[0]")
    ds = await gw.api("POST", "/api/datasources", {"name": "m", "type": "prometheus", "accessPolicyId": p["id"]})
    uid = ds.get("uid") or ds["datasource"]["uid"]
    await _refused(gw, "PUT", f"/api/datasources/uid/{uid}/lbac/teams", {"rules": [
        {"teamId": 1, "rules": [{"header": "X-Prom-Label-Policy", "value": f'100:{{a="{bad}"}}'}]}]},
        "rules[0].rules[0].value")


@pytest.mark.parametrize(("path", "param"), [
    (P, "name"), (P, "realmIdentifier"), (T, "name"), (T, "accessPolicyName"), ("/api/datasources", "name"),
    ("/api/teams", "name"), ("/api/teams/search", "query"), ("/api/teams/search", "name"),
    ("/api/v1/auditlog", "resource"), ("/api/v1/auditlog", "actor"), ("/api/instances", "slug"),
])
async def test_filters_refuse_nul(gw: Gateway, path: str, param: str) -> None:
    extra = "&realmType=stack" if param == "realmIdentifier" else ""
    await _refused(gw, "GET", f"{path}?{param}=a%00{extra}", None, param)


async def test_path_parameters_refuse_nul(gw: Gateway) -> None:
    await _refused(gw, "GET", "/api/datasources/uid/a%00b", None, "uid")
    await _refused(gw, "GET", "/api/teams/uid/a%00b", None, "uid")


async def test_names_with_a_trailing_newline_are_refused(gw: Gateway) -> None:
    await _refused(gw, "POST", P, _policy(name="readers\n"), "name")
    p = await gw.policy("ok", ["metrics:read"])
    await _refused(gw, "POST", T, {"accessPolicyId": p["id"], "name": "tok\n"}, "name")
    await _refused(gw, "POST", "/api/teams", {"name": "t", "uid": "abc\n"}, "uid")
    await _refused(gw, "POST", "/api/datasources", {"name": "m", "uid": "abc\n", "type": "prometheus",
                                                    "accessPolicyId": p["id"]}, "uid")


def _spell(claims: dict[str, Any]) -> str:
    """The claims in the one canonical spelling ``decode`` accepts."""
    return "glc_" + base64.urlsafe_b64encode(json.dumps(claims, separators=(",", ":")).encode()).decode().rstrip("=")


def _claims(token: str) -> dict[str, Any]:
    raw = token[4:]
    return json.loads(base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)))  # type: ignore[no-any-return]


async def test_a_token_whose_secret_is_a_lone_surrogate_is_a_401(gw: Gateway) -> None:
    p = await gw.policy("r", ["metrics:read"])
    bad = _spell({**_claims((await gw.token(p["id"], "t"))["token"]), "k": SURROGATE})
    unknown = _spell({"o": "1", "i": str(uuid.uuid4()), "k": SURROGATE, "m": {"r": "local"}})
    for token in (bad, unknown):
        resp = await gw.client.get(P, headers=gw.auth(token))
        assert resp.status == 401 and (await resp.json())["code"] == "InvalidCredentials"
        for headers in ({"Authorization": f"Bearer {token}"},
                        {"Authorization": "Basic " + base64.b64encode(f"100:{token}".encode()).decode()}):
            resp = await gw.client.get("/api/prom/api/v1/query?query=up", headers=headers)
            assert resp.status == 401, await resp.text()
            assert (await resp.json())["status"] == "error"


async def test_the_page_refuses_unstorable_text(gw: Gateway) -> None:
    b = Browser(gw)
    await b.sign_in()
    _, text = await b.post("/ui/policies/new", policy_form("x", ["metrics:read"], display=f"a{NUL}"), status=400)
    assert "displayName must not contain a NUL character" in text
    _, text = await b.post("/ui/policies/new", policy_form("x", ["metrics:read"], selectors=f'{{a="{NUL}"}}'),
                           status=400)
    assert "selector must not contain a NUL character" in text
    text = await b.get("/ui/policies?q=a%00", status=400)
    assert "q must not contain a NUL character" in text
    text = await b.get("/ui/audit?resource=a%00", status=400)
    assert "resource must not contain a NUL character" in text
    _, text = await b.post("/ui/teams", {"name": f"t{NUL}"}, status=400, form_page="/ui/teams")
    assert "name must not contain a NUL character" in text
    assert (await gw.api("GET", f"{P}?name=x"))["items"] == []
    assert (await gw.api("GET", "/api/teams"))["items"] == []


def test_a_tenant_id_with_a_trailing_newline_is_refused() -> None:
    """Tenant IDs of the YAML are matched whole too: ``100\\n`` would reach the X-Scope-OrgID header."""
    from gateway.config import ConfigError, parse_config
    from tests.conftest import TEST_CONFIG

    raw = copy.deepcopy(TEST_CONFIG)
    raw["database"] = {"url": "postgresql://localhost/x"}
    raw["orgs"][0]["stacks"][0]["tenants"]["metrics"] = "100\n"
    with pytest.raises(ConfigError) as info:
        parse_config(raw, env={})
    assert any("tenant" in p for p in info.value.problems), info.value.problems
