"""Grafana Cloud's read-only views that the Terraform provider and its examples call, in the shapes
of Cloud's OpenAPI spec (``grafana-com-public-clients``, ``go/gcom/api/openapi.yaml``).

* ``GET /api/v1/accesspolicies/config``: the scope catalogue (``AccessPoliciesConfig``); no token,
  as on the Cloud.
* ``GET /api/stack-regions``: one region, the configured one (``getStackRegions_200_response``);
  the provider's ``grafana_cloud_access_policies`` data source and its lister walk it.
* ``GET /api/orgs/{slugOrId}``: the org of the YAML (``FormattedApiOrgPublic``); ``slug`` is the
  org's name, ``id`` its id (a number when the id is one: the provider reads it as ``int32``).
* ``GET /api/instances``, ``/api/instances/{slugOrId}`` and ``/api/orgs/{orgSlug}/instances``: the
  stacks (``FormattedApiInstance``), with their per-signal tenant IDs and this gateway's URL for each
  signal. Ids and tenant IDs that are numbers in the YAML are JSON numbers, as on the Cloud; others stay
  strings (the Go client, which decodes them as numbers, then fails: give stacks numeric ids and tenants
  for Go clients).

These views need a token that can read access policies (``accesspolicies:read``) and show only its
org, and of that org only the stacks within the token's realm.
"""

from __future__ import annotations

from typing import Any, Final

from aiohttp import web

from gateway.admin.api import authenticate
from gateway.admin.errors import ApiError
from gateway.config import Org, Stack
from gateway.policy.scopes import ALL_SCOPES, SERVED_SCOPES, SERVICE_DESCRIPTIONS
from gateway.state import get_state
from gateway.store import AdminScope

READ: Final = "accesspolicies:read"
#: Scopes that only make sense on a stack realm on the Cloud (``scopes_inner.requiresRealmType``).
_STACK_ONLY: Final = frozenset({"stack-config:read", "stack-plugins:read", "stack-plugins:write",
                                "stack-plugins:delete", "stack-service-accounts:write", "stack-users:read"})
#: Ready-made scope sets (``sets_inner``), as the Cloud portal offers them.
_SETS: Final = (("metrics-read", ("metrics:read",)), ("metrics-write", ("metrics:write",)),
                ("logs-read", ("logs:read",)), ("logs-write", ("logs:write",)),
                ("traces-read", ("traces:read",)), ("traces-write", ("traces:write",)),
                ("agent", ("metrics:write", "logs:write", "traces:write")),
                ("datasource", ("metrics:read", "logs:read", "traces:read")),
                ("accesspolicies-admin", ("accesspolicies:read", "accesspolicies:write", "accesspolicies:delete")))


def _num(value: str) -> int | str:
    """Cloud ids are numbers (the Go client decodes them as floats); ours are when the YAML's are."""
    return int(value) if value.isascii() and value.isdigit() and len(value) <= 15 else value


def _scope_description(scope: str) -> str:
    service, _, action = scope.partition(":")
    if scope not in SERVED_SCOPES:
        return f"{action} {service} (Grafana Cloud scope; grants nothing on this gateway)"
    return f"{action} {SERVICE_DESCRIPTIONS.get(service, service)}"


async def get_config(request: web.Request) -> web.Response:
    """The catalogue of scopes and realm types; unauthenticated like the Cloud's."""
    scopes = []
    for s in sorted(ALL_SCOPES):
        item: dict[str, Any] = {"name": s, "description": _scope_description(s)}
        if s in _STACK_ONLY:
            item["requiresRealmType"] = "stack"
        scopes.append(item)
    return web.json_response({
        "realms": [{"type": "org", "identifier": "org id"}, {"type": "stack", "identifier": "stack id"}],
        "scopes": scopes,
        "sets": [{"name": name, "scopes": list(members)} for name, members in _SETS],
    })


def _list(items: list[dict[str, Any]], order_by: str) -> dict[str, Any]:
    """The Cloud's page envelope for these views: everything on one page."""
    return {"items": items, "orderBy": order_by, "direction": "asc", "total": len(items), "pages": 1,
            "pageSize": max(len(items), 1), "page": 1}


async def get_stack_regions(request: web.Request) -> web.Response:
    authenticate(request, READ)
    region = get_state(request).config.region
    item = {"id": 1, "status": "active", "visibility": "public", "slug": region, "name": region,
            "publicName": region, "description": f"the region of this gateway ({region})",
            "provider": "self-hosted", "createdAt": "1970-01-01T00:00:00Z", "updatedAt": None, "sortOrder": 0}
    return web.json_response(_list([item], "sortOrder"))


def _base_url(request: web.Request) -> str:
    return str(request.url.origin())


def _own_org(request: web.Request, scope: AdminScope) -> Org:
    org = get_state(request).config.orgs_by_id.get(scope.org_id)
    if org is None:  # the YAML lost the token's org since the token was made
        raise ApiError(404, "not_found", "your token's org is not configured")
    return org


def _org_json(request: web.Request, org: Org) -> dict[str, Any]:
    return {"id": _num(org.id), "slug": org.name, "name": org.name, "url": f"{_base_url(request)}/orgs/{org.name}",
            "createdAt": None, "updatedAt": None}


async def get_org(request: web.Request) -> web.Response:
    """``{slugOrId}`` is the org's name or id; other orgs answer 404 (no hint that they exist)."""
    _, scope = authenticate(request, READ)
    org = _own_org(request, scope)
    if request.match_info["slug"] not in (org.name, org.id):
        raise ApiError(404, "not_found", "no such org")
    return web.json_response(_org_json(request, org))


#: Per signal: the Cloud's instance-id and URL fields. Every signal is served at the gateway's own
#: address (clients add the paths they add on the Cloud: ``/api/prom``, ``/loki/api/v1/push``, ...).
_SIGNAL_FIELDS: Final = (("metrics", "hmInstancePromId", "hmInstancePromUrl"),
                         ("logs", "hlInstanceId", "hlInstanceUrl"),
                         ("traces", "htInstanceId", "htInstanceUrl"))


def _stack_json(request: web.Request, org: Org, stack: Stack) -> dict[str, Any]:
    base = _base_url(request)
    region = get_state(request).config.region
    out: dict[str, Any] = {
        "id": _num(stack.id), "slug": stack.name, "name": stack.name, "description": "", "url": base,
        "status": "active", "orgId": _num(org.id), "orgSlug": org.name, "orgName": org.name,
        "regionSlug": region, "clusterSlug": region, "type": "stack", "labels": {},
        "createdAt": None, "updatedAt": None,
    }
    for signal, id_field, url_field in _SIGNAL_FIELDS:
        tenant = stack.tenants.get(signal)
        if tenant is not None:
            out[id_field] = _num(tenant)
            out[url_field] = base
    return out


def _visible_stacks(request: web.Request, scope: AdminScope) -> tuple[Org, list[Stack]]:
    org = _own_org(request, scope)
    return org, [s for s in org.stacks if scope.whole_org or s.id in scope.stacks]


async def list_instances(request: web.Request) -> web.Response:
    """Filters the gcom client sends: ``orgSlug``/``orgId`` (must be the token's org), ``slug``, ``name``."""
    _, scope = authenticate(request, READ)
    org, stacks = _visible_stacks(request, scope)
    q = request.query
    if q.get("orgSlug") not in (None, org.name) or q.get("orgId") not in (None, org.id):
        stacks = []
    for key in ("slug", "name"):
        if key in q:
            stacks = [s for s in stacks if s.name == q[key]]
    return web.json_response(_list([_stack_json(request, org, s) for s in stacks], "id"))


async def list_org_instances(request: web.Request) -> web.Response:
    """``GET /api/orgs/{orgSlug}/instances`` (``getOrgInstances``, where Cloud's docs send users for stack
    ids): the stacks of the token's org in its reach, in ``getInstances_200_response``; filters ``slug``,
    ``name``, ``id``. Another org is a 404, as for ``/api/orgs/{slugOrId}``."""
    _, scope = authenticate(request, READ)
    org, stacks = _visible_stacks(request, scope)
    if request.match_info["slug"] not in (org.name, org.id):
        raise ApiError(404, "not_found", "no such org")
    q = request.query
    for key, of in (("slug", _stack_name), ("name", _stack_name), ("id", _stack_id)):
        if key in q:
            stacks = [s for s in stacks if of(s) == q[key]]
    return web.json_response(_list([_stack_json(request, org, s) for s in stacks], "id"))


def _stack_name(stack: Stack) -> str:
    return stack.name


def _stack_id(stack: Stack) -> str:
    return stack.id


async def get_instance(request: web.Request) -> web.Response:
    _, scope = authenticate(request, READ)
    org, stacks = _visible_stacks(request, scope)
    key = request.match_info["slug"]
    for s in stacks:
        if key in (s.name, s.id):
            return web.json_response(_stack_json(request, org, s))
    raise ApiError(404, "not_found", "no such stack in your token's reach")


def add_routes(app: web.Application) -> None:
    """Register the views; the config route must precede ``/accesspolicies/{id}``."""
    r = app.router
    for prefix in ("/api/v1", "/v1"):
        r.add_get(f"{prefix}/accesspolicies/config", get_config)
    r.add_get("/api/stack-regions", get_stack_regions)
    r.add_get("/api/orgs/{slug}", get_org)
    r.add_get("/api/orgs/{slug}/instances", list_org_instances)
    r.add_get("/api/instances", list_instances)
    r.add_get("/api/instances/{slug}", get_instance)
