"""The Access Policies page (/ui/) server side: every form, sign-in, CSRF, validation, pagination, audit."""

from __future__ import annotations

import asyncio
import html
import re
from datetime import UTC, datetime, timedelta
from typing import Any

from tests.conftest import Gateway, bootstrap_token, make_config

P = "/api/v1/accesspolicies"
_CSRF = re.compile(r'name="csrf" value="([^"]+)"')


class Browser:
    """The test client used like a browser: follows the page's forms, keeps its cookie."""

    def __init__(self, gw: Gateway):
        self.gw = gw
        self.c = gw.client

    async def get(self, path: str, status: int = 200) -> str:
        r = await self.c.get(path, allow_redirects=False)
        text = await r.text()
        assert r.status == status, (path, r.status, text[:2000])
        return text

    async def csrf(self, path: str = "/ui/policies") -> str:
        m = _CSRF.search(await self.get(path))
        assert m, "no CSRF field on " + path
        return html.unescape(m.group(1))

    async def post(self, path: str, data: list[tuple[str, str]] | dict[str, str], status: int = 303,
                   csrf: str | None = "page", form_page: str = "/ui/policies") -> tuple[str, str]:
        """POST a form; returns (Location, body). ``csrf="page"`` takes the token from ``form_page``."""
        items = list(data.items()) if isinstance(data, dict) else list(data)
        if csrf == "page":
            csrf = await self.csrf(form_page)
        if csrf is not None:
            items.append(("csrf", csrf))
        r = await self.c.post(path, data=items, allow_redirects=False)
        text = await r.text()
        assert r.status == status, (path, r.status, text[:3000])
        return r.headers.get("Location", ""), text

    async def sign_in(self, token: str | None = None, status: int = 303) -> str:
        _, text = await self.post("/ui/signin", {"token": token or self.gw.admin_token, "next": "/ui/policies"},
                                  status=status, form_page="/ui/signin")
        return text


def policy_form(name: str, scopes: list[str], realm: str = "stack:100", selectors: str = "",
                subnets: str = "", display: str = "") -> list[tuple[str, str]]:
    data = [("name", name), ("displayName", display), ("realm", realm), (f"selectors:{realm}", selectors),
            ("subnets", subnets)]
    return data + [("scope", s) for s in scopes]


async def audit_rows(gw: Gateway) -> list[dict[str, Any]]:
    return (await gw.api("GET", "/api/v1/auditlog"))["items"]  # type: ignore[no-any-return]


def token_id(gw: Gateway, token: str) -> str:
    from gateway.policy import tokens as tokfmt
    return tokfmt.decode(token).token_id


# ---- sign-in -------------------------------------------------------------------------------------------

async def test_sign_in_session_cookie_and_sign_out(gw: Gateway) -> None:
    b = Browser(gw)
    r = await gw.client.get("/ui/policies?q=x", allow_redirects=False)
    assert r.status == 303 and r.headers["Location"] == "/ui/signin?next=%2Fui%2Fpolicies%3Fq%3Dx"
    r = await gw.client.get("/ui", allow_redirects=False)
    assert r.status == 303 and r.headers["Location"] == "/ui/policies"
    page = await b.get("/ui/signin")
    assert '<label for="token">Admin token</label>' in page and 'type="password"' in page
    csrf = html.unescape(_CSRF.search(page).group(1))  # type: ignore[union-attr]
    r = await gw.client.post("/ui/signin", data={"token": gw.admin_token, "csrf": csrf, "next": "/ui/audit"},
                             allow_redirects=False)
    assert r.status == 303 and r.headers["Location"] == "/ui/audit"
    cookie = r.headers["Set-Cookie"]
    assert cookie.startswith("gateway_ui=") and "HttpOnly" in cookie and "SameSite=Strict" in cookie
    assert "Path=/ui" in cookie and "Max-Age=28800" in cookie and "expires=" in cookie.lower()
    value = cookie.split(";", 1)[0].split("=", 1)[1]
    assert gw.admin_token not in value and token_id(gw, gw.admin_token) not in value  # sealed, not readable
    page = await b.get("/ui/policies")
    assert "Signed in with token" in page and "bootstrap-admin" in page
    assert csrf not in page  # a fresh CSRF token after sign-in (no fixation)
    loc, _ = await b.post("/ui/signout", {})
    assert loc == "/ui/signin"
    assert "Signed out." in await b.get("/ui/signin")
    r = await gw.client.get("/ui/policies", allow_redirects=False)
    assert r.status == 303 and r.headers["Location"].startswith("/ui/signin")


async def test_link_from_another_site_reloads_to_get_the_strict_cookie(gw: Gateway) -> None:
    """A SameSite=Strict cookie is not sent on a cross-site navigation: reload same-origin instead of
    answering "sign in" (which would also overwrite the good cookie)."""
    r = await gw.client.get("/ui/policies?q=<x>", headers={"Sec-Fetch-Site": "cross-site"}, allow_redirects=False)
    text = await r.text()
    assert r.status == 200 and '<meta http-equiv="refresh" content="0">' in text
    assert "<x>" not in text and '<a href="/ui/policies?q=' in text
    r = await gw.client.get("/ui/policies", headers={"Sec-Fetch-Site": "same-origin"}, allow_redirects=False)
    assert r.status == 303


async def test_sign_in_refuses_bad_tokens_and_missing_scope(gw: Gateway) -> None:
    b = Browser(gw)
    text = await b.sign_in("glc_nonsense", status=401)
    assert "invalid token" in text and 'aria-invalid="true"' in text
    assert "Paste an admin token" in await b.sign_in("   ", status=400)
    p = await gw.policy("metrics-only", ["metrics:read"])
    tok = (await gw.token(p["id"], "m1"))["token"]
    text = await b.sign_in(tok, status=403)
    assert "lacks the accesspolicies:read scope" in text
    r = await gw.client.get("/ui/policies", allow_redirects=False)
    assert r.status == 303  # still signed out


async def test_sign_in_next_is_never_an_open_redirect(gw: Gateway) -> None:
    b = Browser(gw)
    for evil in ("https://evil.example/", "//evil.example/ui/", "/ui/\\evil", "/api/v1/accesspolicies"):
        gw.client.session.cookie_jar.clear()
        loc, _ = await b.post("/ui/signin", {"token": gw.admin_token, "next": evil}, form_page="/ui/signin")
        assert loc == "/ui/policies", evil


async def test_read_only_admin_sees_which_scope_is_missing(gw: Gateway) -> None:
    p = await gw.policy("viewer", ["accesspolicies:read"])
    tok = (await gw.token(p["id"], "viewer-1"))["token"]
    b = Browser(gw)
    await b.sign_in(tok)
    page = await b.get("/ui/policies")
    assert "Create access policy" not in page and "/delete" not in page
    text = await b.get("/ui/policies/new", status=403)
    assert "needs the accesspolicies:write scope" in text and "accesspolicies:read" in text
    _, text = await b.post(f"/ui/policies/{p['id']}/delete", {}, status=403)
    assert "accesspolicies:delete" in text
    await gw.api("GET", f"{P}/{p['id']}")  # not deleted


async def test_deleted_or_expired_token_ends_the_session(gw: Gateway) -> None:
    p = await gw.policy("second-admin", ["accesspolicies:read"])
    t = await gw.token(p["id"], "second")
    b = Browser(gw)
    await b.sign_in(t["token"])
    await b.get("/ui/policies")
    await gw.api("DELETE", f"/api/v1/tokens/{t['id']}")
    r = await gw.client.get("/ui/policies", allow_redirects=False)
    assert r.status == 303 and r.headers["Location"].startswith("/ui/signin")
    assert "Your token was deleted" in await b.get(r.headers["Location"])

    t2 = await gw.token(p["id"], "short", expiresAt=(datetime.now(UTC) + timedelta(seconds=1)).isoformat())
    await b.sign_in(t2["token"])
    await b.get("/ui/policies")
    await asyncio.sleep(1.1)
    r = await gw.client.get("/ui/policies", allow_redirects=False)
    assert r.status == 303
    assert "expired" in await b.get(r.headers["Location"])


async def test_policy_losing_the_read_scope_ends_the_session(gw: Gateway) -> None:
    p = await gw.policy("demoted", ["accesspolicies:read"])
    t = await gw.token(p["id"], "demoted-1")
    b = Browser(gw)
    await b.sign_in(t["token"])
    await gw.api("POST", f"{P}/{p['id']}", {"scopes": ["metrics:read"]})
    r = await gw.client.get("/ui/policies", allow_redirects=False)
    assert r.status == 303 and r.headers["Location"].startswith("/ui/signin")


async def test_csrf_missing_or_wrong_is_refused(gw: Gateway) -> None:
    b = Browser(gw)
    _, text = await b.post("/ui/signin", {"token": gw.admin_token}, status=403, csrf=None)
    assert "CSRF" in text
    await b.sign_in()
    form = policy_form("csrf-test", ["metrics:read"])
    for csrf in (None, "", "wrong-token-value"):
        _, text = await b.post("/ui/policies/new", form, status=403, csrf=csrf)
        assert "CSRF" in text and "Form expired" in text
    _, text = await b.post("/ui/signout", {}, status=403, csrf="nope")
    assert "CSRF" in text
    listed = await gw.api("GET", f"{P}?name=csrf-test")
    assert listed["items"] == []
    await b.post("/ui/policies/new", form)  # the real token works
    assert len((await gw.api("GET", f"{P}?name=csrf-test"))["items"]) == 1


# ---- policies ------------------------------------------------------------------------------------------

async def test_validation_errors_are_shown_beside_each_field(gw: Gateway) -> None:
    b = Browser(gw)
    await b.sign_in()
    form = policy_form("bad\tname", [], selectors='{env="dev"}\n{env=}\n', subnets="10.0.0.0/8\n10.0.0.300/8")
    _, text = await b.post("/ui/policies/new", form, status=400)
    assert "The policy was not saved: 4 fields need attention." in text
    assert "name must be 1-255 printable characters" in text
    assert 'value="bad\tname"' in text  # what was typed is kept
    assert "Choose at least one scope." in text
    assert re.search(r'id="err-realm-stack-100-1">line 2: selector ', text)
    assert 'id="err-subnets-1">line 2: &#39;10.0.0.300/8&#39; is not an IPv4 or IPv6 address' in text
    assert 'aria-invalid="true" aria-describedby="err-subnets-1 "' in text
    assert "{env=&#34;dev&#34;}\n{env=}" in text  # the textarea keeps the lines
    _, text = await b.post("/ui/policies/new", [("name", "x"), ("scope", "metrics:read"), ("moreScopes", "Nope")],
                           status=400)
    assert "scope &#39;Nope&#39; is not of the form service:permission" in text
    assert "Choose at least one realm." in text
    _, text = await b.post("/ui/policies/new", policy_form("x", ["metrics:read"], realm="stack:200"), status=400)
    assert "stack 200 belongs to another org" in text  # the validator's message, on that realm's row
    assert (await gw.api("GET", f"{P}?name=x"))["items"] == []


async def test_duplicate_name_is_refused(gw: Gateway) -> None:
    b = Browser(gw)
    await b.sign_in()
    await b.post("/ui/policies/new", policy_form("dup", ["metrics:read"]))
    _, text = await b.post("/ui/policies/new", policy_form("dup", ["metrics:read"]), status=409)
    assert "an access policy named &#39;dup&#39; already exists" in text


async def test_create_edit_delete_policy(gw: Gateway) -> None:
    b = Browser(gw)
    await b.sign_in()
    form = policy_form("team-a", ["metrics:read", "logs:read"], selectors='{env="dev"}\n{team=~"a|b"}',
                       subnets="10.0.0.0/8\n2001:db8::/32", display="Team A")
    loc, _ = await b.post("/ui/policies/new", form, form_page="/ui/policies/new")
    pid = loc.rsplit("/", 1)[1]
    got = await gw.api("GET", f"{P}/{pid}")
    assert got["name"] == "team-a" and got["displayName"] == "Team A"
    assert got["scopes"] == ["logs:read", "metrics:read"]
    assert got["realms"] == [{"type": "stack", "identifier": "100", "labelPolicies": [
        {"selector": '{env="dev"}'}, {"selector": '{team=~"a|b"}'}]}]
    assert got["conditions"] == {"allowedSubnets": ["10.0.0.0/8", "2001:db8::/32"]}
    page = await b.get(loc)
    assert "Created access policy team-a." in page and "{env=&#34;dev&#34;}" in page

    edit = await b.get(f"/ui/policies/{pid}/edit")
    assert 'value="logs:read" checked' in edit and "10.0.0.0/8\n2001:db8::/32</textarea>" in edit
    form = [("displayName", "Team A2"), ("status", "inactive"), ("scope", "metrics:read"),
            ("realm", "org:1"), ("selectors:org:1", ""), ("realm", "stack:101"),
            ("selectors:stack:101", '{app="x"}'), ("subnets", ""), ("name", "renamed-is-ignored")]
    loc, _ = await b.post(f"/ui/policies/{pid}/edit", form)
    got = await gw.api("GET", f"{P}/{pid}")
    assert got["name"] == "team-a" and got["displayName"] == "Team A2" and got["status"] == "inactive"
    assert got["scopes"] == ["metrics:read"] and got["conditions"] == {"allowedSubnets": []}
    assert got["realms"] == [{"type": "org", "identifier": "1", "labelPolicies": []},
                             {"type": "stack", "identifier": "101", "labelPolicies": [{"selector": '{app="x"}'}]}]
    _, text = await b.post(f"/ui/policies/{pid}/edit", [("displayName", "y"), ("realm", "stack:100"),
                                                        ("selectors:stack:100", "{x")], status=400)
    assert "Choose at least one scope." in text and "line 1: selector" in text

    await gw.token(pid, "t-one")
    await gw.token(pid, "t-two")
    confirm = await b.get(f"/ui/policies/{pid}/delete")
    assert "Its 2 tokens will stop working at once" in confirm and "Delete policy and 2 tokens" in confirm
    loc, _ = await b.post(f"/ui/policies/{pid}/delete", {})
    assert loc == "/ui/policies"
    assert "Deleted access policy team-a; 2 tokens stopped working." in await b.get(loc)
    await gw.api("GET", f"{P}/{pid}", expect=404)
    assert (await gw.api("GET", f"/api/v1/tokens?accessPolicyId={pid}"))["items"] == []

    actor = token_id(gw, gw.admin_token)
    mine = [(r["action"], r["actor"]) for r in await audit_rows(gw) if r["resourceId"] == pid]
    assert mine == [("accesspolicy.delete", actor), ("accesspolicy.update", actor), ("accesspolicy.create", actor)]


async def test_unknown_policy_and_ui_paths_answer_html_404(gw: Gateway) -> None:
    b = Browser(gw)
    await b.sign_in()
    assert "No such access policy" in await b.get("/ui/policies/00000000-0000-0000-0000-000000000000", 404)
    assert "ids are UUIDs" in await b.get("/ui/policies/not-a-uuid/edit", 404)
    for method, path in (("GET", "/ui/nope"), ("PUT", "/ui/policies"), ("GET", "/ui/static/missing.css")):
        r = await gw.client.request(method, path, allow_redirects=False)
        assert r.status == 404 and r.content_type == "text/html", (method, path)
    r = await gw.client.get("/ui/static/page.css")
    assert r.status == 200 and r.content_type == "text/css"
    r = await gw.client.get("/prometheus/api/v1/query?query=up")  # the data path is untouched
    assert r.status == 401 and (await r.json())["status"] == "error"


async def test_security_headers(gw: Gateway) -> None:
    b = Browser(gw)
    await b.sign_in()
    r = await gw.client.get("/ui/policies")
    assert r.headers["Cache-Control"] == "no-store" and r.headers["X-Frame-Options"] == "DENY"
    assert "script-src 'self'" in r.headers["Content-Security-Policy"]
    assert "frame-ancestors 'none'" in r.headers["Content-Security-Policy"]
    assert "Secure" not in r.headers.get("Set-Cookie", "")


async def test_cookie_is_secure_behind_a_trusted_tls_proxy(db_dsn: str, aiohttp_client: Any) -> None:
    from gateway.app import build_app, close_state, open_state

    state = await open_state(make_config(db_dsn, trusted_proxies=["127.0.0.0/8"]))
    try:
        gw = Gateway(await aiohttp_client(build_app(state)), state, await bootstrap_token(state))
        b = Browser(gw)
        for proto, secure in (("http", False), ("https", True)):
            gw.client.session.cookie_jar.clear()
            csrf = await b.csrf("/ui/signin")
            r = await gw.client.post("/ui/signin", data={"token": gw.admin_token, "csrf": csrf},
                                     headers={"X-Forwarded-Proto": proto}, allow_redirects=False)
            assert r.status == 303 and ("; Secure" in r.headers["Set-Cookie"]) == secure, r.headers["Set-Cookie"]
    finally:
        await close_state(state)


# ---- tokens --------------------------------------------------------------------------------------------

async def test_create_token_shows_secret_once_then_delete(gw: Gateway) -> None:
    b = Browser(gw)
    await b.sign_in()
    p = await gw.policy("readers", ["accesspolicies:read"])
    page_url = f"/ui/policies/{p['id']}"
    day = (datetime.now(UTC) + timedelta(days=30)).date().isoformat()
    loc, _ = await b.post(f"{page_url}/tokens", {"name": "ci-agent", "expires": day}, form_page=page_url)
    assert loc == f"{page_url}#new-token"  # redirect after POST: a reload never re-posts the form
    text = await b.get(page_url)
    m = re.search(r'id="new-token" class="secret-value" value="(glc_[^"]+)"', text)
    assert m and "you will not see it again" in text and 'data-copy="new-token"' in text
    secret = m.group(1)
    r = await gw.client.get(P, headers=gw.auth(secret))  # the shown token really works
    assert r.status == 200
    again = await b.get(page_url)
    assert secret not in again and "glc_" not in again and "ci-agent" in again
    assert f"{day} 00:00 UTC" in again
    tok = (await gw.api("GET", f"/api/v1/tokens?accessPolicyId={p['id']}"))["items"][0]
    assert tok["expiresAt"] == f"{day}T00:00:00Z"

    _, text = await b.post(f"{page_url}/tokens", {"name": "bad\tname", "expires": "2001-01-01"}, status=400,
                           form_page=page_url)
    assert "name must be 1-255 printable characters" in text and "expiresAt must be in the future" in text
    _, text = await b.post(f"{page_url}/tokens", {"name": "ci-agent", "expires": ""}, status=409, form_page=page_url)
    assert "a token named &#39;ci-agent&#39; already exists" in text and "glc_" not in text

    confirm = await b.get(f"/ui/tokens/{tok['id']}/delete")
    assert "Delete token ci-agent?" in confirm
    loc, _ = await b.post(f"/ui/tokens/{tok['id']}/delete", {})
    assert loc == page_url
    assert "Deleted token ci-agent" in await b.get(loc)
    r = await gw.client.get(P, headers=gw.auth(secret))
    assert r.status == 401
    acts = {(r["action"], r["resourceId"]) for r in await audit_rows(gw)}
    assert ("token.create", tok["id"]) in acts and ("token.delete", tok["id"]) in acts


async def test_token_list_marks_expired_and_usage(gw: Gateway) -> None:
    b = Browser(gw)
    await b.sign_in()
    p = await gw.policy("mixed", ["accesspolicies:read"])
    await gw.token(p["id"], "soon-gone", expiresAt=(datetime.now(UTC) + timedelta(seconds=1)).isoformat())
    used = await gw.token(p["id"], "used")
    await gw.token(p["id"], "forever")
    await gw.client.get(P, headers=gw.auth(used["token"]))
    await gw.state.cache.flush_usage()
    await asyncio.sleep(1.1)
    page = await b.get(f"/ui/policies/{p['id']}")
    row = lambda name: re.search(rf"<tr[^>]*>\s*<th scope=\"row\">{name}.*?</tr>", page, re.S).group(0)  # noqa: E731
    assert 'class="expired"' in row("soon-gone") and "badge expired" in row("soon-gone")
    assert "never" not in row("used").split("</td>", 3)[2] and "UTC" in row("used")
    assert "expired" not in row("forever") and row("forever").count("never") == 3


async def test_edit_token_display_name_and_expiry(gw: Gateway) -> None:
    b = Browser(gw)
    await b.sign_in()
    p = await gw.policy("editable", ["metrics:read"])
    at = (datetime.now(UTC) + timedelta(days=10)).replace(hour=15, minute=30, second=0, microsecond=0)
    t = await gw.token(p["id"], "ci-agent", expiresAt=at.isoformat())
    page_url = f"/ui/policies/{p['id']}"
    assert f'href="/ui/tokens/{t["id"]}/edit"' in await b.get(page_url)
    edit = f"/ui/tokens/{t['id']}/edit"
    form = await b.get(edit)
    assert 'name="displayName" value="ci-agent"' in form and f'value="{at:%Y-%m-%dT%H:%M:%S}"' in form
    assert f'data-local>{at:%Y-%m-%d %H:%M:%S} UTC</time>' in form

    # the display name changes; the expiry as the field showed it is kept
    loc, _ = await b.post(edit, {"displayName": "CI agent (prod)", "expires": f"{at:%Y-%m-%dT%H:%M:%S}"},
                          form_page=edit)
    assert loc == page_url
    got = await gw.api("GET", f"/api/v1/tokens/{t['id']}")
    assert got["displayName"] == "CI agent (prod)" and got["expiresAt"] == at.strftime("%Y-%m-%dT%H:%M:%SZ")
    page = await b.get(loc)
    assert "Saved token ci-agent." in page and "CI agent (prod)" in page

    day = (datetime.now(UTC) + timedelta(days=40)).date().isoformat()
    await b.post(edit, {"displayName": "CI agent (prod)", "expires": day}, form_page=edit)
    assert (await gw.api("GET", f"/api/v1/tokens/{t['id']}"))["expiresAt"] == f"{day}T00:00:00Z"
    await b.post(edit, {"displayName": "", "expires": ""}, form_page=edit)  # empty: the name, and never
    got = await gw.api("GET", f"/api/v1/tokens/{t['id']}")
    assert got["displayName"] == "ci-agent" and got["expiresAt"] is None

    _, text = await b.post(edit, {"displayName": "x" * 300, "expires": "2001-01-01"}, status=400, form_page=edit)
    assert "The token was not saved: 2 fields need attention." in text
    assert "displayName must be a non-empty string" in text and "expiresAt must be in the future" in text
    assert 'value="2001-01-01"' in text
    _, text = await b.post(edit, {"displayName": "y", "expires": ""}, status=403, csrf="wrong", form_page=edit)
    assert "CSRF" in text
    assert (await gw.api("GET", f"/api/v1/tokens/{t['id']}"))["displayName"] == "ci-agent"
    actor = token_id(gw, gw.admin_token)
    mine = [(r["action"], r["actor"]) for r in await audit_rows(gw) if r["resourceId"] == t["id"]]
    assert mine == [("token.update", actor)] * 3 + [("token.create", actor)]

    viewer = await gw.policy("viewer", ["accesspolicies:read"])
    gw.client.session.cookie_jar.clear()
    await b.sign_in((await gw.token(viewer["id"], "v"))["token"])
    assert "/edit" not in await b.get(page_url)
    assert "needs the accesspolicies:write scope" in await b.get(edit, status=403)
    _, text = await b.post(edit, {"displayName": "z"}, status=403, form_page=page_url)
    assert "accesspolicies:write" in text


async def test_token_expiry_is_a_date_time_in_utc_stored_exactly(gw: Gateway) -> None:
    """The expiry field takes a date and time (UTC, as ``<input type=datetime-local>`` sends it) and the token
    stops working at exactly that second; the page states UTC and marks the time for localtime.js."""
    b = Browser(gw)
    await b.sign_in()
    p = await gw.policy("timed", ["metrics:read"])
    page_url = f"/ui/policies/{p['id']}"
    page = await b.get(page_url)
    assert 'type="datetime-local" step="1" id="token-expires"' in page and "Expires at, UTC" in page
    assert '<script src="/ui/static/localtime.js" defer>' in page
    day = (datetime.now(UTC) + timedelta(days=20)).date().isoformat()
    cases = [("t-seconds", f"{day}T17:45:30", f"{day}T17:45:30Z"),  # what the field sends with step=1
             ("t-minutes", f"{day}T08:05", f"{day}T08:05:00Z"),  # and without seconds
             ("t-zone", f"{day}T12:00:00+02:00", f"{day}T10:00:00Z")]  # an explicit zone is honoured
    for name, sent, stored in cases:
        await b.post(f"{page_url}/tokens", {"name": name, "expires": sent}, form_page=page_url)
        tok = (await gw.api("GET", f"/api/v1/tokens?accessPolicyId={p['id']}&name={name}"))["items"][0]
        assert tok["expiresAt"] == stored, (sent, tok["expiresAt"])
    page = await b.get(page_url)
    assert f'<time datetime="{day}T17:45:30Z" data-local>{day} 17:45 UTC</time>' in page
    _, text = await b.post(f"{page_url}/tokens", {"name": "t-bad", "expires": "next tuesday"}, status=400,
                           form_page=page_url)
    assert "expiry must be a date and time in UTC such as 2030-01-31T17:30" in text

    # Editing: the field shows the exact second; sent back as shown, a fraction the API set is kept.
    at = (datetime.now(UTC) + timedelta(days=5)).replace(hour=10, minute=11, second=12, microsecond=345000)
    t = await gw.token(p["id"], "t-api", expiresAt=at.isoformat())
    before = (await gw.api("GET", f"/api/v1/tokens/{t['id']}"))["expiresAt"]
    assert before.endswith("12.345000Z"), before  # the API keeps fractions
    edit = f"/ui/tokens/{t['id']}/edit"
    form = await b.get(edit)
    assert f'value="{at:%Y-%m-%dT%H:%M:%S}"' in form and '<script src="/ui/static/localtime.js" defer>' in form
    await b.post(edit, {"displayName": "", "expires": f"{at:%Y-%m-%dT%H:%M:%S}"}, form_page=edit)
    await b.post(edit, {"displayName": "", "expires": f"{at:%Y-%m-%d %H:%M:%S} UTC"}, form_page=edit)
    assert (await gw.api("GET", f"/api/v1/tokens/{t['id']}"))["expiresAt"] == before
    await b.post(edit, {"displayName": "", "expires": f"{day}T23:59:59"}, form_page=edit)
    assert (await gw.api("GET", f"/api/v1/tokens/{t['id']}"))["expiresAt"] == f"{day}T23:59:59Z"
    script = await b.get("/ui/static/localtime.js")
    assert "toLocaleString" in script and "data-utc-local" in script


# ---- list, filters, pagination --------------------------------------------------------------------------

def names(page: str) -> list[str]:
    return re.findall(r'<th scope="row"><a href="/ui/policies/[0-9a-f-]+">([^<]+)</a>', page)


async def walk(b: Browser, url: str) -> tuple[list[str], int]:
    seen: list[str] = []
    pages = 0
    next_url: str | None = url
    while next_url:
        page = await b.get(next_url)
        seen += names(page)
        pages += 1
        m = re.search(r'<a href="([^"]+)" rel="next">', page)
        next_url = html.unescape(m.group(1)) if m else None
        assert pages < 20
    return seen, pages


async def test_pagination_and_filters(gw: Gateway) -> None:
    b = Browser(gw)
    await b.sign_in()
    for i in range(7):
        await gw.policy(f"pol-{i}", ["metrics:read"], [{"type": "stack", "identifier": "100" if i % 2 else "101"}])
    await gw.policy("logs-team", ["logs:read"], [{"type": "stack", "identifier": "101"}])
    await gw.api("POST", f"{P}/{(await gw.api('GET', f'{P}?name=pol-6'))['items'][0]['id']}", {"status": "inactive"})
    seen, pages = await walk(b, "/ui/policies?size=3")
    assert pages == 3 and seen == ["bootstrap-admin", *[f"pol-{i}" for i in range(7)], "logs-team"]
    seen, pages = await walk(b, "/ui/policies?size=2&realm=stack%3A101")
    assert seen == ["pol-0", "pol-2", "pol-4", "pol-6", "logs-team"] and pages == 3
    seen, pages = await walk(b, "/ui/policies?size=2&q=POL")  # text search: name or display name, any case
    assert seen == [f"pol-{i}" for i in range(7)] and pages == 4
    seen, _ = await walk(b, "/ui/policies?q=pol&realm=stack%3A100")
    assert seen == ["pol-1", "pol-3", "pol-5"]
    seen, _ = await walk(b, "/ui/policies?status=inactive")
    assert seen == ["pol-6"]
    seen, _ = await walk(b, "/ui/policies?q=%25")  # LIKE wildcards are taken literally
    assert seen == []
    page = await b.get("/ui/policies?realm=stack%3A101&q=team")
    assert '<option value="stack:101" selected>' in page and 'value="team"' in page
    assert names(page) == ["logs-team"]
    row = re.search(r"logs-team</a>.*?</tr>", page, re.S).group(0)  # type: ignore[union-attr]
    assert "stack acme-dev (101)" in row and "<code>logs:read</code>" in row and ">0</a>" in row
    page = await b.get("/ui/policies?size=4")
    assert "9 access policies; showing 1–4 (page 1 of 3)" in page and 'rel="prev"' not in page
    page = await b.get("/ui/policies?size=4&page=3")
    assert "showing 9–9 (page 3 of 3)" in page and 'rel="next"' not in page
    assert '<a href="/ui/policies?size=4&amp;page=2" rel="prev">Previous page</a>' in page
    assert names(await b.get("/ui/policies?size=4&page=2")) == ["pol-3", "pol-4", "pol-5", "pol-6"]
    page = await b.get("/ui/policies?size=4&page=9")  # past the end: says so, and links back
    assert names(page) == [] and "on page 9" in page and 'href="/ui/policies?size=4&amp;page=3" rel="prev"' in page
    assert names(await b.get("/ui/policies?page=x")) == names(await b.get("/ui/policies"))
    assert "3 access policies match these filters" in await b.get("/ui/policies?q=pol&realm=stack%3A100")


# ---- audit log -----------------------------------------------------------------------------------------

async def test_audit_page_lists_who_what_when_before_after(gw: Gateway) -> None:
    b = Browser(gw)
    await b.sign_in()
    loc, _ = await b.post("/ui/policies/new", policy_form("audited", ["metrics:read"], display="Before"))
    pid = loc.rsplit("/", 1)[1]
    await b.post(f"/ui/policies/{pid}/edit", [("displayName", "After"), ("scope", "metrics:read"),
                                              ("realm", "stack:100"), ("status", "active")])
    page = await b.get("/ui/audit")
    assert "<code>accesspolicy.update</code>" in page and "<code>accesspolicy.create</code>" in page
    boot = (await gw.api("GET", f"/api/v1/tokens/{token_id(gw, gw.admin_token)}"))["name"]
    assert f"token {boot} (policy bootstrap-admin)" in page
    upd = page[page.index("<code>accesspolicy.update</code>"):page.index("<code>accesspolicy.create</code>")]
    assert '<th scope="row">displayName</th><td><code class="was">Before</code></td><td><code class="now">After' in upd
    assert "scopes" not in upd.split("<details>")[0]  # only changed fields in the summary
    assert f'href="/ui/policies/{pid}">audited</a>' in upd and "&#34;displayName&#34;: &#34;After&#34;" in upd
    assert re.search(r'<time datetime="\d{4}-\d\d-\d\dT', page)


async def test_audit_pages_and_needs_whole_org(gw: Gateway) -> None:
    b = Browser(gw)
    await b.sign_in()
    for i in range(4):
        await gw.policy(f"a{i}", ["metrics:read"])
    first = await b.get("/ui/audit?size=3")
    assert first.count("<code>accesspolicy.create</code>") == 3
    m = re.search(r'<a href="([^"]+)" rel="next">Older</a>', first)
    assert m
    second = await b.get(html.unescape(m.group(1)))
    assert second.count("<code>accesspolicy.create</code>") >= 2  # a0 and the bootstrap policy
    p = await gw.policy("stack-admin", ["accesspolicies:read"], [{"type": "stack", "identifier": "100"}])
    tok = (await gw.token(p["id"], "stack-admin-1"))["token"]
    b2 = Browser(gw)
    gw.client.session.cookie_jar.clear()
    await b2.sign_in(tok)
    assert "needs a token whose access policy&#39;s realm is the whole org" in await b2.get("/ui/audit", 403)
    page = await b2.get("/ui/policies")
    assert names(page) == ["stack-admin"]  # a stack admin sees only policies within its stacks


async def test_datasources_page_is_live(gw: Gateway) -> None:
    b = Browser(gw)
    await b.sign_in()
    page = await b.get("/ui/datasources")
    assert "Not available yet" not in page and "Add a data source" in page  # tests/test_page_datasources.py
    assert '<a href="/ui/teams">Teams</a>' in page


async def test_session_key_is_shared_by_replicas(gw: Gateway) -> None:
    from gateway.web.session import load_key
    assert await load_key(gw.state.store) == await load_key(gw.state.store)
    assert len(await load_key(gw.state.store)) == 32


# ---- issue 16: the first hour of a new operator -------------------------------------------------------

async def test_selectors_for_an_unticked_realm_are_refused_not_dropped(gw: Gateway) -> None:
    b = Browser(gw)
    await b.sign_in()
    data = [("name", "half-ticked"), ("displayName", ""), ("scope", "metrics:read"), ("realm", "stack:100"),
            ("selectors:stack:100", ""), ("selectors:stack:101", '{team="a"}'), ("subnets", "")]
    _, text = await b.post("/ui/policies/new", data, status=400)
    assert "this realm is not ticked: tick it to apply them, or clear them" in text
    assert "{team=&#34;a&#34;}</textarea>" in text  # what was typed is still there
    assert (await gw.api("GET", f"{P}?name=half-ticked"))["items"] == []
    loc, _ = await b.post("/ui/policies/new", policy_form("half-ticked", ["metrics:read"], "stack:101", '{team="a"}'))
    pid = loc.rsplit("/", 1)[1]
    before = len(await audit_rows(gw))
    edit = [("displayName", ""), ("scope", "metrics:read"), ("realm", "stack:101"),
            ("selectors:stack:101", '{team="a"}'), ("selectors:stack:100", '{team="b"}'), ("status", "active")]
    _, text = await b.post(f"/ui/policies/{pid}/edit", edit, status=400)
    assert "not ticked" in text and "Saved" not in text
    assert len(await audit_rows(gw)) == before
    got = await gw.api("GET", f"{P}/{pid}")
    assert got["realms"] == [{"type": "stack", "identifier": "101", "labelPolicies": [{"selector": '{team="a"}'}]}]


async def test_token_secret_is_shown_once_after_the_redirect(gw: Gateway) -> None:
    b = Browser(gw)
    await b.sign_in()
    p = await gw.policy("once", ["metrics:read"])
    other = await gw.policy("other", ["metrics:read"])
    url = f"/ui/policies/{p['id']}"
    loc, _ = await b.post(f"{url}/tokens", {"name": "t1", "expires": ""}, form_page=url)
    assert loc == f"{url}#new-token"
    assert "glc_" not in await b.get(f"/ui/policies/{other['id']}")  # another policy's page never shows it...
    assert "glc_" not in await b.get(url)  # ...and it was taken from the session there: shown at most once
    loc, _ = await b.post(f"{url}/tokens", {"name": "t2", "expires": ""}, form_page=url)
    first = await b.get(url)
    assert "Token <code>t2</code> created" in first and "glc_" in first
    second = await b.get(url)  # the reload
    assert "glc_" not in second and "already exists" not in second


async def test_root_sends_browsers_to_the_page_and_api_clients_get_404(gw: Gateway) -> None:
    r = await gw.client.get("/", headers={"Accept": "text/html,application/xhtml+xml"}, allow_redirects=False)
    assert r.status == 302 and r.headers["Location"] == "/ui/"
    r = await gw.client.get("/", allow_redirects=False)
    assert r.status == 404 and (await r.json())["errorType"] == "not_found"


async def test_audit_filters_in_the_api(gw: Gateway) -> None:
    p = await gw.policy("audit-a", ["metrics:read"])
    await gw.policy("audit-b", ["metrics:read"])
    await gw.api("POST", f"{P}/{p['id']}", {"displayName": "A2"})
    tok = await gw.token(p["id"], "audit-tok")
    me = token_id(gw, gw.admin_token)

    async def ids(query: str) -> list[tuple[str, str]]:
        items = (await gw.api("GET", f"/api/v1/auditlog?{query}"))["items"]
        return [(r["action"], r["resourceId"]) for r in items]

    assert await ids(f"resource={p['id']}") == [("accesspolicy.update", p["id"]), ("accesspolicy.create", p["id"])]
    assert await ids("resource=audit-a") == await ids(f"resource={p['id']}")  # by name, too
    assert await ids("resourceType=token&actor=" + me) == [("token.create", tok["id"])]
    assert await ids("actor=cli") == []
    all_rows = await ids("")
    assert await ids("since=2000-01-01T00:00:00Z&until=2999-01-01T00:00:00Z") == all_rows
    assert await ids("until=2000-01-01T00:00:00Z") == []
    items = (await gw.api("GET", "/api/v1/auditlog?resourceType=accesspolicy&pageSize=1"))["items"]
    nxt = (await gw.api("GET", "/api/v1/auditlog?resourceType=accesspolicy&pageSize=1"))["metadata"]["pagination"]
    assert "resourceType=accesspolicy" in nxt["nextPage"] and items[0]["resourceType"] == "accesspolicy"
    for bad, field in (("resourceType=nope", "resourceType"), ("since=yesterday", "since"),
                       ("since=2030-01-01T00:00:00Z&until=2020-01-01T00:00:00Z", "since")):
        err = await gw.api("GET", f"/api/v1/auditlog?{bad}", expect=400)
        assert err["code"] == "invalid_argument" and err.get("field") == field, err


async def test_audit_filters_on_the_page(gw: Gateway) -> None:
    b = Browser(gw)
    await b.sign_in()
    p = await gw.policy("paged-a", ["metrics:read"])
    await gw.policy("paged-b", ["metrics:read"])
    await gw.token(p["id"], "paged-tok")
    boot = (await gw.api("GET", f"/api/v1/tokens/{token_id(gw, gw.admin_token)}"))["name"]
    page = await b.get("/ui/audit?resource=paged-a")
    assert page.count("<code>accesspolicy.create</code>") == 1 and "paged-b" not in page.split("<tbody>")[1]
    assert 'value="paged-a"' in page and ">Clear</a>" in page
    page = await b.get("/ui/audit?type=token")
    assert "<code>token.create</code>" in page and "<code>accesspolicy.create</code>" not in page
    page = await b.get(f"/ui/audit?who={boot}&type=accesspolicy")
    assert page.count("<code>accesspolicy.create</code>") == 2  # the bootstrap policy was made by "test"
    today = datetime.now(UTC).date()
    page = await b.get(f"/ui/audit?from={today.isoformat()}&to={today.isoformat()}&type=accesspolicy")
    assert page.count("<code>accesspolicy.create</code>") == 3
    page = await b.get(f"/ui/audit?to={(today - timedelta(days=1)).isoformat()}")
    assert "No change matches these filters." in page
    page = await b.get("/ui/audit?who=nobody-like-this", status=400)
    assert "No token named &#39;nobody-like-this&#39;" in page and 'aria-invalid="true"' in page
    assert "Give a date such as" in await b.get("/ui/audit?from=31.01.2030", status=400)
    page = await b.get("/ui/audit?type=accesspolicy&size=1")
    m = re.search(r'<a href="([^"]+)" rel="next">Older</a>', page)
    assert m and "type=accesspolicy" in html.unescape(m.group(1))
    row_links = re.findall(r'href="(/ui/audit\?type=accesspolicy&amp;resource=[^"]+)">its history', page)
    assert row_links and "<code>accesspolicy.create</code>" in await b.get(html.unescape(row_links[0]))


async def test_datasource_form_lists_a_searchable_slice_of_many_policies(gw: Gateway, monkeypatch: Any) -> None:
    from gateway.web import datasources
    monkeypatch.setattr(datasources, "CHOICE_CAP", 3)
    b = Browser(gw)
    await b.sign_in()
    for i in range(5):
        await gw.policy(f"grafana-{i}", ["metrics:read"])
    await gw.policy("writer-only", ["metrics:write"])  # never qualifies
    page = await b.get("/ui/datasources")
    assert "5 policies qualify; the first 3 are listed: search above to narrow" in page
    assert page.count('<option value="', page.index('id="ds-policy"')) == 1 + 3  # the empty choice and 3
    assert 'name="policy_q"' in page and "writer-only" not in page
    page = await b.get("/ui/datasources?policy_q=GRAFANA-4")
    assert "1 of 5 qualifying policies match" in page and ">grafana-4: Prometheus</option>" in page
    assert "grafana-3" not in page
    pid = (await gw.api("GET", f"{P}?name=grafana-4"))["items"][0]["id"]
    loc, _ = await b.post("/ui/datasources", {"name": "DS", "type": "prometheus", "accessPolicyId": pid,
                                              "policy_q": "grafana-4"}, form_page="/ui/datasources")
    assert loc.startswith("/ui/datasources/")
    page = await b.get("/ui/datasources?policy_q=zzz")
    assert "No qualifying access policy matches" in page
