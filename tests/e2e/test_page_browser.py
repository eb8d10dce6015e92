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
            ctx = await browser.new_context(viewport={"width": 1280, "height": 800}, base_url=base)
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
            await page.get_by_label("Expires on (optional)").fill("2099-12-31")
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
