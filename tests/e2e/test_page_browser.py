"""The Access Policies page in a real browser (Debian's chromium driven by Playwright) on a real server:
sign in, create a policy and a token, copy it, use it on the data path, delete the policy; add a data source
and a team, set the team's rule, and see it on the data path.

Screenshots of every page land in tests/artifacts/ (look at them); the policies page also in
docs/screenshots/policies.png for the README when GATEWAY_UPDATE_SCREENSHOTS=1.
"""

from __future__ import annotations

import base64
import importlib.util
import os
import shutil
from pathlib import Path
from typing import Any

import aiohttp

from tests.conftest import bootstrap_token, make_config, require
from tests.recorder import start_recorder

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "tests" / "artifacts"
DOC_SHOT = ROOT / "docs" / "screenshots" / "policies.png"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]

# A few policies so the screenshot of the list shows what a real one looks like.
_SAMPLE = [
    {"name": "grafana-datasource", "displayName": "Grafana data source (prod)", "scopes": ["metrics:read", "logs:read"],
     "realms": [{"type": "stack", "identifier": "100"}]},
    {"name": "team-payments-read", "displayName": "Payments team: read own data",
     "scopes": ["metrics:read", "logs:read", "traces:read"],
     "realms": [{"type": "stack", "identifier": "100", "labelPolicies": [{"selector": '{team="payments"}'}]}]},
    {"name": "alloy-agents", "displayName": "Alloy agents (write)", "scopes": ["metrics:write", "logs:write",
                                                                               "traces:write"],
     "realms": [{"type": "org", "identifier": "1"}], "conditions": {"allowedSubnets": ["10.0.0.0/8"]}},
    {"name": "dev-readonly", "displayName": "Developers, dev stack", "scopes": ["metrics:read", "logs:read"],
     "realms": [{"type": "stack", "identifier": "101", "labelPolicies": [{"selector": '{env="dev"}'},
                                                                         {"selector": '{env=~"staging|qa"}'}]}]},
]


def _basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


async def test_page_end_to_end_in_chromium(db_dsn: str, aiohttp_server: Any) -> None:
    require(shutil.which("chromium") is not None, "chromium")
    require(importlib.util.find_spec("playwright") is not None, "playwright (pip install playwright)")
    from playwright.async_api import async_playwright, expect

    from gateway.app import build_app, close_state, open_state

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    rec, up = await start_recorder(aiohttp_server)
    rec.lbac = True  # the upstream enforces X-Prom-Label-Policy like Loki, so header mode passes the probe
    state = await open_state(make_config(db_dsn, upstreams={"metrics": {"url": up, "lbac": "header"},
                                                            "logs": {"url": up, "lbac": "header"},
                                                            "traces": {"url": up}}))
    http: aiohttp.ClientSession | None = None
    try:
        server = await aiohttp_server(build_app(state))
        base = f"http://127.0.0.1:{server.port}"
        admin = await bootstrap_token(state)
        http = aiohttp.ClientSession()
        for body in _SAMPLE:
            async with http.post(f"{base}/api/v1/accesspolicies", json=body,
                                 headers={"Authorization": f"Bearer {admin}"}) as r:
                assert r.status == 200, await r.text()

        async with async_playwright() as pw:
            browser = await pw.chromium.launch(executable_path="/usr/bin/chromium", headless=True, args=CHROMIUM_ARGS)
            # UTC+05:30 all year: the token expiry's local time is known
            ctx = await browser.new_context(viewport={"width": 1280, "height": 800}, base_url=base,
                                            timezone_id="Asia/Kolkata", locale="en-US")
            await ctx.grant_permissions(["clipboard-read", "clipboard-write"], origin=base)
            page = await ctx.new_page()

            async def shot(name: str) -> None:
                await page.screenshot(path=str(ARTIFACTS / f"page-{name}.png"), full_page=True)

            # sign in
            await page.goto("/ui/")
            await expect(page).to_have_url(f"{base}/ui/signin?next=%2Fui%2Fpolicies")
            await page.get_by_label("Admin token").fill("glc_wrong")
            await page.get_by_role("button", name="Sign in").click()
            await expect(page.get_by_role("alert")).to_contain_text("invalid token")
            await shot("signin-error")
            await page.get_by_label("Admin token").fill(admin)
            await page.get_by_role("button", name="Sign in").click()
            await expect(page).to_have_url(f"{base}/ui/policies")
            await expect(page.get_by_role("heading", name="Access policies")).to_be_visible()

            # create a policy: one label selector, one IP range (the test's own client is on 127.0.0.1)
            await page.get_by_role("link", name="Create access policy").click()
            await page.get_by_label("Name", exact=True).fill("browser-made")
            await page.get_by_label("Display name").fill("Made in a browser")
            await page.locator('input[name="scope"][value="metrics:read"]').check()
            await page.get_by_label("Stack acme-prod (100)", exact=True).check()
            selectors = page.get_by_label("Label selectors for Stack acme-prod (100), one per line")
            await selectors.fill('{env="dev"}\n{env=}')
            await page.get_by_label("Allowed IP ranges, one per line").fill("127.0.0.0/8\n300.1.1.1")
            await page.get_by_role("button", name="Create access policy").click()
            await expect(page.get_by_text("line 2: selector")).to_be_visible()
            await expect(page.get_by_text("line 2: '300.1.1.1' is not an IPv4 or IPv6 address")).to_be_visible()
            await shot("policy-form-errors")
            await selectors.fill('{env="dev"}')
            await page.get_by_label("Allowed IP ranges, one per line").fill("127.0.0.0/8")
            await page.get_by_role("button", name="Create access policy").click()
            await expect(page.get_by_role("status").first).to_contain_text("Created access policy browser-made")
            policy_url = page.url
            assert "/ui/policies/" in policy_url

            # create a token; it is shown once, with a copy button
            await page.get_by_label("Name", exact=True).fill("browser-token")
            await page.get_by_role("button", name="Create token").click()
            await expect(page.get_by_text("you will not see it again")).to_be_visible()
            await page.get_by_role("button", name="Copy").click()
            await expect(page.locator("#new-token-status")).to_have_text("Copied to the clipboard.")
            token = await page.evaluate("navigator.clipboard.readText()")
            assert token.startswith("glc_") and token == await page.locator("#new-token").input_value()
            await shot("token-created")
            await page.goto(policy_url)
            assert token not in await page.content()

            # its expiry: a date and time in UTC, to the second, shown in the browser's time zone as typed
            await page.get_by_role("link", name="Edit token browser-token").click()
            await page.locator("#token-expires").fill("2031-03-04T05:06:07")
            await expect(page.locator("#token-expires-local")).to_have_text(
                "That is Mar 4, 2031, 10:36:07 AM your time.")
            await page.get_by_role("button", name="Save token").click()
            await expect(page.get_by_role("status").first).to_contain_text("Saved token browser-token.")
            await expect(page.locator("time[data-local]")).to_have_count(1)
            row = page.locator("tr", has=page.locator("time[data-local]"))
            await expect(row).to_contain_text("2031-03-04 05:06 UTC (Mar 4, 2031, 10:36:07 AM your time)")
            async with http.get(f"{base}/api/v1/tokens", params={"name": "browser-token", "includeExpired": "true"},
                                headers={"Authorization": f"Bearer {admin}"}) as r:
                assert (await r.json())["items"][0]["expiresAt"] == "2031-03-04T05:06:07Z"
            await shot("policy")

            # the token works on the data path, with the tenant and the label policy
            async with http.get(f"{base}/prometheus/api/v1/query", params={"query": "up"},
                                headers=_basic("100", token)) as r:
                assert r.status == 200, await r.text()
            seen = rec.last
            assert seen.path == "/prometheus/api/v1/query"
            assert seen.headers.getall("X-Scope-OrgID") == ["100"]
            assert seen.headers.getall("X-Prom-Label-Policy") == ["100:%7Benv=%22dev%22%7D"]

            await page.goto("/ui/policies")
            await expect(page.get_by_role("link", name="browser-made", exact=True)).to_be_visible()
            await shot("policies")
            if os.environ.get("GATEWAY_UPDATE_SCREENSHOTS"):  # refresh the README's picture on purpose only
                await page.screenshot(path=str(DOC_SHOT))
            await page.get_by_label("Name or display name contains").fill("payments")
            await page.get_by_role("button", name="Filter").click()
            await expect(page.locator("tbody tr")).to_have_count(1)
            await shot("policies-filtered")
            await page.goto(f"{policy_url}/edit")
            await shot("policy-edit")
            await page.goto("/ui/audit")
            await expect(page.get_by_text("token.create").first).to_be_visible()
            await page.locator("details summary").first.click()
            await shot("audit")
            await page.goto("/ui/datasources")
            await shot("datasources-empty")

            # delete the policy: the confirmation says how many tokens stop working
            await page.goto(policy_url)
            await page.get_by_role("link", name="Delete", exact=True).click()
            await expect(page.get_by_text("Its 1 token will stop working at once")).to_be_visible()
            await shot("policy-delete")
            await page.get_by_role("button", name="Delete policy and 1 token").click()
            await expect(page.get_by_role("status").first).to_contain_text(
                "Deleted access policy browser-made; 1 token stopped working.")
            async with http.get(f"{base}/prometheus/api/v1/query", params={"query": "up"},
                                headers=_basic("100", token)) as r:
                assert r.status == 401

            await page.get_by_role("button", name="Sign out").click()
            await expect(page).to_have_url(f"{base}/ui/signin")
            await browser.close()
        assert (ARTIFACTS / "page-policies.png").stat().st_size < 200_000
    finally:
        if http is not None:
            await http.close()
        await close_state(state)


async def test_datasources_teams_and_rules_in_chromium(db_dsn: str, aiohttp_server: Any) -> None:
    """Add a data source, a team with members, set the team's rule on the page; a query of a member
    through the data source's token then carries the rule as X-Prom-Label-Policy (header mode)."""
    require(shutil.which("chromium") is not None, "chromium")
    require(importlib.util.find_spec("playwright") is not None, "playwright (pip install playwright)")
    from playwright.async_api import async_playwright, expect

    from gateway.app import build_app, close_state, open_state

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    rec, up = await start_recorder(aiohttp_server)
    rec.lbac = True  # the upstream enforces X-Prom-Label-Policy like Loki, so header mode passes the probe
    state = await open_state(make_config(db_dsn, upstreams={"metrics": {"url": up, "lbac": "header"},
                                                            "logs": {"url": up, "lbac": "header"},
                                                            "traces": {"url": up}}))
    http: aiohttp.ClientSession | None = None
    try:
        server = await aiohttp_server(build_app(state))
        base = f"http://127.0.0.1:{server.port}"
        admin = await bootstrap_token(state)
        http = aiohttp.ClientSession()
        bearer = {"Authorization": f"Bearer {admin}"}
        for body in _SAMPLE:
            async with http.post(f"{base}/api/v1/accesspolicies", json=body, headers=bearer) as r:
                assert r.status == 200, await r.text()
        async with http.get(f"{base}/api/v1/accesspolicies?name=grafana-datasource", headers=bearer) as r:
            policy = (await r.json())["items"][0]
        async with http.post(f"{base}/api/v1/tokens", json={"accessPolicyId": policy["id"], "name": "grafana"},
                             headers=bearer) as r:
            token = (await r.json())["token"]
        async with http.post(f"{base}/api/teams", json={"name": "SRE", "members": ["dora", "erin"]},
                             headers=bearer) as r:
            assert r.status == 200

        async def query(user: str) -> list[str]:
            async with http.get(f"{base}/prometheus/api/v1/query", params={"query": "up"},  # type: ignore[union-attr]
                                headers={**_basic("100", token), "X-Grafana-User": user}) as r:
                assert r.status == 200, await r.text()
            return list(rec.last.headers.getall("X-Prom-Label-Policy", []))

        async with async_playwright() as pw:
            browser = await pw.chromium.launch(executable_path="/usr/bin/chromium", headless=True, args=CHROMIUM_ARGS)
            ctx = await browser.new_context(viewport={"width": 1280, "height": 800}, base_url=base)
            page = await ctx.new_page()

            async def shot(name: str) -> None:
                await page.screenshot(path=str(ARTIFACTS / f"page-{name}.png"), full_page=True)

            await page.goto("/ui/datasources")
            await page.get_by_label("Admin token").fill(admin)
            await page.get_by_role("button", name="Sign in").click()
            await expect(page.get_by_role("heading", name="Data sources and team rules")).to_be_visible()

            # add a data source: a bad uid first, then a good one
            await page.get_by_label("Name", exact=True).fill("Mimir (prod)")
            await page.get_by_label("UID (optional)").fill("mimir prod")
            await page.get_by_label("Type").select_option("prometheus")
            policy_select = page.get_by_label("Access policy")
            await expect(policy_select.locator("option")).to_have_count(2)  # the prompt + the one eligible policy
            await policy_select.select_option(policy["id"])
            await page.get_by_role("button", name="Add data source").click()
            await expect(page.get_by_text("uid must be 1-40 characters")).to_be_visible()
            await shot("datasource-form-errors")
            await page.get_by_label("UID (optional)").fill("mimir")
            await page.get_by_role("button", name="Add data source").click()
            await expect(page.get_by_role("status").first).to_contain_text("Created data source Mimir (prod)")

            # a team with members
            await page.get_by_role("link", name="Teams", exact=True).click()
            await page.get_by_label("Name", exact=True).fill("Developers")
            await page.get_by_label("Members, one Grafana login per line").fill("alice\nbob")
            await page.get_by_role("button", name="Create team").click()
            await expect(page.get_by_role("status").first).to_contain_text("Created team Developers with 2 members")
            await shot("team")

            # its rule on the data source: one bad line, then right
            await page.goto("/ui/datasources/mimir")
            await expect(page.get_by_text("Saving replaces this data source's whole rule set")).to_be_visible()
            box = page.get_by_label("Rules for team Developers")
            await box.fill('{env="dev"}\n101:{env="dev"}')
            await page.get_by_role("button", name="Save all team rules").click()
            await expect(page.get_by_text("line 2: '101' is not a metrics tenant")).to_be_visible()
            await shot("datasource-rules-errors")
            await box.fill('{env="dev"}')
            await page.get_by_role("button", name="Save all team rules").click()
            await expect(page.get_by_role("status").first).to_contain_text("Saved the team rules of Mimir (prod)")
            await expect(page.get_by_label("Rules for team Developers")).to_have_value('100:{env="dev"}')
            await shot("datasource")

            # the data path: members of Developers carry the rule, others keep the token's access
            assert await query("alice") == ["100:%7Benv=%22dev%22%7D"]
            assert await query("Bob") == ["100:%7Benv=%22dev%22%7D"]
            assert await query("dora") == []

            await page.goto("/ui/datasources")
            await expect(page.get_by_role("link", name="Mimir (prod)", exact=True)).to_be_visible()
            await shot("datasources")
            await page.goto("/ui/teams")
            await shot("teams")

            # membership edited on the page applies at once
            await page.get_by_role("link", name="Developers", exact=True).click()
            await page.get_by_label("Members, one Grafana login per line").fill("bob")
            await page.get_by_role("button", name="Save members").click()
            await expect(page.get_by_role("status").first).to_contain_text("Saved the members of Developers: 1")
            assert await query("alice") == []
            assert await query("bob") == ["100:%7Benv=%22dev%22%7D"]

            # edit the data source token's display name and expiry
            await page.goto(f"/ui/policies/{policy['id']}")
            await page.get_by_role("link", name="Edit token grafana").click()
            await page.get_by_label("Display name").fill("Grafana (prod data source)")
            await page.get_by_label("Expires at, UTC (optional)").fill("2099-12-31T00:00:00")
            await shot("token-edit")
            await page.get_by_role("button", name="Save token").click()
            await expect(page.get_by_role("status").first).to_contain_text("Saved token grafana.")
            await expect(page.get_by_text("2099-12-31 00:00 UTC")).to_be_visible()

            # delete the data source: the rule goes with it
            await page.goto("/ui/datasources/mimir")
            await page.get_by_role("link", name="Delete", exact=True).click()
            await expect(page.get_by_text("Its rules for 1 team go with it")).to_be_visible()
            await shot("datasource-delete")
            await page.get_by_role("button", name="Delete data source").click()
            await expect(page.get_by_role("status").first).to_contain_text("Deleted data source Mimir (prod)")
            assert await query("bob") == []
            await browser.close()
    finally:
        if http is not None:
            await http.close()
        await close_state(state)


# What sticks out of the viewport (a scroll container's content does not count, the container does).
_WIDE_JS = """[...document.querySelectorAll('body *')].filter(e =>
  (e.className === 'scroll' || !e.closest('.scroll')) && e.getBoundingClientRect().right > window.innerWidth + 0.5)
  .slice(0, 5).map(e => e.tagName + '.' + e.className + ' ' + e.getBoundingClientRect().right)"""


def _png_width(path: Path) -> int:
    return int.from_bytes(path.read_bytes()[16:20], "big")  # the IHDR chunk's width


def _many_policies(n: int) -> list[dict[str, Any]]:
    """Policies as a real org has them: long names, several realms with selectors, many scopes, IP ranges."""
    out = []
    for i in range(n):
        realms = [{"type": "stack", "identifier": "100", "labelPolicies": [
            {"selector": f'{{team="payments-{i}", env=~"prod|staging|qa", cluster!="eu-west-1-legacy"}}'}]},
            {"type": "stack", "identifier": "101", "labelPolicies": [
                {"selector": f'{{namespace=~"payments-.*", app="checkout-service-{i}"}}'}]}]
        out.append({"name": f"team-payments-checkout-readers-{i:03d}",
                    "displayName": f"Payments checkout readers, production and staging #{i}",
                    "scopes": ["metrics:read", "logs:read", "traces:read", "rules:read", "alerts:read",
                               "metrics:write", "logs:write"],
                    "realms": realms if i % 3 else realms[:1],
                    "conditions": {"allowedSubnets": ["10.20.0.0/16", "192.168.100.0/24", "2001:db8:1234::/48"]}})
    return out


async def test_page_fits_1280_and_390_and_first_hour_fixes_in_chromium(db_dsn: str, aiohttp_server: Any,
                                                                       monkeypatch: Any) -> None:
    """Issue 16 in a real browser: the policies list fits 1280 px and a phone (screenshots checked: the Delete
    links inside the viewport, no horizontal overflow), total count and previous/next, GET / to the page,
    selectors typed for an unticked realm refused, the token secret shown once after a redirect (a reload
    does not re-post), audit-log filters, and the data-source form's policy search."""
    require(shutil.which("chromium") is not None, "chromium")
    require(importlib.util.find_spec("playwright") is not None, "playwright (pip install playwright)")
    from playwright.async_api import async_playwright, expect

    from gateway.app import build_app, close_state, open_state
    from gateway.web import datasources

    monkeypatch.setattr(datasources, "CHOICE_CAP", 20)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    state = await open_state(make_config(db_dsn))
    http: aiohttp.ClientSession | None = None
    try:
        server = await aiohttp_server(build_app(state))
        base = f"http://127.0.0.1:{server.port}"
        admin = await bootstrap_token(state)
        http = aiohttp.ClientSession(headers={"Authorization": f"Bearer {admin}"})
        bodies = _many_policies(58) + [{"name": f"grafana-candidate-{i:02d}", "scopes": ["metrics:read"],
                                        "realms": [{"type": "stack", "identifier": "100"}]} for i in range(25)]
        for body in bodies:
            async with http.post(f"{base}/api/v1/accesspolicies", json=body) as r:
                assert r.status == 200, await r.text()
        total = len(bodies) + 1  # and bootstrap-admin

        async with async_playwright() as pw:
            browser = await pw.chromium.launch(executable_path="/usr/bin/chromium", headless=True, args=CHROMIUM_ARGS)
            for width in (1280, 390):
                ctx = await browser.new_context(viewport={"width": width, "height": 900}, base_url=base)
                page = await ctx.new_page()

                async def check_fits(name: str, width: int = width, page: Any = page) -> None:
                    overflow = await page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
                    wide = await page.evaluate(_WIDE_JS)
                    assert overflow <= 0, f"{name} at {width} px overflows by {overflow} px: {wide}"
                    path = ARTIFACTS / f"page-{name}-{width}.png"
                    await page.screenshot(path=str(path), full_page=True)
                    assert _png_width(path) == width, (name, width, _png_width(path))

                await page.goto("/")  # a browser at the gateway's address lands on the page
                await expect(page).to_have_url(f"{base}/ui/signin?next=%2Fui%2Fpolicies")
                await page.get_by_label("Admin token").fill(admin)
                await page.get_by_role("button", name="Sign in").click()
                await expect(page).to_have_url(f"{base}/ui/policies")
                await expect(page.locator("#policies-count")).to_have_text(
                    f"{total} access policies; showing 1–50 (page 1 of 2)")
                deletes = page.locator("a.danger-link", has_text="Delete")
                assert await deletes.count() == 50
                for i in (0, 1, 25, 49):
                    link = deletes.nth(i)
                    await link.scroll_into_view_if_needed()
                    box = await link.bounding_box()
                    assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= width, (width, i, box)
                await check_fits("policies-many")
                await page.get_by_role("link", name="Next page").click()
                await expect(page.locator("#policies-count")).to_have_text(
                    f"{total} access policies; showing 51–{total} (page 2 of 2)")
                await expect(page.get_by_role("link", name="Next page")).to_have_count(0)
                await check_fits("policies-page-2")
                await page.get_by_role("link", name="Previous page").click()
                await expect(page.locator("#policies-count")).to_contain_text("(page 1 of 2)")

                # selectors typed for a realm whose box is not ticked: refused beside the field, nothing saved
                await page.goto("/ui/policies/new")
                name = f"unticked-{width}"
                await page.get_by_label("Name", exact=True).fill(name)
                await page.locator('input[name="scope"][value="metrics:read"]').check()
                await page.get_by_label("Stack acme-prod (100)", exact=True).check()
                await page.get_by_label("Label selectors for Stack acme-dev (101), one per line").fill('{env="dev"}')
                await page.get_by_role("button", name="Create access policy").click()
                await expect(page.get_by_text("this realm is not ticked")).to_be_visible()
                await expect(page.get_by_label("Label selectors for Stack acme-dev (101), one per line")) \
                    .to_have_value('{env="dev"}')
                await check_fits("policy-form-unticked")
                async with http.get(f"{base}/api/v1/accesspolicies", params={"name": name}) as r:
                    assert (await r.json())["items"] == []
                await page.get_by_label("Stack acme-dev (101)", exact=True).check()
                await page.get_by_role("button", name="Create access policy").click()
                await expect(page.get_by_role("status").first).to_contain_text(f"Created access policy {name}")
                total += 1

                # a token: redirect after POST, the secret once; a reload neither re-posts nor shows it
                policy_url = page.url
                await page.get_by_label("Name", exact=True).fill(f"tok-{width}")
                await page.get_by_role("button", name="Create token").click()
                await expect(page.get_by_text("you will not see it again")).to_be_visible()
                assert page.url == f"{policy_url}#new-token"
                secret = await page.locator("#new-token").input_value()
                assert secret.startswith("glc_")
                await check_fits("token-created")
                await page.reload()
                await expect(page.get_by_role("heading", name="Tokens")).to_be_visible()
                content = await page.content()
                assert secret not in content and "already exists" not in content
                await check_fits("policy-with-token")

                # audit-log filters
                await page.goto("/ui/audit")
                await page.get_by_label("Resource (name or id)").fill(name)
                await page.get_by_role("button", name="Filter").click()
                await expect(page.locator("table.audit > tbody > tr")).to_have_count(1)
                await expect(page.get_by_text("accesspolicy.create")).to_be_visible()
                await page.goto("/ui/audit")
                await page.get_by_label("Resource type").select_option("token")
                await page.get_by_role("button", name="Filter").click()
                tokens_made = 2 if width == 1280 else 3  # with the bootstrap token
                await expect(page.locator("table.audit > tbody > tr")).to_have_count(tokens_made)
                await check_fits("audit-filtered")

                # the data-source form: a search narrows many qualifying policies to a short list
                await page.goto("/ui/datasources")
                await expect(page.locator("#ds-policy-count")).to_contain_text(
                    "policies qualify; the first 20 are listed: search above to narrow")
                search = page.get_by_role("searchbox", name="Find an access policy")
                await search.fill(f"candidate-{7 if width == 1280 else 8:02d}")
                await page.get_by_role("button", name="Find").click()
                await expect(page.locator("#ds-policy option")).to_have_count(2)  # the empty choice and one
                await page.get_by_label("Name", exact=True).fill(f"Mimir {width}")
                await page.get_by_label("Access policy", exact=True).select_option(index=1)
                await check_fits("datasource-search")
                await page.get_by_role("button", name="Add data source").click()
                await expect(page.get_by_role("status").first).to_contain_text(f"Created data source Mimir {width}")
                await ctx.close()
            await browser.close()
    finally:
        if http is not None:
            await http.close()
        await close_state(state)
