"""Server-side page sessions (issue 12, item 5): signing out ends the session for every copy of its
cookie, and deleting the signing token ends its sessions."""

from __future__ import annotations

from typing import Any

from tests.conftest import Gateway
from tests.test_page import Browser, token_id


async def _signed_in_cookie(gw: Gateway, token: str | None = None, form_page: str = "/ui/signin") -> str:
    b = Browser(gw)
    csrf = await b.csrf(form_page)
    r = await gw.client.post("/ui/signin", data={"token": token or gw.admin_token, "csrf": csrf,
                                                 "next": "/ui/policies"}, allow_redirects=False)
    assert r.status == 303, await r.text()
    return r.headers["Set-Cookie"].split(";", 1)[0].split("=", 1)[1]


async def _with_cookie(gw: Gateway, value: str, path: str = "/ui/policies") -> Any:
    gw.client.session.cookie_jar.clear()
    return await gw.client.get(path, headers={"Cookie": f"gateway_ui={value}"}, allow_redirects=False)


async def _rows(gw: Gateway) -> int:
    return int(await gw.state.store.pool.fetchval("SELECT count(*) FROM web_sessions"))


async def test_sign_out_revokes_a_copied_cookie(gw: Gateway) -> None:
    copied = await _signed_in_cookie(gw)
    assert await _rows(gw) == 1
    r = await _with_cookie(gw, copied)
    assert r.status == 200 and "Signed in with token" in await r.text()
    # sign out in the browser (which holds the same cookie)
    gw.client.session.cookie_jar.update_cookies({"gateway_ui": copied})
    loc, _ = await Browser(gw).post("/ui/signout", {})
    assert loc == "/ui/signin"
    assert await _rows(gw) == 0
    # the copy taken before sign-out no longer works
    r = await _with_cookie(gw, copied)
    assert r.status == 303 and r.headers["Location"].startswith("/ui/signin")
    page = await gw.client.get(r.headers["Location"])
    assert "session has ended" in await page.text()


async def test_a_new_sign_in_ends_the_previous_session(gw: Gateway) -> None:
    first = await _signed_in_cookie(gw)
    gw.client.session.cookie_jar.update_cookies({"gateway_ui": first})
    second = await _signed_in_cookie(gw, form_page="/ui/policies")  # signed in: the form's CSRF is the session's
    assert first != second and await _rows(gw) == 1
    assert (await _with_cookie(gw, first)).status == 303
    assert (await _with_cookie(gw, second)).status == 200


async def test_deleting_the_signing_token_deletes_its_sessions(gw: Gateway) -> None:
    p = await gw.policy("page-reader", ["accesspolicies:read"])
    t = await gw.token(p["id"], "page-reader")
    copied = await _signed_in_cookie(gw, t["token"])
    assert (await _with_cookie(gw, copied)).status == 200
    count = await gw.state.store.pool.fetchval(
        "SELECT count(*) FROM web_sessions WHERE token_id = $1::uuid", token_id(gw, t["token"]))
    assert count == 1
    await gw.api("DELETE", f"/api/v1/tokens/{t['id']}", expect=200)
    assert await _rows(gw) == 0
    assert (await _with_cookie(gw, copied)).status == 303


async def test_a_cookie_without_a_session_record_is_refused(gw: Gateway) -> None:
    copied = await _signed_in_cookie(gw)
    await gw.state.store.pool.execute("DELETE FROM web_sessions")  # e.g. revoked by another replica
    r = await _with_cookie(gw, copied)
    assert r.status == 303 and r.headers["Location"].startswith("/ui/signin")
