"""Who is signed in to the page: an encrypted session cookie holding a token id, re-checked on every request.

The cookie (aiohttp-session's EncryptedCookieStorage: Fernet, HttpOnly, SameSite=Strict, with an
absolute expiry) carries the token id, never the token itself. Each request looks the token up in
the policy cache exactly as the API does, so a revoked or expired token ends its sessions at once.
Every POST form carries a per-session random CSRF token compared in constant time.

The cookie also carries a random session nonce whose SHA-256 is a row of ``web_sessions`` (issue 12):
each request checks the row, signing out deletes it (a copy of the cookie taken before stops working
on every replica), and deleting the token deletes its rows (ON DELETE CASCADE).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Final

import asyncpg
from aiohttp import web
from aiohttp_session import Session
from aiohttp_session.cookie_storage import EncryptedCookieStorage

from gateway.admin.api import admin_scope
from gateway.clientip import client_ip
from gateway.policy.decision import Denied, identify
from gateway.policy.model import AccessPolicy, Token
from gateway.state import STATE, State
from gateway.store import AdminScope, Store

log = logging.getLogger("gateway.web")

COOKIE: Final = "gateway_ui"
SESSION_MAX_AGE: Final = 8 * 3600  # absolute: the created time is sealed inside the cookie
READ: Final = "accesspolicies:read"
_KEY_NAME: Final = "session_key"


@dataclass
class WebState:
    """Per-application state of the page, filled in at startup (the key lives in the database)."""

    storage: EncryptedCookieStorage | None = None


WEB = web.AppKey("web", WebState)
_SESSION = web.RequestKey("web_session", Session)
_LOADED_SID = web.RequestKey("web_loaded_sid", str)  # the nonce the request's cookie came with
_DB_ERRORS: Final = (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError)


@dataclass(frozen=True, slots=True)
class Admin:
    """The signed-in token, its policy and what it may administer."""

    token: Token
    policy: AccessPolicy
    scope: AdminScope

    def can(self, scope: str) -> bool:
        return scope in self.policy.scopes

    def missing(self, *needed: str) -> list[str]:
        return [s for s in needed if s not in self.policy.scopes]


ADMIN = web.RequestKey("web_admin", Admin)


class PageError(Exception):
    """A refusal rendered as an HTML page with ``status``."""

    def __init__(self, status: int, title: str, message: str):
        super().__init__(message)
        self.status, self.title, self.message = status, title, message


class SignInRequired(Exception):
    """No usable session: send the browser to the sign-in page, saying why."""

    def __init__(self, reason: str = ""):
        super().__init__(reason)
        self.reason = reason


def state_of(request: web.Request) -> State:
    """The process state (the page is a sub-application, so it lives in the parent's config)."""
    return request.config_dict[STATE]


async def load_key(store: Store) -> bytes:
    """The 32-byte session key every replica shares; the first replica to start creates it."""
    try:
        async with store.pool.acquire() as conn:
            await conn.execute("INSERT INTO web_secrets (name, value) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING",
                               _KEY_NAME, os.urandom(32))
            value = await conn.fetchval("SELECT value FROM web_secrets WHERE name = $1", _KEY_NAME)
            return bytes(value)
    except asyncpg.UndefinedTableError:
        log.warning("table web_secrets is missing (run `gateway migrate`); page sessions will not survive a restart"
                    " or work across replicas")
        return os.urandom(32)


def make_storage(key: bytes) -> EncryptedCookieStorage:
    return EncryptedCookieStorage(key, cookie_name=COOKIE, max_age=SESSION_MAX_AGE, path="/ui", httponly=True,
                                  samesite="Strict")


async def session(request: web.Request) -> Session:
    """The request's session, loaded (decrypted) on first use; the page middleware saves it."""
    got = request.get(_SESSION)
    if got is None:
        storage = request.config_dict[WEB].storage
        assert storage is not None, "the page's session key is loaded at startup"
        got = await storage.load_session(request)
        request[_SESSION] = got
        sid = got.get("sid")
        if isinstance(sid, str):
            request[_LOADED_SID] = sid
    return got


async def save_session(request: web.Request, response: web.StreamResponse) -> None:
    """Write the cookie back when the session was used: re-sealed, or deleted when emptied."""
    s = request.get(_SESSION)
    storage = request.config_dict[WEB].storage
    if s is None or storage is None or (s.new and s.empty):
        return
    loaded = request.get(_LOADED_SID)
    if loaded is not None and s.get("sid") != loaded:  # signed out, ended, or replaced by a new sign-in
        await revoke(state_of(request).store, loaded)
    await storage.save_session(request, response, s)


def _nonce_hash(sid: str) -> bytes:
    return hashlib.sha256(sid.encode()).digest()


async def revoke(store: Store, sid: str) -> None:
    """End a session on every replica (its cookie, wherever copied, no longer signs in)."""
    try:
        await store.pool.execute("DELETE FROM web_sessions WHERE nonce_sha256 = $1", _nonce_hash(sid))
    except _DB_ERRORS as exc:
        log.warning("could not delete a page session record (%s); it lapses at its expiry", exc.__class__.__name__)


async def _record(store: Store, sid: str, token_id: str) -> None:
    async with store.pool.acquire() as conn, conn.transaction():
        await conn.execute("DELETE FROM web_sessions WHERE expires_at < now()")
        await conn.execute("INSERT INTO web_sessions (nonce_sha256, token_id, expires_at) VALUES ($1, $2, $3)",
                           _nonce_hash(sid), token_id,
                           datetime.now(UTC) + timedelta(seconds=SESSION_MAX_AGE))


async def _alive(store: Store, sid: str, token_id: str) -> bool:
    try:
        return bool(await store.pool.fetchval(
            "SELECT EXISTS (SELECT 1 FROM web_sessions WHERE nonce_sha256 = $1 AND token_id = $2::uuid"
            " AND expires_at > now())", _nonce_hash(sid), token_id))
    except _DB_ERRORS:
        raise PageError(503, "Unavailable", "The policy database is unavailable; try again shortly.") from None


async def csrf_token(request: web.Request) -> str:
    """The session's CSRF token, created on first need."""
    s = await session(request)
    tok = s.get("csrf")
    if not isinstance(tok, str):
        tok = secrets.token_urlsafe(32)
        s["csrf"] = tok
    return tok


async def check_csrf(request: web.Request) -> None:
    """Refuse a POST whose form does not carry this session's CSRF token."""
    form = await request.post()
    sent = form.get("csrf")
    expected = (await session(request)).get("csrf")
    if not isinstance(sent, str) or not isinstance(expected, str) or not sent or not expected \
            or not hmac.compare_digest(sent.encode(), expected.encode()):
        raise PageError(403, "Form expired",
                        "The form's security token is missing or wrong (CSRF protection). Reload the page and"
                        " submit the form again.")


def _ip_check(request: web.Request, st: State, policy: AccessPolicy) -> None:
    ip = client_ip(request.remote, request.headers.getall("X-Forwarded-For", []), st.config.trusted_proxies)
    if not policy.ip_allowed(ip):
        raise PageError(403, "Address not allowed", f"Your address {ip} is outside the IP ranges of your token's"
                        f" access policy {policy.name!r}.")


def check_token(request: web.Request, presented: str) -> Admin:
    """Sign-in: the same checks as the admin API's ``authenticate`` with the read scope."""
    st = state_of(request)
    if st.cache.stale:
        raise PageError(503, "Unavailable", "The policy snapshot is not available; try again shortly.")
    try:
        ident = identify(presented.strip(), st.cache.tokens, st.cache.policies, datetime.now(UTC))
    except Denied as exc:
        raise PageError(401, "Sign-in failed", exc.message) from None
    return _admit(request, st, ident.token, ident.policy)


def _admit(request: web.Request, st: State, token: Token, policy: AccessPolicy) -> Admin:
    if policy.status != "active":
        raise PageError(403, "Access policy inactive", f"The access policy {policy.name!r} of this token is inactive.")
    if READ not in policy.scopes:
        raise PageError(403, "Missing scope", f"This token's access policy {policy.name!r} lacks the {READ} scope,"
                        " which the page needs at least.")
    _ip_check(request, st, policy)
    st.cache.record_use(token.id)
    return Admin(token, policy, admin_scope(policy))


async def sign_in(request: web.Request, admin: Admin) -> None:
    """Start a fresh session (a new CSRF token too: no fixation) for ``admin``."""
    storage = request.config_dict[WEB].storage
    assert storage is not None
    sid = secrets.token_urlsafe(32)
    try:
        await _record(state_of(request).store, sid, admin.token.id)
    except _DB_ERRORS:
        raise PageError(503, "Unavailable", "The policy database is unavailable; try again shortly.") from None
    await session(request)  # note the nonce the request came with: save_session revokes it
    s = await storage.new_session()  # created now: the 8 hours count from sign-in
    request[_SESSION] = s
    s["sid"] = sid
    s["tid"] = admin.token.id
    s["org"] = admin.policy.org_id
    s["csrf"] = secrets.token_urlsafe(32)


async def current_admin(request: web.Request) -> Admin:
    """The signed-in admin, re-checked against the cache; SignInRequired or PageError otherwise."""
    cached = request.get(ADMIN)
    if cached is not None:
        return cached
    s = await session(request)
    tid = s.get("tid")
    if not isinstance(tid, str):
        raise SignInRequired()
    st = state_of(request)
    if st.cache.stale:
        raise PageError(503, "Unavailable", "The policy snapshot is not available; try again shortly.")
    token = st.cache.tokens.get(tid)
    policy = st.cache.policies.get(token.access_policy_id) if token else None
    if token is None or policy is None or policy.org_id != s.get("org"):
        s.invalidate()
        raise SignInRequired("Your token was deleted or its access policy removed; sign in again.")
    if token.expired(datetime.now(UTC)):
        s.invalidate()
        raise SignInRequired("Your token has expired; sign in with another.")
    if policy.status != "active" or READ not in policy.scopes:
        s.invalidate()
        raise SignInRequired(f"Your token's access policy {policy.name!r} is now inactive or lacks {READ};"
                             " sign in with another token.")
    sid = s.get("sid")
    if not isinstance(sid, str) or not await _alive(st.store, sid, tid):
        s.invalidate()
        raise SignInRequired("Your session has ended (signed out); sign in again.")
    admin = _admit(request, st, token, policy)
    request[ADMIN] = admin
    return admin


def is_https(request: web.Request) -> bool:
    """TLS to us, or to a trusted proxy that says so: then the cookie is marked Secure."""
    if request.secure:
        return True
    st = state_of(request)
    peer = client_ip(request.remote, [], ())
    trusted = peer is not None and any(peer.version == n.version and peer in n for n in st.config.trusted_proxies)
    return trusted and request.headers.get("X-Forwarded-Proto", "").split(",")[-1].strip().lower() == "https"


def flash(s: Session, message: str) -> None:
    """A one-line notice shown on the next page (kept in the encrypted session)."""
    s["flash"] = message


def pop_flash(s: Session) -> Any:
    return s.pop("flash", None)
