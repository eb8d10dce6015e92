"""The Access Policies and Tokens API in Grafana Cloud's shapes (REFERENCE.md section 1)."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlencode

from aiohttp import web

from gateway.admin import text
from gateway.admin import validate as v
from gateway.admin.errors import ApiError, bad_request, is_cloud_path
from gateway.admin.serialize import audit_json, policy_json, token_json
from gateway.clientip import client_ip
from gateway.policy import tokens as tokfmt
from gateway.policy.datasource import READ_SCOPE_OF_TYPE
from gateway.policy.decision import Denied, Identity, identify
from gateway.policy.model import AccessPolicy, Token
from gateway.state import State, get_state
from gateway.store import AdminScope, BadCursor, Conflict, NotFound

MAX_PAGE = 500
_BEARER_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="gateway"'}


_state = get_state


def admin_scope(policy: AccessPolicy) -> AdminScope:
    whole = any(r.type == "org" and r.identifier == policy.org_id for r in policy.realms)
    return AdminScope(policy.org_id, whole, frozenset(r.identifier for r in policy.realms if r.type == "stack"))


def authenticate(request: web.Request, scope: str, *extra: str) -> tuple[Identity, AdminScope]:
    """Bearer token → identity with ``scope`` (and ``extra`` scopes); ApiError otherwise."""
    st = _state(request)
    header = request.headers.get("Authorization", "")
    kind, _, presented = header.partition(" ")
    if kind.lower() != "bearer" or not presented.strip():
        raise ApiError(401, "unauthenticated", "missing Authorization: Bearer <token>", headers=_BEARER_CHALLENGE)
    if st.cache.stale:
        raise ApiError(503, "unavailable", "policy snapshot is not available; try again shortly")
    try:
        ident = identify(presented.strip(), st.cache.tokens, st.cache.policies, datetime.now(UTC))
    except Denied as exc:
        raise ApiError(401, "unauthenticated", exc.message, headers=_BEARER_CHALLENGE) from None
    policy = ident.policy
    if policy.status != "active":
        raise ApiError(403, "permission_denied", "access policy is inactive")
    for needed in (scope, *extra):
        if needed not in policy.scopes:
            raise ApiError(403, "permission_denied", f"token lacks the {needed} scope")
    ip = client_ip(request.remote, request.headers.getall("X-Forwarded-For", []), st.config.trusted_proxies)
    if not policy.ip_allowed(ip):
        raise ApiError(403, "permission_denied", f"client address {ip} is outside the allowed ranges")
    _check_org_param(request, policy.org_id)
    text.check_params(request.query, request.match_info)  # filters and ids reach the store as text
    st.cache.record_use(ident.token.id)
    return ident, admin_scope(policy)


def _check_org_param(request: web.Request, org_id: str) -> None:
    """Cloud clients may add ``?orgId=``: accepted (and ignored) when it names the token's own org."""
    given = request.query.get("orgId")
    if given is not None and is_cloud_path(request.path) and given != org_id:
        raise ApiError(403, "permission_denied", f"orgId {given!r} is not the org of your token", "orgId")


async def read_json(request: web.Request) -> Any:
    limit = _state(request).config.limits.max_admin_body
    ctype = request.headers.get("Content-Type", "")
    if ctype.split(";", 1)[0].strip().lower() != "application/json":
        raise ApiError(415, "unsupported_media_type", "send the body as Content-Type: application/json")
    if request.content_length is not None and request.content_length > limit:
        raise ApiError(413, "payload_too_large", f"request body exceeds {limit} bytes")
    data = bytearray()  # read(n) returns what has arrived so far: a body sent in pieces needs the loop
    while len(data) <= limit and (chunk := await request.content.read(limit + 1 - len(data))):
        data += chunk
    if len(data) > limit:
        raise ApiError(413, "payload_too_large", f"request body exceeds {limit} bytes")
    try:
        body = json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise bad_request("request body is not valid JSON") from None
    text.check_tree(body)
    return body


def _check_region(request: web.Request) -> None:
    region = request.query.get("region")
    if region is not None and region != _state(request).config.region:
        raise bad_request(f"region must be {_state(request).config.region!r} on this gateway", "region")


def _page_params(request: web.Request) -> tuple[int, str | None]:
    raw = request.query.get("pageSize")
    size = MAX_PAGE
    if raw is not None:
        if not (raw.isascii() and raw.isdigit()) or not 1 <= int(raw) <= MAX_PAGE:
            raise bad_request(f"pageSize must be an integer from 1 to {MAX_PAGE}", "pageSize")
        size = int(raw)
    return size, request.query.get("pageCursor") or None


def _paged(request: web.Request, items: list[Any], size: int, nxt: str | None) -> web.Response:
    """``nextPage`` is relative to Cloud's ``/api`` base on Cloud paths (``/v1/accesspolicies?...``, the
    provider and the gcom client join it to their base URL), the full path elsewhere."""
    next_page = None
    if nxt:
        query = [(k, val) for k, val in request.query.items() if k != "pageCursor"] + [("pageCursor", nxt)]
        path = request.path
        if is_cloud_path(path) and path.startswith("/api/"):
            path = path[len("/api"):]
        next_page = f"{path}?{urlencode(query)}"
    return web.json_response({"items": items, "metadata": {"pagination": {
        "pageSize": size, "pageCursor": request.query.get("pageCursor"), "nextPage": next_page}}})


def _actor(ident: Identity) -> str:
    return ident.token.id


# ---- access policies --------------------------------------------------------------------------------

async def create_policy(request: web.Request) -> web.Response:
    _check_region(request)
    ident, scope = authenticate(request, "accesspolicies:write")
    st = _state(request)
    body = v.obj(await read_json(request), ("name", "displayName", "scopes", "realms", "conditions", "attributes"),
                 ("name", "scopes", "realms"))
    name = v.name(body["name"])
    nets, texts = v.conditions_text(body.get("conditions"))
    policy = AccessPolicy(
        id=str(uuid.uuid4()), org_id=scope.org_id, name=name,
        display_name=v.display_name(body.get("displayName"), name), scopes=v.scopes(body["scopes"]),
        realms=v.realms(body["realms"], st.config, scope), allowed_subnets=nets, subnet_texts=texts,
        attributes_json=_attributes_json(body.get("attributes")))
    try:
        created = await st.store.create_policy(policy, _actor(ident), policy_json)
    except Conflict as exc:
        raise ApiError(409, "already_exists", str(exc), "name") from None
    await st.cache.apply_change("access_policies", "INSERT", created.id)
    return web.json_response(policy_json(created))


def _attributes_json(value: Any) -> str | None:
    checked = v.attributes(value)
    return None if checked is None else json.dumps(checked, sort_keys=True)


_POLICY_FILTERS = ("name", "realmType", "realmIdentifier", "status")


async def list_policies(request: web.Request) -> web.Response:
    _check_region(request)
    _, scope = authenticate(request, "accesspolicies:read")
    size, cursor = _page_params(request)
    filters = {k: request.query[k] for k in _POLICY_FILTERS if k in request.query}
    if "realmType" in filters and filters["realmType"] not in ("org", "stack"):
        raise bad_request("realmType must be 'org' or 'stack'", "realmType")
    if "realmIdentifier" in filters and "realmType" not in filters:
        raise bad_request("realmIdentifier needs realmType", "realmIdentifier")
    _org_by_slug(request, scope, filters, "realmType", "realmIdentifier")
    if "status" in filters:
        v.status(filters["status"])
    try:
        page = await _state(request).store.list_policies(scope, filters, size, cursor)
    except BadCursor as exc:
        raise bad_request(str(exc), "pageCursor") from None
    return _paged(request, [policy_json(p) for p in page.items], size, page.next_cursor)


async def get_policy(request: web.Request) -> web.Response:
    _check_region(request)
    _, scope = authenticate(request, "accesspolicies:read")
    pid = _path_uuid(request)
    try:
        return web.json_response(policy_json(await _state(request).store.get_policy(scope, pid)))
    except NotFound as exc:
        raise ApiError(404, "not_found", str(exc)) from None


def _path_uuid(request: web.Request) -> str:
    try:
        return str(uuid.UUID(request.match_info["id"]))
    except ValueError:
        raise ApiError(404, "not_found", "no such id (ids are UUIDs)") from None


async def update_policy(request: web.Request) -> web.Response:
    _check_region(request)
    ident, scope = authenticate(request, "accesspolicies:write")
    st = _state(request)
    pid = _path_uuid(request)
    body = v.obj(await read_json(request), ("name", "displayName", "scopes", "realms", "conditions", "status",
                                            "attributes"))
    changes: dict[str, Any] = {}
    if body.get("displayName") not in (None, ""):  # "" is Terraform's "unset": keep the current one
        changes["display_name"] = v.display_name(body["displayName"], "")
    if "scopes" in body:
        changes["scopes"] = v.scopes(body["scopes"])
    if "realms" in body:
        changes["realms"] = v.realms(body["realms"], st.config, scope)
    if "conditions" in body:
        changes["allowed_subnets"], changes["subnet_texts"] = v.conditions_text(body["conditions"])
    if "attributes" in body:
        changes["attributes_json"] = _attributes_json(body["attributes"])
    if "status" in body:
        changes["status"] = v.status(body["status"])

    def check(before: AccessPolicy, after: AccessPolicy) -> None:
        if "name" in body and body["name"] != before.name:
            raise bad_request("name cannot change; create a new policy instead", "name")
        check_datasource_policy(st, after)

    try:
        updated = await st.store.update_policy(scope, pid, changes, _actor(ident), policy_json, check)
    except NotFound as exc:
        raise ApiError(404, "not_found", str(exc)) from None
    await st.cache.apply_change("access_policies", "UPDATE", updated.id)
    return web.json_response(policy_json(updated))


def check_datasource_policy(st: State, after: AccessPolicy) -> None:
    """A policy that data sources use keeps their read scope and stays free of label policies (400 otherwise)."""
    for ds in st.cache.datasources.values():
        if ds.access_policy_id != after.id:
            continue
        need = READ_SCOPE_OF_TYPE[ds.type]
        if need not in after.scopes:
            raise bad_request(f"data source {ds.uid!r} uses this policy and needs its {need} scope", "scopes")
        if any(r.label_policies for r in after.realms):
            raise bad_request(f"data source {ds.uid!r} uses this policy; its team rules need a policy "
                              "without label policies", "realms")


async def delete_policy(request: web.Request) -> web.Response:
    _check_region(request)
    ident, scope = authenticate(request, "accesspolicies:delete")
    st = _state(request)
    pid = _path_uuid(request)
    try:
        await st.store.delete_policy(scope, pid, _actor(ident), policy_json)
    except NotFound as exc:
        raise ApiError(404, "not_found", str(exc)) from None
    await st.cache.apply_change("access_policies", "DELETE", pid)
    return web.json_response({})  # the spec's 200; the gcom client decodes a JSON body


# ---- tokens -----------------------------------------------------------------------------------------

async def create_token(request: web.Request) -> web.Response:
    _check_region(request)
    ident, scope = authenticate(request, "accesspolicies:write")
    st = _state(request)
    body = v.obj(await read_json(request), ("accessPolicyId", "name", "displayName", "expiresAt"),
                 ("accessPolicyId", "name"))
    policy_id = v.uuid_str(body["accessPolicyId"], "accessPolicyId")
    name = v.name(body["name"])
    expires = v.timestamp(body["expiresAt"], "expiresAt", future=True) if body.get("expiresAt") else None
    secret = tokfmt.new_secret()
    token = Token(id=str(uuid.uuid4()), access_policy_id=policy_id, name=name,
                  display_name=v.display_name(body.get("displayName"), name),
                  secret_hash=tokfmt.hash_secret(secret), expires_at=expires)
    try:
        created = await st.store.create_token(scope, token, _actor(ident), token_json)
    except NotFound:
        raise bad_request("no access policy with that id", "accessPolicyId") from None
    except Conflict as exc:
        raise ApiError(409, "already_exists", str(exc), "name") from None
    await st.cache.apply_change("tokens", "INSERT", created.id)
    out = token_json(created)
    out["token"] = tokfmt.encode(scope.org_id, created.id, secret, st.config.region)
    return web.json_response(out)


_TOKEN_FILTERS = ("accessPolicyId", "accessPolicyName", "accessPolicyRealmType", "accessPolicyRealmIdentifier",
                  "name", "expiresBefore", "expiresAfter", "accessPolicyStatus")


async def list_tokens(request: web.Request) -> web.Response:
    _check_region(request)
    _, scope = authenticate(request, "accesspolicies:read")
    size, cursor = _page_params(request)
    filters: dict[str, Any] = {k: request.query[k] for k in _TOKEN_FILTERS if k in request.query}
    if "accessPolicyId" in filters:
        v.uuid_str(filters["accessPolicyId"], "accessPolicyId")
    if "accessPolicyIds" in request.query:
        ids = [i for i in request.query["accessPolicyIds"].split(",") if i]
        if not ids or len(ids) > MAX_PAGE:
            raise bad_request(f"accessPolicyIds must be a comma-separated list of 1-{MAX_PAGE} ids", "accessPolicyIds")
        filters["accessPolicyIds"] = [v.uuid_str(i, "accessPolicyIds") for i in ids]
    filters["includeExpired"] = _flag(request, "includeExpired")
    for key in ("expiresBefore", "expiresAfter"):
        if key in filters:
            filters[key] = v.timestamp(filters[key], key)
    if "accessPolicyRealmType" in filters and filters["accessPolicyRealmType"] not in ("org", "stack"):
        raise bad_request("accessPolicyRealmType must be 'org' or 'stack'", "accessPolicyRealmType")
    if "accessPolicyRealmIdentifier" in filters and "accessPolicyRealmType" not in filters:
        raise bad_request("accessPolicyRealmIdentifier needs accessPolicyRealmType", "accessPolicyRealmIdentifier")
    _org_by_slug(request, scope, filters, "accessPolicyRealmType", "accessPolicyRealmIdentifier")
    if "accessPolicyStatus" in filters:
        v.status(filters["accessPolicyStatus"])
    try:
        page = await _state(request).store.list_tokens(scope, filters, size, cursor)
    except BadCursor as exc:
        raise bad_request(str(exc), "pageCursor") from None
    return _paged(request, [token_json(t) for t in page.items], size, page.next_cursor)


def _org_by_slug(request: web.Request, scope: AdminScope, filters: dict[str, Any], type_key: str,
                 ident_key: str) -> None:
    """An org realm filter may name the token's org by slug, as realms may: realms are stored by org id."""
    org = _state(request).config.orgs_by_id.get(scope.org_id)
    if filters.get(type_key) == "org" and org is not None and filters.get(ident_key) == org.name:
        filters[ident_key] = org.id


def _flag(request: web.Request, key: str) -> bool:
    raw = request.query.get(key, "false").lower()
    if raw not in ("true", "false", "1", "0"):
        raise bad_request(f"{key} must be true or false", key)
    return raw in ("true", "1")


async def get_token(request: web.Request) -> web.Response:
    _check_region(request)
    _, scope = authenticate(request, "accesspolicies:read")
    try:
        return web.json_response(token_json(await _state(request).store.get_token(scope, _path_uuid(request))))
    except NotFound as exc:
        raise ApiError(404, "not_found", str(exc)) from None


async def update_token(request: web.Request) -> web.Response:
    _check_region(request)
    ident, scope = authenticate(request, "accesspolicies:write")
    st = _state(request)
    tid = _path_uuid(request)
    body = v.obj(await read_json(request), ("displayName", "expiresAt"))
    changes: dict[str, Any] = {}
    if body.get("displayName") not in (None, ""):  # "" is Terraform's "unset": keep the current one
        changes["display_name"] = v.display_name(body["displayName"], "")
    if "expiresAt" in body:
        changes["expires_at"] = None if body["expiresAt"] is None else v.timestamp(body["expiresAt"], "expiresAt")
    try:
        updated = await st.store.update_token(scope, tid, changes, _actor(ident), token_json)
    except NotFound as exc:
        raise ApiError(404, "not_found", str(exc)) from None
    await st.cache.apply_change("tokens", "UPDATE", tid)
    return web.json_response(token_json(updated))


async def delete_token(request: web.Request) -> web.Response:
    _check_region(request)
    ident, scope = authenticate(request, "accesspolicies:delete")
    st = _state(request)
    tid = _path_uuid(request)
    try:
        await st.store.delete_token(scope, tid, _actor(ident), token_json)
    except NotFound as exc:
        raise ApiError(404, "not_found", str(exc)) from None
    await st.cache.apply_change("tokens", "DELETE", tid)
    return web.json_response({})  # the spec's 200 with an object body


# ---- audit log --------------------------------------------------------------------------------------

async def list_audit(request: web.Request) -> web.Response:
    _, scope = authenticate(request, "accesspolicies:read")
    if not scope.whole_org:
        raise ApiError(403, "permission_denied", "the audit log needs a token whose realm is the whole org")
    size, cursor = _page_params(request)
    from gateway.admin.auditfilter import audit_filters  # actor, resourceType, resource, since, until
    try:
        page = await _state(request).store.list_audit(scope.org_id, size, cursor, audit_filters(request.query))
    except BadCursor as exc:
        raise bad_request(str(exc), "pageCursor") from None
    return _paged(request, [audit_json(r) for r in page.items], size, page.next_cursor)


def add_routes(app: web.Application) -> None:
    """The Access Policies / Tokens API; :func:`gateway.admin.routes.add_routes` adds the Cloud routes first."""
    for prefix in ("/api/v1", "/v1"):  # Cloud clients use both /api/v1/... and /v1/...
        app.router.add_post(f"{prefix}/accesspolicies", create_policy)
        app.router.add_get(f"{prefix}/accesspolicies", list_policies)
        app.router.add_get(f"{prefix}/accesspolicies/{{id}}", get_policy)
        app.router.add_post(f"{prefix}/accesspolicies/{{id}}", update_policy)
        app.router.add_delete(f"{prefix}/accesspolicies/{{id}}", delete_policy)
        app.router.add_post(f"{prefix}/tokens", create_token)
        app.router.add_get(f"{prefix}/tokens", list_tokens)
        app.router.add_get(f"{prefix}/tokens/{{id}}", get_token)
        app.router.add_post(f"{prefix}/tokens/{{id}}", update_token)
        app.router.add_delete(f"{prefix}/tokens/{{id}}", delete_token)
    app.router.add_get("/api/v1/auditlog", list_audit)

