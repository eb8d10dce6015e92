"""The page's handlers: sign-in, policies, tokens, audit log. Each form posts back, is checked with the
API's validators and writes through the same Store methods (so the audit log names the signed-in token).
"""

from __future__ import annotations

import dataclasses
import functools
import html
import json
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any, Final, cast
from urllib.parse import urlencode

import aiohttp_jinja2
from aiohttp import web

from gateway.admin import validate as v
from gateway.admin.api import check_datasource_policy
from gateway.admin.auditfilter import RESOURCE_TYPES
from gateway.admin.errors import ApiError
from gateway.admin.serialize import policy_json, token_json
from gateway.limits.stage import describe as describe_limits
from gateway.policy import tokens as tokfmt
from gateway.policy.model import AccessPolicy, Realm, Token
from gateway.policy.scopes import SCOPE_GROUPS, enforced
from gateway.store import BadCursor, Conflict, NotFound, browse
from gateway.web import session as sess
from gateway.web.forms import PolicyForm, realm_choices, validate
from gateway.web.limitsform import FIELDS as LIMIT_FIELDS
from gateway.web.limitsform import merged
from gateway.web.session import READ, Admin, PageError, SignInRequired, state_of

WRITE = "accesspolicies:write"
DELETE = "accesspolicies:delete"
PAGE_SIZE = 50
MAX_PAGE = 500
AUDIT_PAGE = 50

AdminHandler = Callable[[web.Request, Admin], Awaitable[web.StreamResponse]]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


# ---- plumbing -------------------------------------------------------------------------------------------

def redirect(location: str) -> web.Response:
    """303 See Other: after a POST the browser GETs the result (reload never re-submits)."""
    return web.Response(status=303, headers={"Location": location})


def _safe_next(value: Any) -> str:
    """Only paths of the page itself: never an open redirect."""
    if isinstance(value, str) and value.startswith("/ui/") and "//" not in value and "\\" not in value:
        return value
    return "/ui/policies"


async def render(request: web.Request, template: str, ctx: dict[str, Any], status: int = 200) -> web.Response:
    """Render with what every page shows: the signed-in admin, the CSRF token, the one-time notice."""
    s = await sess.session(request)
    admin = request.get(sess.ADMIN)
    st = state_of(request)
    org = st.config.orgs_by_id.get(admin.policy.org_id) if admin else None
    base = {"admin": admin, "csrf": await sess.csrf_token(request), "notice": sess.pop_flash(s),
            "org_name": org.name if org else "", "nav": "", "realm_name": functools.partial(_realm_name, request)}
    return aiohttp_jinja2.render_template(template, request, {**base, **ctx}, status=status)


async def render_error(request: web.Request, exc: PageError) -> web.Response:
    return await render(request, "error.html", {"title": exc.title, "message": exc.message}, exc.status)


def _realm_name(request: web.Request, realm: Realm) -> str:
    cfg = state_of(request).config
    if realm.type == "org":
        org = cfg.orgs_by_id.get(realm.identifier)
        return f"org {org.name} ({realm.identifier})" if org else f"org {realm.identifier}"
    stack = cfg.stacks_by_id.get(realm.identifier)
    return f"stack {stack.name} ({realm.identifier})" if stack else f"stack {realm.identifier}"


async def _to_signin(request: web.Request, reason: str) -> web.Response:
    # SameSite=Strict cookies are not sent on a navigation that starts on another site; a same-origin
    # reload (no script needed) brings the cookie back instead of wrongly asking to sign in again.
    if request.method == "GET" and sess.COOKIE not in request.cookies \
            and request.headers.get("Sec-Fetch-Site") in ("cross-site", "same-site"):
        here = html.escape(request.path_qs)
        return web.Response(text=f'<!doctype html><meta http-equiv="refresh" content="0"><title>Loading</title>'
                                 f'<a href="{here}">Continue</a>', content_type="text/html")
    s = await sess.session(request)
    if reason:
        sess.flash(s, reason)
    target = request.path_qs if request.method == "GET" else "/ui/policies"
    return redirect("/ui/signin?" + urlencode({"next": target}))


def page(*needed: str) -> Callable[[AdminHandler], Handler]:
    """A handler for signed-in admins holding ``needed`` scopes; POSTs must carry the CSRF token."""
    def wrap(fn: AdminHandler) -> Handler:
        @functools.wraps(fn)
        async def run(request: web.Request) -> web.StreamResponse:
            try:
                admin = await sess.current_admin(request)
                if request.method == "POST":
                    await sess.check_csrf(request)
                missing = admin.missing(READ, *needed)
                if missing:
                    have = ", ".join(sorted(admin.policy.scopes)) or "none"
                    raise PageError(403, "Missing scope",
                                    f"This needs the {' and '.join(missing)} scope. Your token's access policy"
                                    f" {admin.policy.name!r} has: {have}.")
                return await fn(request, admin)
            except SignInRequired as exc:
                return await _to_signin(request, exc.reason)
            except PageError as exc:
                return await render_error(request, exc)
            except ApiError as exc:
                return await render_error(request, PageError(exc.status, "Refused", exc.message))
        return run
    return wrap


def _path_uuid(request: web.Request, key: str = "id") -> str:
    try:
        return str(uuid.UUID(request.match_info[key]))
    except ValueError:
        raise PageError(404, "Not found", "No such page: ids are UUIDs.") from None


def _size(request: web.Request) -> int:
    raw = request.query.get("size", "")
    return min(int(raw), MAX_PAGE) if (raw.isascii() and raw.isdigit()) and int(raw) > 0 else PAGE_SIZE


async def _policy(request: web.Request, admin: Admin) -> AccessPolicy:
    try:
        return await state_of(request).store.get_policy(admin.scope, _path_uuid(request))
    except NotFound:
        raise PageError(404, "Not found", "No such access policy (or it is outside your token's realm).") from None


# ---- sign-in --------------------------------------------------------------------------------------------

async def index(request: web.Request) -> web.Response:
    return redirect("/ui/policies")


async def signin_form(request: web.Request) -> web.StreamResponse:
    nxt = _safe_next(request.query.get("next"))
    try:
        await sess.current_admin(request)
        return redirect(nxt)
    except (SignInRequired, PageError):
        pass
    return await render(request, "signin.html", {"next": nxt, "error": None})


async def signin(request: web.Request) -> web.StreamResponse:
    form = await request.post()
    nxt = _safe_next(form.get("next"))
    try:
        await sess.check_csrf(request)
        presented = form.get("token")
        if not isinstance(presented, str) or not presented.strip():
            raise PageError(400, "Sign-in failed", "Paste an admin token (it starts with glc_).")
        admin = sess.check_token(request, presented)
    except PageError as exc:
        return await render(request, "signin.html", {"next": nxt, "error": exc.message}, exc.status)
    await sess.sign_in(request, admin)
    return redirect(nxt)


async def signout(request: web.Request) -> web.StreamResponse:
    try:
        await sess.check_csrf(request)
    except PageError as exc:
        return await render_error(request, exc)
    s = await sess.session(request)
    s.invalidate()
    sess.flash(s, "Signed out.")
    return redirect("/ui/signin")


# ---- policies -------------------------------------------------------------------------------------------

def _page_number(request: web.Request) -> int:
    raw = request.query.get("page", "")
    return int(raw) if raw.isascii() and raw.isdigit() and 0 < int(raw) <= 1_000_000 else 1


@page()
async def policies(request: web.Request, admin: Admin) -> web.StreamResponse:
    st = state_of(request)
    q = request.query.get("q", "").strip()
    realm = request.query.get("realm", "")
    status = request.query.get("status", "")
    size = _size(request)
    number = _page_number(request)
    filters: dict[str, str] = {}
    rtype, _, ident = realm.partition(":")
    if rtype in ("org", "stack") and ident:
        filters.update(realmType=rtype, realmIdentifier=ident)
    if status in ("active", "inactive"):
        filters["status"] = status
    if q:
        filters["text"] = q
    items, total = await browse.policy_page(st.store, admin.scope, filters, size, (number - 1) * size)
    counts = await st.store.count_tokens([p.id for p in items]) if items else {}
    pages = max(1, -(-total // size))
    keep = [(k, val) for k, val in request.query.items() if k != "page"]

    def link(n: int) -> str:
        return f"/ui/policies?{urlencode([*keep, ('page', str(n))] if n > 1 else keep)}"
    first = (number - 1) * size + 1
    return await render(request, "policies.html", {
        "nav": "policies", "policies": items, "counts": counts, "q": q, "realm": realm, "status": status,
        "choices": realm_choices(st.config, admin.scope), "total": total, "number": number, "pages": pages,
        "shown": (first, first + len(items) - 1) if items else None,
        "next_url": link(number + 1) if number < pages else None,
        "prev_url": link(min(number - 1, pages)) if number > 1 else None,
        "can_write": admin.can(WRITE), "can_delete": admin.can(DELETE)})


async def _policy_form(request: web.Request, admin: Admin, f: PolicyForm, policy: AccessPolicy | None,
                       status: int = 200) -> web.Response:
    keep = policy.realms if policy else ()
    choices = realm_choices(state_of(request).config, admin.scope, keep)
    shown = {f"realm:{c.key}" for c in choices}
    for key in [k for k in f.errors if k.startswith("realm:") and k not in shown]:  # a realm the form never offered
        f.errors.setdefault("realms", []).extend(f.errors.pop(key))
    return await render(request, "policy_form.html", {
        "nav": "policies", "f": f, "policy": policy, "groups": SCOPE_GROUPS, "choices": choices,
        "limit_fields": LIMIT_FIELDS,
        "unenforced": sorted(s for s in f.scopes if not enforced(s))}, status)


_INVALID: Final = object()


def _limits(f: PolicyForm, policy: AccessPolicy | None) -> str | None | object:
    """The policy's attributes text with the form's limit fields (gateway.web.limitsform), or _INVALID with
    the problems in ``f.errors``."""
    attrs, problems = merged(policy.attributes_json if policy else None, f.limits)
    for key, message in problems.items():
        f.error(f"limit:{key}", message)
    if problems:
        return _INVALID
    return None if attrs is None else json.dumps(attrs, separators=(",", ":"), sort_keys=True)


@page(WRITE)
async def new_policy_form(request: web.Request, admin: Admin) -> web.StreamResponse:
    return await _policy_form(request, admin, PolicyForm(), None)


@page(WRITE)
async def create_policy(request: web.Request, admin: Admin) -> web.StreamResponse:
    st = state_of(request)
    f = PolicyForm.from_post(await request.post())
    values = validate(f, st.config, admin.scope)
    attrs = _limits(f, None)
    if values is None or attrs is _INVALID:
        return await _policy_form(request, admin, f, None, 400)
    policy = AccessPolicy(id=str(uuid.uuid4()), org_id=admin.scope.org_id, name=values.name,
                          display_name=values.display_name, scopes=values.scopes, realms=values.realms,
                          allowed_subnets=values.subnets, status="active" if values.status == "active" else "inactive",
                          attributes_json=cast(str | None, attrs))
    try:
        created = await st.store.create_policy(policy, admin.token.id, policy_json)
    except Conflict as exc:
        f.error("name", str(exc))
        return await _policy_form(request, admin, f, None, 409)
    await st.cache.apply_change("access_policies", "INSERT", created.id)
    sess.flash(await sess.session(request), f"Created access policy {created.name}. Create a token for it below.")
    return redirect(f"/ui/policies/{created.id}")


@page(WRITE)
async def edit_policy_form(request: web.Request, admin: Admin) -> web.StreamResponse:
    policy = await _policy(request, admin)
    return await _policy_form(request, admin, PolicyForm.from_policy(policy), policy)


@page(WRITE)
async def update_policy(request: web.Request, admin: Admin) -> web.StreamResponse:
    st = state_of(request)
    policy = await _policy(request, admin)
    f = PolicyForm.from_post(await request.post(), name=policy.name)
    values = validate(f, st.config, admin.scope)
    attrs = _limits(f, policy)
    if values is None or attrs is _INVALID:
        return await _policy_form(request, admin, f, policy, 400)
    # Every scope the policy has is on the form (those the gateway does not enforce too): the form is the whole
    # set. An org realm Terraform gave by slug keeps reading back as that slug.
    slugs = {(r.type, r.identifier): r.written for r in policy.realms if r.written is not None}
    realms = tuple(dataclasses.replace(r, written=slugs.get((r.type, r.identifier))) for r in values.realms)
    changes: dict[str, Any] = {"display_name": values.display_name, "scopes": values.scopes,
                               "realms": realms, "allowed_subnets": values.subnets, "status": values.status,
                               "attributes_json": attrs}
    try:
        check_datasource_policy(st, dataclasses.replace(policy, **changes))
    except ApiError as exc:
        f.error(exc.field or "scopes", exc.message)
        return await _policy_form(request, admin, f, policy, 400)
    try:
        updated = await st.store.update_policy(admin.scope, policy.id, changes, admin.token.id, policy_json)
    except NotFound:
        raise PageError(404, "Not found", "The access policy was deleted meanwhile.") from None
    await st.cache.apply_change("access_policies", "UPDATE", updated.id)
    sess.flash(await sess.session(request), f"Saved access policy {updated.name}.")
    return redirect(f"/ui/policies/{updated.id}")


@page(DELETE)
async def delete_policy_form(request: web.Request, admin: Admin) -> web.StreamResponse:
    policy = await _policy(request, admin)
    n = (await state_of(request).store.count_tokens([policy.id])).get(policy.id, 0)
    return await render(request, "confirm.html", {
        "nav": "policies", "title": f"Delete access policy {policy.name}?",
        "lines": [f"Its {n} token{'' if n == 1 else 's'} will stop working at once: every client using "
                  f"{'it' if n == 1 else 'them'} is refused from the next request on." if n else
                  "It has no tokens, so no client stops working.",
                  *(["This is the policy of the token you are signed in with: you will be signed out."]
                    if policy.id == admin.policy.id else []),
                  "This cannot be undone."],
        "action": f"/ui/policies/{policy.id}/delete", "button": f"Delete policy and {n} token{'' if n == 1 else 's'}",
        "cancel": f"/ui/policies/{policy.id}"})


@page(DELETE)
async def delete_policy(request: web.Request, admin: Admin) -> web.StreamResponse:
    st = state_of(request)
    policy = await _policy(request, admin)
    n = (await st.store.count_tokens([policy.id])).get(policy.id, 0)
    try:
        await st.store.delete_policy(admin.scope, policy.id, admin.token.id, policy_json)
    except NotFound:
        raise PageError(404, "Not found", "The access policy was already deleted.") from None
    await st.cache.apply_change("access_policies", "DELETE", policy.id)
    sess.flash(await sess.session(request),
               f"Deleted access policy {policy.name}; {n} token{'' if n == 1 else 's'} stopped working.")
    return redirect("/ui/policies")


# ---- tokens ---------------------------------------------------------------------------------------------

async def _policy_page(request: web.Request, admin: Admin, policy: AccessPolicy, status: int = 200,
                       **extra: Any) -> web.Response:
    st = state_of(request)
    cursor = request.query.get("cursor") or None
    try:
        tokens = await st.store.list_tokens(admin.scope, {"accessPolicyId": policy.id}, _size(request), cursor)
    except BadCursor:
        raise PageError(400, "Bad link", "The page cursor in this link is not one the page issued.") from None
    next_url = f"/ui/policies/{policy.id}?{urlencode({'cursor': tokens.next_cursor})}" if tokens.next_cursor else None
    return await render(request, "policy.html", {
        "nav": "policies", "policy": policy, "tokens": tokens.items, "now": datetime.now(UTC),
        "next_url": next_url, "first_url": f"/ui/policies/{policy.id}" if cursor else None,
        "can_write": admin.can(WRITE), "can_delete": admin.can(DELETE),
        "min_expiry": _min_expiry(),
        "form": {"name": "", "expires": ""}, "errors": {}, "new_token": None, "secret": None,
        "limits": describe_limits(policy.attributes_json), **extra}, status)


_SHOW_ONCE = "show_once"


@page()
async def policy_page(request: web.Request, admin: Admin) -> web.StreamResponse:
    policy = await _policy(request, admin)
    shown = (await sess.session(request)).pop(_SHOW_ONCE, None)  # once: the saved session no longer has it
    if isinstance(shown, dict) and shown.get("policy") == policy.id:
        return await _policy_page(request, admin, policy, new_token={"name": shown.get("name")},
                                  secret=shown.get("secret"))
    return await _policy_page(request, admin, policy)


def _expiry_at(raw: str) -> datetime:
    """The expiry field: ``<input type=datetime-local>`` gives YYYY-MM-DDTHH:MM[:SS], read as UTC (the field
    says so, and shows the local time beside it); an explicit zone (Z, +02:00) is honoured, a bare date is
    00:00 UTC that day. The token stops working at exactly that second."""
    try:
        at = datetime.fromisoformat(raw.removesuffix(" UTC"))
    except ValueError:
        raise ApiError(400, "invalid_argument", "expiry must be a date and time in UTC such as 2030-01-31T17:30",
                       "expiresAt") from None
    return at.replace(tzinfo=UTC) if at.tzinfo is None else at.astimezone(UTC)


def _expiry(raw: str) -> datetime | None:
    """A new expiry from the field, which must be in the future; empty means never."""
    return v.timestamp(_expiry_at(raw).isoformat(), "expiresAt", future=True) if raw else None


def _expiry_field(value: datetime | None) -> str:
    """An expiry as the field shows it: UTC, to the second."""
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S") if value else ""


def _min_expiry() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M")


@page(WRITE)
async def create_token(request: web.Request, admin: Admin) -> web.StreamResponse:
    st = state_of(request)
    policy = await _policy(request, admin)
    form = await request.post()
    name = str(form.get("name", "")).strip()
    raw_exp = str(form.get("expires", "")).strip()
    errors: dict[str, str] = {}
    status = 400
    expires = None
    try:
        v.name(name)
    except ApiError as exc:
        errors["name"] = exc.message
    try:
        expires = _expiry(raw_exp)
    except ApiError as exc:
        errors["expires"] = exc.message
    if not errors:
        secret = tokfmt.new_secret()
        token = Token(id=str(uuid.uuid4()), access_policy_id=policy.id, name=name, display_name=name,
                      secret_hash=tokfmt.hash_secret(secret), expires_at=expires)
        try:
            created = await st.store.create_token(admin.scope, token, admin.token.id, token_json)
        except NotFound:
            raise PageError(404, "Not found", "The access policy was deleted meanwhile.") from None
        except Conflict as exc:
            errors["name"], status = str(exc), 409
        else:
            await st.cache.apply_change("tokens", "INSERT", created.id)
            shown = tokfmt.encode(admin.scope.org_id, created.id, secret, st.config.region)
            # Redirect after POST, so a reload never re-posts the form. The secret rides in the encrypted,
            # HttpOnly session cookie for that one redirect; the next page (Cache-Control: no-store) shows it
            # and removes it, so no later page can show it again.
            (await sess.session(request))[_SHOW_ONCE] = {"policy": policy.id, "name": created.name, "secret": shown}
            return redirect(f"/ui/policies/{policy.id}#new-token")
    return await _policy_page(request, admin, policy, status, form={"name": name, "expires": raw_exp}, errors=errors)


async def _token(request: web.Request, admin: Admin) -> Token:
    try:
        return await state_of(request).store.get_token(admin.scope, _path_uuid(request))
    except NotFound:
        raise PageError(404, "Not found", "No such token (or it is outside your token's realm).") from None


@page(DELETE)
async def delete_token_form(request: web.Request, admin: Admin) -> web.StreamResponse:
    token = await _token(request, admin)
    return await render(request, "confirm.html", {
        "nav": "policies", "title": f"Delete token {token.name}?",
        "lines": ["Every client using this token is refused from its next request on.",
                  *(["This is the token you are signed in with: you will be signed out."]
                    if token.id == admin.token.id else []),
                  "This cannot be undone."],
        "action": f"/ui/tokens/{token.id}/delete", "button": "Delete token",
        "cancel": f"/ui/policies/{token.access_policy_id}"})


@page(DELETE)
async def delete_token(request: web.Request, admin: Admin) -> web.StreamResponse:
    st = state_of(request)
    token = await _token(request, admin)
    try:
        await st.store.delete_token(admin.scope, token.id, admin.token.id, token_json)
    except NotFound:
        raise PageError(404, "Not found", "The token was already deleted.") from None
    await st.cache.apply_change("tokens", "DELETE", token.id)
    sess.flash(await sess.session(request), f"Deleted token {token.name}; it stopped working.")
    return redirect(f"/ui/policies/{token.access_policy_id}")


async def _token_form(request: web.Request, token: Token, form: dict[str, str], errors: dict[str, str],
                      status: int = 200) -> web.Response:
    return await render(request, "token_form.html", {
        "nav": "policies", "token": token, "form": form, "errors": errors, "now": datetime.now(UTC),
        "min_expiry": _min_expiry()}, status)


@page(WRITE)
async def edit_token_form(request: web.Request, admin: Admin) -> web.StreamResponse:
    token = await _token(request, admin)
    return await _token_form(request, token, {"displayName": token.display_name,
                                              "expires": _expiry_field(token.expires_at)}, {})


@page(WRITE)
async def update_token(request: web.Request, admin: Admin) -> web.StreamResponse:
    """Display name and expiry, as ``POST /api/v1/tokens/{id}`` changes them; an expiry left as the field
    showed it (to the second) keeps the exact one (the API may have set fractions of a second)."""
    st = state_of(request)
    token = await _token(request, admin)
    post = await request.post()
    form = {"displayName": str(post.get("displayName", "")).strip(), "expires": str(post.get("expires", "")).strip()}
    errors: dict[str, str] = {}
    changes: dict[str, Any] = {}
    try:
        display = v.display_name(form["displayName"] or None, token.name)
        if display != token.display_name:
            changes["display_name"] = display
    except ApiError as exc:
        errors["displayName"] = exc.message
    try:
        if form["expires"] != _expiry_field(token.expires_at) and not (
                form["expires"] and token.expires_at is not None
                and _expiry_at(form["expires"]) == token.expires_at.replace(microsecond=0)):
            changes["expires_at"] = _expiry(form["expires"])
    except ApiError as exc:
        errors["expires"] = exc.message
    if errors:
        return await _token_form(request, token, form, errors, 400)
    if changes:
        try:
            await st.store.update_token(admin.scope, token.id, changes, admin.token.id, token_json)
        except NotFound:
            raise PageError(404, "Not found", "The token was deleted meanwhile.") from None
        await st.cache.apply_change("tokens", "UPDATE", token.id)
    sess.flash(await sess.session(request), f"Saved token {token.name}." if changes else
               f"Token {token.name} unchanged.")
    return redirect(f"/ui/policies/{token.access_policy_id}")


# ---- audit log ------------------------------------------------------------------------------------------

_HIDDEN = ("id", "orgId", "createdAt", "updatedAt", "accessPolicyId")
_FIRST = ("name", "displayName", "status", "scopes", "realms", "conditions", "expiresAt")


def _show(key: str, value: Any) -> str:
    """A field of the API's JSON as a person reads it (realms and conditions without JSON quoting)."""
    if value is None:
        return "—"
    if key == "realms" and isinstance(value, list):
        return "; ".join(f"{r.get('type')} {r.get('identifier')}" + (
            ": " + ", ".join(str(lp.get("selector")) for lp in r["labelPolicies"]) if r.get("labelPolicies") else "")
            for r in value if isinstance(r, dict)) or "none"
    if key == "conditions" and isinstance(value, dict):
        return ", ".join(value.get("allowedSubnets") or ()) or "any address"
    if key == "scopes" and isinstance(value, list):
        return ", ".join(str(s) for s in value)
    if isinstance(value, str):
        return value
    return json.dumps(value, separators=(", ", ": "), ensure_ascii=False)


def changes(before: Any, after: Any) -> list[tuple[str, str, str]]:
    """(field, before, after) of what an audit entry changed; for a create or delete, the fields that are set."""
    b = before if isinstance(before, dict) else {}
    a = after if isinstance(after, dict) else {}
    keys = [k for k in dict.fromkeys([*_FIRST, *b, *a]) if k not in _HIDDEN and (k in a or k in b)]
    out = []
    for k in keys:
        if before is not None and after is not None:
            if b.get(k) != a.get(k):
                out.append((k, _show(k, b.get(k)), _show(k, a.get(k))))
        elif (a or b).get(k) is not None:
            out.append((k, _show(k, b.get(k)) if before is not None else "", _show(k, a.get(k)) if after is not None
                        else ""))
    return out


def _audit_filters(st: Any, admin: Admin, query: Any) -> tuple[dict[str, str], dict[str, Any], dict[str, str]]:
    """The page's audit filters: (as typed, for the store, problems per field). ``who`` is a token's name or
    id, or ``cli``; ``resource`` an id or a name; ``from`` and ``to`` days in UTC, both included."""
    form = {k: str(query.get(k, "")).strip() for k in ("who", "type", "resource", "from", "to")}
    out: dict[str, Any] = {}
    errors: dict[str, str] = {}
    who = form["who"]
    if who:
        ids = [who] if who == "cli" or _is_uuid(who) else [
            t.id for t in st.cache.tokens.values() if t.name == who
            and getattr(st.cache.policies.get(t.access_policy_id), "org_id", None) == admin.scope.org_id]
        if ids:
            out["actor"] = ids
        else:
            errors["who"] = f"No token named {who!r}: give a token's name or id, or cli."
    if form["type"]:
        if form["type"] in RESOURCE_TYPES:
            out["resourceType"] = form["type"]
        else:
            errors["type"] = "Choose a resource type from the list."
    if form["resource"]:
        out["resource"] = form["resource"]
    for key, store_key, extra in (("from", "since", 0), ("to", "until", 1)):
        if form[key]:
            try:
                day = date.fromisoformat(form[key])
            except ValueError:
                errors[key] = "Give a date such as 2030-01-31."
                continue
            out[store_key] = datetime(day.year, day.month, day.day, tzinfo=UTC) + timedelta(days=extra)
    if "since" in out and "until" in out and out["since"] >= out["until"]:
        errors["to"] = "The last day must not be before the first."
    return form, out, errors


@page()
async def audit(request: web.Request, admin: Admin) -> web.StreamResponse:
    if not admin.scope.whole_org:
        raise PageError(403, "Whole-org realm needed", "The audit log needs a token whose access policy's realm is the"
                        " whole org; yours covers only some stacks.")
    st = state_of(request)
    cursor = request.query.get("cursor") or None
    form, filters, errors = _audit_filters(st, admin, request.query)
    if errors:
        return await render(request, "audit.html", {
            "nav": "audit", "rows": [], "next_url": None, "first_url": None, "form": form, "errors": errors,
            "types": RESOURCE_TYPES, "filtered": True}, 400)
    try:
        page_ = await st.store.list_audit(admin.scope.org_id, min(_size(request), MAX_PAGE), cursor, filters)
    except BadCursor:
        raise PageError(400, "Bad link", "The page cursor in this link is not one the page issued.") from None
    rows = []
    for r in page_.items:
        doc = r["after"] if isinstance(r["after"], dict) else r["before"] if isinstance(r["before"], dict) else {}
        kind = "update" if r["before"] is not None and r["after"] is not None else \
            "create" if r["after"] is not None else "delete"
        rows.append({**r, "who": _actor(st, r["actor"]), "what": doc.get("name", ""), "kind": kind,
                     "changes": changes(r["before"], r["after"]),
                     "before_json": json.dumps(r["before"], indent=2, ensure_ascii=False) if r["before"] else "",
                     "after_json": json.dumps(r["after"], indent=2, ensure_ascii=False) if r["after"] else "",
                     "link": _resource_link(st, r["resource_type"], r["resource_id"]),
                     "by_actor": "/ui/audit?" + urlencode({"who": r["actor"]}),
                     "by_resource": "/ui/audit?" + urlencode({"type": r["resource_type"],
                                                              "resource": r["resource_id"]})})
    keep = [(k, val) for k, val in form.items() if val]
    next_url = f"/ui/audit?{urlencode([*keep, ('cursor', page_.next_cursor)])}" if page_.next_cursor else None
    return await render(request, "audit.html", {
        "nav": "audit", "rows": rows, "next_url": next_url, "form": form, "errors": {}, "types": RESOURCE_TYPES,
        "filtered": bool(keep), "first_url": f"/ui/audit?{urlencode(keep)}" if cursor else None})


def _actor(st: Any, actor: str) -> str:
    token = st.cache.tokens.get(actor)
    if token is None:
        return actor if not _is_uuid(actor) else f"deleted token {actor}"
    policy = st.cache.policies.get(token.access_policy_id)
    return f"token {token.name} (policy {policy.name})" if policy else f"token {token.name}"


def _resource_link(st: Any, rtype: str, rid: str) -> str | None:
    if rtype == "accesspolicy" and rid in st.cache.policies:
        return f"/ui/policies/{rid}"
    if rtype == "datasource" and any(d.uid == rid for d in st.cache.datasources.values()):
        return f"/ui/datasources/{rid}"
    if rtype == "team" and (rid.isascii() and rid.isdigit()) and int(rid) in st.cache.teams:
        return f"/ui/teams/{rid}"
    token = st.cache.tokens.get(rid) if rtype == "token" else None
    return f"/ui/policies/{token.access_policy_id}" if token else None


def _is_uuid(s: str) -> bool:
    try:
        uuid.UUID(s)
    except ValueError:
        return False
    return True


async def not_found(request: web.Request) -> web.StreamResponse:
    return await render_error(request, PageError(404, "Not found", f"The page has nothing at {request.path}."))


def _static(folder: Path) -> Handler:
    """Serve the page's few static files by name (nothing else in the folder is reachable)."""
    files = {p.name: p for p in folder.iterdir() if p.is_file()}

    async def handle(request: web.Request) -> web.StreamResponse:
        path = files.get(request.match_info["name"])
        if path is None:
            return await not_found(request)
        return web.FileResponse(path, headers={"Cache-Control": "public, max-age=300"})
    return handle


def add_routes(ui: web.Application, static_dir: Path) -> None:
    r = ui.router
    r.add_get("", index)
    r.add_get("/", index)
    r.add_get("/signin", signin_form)
    r.add_post("/signin", signin)
    r.add_post("/signout", signout)
    r.add_get("/policies", policies)
    r.add_get("/policies/new", new_policy_form)
    r.add_post("/policies/new", create_policy)
    r.add_get("/policies/{id}", policy_page)
    r.add_post("/policies/{id}/tokens", create_token)
    r.add_get("/policies/{id}/edit", edit_policy_form)
    r.add_post("/policies/{id}/edit", update_policy)
    r.add_get("/policies/{id}/delete", delete_policy_form)
    r.add_post("/policies/{id}/delete", delete_policy)
    r.add_get("/tokens/{id}/edit", edit_token_form)
    r.add_post("/tokens/{id}/edit", update_token)
    r.add_get("/tokens/{id}/delete", delete_token_form)
    r.add_post("/tokens/{id}/delete", delete_token)
    r.add_get("/audit", audit)
    r.add_get("/static/{name}", _static(static_dir))
    r.add_route("*", "/{tail:.*}", not_found)
