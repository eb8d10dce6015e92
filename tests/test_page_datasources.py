"""The page's data sources, teams and team rules (/ui/datasources, /ui/teams): every form, CSRF, scopes,
validation messages from the API's own validators, and the result checked through the API."""

from __future__ import annotations

import html
import re
from typing import Any

from tests.conftest import Gateway, bootstrap_token
from tests.test_datasources import DS, HDR, TEAMS, datasource, reader_policy, rule, scoped_token, sent, team
from tests.test_page import Browser, audit_rows, token_id
from tests.test_proxy import _env

ALL_DS = ["accesspolicies:read", "datasources:read", "datasources:write", "datasources.permissions:write"]


async def rules_of(gw: Gateway, uid: str) -> list[dict[str, Any]]:
    return (await gw.api("GET", f"{DS}/{uid}/lbac/teams"))["lbacRules"]  # type: ignore[no-any-return]


def version(page: str) -> str:
    m = re.search(r'name="version" value="([0-9a-f]+)"', page)
    assert m, "no version field"
    return m.group(1)


async def signed_in(gw: Gateway, scopes: list[str] | None = None, realms: list[dict[str, Any]] | None = None
                    ) -> Browser:
    b = Browser(gw)
    gw.client.session.cookie_jar.clear()
    await b.sign_in(await scoped_token(gw, scopes, realms) if scopes else None)
    return b


# ---- data sources -------------------------------------------------------------------------------------

async def test_create_datasource_with_an_eligible_policy(gw: Gateway) -> None:
    good = await reader_policy(gw, name="grafana-prod")
    metrics_only = await reader_policy(gw, ["metrics:read"], name="metrics-only")
    labelled = await reader_policy(gw, realms=[{"type": "stack", "identifier": "100",
                                                "labelPolicies": [{"selector": '{env="dev"}'}]}], name="labelled")
    await gw.policy("writer", ["metrics:write"])
    b = await signed_in(gw)
    page = await b.get("/ui/datasources")
    assert "No data sources yet." in page and "Add a data source" in page
    options = re.findall(r'<option value="([0-9a-f-]{36})"[^>]*>([^<]+)</option>', page)
    assert [(i, html.unescape(label)) for i, label in options] == [
        (good["id"], "grafana-prod: Prometheus, Loki"), (metrics_only["id"], "metrics-only: Prometheus")]

    # every field's message at once, beside its field, what was typed kept
    _, text = await b.post("/ui/datasources", {"name": " ", "uid": "bad uid!", "type": "graphite",
                                                "accessPolicyId": ""}, status=400, form_page="/ui/datasources")
    assert "The data source was not created: 4 fields need attention." in text
    assert "name must be a non-empty string of at most 190 characters" in text
    assert "uid must be 1-40 characters of letters, digits" in text and 'value="bad uid!"' in text
    assert "type must be one of prometheus, loki" in text
    assert "Choose the access policy whose token Grafana uses." in text
    assert 'aria-invalid="true" aria-describedby="ds-uid-hint err-ds-uid"' in text
    # a policy the select does not offer is refused by the API's own check (check_policy)
    for pid, message in ((labelled["id"], "has label policies"), (metrics_only["id"], "lacks the logs:read scope"),
                         ("not-a-uuid", "accessPolicyId must be a UUID")):
        _, text = await b.post("/ui/datasources", {"name": "L", "type": "loki", "accessPolicyId": pid}, status=400,
                               form_page="/ui/datasources")
        assert message in html.unescape(text), message
    assert (await gw.api("GET", DS))["items"] == []

    loc, _ = await b.post("/ui/datasources", {"name": "Mimir prod", "uid": "mimir", "type": "prometheus",
                                               "accessPolicyId": good["id"]}, form_page="/ui/datasources")
    assert loc == "/ui/datasources/mimir"
    got = await gw.api("GET", f"{DS}/uid/mimir")
    assert (got["name"], got["type"], got["accessPolicyId"]) == ("Mimir prod", "prometheus", good["id"])
    page = await b.get(loc)
    assert "Created data source Mimir prod (mimir)." in page and "<code>100</code>" in page
    # the policy now offers only Loki; a second Prometheus one on it is a conflict on the field
    page = await b.get("/ui/datasources")
    assert "grafana-prod: Loki</option>" in page and "metrics-only: Prometheus" in page
    assert '<a href="/ui/datasources/mimir">Mimir prod</a>' in page
    _, text = await b.post("/ui/datasources", {"name": "Mimir 2", "type": "prometheus",
                                                "accessPolicyId": good["id"]}, status=409, form_page="/ui/datasources")
    assert "another prometheus data source already uses access policy" in text and 'id="err-ds-accessPolicyId"' in text
    _, text = await b.post("/ui/datasources", {"name": "Mimir prod", "type": "loki", "accessPolicyId": good["id"]},
                           status=409, form_page="/ui/datasources")
    assert "a data source named &#39;Mimir prod&#39; already exists" in text
    loc, _ = await b.post("/ui/datasources", {"name": "Loki prod", "type": "loki", "accessPolicyId": good["id"]},
                          form_page="/ui/datasources")
    generated = loc.rsplit("/", 1)[1]
    assert (await gw.api("GET", f"{DS}/uid/{generated}"))["type"] == "loki"
    actor = token_id(gw, gw.admin_token)
    assert [(r["action"], r["actor"]) for r in await audit_rows(gw) if r["resourceType"] == "datasource"] == [
        ("datasource.create", actor), ("datasource.create", actor)]


async def test_no_eligible_policy_says_how_to_get_one(gw: Gateway) -> None:
    b = await signed_in(gw)
    page = await b.get("/ui/datasources")
    assert "No access policy qualifies yet" in page and 'href="/ui/policies/new"' in page


async def test_delete_datasource_confirms_and_needs_permissions_when_it_has_rules(gw: Gateway) -> None:
    p = await reader_policy(gw)
    await datasource(gw, "a", p["id"], name="A")
    t = await team(gw, "devs", ["alice"])
    await gw.api("PUT", f"{DS}/a/lbac/teams", {"teamId": t["id"], "rules": [rule('100:{env="dev"}')]})
    writer = await signed_in(gw, ["accesspolicies:read", "datasources:read", "datasources:write"])
    text = await writer.get("/ui/datasources/a/delete", status=403)
    assert "deleting it needs the datasources.permissions:write scope" in text
    _, text = await writer.post("/ui/datasources/a/delete", {}, status=403, form_page="/ui/datasources")
    assert "datasources.permissions:write" in text
    await gw.api("GET", f"{DS}/uid/a")

    b = await signed_in(gw)
    confirm = await b.get("/ui/datasources/a/delete")
    assert "Delete data source A?" in confirm and "Its rules for 1 team go with it" in confirm
    loc, _ = await b.post("/ui/datasources/a/delete", {}, form_page="/ui/datasources")
    assert loc == "/ui/datasources"
    assert "Deleted data source A (a)." in await b.get(loc)
    await gw.api("GET", f"{DS}/uid/a", expect=404)
    assert "No such data source" in await b.get("/ui/datasources/a", status=404)
    last = (await audit_rows(gw))[0]
    assert (last["action"], last["actor"]) == ("datasource.delete", token_id(gw, gw.admin_token))


# ---- team rules ---------------------------------------------------------------------------------------

async def test_rules_form_validates_every_line_with_the_api_validator(gw: Gateway) -> None:
    p = await reader_policy(gw)
    await datasource(gw, "a", p["id"], name="A")
    one, two = await team(gw, "one", ["alice"]), await team(gw, "two", ["bob"])
    await gw.api("PUT", f"{DS}/a/lbac/teams", {"teamId": two["id"], "rules": [rule('100:{env="prod"}')]})
    b = await signed_in(gw)
    page = await b.get("/ui/datasources/a")
    assert "Saving replaces this data source's whole rule set" in page
    assert "PUT /api/datasources/a/lbac/teams" in page
    # the team with rules comes first, its rules in its box
    assert page.index('name="rules:' + str(two["id"])) < page.index('name="rules:' + str(one["id"]))
    assert '100:{env=&#34;prod&#34;}</textarea>' in page
    ver = version(page)
    bad = "\n".join(['100:{env="dev"}', '101:{env="dev"}', '100:{env="dev"', "100:{}", '{app="x"}', "x:y:z"])
    _, text = await b.post("/ui/datasources/a/rules", {f"rules:{one['id']}": bad, f"rules:{two['id']}": "",
                                                       "version": ver}, status=400, form_page="/ui/datasources/a")
    text = html.unescape(text)
    assert "The rules were not saved: 1 place needs attention." in text
    assert "line 2: '101' is not a metrics tenant of a stack in access policy" in text
    assert "line 3: selector " in text and "line 4: selector " in text
    assert "line 6: 'x' is not a metrics tenant" in text
    assert "line 1:" not in text and "line 5:" not in text  # a bare selector is for the single tenant
    assert bad + "</textarea>" in text  # what was typed is kept
    assert f'aria-describedby="err-team-{one["id"]}-1 ' in text
    assert await rules_of(gw, "a") == [{"teamId": two["id"], "rules": [rule('100:{env="prod"}')]}]

    too_many = "\n".join(f'100:{{n="{i}"}}' for i in range(101))
    _, text = await b.post("/ui/datasources/a/rules", {f"rules:{one['id']}": too_many, "version": ver}, status=400,
                           form_page="/ui/datasources/a")
    assert "rules must be a list of at most 100 rules" in text and f'id="err-team-{one["id"]}-1"' in text


async def test_saving_rules_replaces_the_whole_set_like_the_api_put(gw: Gateway) -> None:
    p = await reader_policy(gw)
    await datasource(gw, "a", p["id"], name="A")
    one, two = await team(gw, "one", ["alice"]), await team(gw, "two", ["bob"])
    await gw.api("PUT", f"{DS}/a/lbac/teams", {"teamId": two["id"], "rules": [rule('100:{env="prod"}')]})
    b = await signed_in(gw)
    ver = version(await b.get("/ui/datasources/a"))
    # team two's box emptied: it loses its rules; team one gets two (a duplicate folded, as the API does)
    loc, _ = await b.post("/ui/datasources/a/rules", {
        f"rules:{one['id']}": '100:{env="dev"}\n\n{team=~"a|b"}\n100:{env="dev"}\n', f"rules:{two['id']}": "  ",
        "version": ver}, form_page="/ui/datasources/a")
    assert loc == "/ui/datasources/a"
    assert await rules_of(gw, "a") == [{"teamId": one["id"], "rules": [rule('100:{env="dev"}'),
                                                                       rule('100:{team=~"a|b"}')]}]
    page = await b.get(loc)
    assert "Saved the team rules of A: 1 team with rules." in page
    assert '100:{env=&#34;dev&#34;}\n100:{team=~&#34;a|b&#34;}</textarea>' in page
    last = (await audit_rows(gw))[0]
    assert (last["action"], last["actor"]) == ("datasource.lbacrules.update", token_id(gw, gw.admin_token))
    audit = await b.get("/ui/audit")
    assert "<code>datasource.lbacrules.update</code>" in audit and '<a href="/ui/datasources/a">A</a>' in audit
    assert f'<a href="/ui/teams/{one["id"]}">one</a>' in audit
    assert last["before"]["lbacRules"] == [{"teamId": two["id"], "rules": ['100:{env="prod"}']}]
    # all boxes empty: no rules at all
    loc, _ = await b.post("/ui/datasources/a/rules", {f"rules:{one['id']}": "", "version": version(page)},
                          form_page="/ui/datasources/a")
    assert await rules_of(gw, "a") == []
    assert "every user keeps the token’s full access" in await b.get(loc)


async def test_rules_changed_meanwhile_are_not_overwritten_silently(gw: Gateway) -> None:
    p = await reader_policy(gw)
    await datasource(gw, "a", p["id"], name="A")
    one, two = await team(gw, "one", ["alice"]), await team(gw, "two", ["bob"])
    b = await signed_in(gw)
    ver = version(await b.get("/ui/datasources/a"))
    await gw.api("PUT", f"{DS}/a/lbac/teams", {"teamId": two["id"], "rules": [rule('100:{env="api"}')]})
    form = {f"rules:{one['id']}": '100:{env="page"}', "version": ver}
    _, text = await b.post("/ui/datasources/a/rules", form, status=409, form_page="/ui/datasources/a")
    assert "Someone changed this data source&#39;s rules after you opened the page" in text
    assert "Saved now: <code>100:{env=&#34;api&#34;}</code>" in text
    assert "100:{env=&#34;page&#34;}</textarea>" in text  # the text is kept
    assert await rules_of(gw, "a") == [{"teamId": two["id"], "rules": [rule('100:{env="api"}')]}]
    await b.post("/ui/datasources/a/rules", {**form, "version": version(text)}, form_page="/ui/datasources/a")
    assert await rules_of(gw, "a") == [{"teamId": one["id"], "rules": [rule('100:{env="page"}')]}]


async def test_rules_for_a_team_deleted_meanwhile_are_refused(gw: Gateway) -> None:
    p = await reader_policy(gw)
    await datasource(gw, "a", p["id"])
    one = await team(gw, "one")
    b = await signed_in(gw)
    ver = version(await b.get("/ui/datasources/a"))
    await gw.api("DELETE", f"{TEAMS}/{one['id']}")
    _, text = await b.post("/ui/datasources/a/rules", {f"rules:{one['id']}": '{a="b"}', "version": ver}, status=400,
                           form_page="/ui/datasources/a")
    assert f"Team {one['id']} was deleted meanwhile" in text
    page = await b.get("/ui/datasources/a")
    assert "The org has no teams yet." in page and 'href="/ui/teams"' in page


async def test_rules_reach_the_data_path(db_dsn: str, aiohttp_client: Any, aiohttp_server: Any) -> None:
    async with _env(db_dsn, aiohttp_client, aiohttp_server) as env:
        gw = env.gw
        p = await reader_policy(gw)
        tok = str((await gw.token(p["id"], "grafana"))["token"])
        b = Browser(gw)
        await b.sign_in()
        await b.post("/ui/datasources", {"name": "Mimir", "uid": "m", "type": "prometheus", "accessPolicyId": p["id"]},
                     form_page="/ui/datasources")
        loc, _ = await b.post("/ui/teams", {"name": "devs", "members": "alice\n"}, form_page="/ui/teams")
        tid = loc.rsplit("/", 1)[1]
        ver = version(await b.get("/ui/datasources/m"))
        await b.post("/ui/datasources/m/rules", {f"rules:{tid}": '{env="dev"}', "version": ver},
                     form_page="/ui/datasources/m")
        assert await sent(env, tok, "Alice") == ["100:%7Benv=%22dev%22%7D"]
        assert await sent(env, tok, "bob") == []
        assert HDR == "X-Prom-Label-Policy"


# ---- teams ----------------------------------------------------------------------------------------------

async def test_team_create_rename_members_delete(gw: Gateway) -> None:
    b = await signed_in(gw)
    assert "No teams yet." in await b.get("/ui/teams")
    _, text = await b.post("/ui/teams", {"name": "", "uid": "no spaces", "members": "alice\nbo\x01b\n\ncarol\x7f"},
                           status=400, form_page="/ui/teams")
    assert "The team was not created: 3 fields need attention." in text
    assert "name must be a non-empty string" in text and "uid must be 1-40 characters" in text
    assert "line 2: must be a Grafana user login" in text and "line 3: must be a Grafana user login" in text
    assert (await gw.api("GET", TEAMS))["items"] == []

    loc, _ = await b.post("/ui/teams", {"name": "Dev Team", "uid": "dev", "members": "alice\nBob\nALICE\n"},
                          form_page="/ui/teams")
    tid = int(loc.rsplit("/", 1)[1])
    got = await gw.api("GET", f"{TEAMS}/{tid}")
    assert (got["name"], got["uid"], got["members"]) == ("Dev Team", "dev", ["alice", "Bob"])
    page = await b.get(loc)
    assert "Created team Dev Team with 2 members." in page and "alice\nBob</textarea>" in page
    _, text = await b.post("/ui/teams", {"name": "Dev Team"}, status=409, form_page="/ui/teams")
    assert "a team named &#39;Dev Team&#39; already exists" in text
    await team(gw, "Ops")

    _, text = await b.post(f"{loc}/name", {"name": "Ops"}, status=409, form_page=loc)
    assert "a team named &#39;Ops&#39; already exists" in text and 'value="Ops"' in text
    _, text = await b.post(f"{loc}/name", {"name": "  "}, status=400, form_page=loc)
    assert "name must be a non-empty string" in text
    await b.post(f"{loc}/name", {"name": "Developers"}, form_page=loc)
    assert "Renamed team Dev Team to Developers." in await b.get(loc)

    _, text = await b.post(f"{loc}/members", {"members": "carol\nd\x00ave"}, status=400, form_page=loc)
    assert "The members were not saved." in text and "line 2: must be a Grafana user login" in text
    await b.post(f"{loc}/members", {"members": " carol \ndave\nCarol"}, form_page=loc)
    assert [m["login"] for m in await gw.api("GET", f"{TEAMS}/{tid}/members")] == ["carol", "dave"]
    assert "Saved the members of Developers: 2 members." in await b.get(loc)

    p = await reader_policy(gw)
    await datasource(gw, "a", p["id"], name="A")
    await gw.api("PUT", f"{DS}/a/lbac/teams", {"teamId": tid, "rules": [rule('100:{env="dev"}')]})
    page = await b.get(loc)
    assert '<a href="/ui/datasources/a#rules">A</a>' in page and "100:{env=&#34;dev&#34;}" in page
    listing = await b.get("/ui/teams")
    assert '<a href="/ui/datasources/a">A</a>' in listing and "<code>carol</code>" in listing
    confirm = await b.get(f"{loc}/delete")
    assert "Its rules on 1 data source (A) are removed with it" in confirm
    await b.post(f"{loc}/delete", {}, form_page=loc)
    await gw.api("GET", f"{TEAMS}/{tid}", expect=404)
    assert await rules_of(gw, "a") == []
    actor = token_id(gw, gw.admin_token)
    mine = [(r["action"], r["actor"]) for r in await audit_rows(gw) if r["resourceId"] in (str(tid), "a")
            and r["action"] != "datasource.create"]
    assert mine == [("team.delete", actor), ("datasource.lbacrules.update", actor),
                    ("datasource.lbacrules.update", actor),
                    ("team.members.update", actor), ("team.update", actor), ("team.create", actor)]
    assert "No such team" in await b.get(loc, status=404)
    assert "team ids are numbers" in await b.get("/ui/teams/abc", status=404)


# ---- CSRF and scopes ------------------------------------------------------------------------------------

async def test_every_new_form_refuses_a_missing_or_wrong_csrf_token(gw: Gateway) -> None:
    p = await reader_policy(gw)
    await datasource(gw, "a", p["id"])
    t = await team(gw, "t", ["alice"])
    b = await signed_in(gw)
    forms = [("/ui/datasources", {"name": "N", "type": "loki", "accessPolicyId": p["id"]}),
             ("/ui/datasources/a/rules", {f"rules:{t['id']}": '{a="b"}', "version": "x"}),
             ("/ui/datasources/a/delete", {}), ("/ui/teams", {"name": "n"}),
             (f"/ui/teams/{t['id']}/name", {"name": "n"}), (f"/ui/teams/{t['id']}/members", {"members": "bob"}),
             (f"/ui/teams/{t['id']}/delete", {})]
    for path, data in forms:
        for csrf in (None, "", "wrong"):
            _, text = await b.post(path, data, status=403, csrf=csrf)
            assert "Form expired" in text and "CSRF" in text, path
    await gw.api("GET", f"{DS}/uid/a")
    assert await rules_of(gw, "a") == []
    assert [x["name"] for x in (await gw.api("GET", TEAMS))["items"]] == ["t"]
    assert [m["login"] for m in await gw.api("GET", f"{TEAMS}/{t['id']}/members")] == ["alice"]


async def test_scopes_are_checked_and_the_missing_one_named(gw: Gateway) -> None:
    p = await reader_policy(gw)
    await datasource(gw, "a", p["id"])
    t = await team(gw, "t", ["alice"])
    tid = t["id"]
    b = await signed_in(gw, ["accesspolicies:read"])
    for path in ("/ui/datasources", "/ui/datasources/a", "/ui/teams", f"/ui/teams/{tid}"):
        text = await b.get(path, status=403)
        assert "This needs the datasources:read scope" in text, path

    reader = await signed_in(gw, ["accesspolicies:read", "datasources:read"])
    page = await reader.get("/ui/datasources")
    assert "Add a data source" not in page and "/delete" not in page
    assert "Adding and deleting data sources needs the datasources:write scope." in page
    page = await reader.get("/ui/datasources/a")
    assert "<textarea" not in page and "Editing rules needs the datasources:write and" in page
    page = await reader.get(f"/ui/teams/{tid}")
    assert "<textarea" not in page and "<code>alice</code>" in page
    assert "Changing teams needs the datasources:write and datasources.permissions:write scopes." in page
    assert "Create a team" not in await reader.get("/ui/teams")
    _, text = await reader.post("/ui/datasources", {"name": "N", "type": "loki", "accessPolicyId": p["id"]},
                                status=403)
    assert "This needs the datasources:write scope" in text

    writer = await signed_in(gw, ["accesspolicies:read", "datasources:read", "datasources:write"])
    checks = [("/ui/datasources/a/rules", {f"rules:{tid}": '{a="b"}'}), ("/ui/teams", {"name": "n"}),
              (f"/ui/teams/{tid}/name", {"name": "n"}), (f"/ui/teams/{tid}/members", {"members": "x"}),
              (f"/ui/teams/{tid}/delete", {})]
    for path, data in checks:
        _, text = await writer.post(path, data, status=403)
        assert "This needs the datasources.permissions:write scope" in text, path

    stack_admin = await signed_in(gw, ALL_DS, [{"type": "stack", "identifier": "100"}])
    page = await stack_admin.get("/ui/datasources/a")
    assert "<textarea" in page  # rules: the data source is within its stack
    page = await stack_admin.get("/ui/teams")
    assert "Create a team" not in page and "Teams span the org" in page
    for path, data in checks[1:]:
        _, text = await stack_admin.post(path, data, status=403)
        assert "Whole-org realm needed" in text and "Teams span the org" in html.unescape(text), path
    await stack_admin.post("/ui/datasources/a/rules", {f"rules:{tid}": '{a="b"}', "version": version(
        await stack_admin.get("/ui/datasources/a"))}, form_page="/ui/datasources/a")
    assert await rules_of(gw, "a") == [{"teamId": tid, "rules": [rule('100:{a="b"}')]}]
    assert (await gw.api("GET", f"{TEAMS}/{tid}"))["name"] == "t"

    # another org's admin sees neither the data source nor the team
    gw.client.session.cookie_jar.clear()
    other = Browser(gw)
    await other.sign_in(await bootstrap_token(gw.state, "2"))
    assert "No such data source" in await other.get("/ui/datasources/a", status=404)
    assert "No such team" in await other.get(f"/ui/teams/{tid}", status=404)
    assert "No data sources yet." in await other.get("/ui/datasources")


async def test_editing_a_datasource_policy_keeps_its_read_scope_and_no_label_policies(gw: Gateway) -> None:
    from tests.test_page import policy_form

    b = Browser(gw)
    await b.sign_in()
    p = await reader_policy(gw, ["metrics:read"])
    await datasource(gw, "guarded", p["id"])
    form = policy_form("ignored", ["logs:read"])
    _, text = await b.post(f"/ui/policies/{p['id']}/edit", form, status=400)
    assert "data source &#39;guarded&#39; uses this policy and needs its metrics:read scope" in text
    form = policy_form("ignored", ["metrics:read"], selectors='{env="dev"}')
    _, text = await b.post(f"/ui/policies/{p['id']}/edit", form, status=400)
    assert "without label policies" in text
    got = await gw.api("GET", f"/api/v1/accesspolicies/{p['id']}")
    assert got["scopes"] == ["metrics:read"] and got["realms"][0]["labelPolicies"] == []
