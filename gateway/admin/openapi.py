"""The admin API as an OpenAPI 3 document, served at ``GET /api/openapi.json`` without a token (it describes
the API's shapes, nothing of any org; Grafana Cloud publishes its own the same way).

Laid out as Grafana's gcom spec (``grafana-com-public-clients``, ``go/gcom/api/openapi.yaml``): the server
is ``/api``, the Cloud paths keep the spec's paths, operation ids, tags and error statuses (invalid
arguments are ``409 Conflict`` there), and the data-source, LBAC-rules and team paths follow Grafana's
HTTP API with the gateway's own 400s. Every status a handler can answer is listed, and nothing else: a
schemathesis run in ``make test`` (tests/test_openapi.py) holds the running API to this document.
"""

from __future__ import annotations

import functools
import json
from typing import Any, Final

from aiohttp import web

from gateway.admin.errors import is_cloud_path
from gateway.policy.datasource import BACKEND_OF_TYPE
from gateway.policy.scopes import MAX_SCOPE_LEN, SCOPE_PATTERN, SERVED_SCOPES
from gateway.state import get_state

JSON: Final = "application/json"
Schema = dict[str, Any]


def _ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def _nullable(schema: Schema) -> Schema:
    return {**schema, "nullable": True}


_STR: Final[Schema] = {"type": "string"}
_TIME: Final[Schema] = {"type": "string", "format": "date-time"}
_INT: Final[Schema] = {"type": "integer"}
_UPDATED: Final[Schema] = {**_TIME, "description": "absent until the first update"}
#: An id that is a JSON number when the YAML's is all digits, a string otherwise (Cloud's are numbers).
_NUM_OR_STR: Final[Schema] = {"anyOf": [{"type": "integer"}, {"type": "string"}]}


def _obj(props: dict[str, Schema], required: tuple[str, ...] = (), closed: bool = False) -> Schema:
    out: Schema = {"type": "object", "properties": props}
    if required:
        out["required"] = list(required)
    if closed:
        out["additionalProperties"] = False
    return out


def _array(items: Schema, **extra: Any) -> Schema:
    return {"type": "array", "items": items, **extra}


def _page(item: str) -> Schema:
    """The Cloud's cursor page (``AccessPolicyListResponse``)."""
    return _obj({"items": _array(_ref(item)), "metadata": _obj({"pagination": _obj({
        "pageSize": _INT, "pageCursor": _nullable(_STR), "nextPage": _nullable(_STR)}, ("pageSize",))},
        ("pagination",))}, ("items", "metadata"))


def _cloud_list(item: str) -> Schema:
    """The Cloud's envelope of its read-only views (``getStackRegions_200_response``)."""
    return _obj({"items": _array(_ref(item)), "orderBy": _STR, "direction": _STR, "total": _INT, "pages": _INT,
                 "pageSize": _INT, "page": _INT}, ("items",))


_SELECTOR: Final[Schema] = {**_STR, "description": 'a label selector ({env="dev"}: restricts metrics, logs, '
                             'profiles) or a trace selector ({resource.env="dev"}: restricts traces), read back as '
                             'written; a realm whose selectors are all of one kind cannot read the other signals'}
_REALM_IN: Final = _obj({
    "type": {"type": "string", "enum": ["org", "stack"]},
    "identifier": {"anyOf": [_STR, _INT], "description": "a stack's id, or an org's id or slug (read back as "
                                                        "written), of the gateway's config"},
    "labelPolicies": _nullable(_array(_obj({"selector": _SELECTOR}, ("selector",), closed=True))),
}, ("type", "identifier"), closed=True)
_ATTRIBUTES: Final = _nullable(_obj({
    "lokiQueryPolicy": _nullable(_obj({
        **{k: _nullable(_INT) for k in ("maxEntriesLimitPerQuery", "minimumLabelsNumber")},
        **{k: _nullable(_STR) for k in ("maxQueryBytesRead", "maxQueryInterval", "maxQueryLength",
                                        "maxQueryLookback", "maxQueryTime", "queryTimeout")},
        "requiredLabels": _nullable(_array(_STR))}, closed=True)),
    "pdcConfiguration": _nullable(_obj({"limitedHosts": _nullable(_array(_STR))}, closed=True)),
}, closed=True))
_UID: Final[Schema] = {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,40}$"}
_TEXT: Final[Schema] = {"type": "string", "minLength": 1, "maxLength": 190, "pattern": r"\S"}
_LOGIN: Final[Schema] = {"type": "string", "minLength": 1, "maxLength": 255,
                  "pattern": r"^[^\x00-\x1f\x7f]*\S[^\x00-\x1f\x7f]*$"}
_TEAM_ID: Final[Schema] = {"anyOf": [_INT, _STR]}
_RULE: Final = _obj({"header": {"type": "string", "example": "X-Prom-Label-Policy"},
                     "value": {"type": "string", "example": '100:{env="dev"}'}}, closed=True)
_CONDITIONS: Final = _nullable(_obj({"allowedSubnets": _nullable(_array(_STR))}, closed=True))
_NAME: Final = {"type": "string", "minLength": 1, "maxLength": 255, "pattern": r"^\S(.*\S)?$",
                "description": "any printable text, nothing to trim at either end (e.g. MyToken-1767225600)"}
_SCOPE: Final = {"type": "string", "pattern": f"^{SCOPE_PATTERN}$", "maxLength": MAX_SCOPE_LEN,
                 "description": "service:permission, as on Grafana Cloud; the gateway enforces "
                                + ", ".join(sorted(SERVED_SCOPES)) + "; any other grants nothing here"}
_POLICY_FIELDS: Final[dict[str, Schema]] = {
    "displayName": _STR, "scopes": _array(_SCOPE, minItems=1, maxItems=100),
    "realms": _array(_REALM_IN, minItems=1),
    "conditions": _CONDITIONS, "attributes": _ATTRIBUTES}


def _schemas(scopes: list[str]) -> dict[str, Schema]:
    realm_out = _obj({"type": {"type": "string", "enum": ["org", "stack"]}, "identifier": _STR,
                      "labelPolicies": _array(_obj({"selector": _SELECTOR}, ("selector",)))}, ("type", "identifier"))
    token_fields = {"id": _STR, "accessPolicyId": _STR, "orgId": _STR, "name": _STR, "displayName": _STR,
                    "expiresAt": _nullable(_TIME), "firstUsedAt": _nullable(_TIME), "lastUsedAt": _nullable(_TIME),
                    "createdAt": _TIME, "updatedAt": _UPDATED}
    team_fields = {"id": _INT, "uid": _STR, "orgId": _NUM_OR_STR, "name": _STR, "email": _STR, "avatarUrl": _STR,
                   "memberCount": _INT, "permission": _INT, "members": _array(_STR), "createdAt": _nullable(_TIME),
                   "updatedAt": _nullable(_TIME)}
    ds_fields: dict[str, Schema] = {"name": _TEXT, "type": {"type": "string", "enum": sorted(BACKEND_OF_TYPE)},
                 "accessPolicyId": {"type": "string", "format": "uuid"}}
    return {
        "Error": _obj({"code": _STR, "message": _STR, "field": _STR}, ("code", "message")),
        "Message": _obj({"message": _STR}, ("message",)),
        "Empty": {"type": "object"},
        "AuthAccessPolicy": _obj({
            "id": {"type": "string", "format": "uuid"}, "orgId": _STR, "name": _STR, "displayName": _STR,
            "scopes": _array(_STR), "realms": _array(realm_out),
            "conditions": _obj({"allowedSubnets": _array(_STR)}), "attributes": _ATTRIBUTES,
            "status": {"type": "string", "enum": ["active", "inactive"]},
            "source": {"type": "string", "enum": ["user", "cloud"]},
            "createdAt": _TIME, "updatedAt": _UPDATED,
        }, ("id", "orgId", "name", "displayName", "scopes", "realms", "status", "createdAt")),
        "postAccessPolicies_request": _obj({"name": _NAME, **_POLICY_FIELDS}, ("name", "scopes", "realms"),
                                           closed=True),
        "postAccessPolicy_request": _obj({"name": _STR, **_POLICY_FIELDS,
                                          "status": {"type": "string", "enum": ["active", "inactive"]}},
                                         closed=True),
        "AuthToken": _obj(token_fields, ("id", "accessPolicyId", "name", "displayName", "createdAt")),
        "AuthTokenWithSecret": _obj({**token_fields, "token": _STR},
                                    ("id", "accessPolicyId", "name", "displayName", "createdAt", "token")),
        "postTokens_request": _obj({"accessPolicyId": {"type": "string", "format": "uuid"}, "name": _NAME,
                                    "displayName": _STR, "expiresAt": _nullable(_TIME)},
                                   ("accessPolicyId", "name"), closed=True),
        "postToken_request": _obj({"displayName": _STR, "expiresAt": _nullable(_TIME)}, closed=True),
        "getAccessPolicies_200_response": _page("AuthAccessPolicy"),
        "AccessPolicyListResponse": _page("AuthToken"),
        "AuditEntry": _obj({"id": _INT, "at": _TIME, "orgId": _STR, "actor": _STR, "action": _STR,
                            "resourceType": _STR, "resourceId": _STR, "before": _nullable({"type": "object"}),
                            "after": _nullable({"type": "object"})}, ("id", "at", "actor", "action")),
        "AuditPage": _page("AuditEntry"),
        "AccessPoliciesConfig": _obj({
            "realms": _array(_obj({"type": _STR, "identifier": _STR})),
            "scopes": _array(_obj({"name": {"type": "string", "enum": scopes}, "description": _STR,
                                   "requiresRealmType": _STR}, ("name", "description"))),
            "sets": _array(_obj({"name": _STR, "scopes": _array(_STR)}))}, ("realms", "scopes", "sets")),
        "StackRegion": _obj({"id": _INT, "slug": _STR, "name": _STR, "status": _STR}, ("id", "slug")),
        "StackRegions": _cloud_list("StackRegion"),
        "FormattedApiOrgPublic": _obj({"id": _NUM_OR_STR, "slug": _STR, "name": _STR, "url": _STR,
                                       "createdAt": _nullable(_TIME), "updatedAt": _nullable(_TIME)},
                                      ("id", "slug", "name")),
        "FormattedApiInstance": _obj({
            "id": _NUM_OR_STR, "slug": _STR, "name": _STR, "url": _STR, "status": _STR, "orgId": _NUM_OR_STR,
            "orgSlug": _STR, "orgName": _STR, "regionSlug": _STR, "clusterSlug": _STR, "type": _STR,
            "createdAt": _nullable(_TIME), "updatedAt": _nullable(_TIME),
            **{k: _NUM_OR_STR for k in ("hmInstancePromId", "hlInstanceId", "htInstanceId")},
            **{k: _STR for k in ("hmInstancePromUrl", "hlInstanceUrl", "htInstanceUrl")}},
            ("id", "slug", "name", "orgId", "orgSlug")),
        "Instances": _cloud_list("FormattedApiInstance"),
        "DataSource": _obj({"id": _INT, "uid": _STR, "orgId": _STR, "name": _STR, "type": _STR,
                            "accessPolicyId": _STR, "createdAt": _nullable(_TIME), "updatedAt": _nullable(_TIME)},
                           ("id", "uid", "name", "type", "accessPolicyId")),
        "DataSourcePage": _page("DataSource"),
        "DataSourceCreate": _obj({"uid": _nullable(_UID), **ds_fields}, ("name", "type", "accessPolicyId"),
                                 closed=True),
        "DataSourceUpdate": _obj({"uid": _UID, **ds_fields}, closed=True),
        "LbacRules": _obj({
            "message": _STR, "id": _INT, "uid": _STR, "name": _STR,
            "rules": _array(_obj({"teamId": _STR, "teamUid": _STR, "rules": _array(_STR)})),
            "lbacRules": _array(_obj({"teamId": _INT, "rules": _array(_obj({"header": _STR, "value": _STR}))}))},
            ("id", "uid", "rules", "lbacRules")),
        "LbacRulesUpdate": _obj({  # {"rules": [{teamId|teamUid, rules}]}, or one team: {teamId|teamUid, rules}
            "rules": _nullable(_array({"anyOf": [_obj({"teamId": _TEAM_ID, "teamUid": _STR, "rules": _nullable(
                _array({"anyOf": [_STR, _RULE]}))}, closed=True), _RULE, _STR]})),
            "teamId": _TEAM_ID, "teamUid": _STR}, closed=True),
        "Team": _obj(team_fields, ("id", "uid", "name")),
        "TeamPage": _page("Team"),
        "TeamCreate": _obj({"uid": _nullable(_UID), "name": _TEXT, "email": _nullable(_STR),
                            "members": _nullable(_array(_LOGIN))}, ("name",), closed=True),
        "TeamCreated": _obj({"message": _STR, "teamId": _INT, **team_fields}, ("message", "teamId")),
        "TeamUpdate": _obj({"uid": _UID, "name": _TEXT, "email": _nullable(_STR), "members": _array(_LOGIN)},
                           closed=True),
        "TeamUpdated": _obj({"message": _STR, **team_fields}, ("message",)),
        "TeamSearch": _obj({"totalCount": _INT, "teams": _array(_ref("Team")), "page": _INT, "perPage": _INT},
                           ("totalCount", "teams")),
        "TeamMember": _obj({"orgId": _NUM_OR_STR, "teamId": _INT, "teamUID": _STR, "userId": _INT, "login": _STR,
                            "email": _STR, "name": _STR}, ("teamId", "login")),
        "TeamMembers": _array(_ref("TeamMember")),
        "TeamMembersUpdate": _obj({"members": _array(_LOGIN), "admins": _nullable(_array(_LOGIN))}, ("members",),
                                  closed=True),
        "TeamMembersUpdated": _obj({"message": _STR, "members": _array(_STR)}, ("message", "members")),
    }


def _param(name: str, where: str = "query", schema: Schema | None = None, required: bool = False,
           description: str = "") -> Schema:
    out: Schema = {"name": name, "in": where, "required": required or where == "path", "schema": schema or _STR}
    if description:
        out["description"] = description
    return out


def _error(description: str) -> Schema:
    return {"description": description, "content": {JSON: {"schema": _ref("Error")}}}


_ERRORS: Final[dict[int, str]] = {
    400: "Invalid arguments (the body or parameter named by `field`)",
    401: "Missing, malformed, unknown, expired or revoked token", 403: "The token lacks a scope or the reach",
    404: "Not found (or outside the token's reach)", 409: "Invalid arguments, or the name is taken",
    413: "Request body too large", 415: "The body must be application/json",
    503: "The policy database or snapshot is unavailable; retry (Retry-After)"}
#: Cloud paths answer invalid arguments with 409 Conflict, as the gcom spec documents.
_CLOUD_ERRORS: Final = {**_ERRORS, 409: "Invalid arguments: wrong or missing parameters, or the name is taken"}


def _op(path: str, op_id: str, tag: str, summary: str, ok: Schema | None, *, status: int = 200,
        params: tuple[Schema, ...] = (), body: str | None = None, public: bool = False,
        links: dict[str, Schema] | None = None, example: Any = None, extra: tuple[int, ...] = ()) -> Schema:
    """One operation and every status its handler can answer."""
    cloud = is_cloud_path(f"/api{path}")
    codes = set(extra)
    if not public:
        codes |= {401, 403, 503, 409 if cloud else 400}
    if body:
        codes |= {413, 415}
    if "{" in path:
        codes.add(404)
    response: Schema = {"description": "OK"}
    if ok is not None:
        response["content"] = {JSON: {"schema": ok}}
    if links:
        response["links"] = links
    responses: dict[str, Schema] = {str(status): response}
    texts = _CLOUD_ERRORS if cloud else _ERRORS
    for code in sorted(codes):
        responses[str(code)] = _error(texts[code])
    out: Schema = {"operationId": op_id, "tags": [tag], "summary": summary, "responses": responses}
    if params:
        out["parameters"] = list(params)
    if body:
        media: Schema = {"schema": _ref(body)}
        if example is not None:
            media["example"] = example
        out["requestBody"] = {"required": True, "content": {JSON: media}}
    if public:
        out["security"] = []
    return out


def _link(op_id: str, **params: str) -> Schema:
    return {"operationId": op_id, "parameters": params}


def _cloud_q(region: str) -> tuple[Schema, ...]:
    return (_param("region", schema={"type": "string", "enum": [region]},
                   description="this gateway's region (optional here; required on the Cloud)"),
            _param("orgId", description="the token's own org (optional)"))


_ID: Final = _param("id", "path")
_PAGE: Final = (_param("pageSize", schema={"type": "integer", "minimum": 1, "maximum": 500}),
                _param("pageCursor"))


def _paths(region: str) -> dict[str, dict[str, Schema]]:
    cloud_q = _cloud_q(region)
    policy, token = _ref("AuthAccessPolicy"), _ref("AuthToken")
    policy_id = "$response.body#/id"
    policy_links = {"GetPolicy": _link("getAccessPolicy", id=policy_id),
                    "UpdatePolicy": _link("postAccessPolicy", id=policy_id),
                    "DeletePolicy": _link("deleteAccessPolicy", id=policy_id),
                    "ListItsTokens": _link("getTokens", accessPolicyId=policy_id),
                    "CreateToken": {"operationId": "postTokens", "requestBody": {"accessPolicyId": policy_id}},
                    "CreateDataSource": {"operationId": "createDataSource",
                                         "requestBody": {"accessPolicyId": policy_id}}}
    token_links = {"GetToken": _link("getToken", id=policy_id), "UpdateToken": _link("postToken", id=policy_id),
                   "DeleteToken": _link("deleteToken", id=policy_id)}
    uid = "$response.body#/uid"
    ds_links = {"GetDataSource": _link("getDataSource", uid=uid),
                "UpdateDataSource": _link("updateDataSource", uid=uid),
                "DeleteDataSource": _link("deleteDataSource", uid=uid), "GetRules": _link("getLbacRules", uid=uid),
                "PutRules": _link("putLbacRules", uid=uid)}
    team_id = "$response.body#/teamId"
    team_links = {"GetTeam": _link("getTeam", id=team_id), "UpdateTeam": _link("updateTeam", id=team_id),
                  "DeleteTeam": _link("deleteTeam", id=team_id), "GetMembers": _link("getTeamMembers", id=team_id),
                  "PutMembers": _link("putTeamMembers", id=team_id)}
    ap, tk = "/v1/accesspolicies", "/v1/tokens"
    policy_example = {"name": "readers", "displayName": "Readers", "scopes": ["metrics:read", "logs:read"],
                      "realms": [{"type": "org", "identifier": "1", "labelPolicies": [{"selector": '{env="dev"}'}]}]}
    team = ("/teams/{id}", _param("id", "path", {"type": "integer"}))
    rules_ops = {
        "get": ("getLbacRules", "Get a data source's team LBAC rules", None),
        "put": ("putLbacRules", "Replace a data source's team LBAC rules (all teams)", "LbacRulesUpdate")}
    paths: dict[str, dict[str, Schema]] = {
        ap: {
            "get": _op(ap, "getAccessPolicies", "accesspolicies", "Get a list of access policies",
                       _ref("getAccessPolicies_200_response"), params=(*cloud_q, *_PAGE, _param("name"),
                       _param("realmType", schema={"type": "string", "enum": ["org", "stack"]}),
                       _param("realmIdentifier"), _param("status", schema={"type": "string",
                                                                            "enum": ["active", "inactive"]}))),
            "post": _op(ap, "postAccessPolicies", "accesspolicies", "Create a new access policy", policy,
                        params=cloud_q, body="postAccessPolicies_request", links=policy_links,
                        example=policy_example)},
        f"{ap}/config": {"get": _op(f"{ap}/config", "getConfig", "accesspolicies",
                                    "The scope catalogue; scopes the gateway does not enforce grant nothing",
                                    _ref("AccessPoliciesConfig"), public=True)},
        f"{ap}/{{id}}": {
            "get": _op(f"{ap}/{{id}}", "getAccessPolicy", "accesspolicies", "Get an access policy", policy,
                       params=(_ID, *cloud_q)),
            "post": _op(f"{ap}/{{id}}", "postAccessPolicy", "accesspolicies", "Update an access policy", policy,
                        params=(_ID, *cloud_q), body="postAccessPolicy_request"),
            "delete": _op(f"{ap}/{{id}}", "deleteAccessPolicy", "accesspolicies",
                          "Delete an access policy and its tokens", _ref("Empty"), params=(_ID, *cloud_q))},
        tk: {
            "get": _op(tk, "getTokens", "tokens", "Get a list of tokens", _ref("AccessPolicyListResponse"),
                       params=(*cloud_q, *_PAGE, *(_param(k) for k in (
                           "accessPolicyId", "accessPolicyIds", "accessPolicyName", "accessPolicyRealmType",
                           "accessPolicyRealmIdentifier", "accessPolicyStatus", "name", "expiresBefore",
                           "expiresAfter")), _param("includeExpired", schema={"type": "boolean"}))),
            "post": _op(tk, "postTokens", "tokens", "Create a new token (the secret is shown once)",
                        _ref("AuthTokenWithSecret"), params=cloud_q, body="postTokens_request", links=token_links)},
        f"{tk}/{{id}}": {
            "get": _op(f"{tk}/{{id}}", "getToken", "tokens", "Get a token", token, params=(_ID, *cloud_q)),
            "post": _op(f"{tk}/{{id}}", "postToken", "tokens", "Update a token", token, params=(_ID, *cloud_q),
                        body="postToken_request"),
            "delete": _op(f"{tk}/{{id}}", "deleteToken", "tokens", "Delete (revoke) a token", _ref("Empty"),
                          params=(_ID, *cloud_q))},
        "/v1/auditlog": {"get": _op("/v1/auditlog", "getAuditLog", "audit", "The org's audit log (whole-org tokens)",
                                    _ref("AuditPage"), params=(*_PAGE, *(_param(k) for k in (
                                        "actor", "resourceType", "resource", "since", "until"))))},
        "/stack-regions": {"get": _op("/stack-regions", "getStackRegions", "stack-regions",
                                      "The one region: this gateway's", _ref("StackRegions"))},
        "/orgs/{slugOrId}": {"get": _op("/orgs/{slugOrId}", "getOrg", "orgs", "The token's org, by slug or id",
                                        _ref("FormattedApiOrgPublic"), params=(_param("slugOrId", "path"),))},
        "/instances": {"get": _op("/instances", "getInstances", "instances", "The stacks in the token's reach",
                                  _ref("Instances"), params=tuple(_param(k) for k in (
                                      "orgSlug", "orgId", "slug", "name")))},
        "/orgs/{orgSlug}/instances": {"get": _op(
            "/orgs/{orgSlug}/instances", "getOrgInstances", "orgs", "The stacks of the token's org in its reach",
            _ref("Instances"), params=(_param("orgSlug", "path"), *(_param(k) for k in ("slug", "name", "id"))))},
        "/instances/{slugOrId}": {"get": _op("/instances/{slugOrId}", "getInstance", "instances",
                                             "A stack in the token's reach, by slug or id",
                                             _ref("FormattedApiInstance"), params=(_param("slugOrId", "path"),))},
        "/datasources": {
            "get": _op("/datasources", "listDataSources", "datasources", "Data sources in the token's reach",
                       _ref("DataSourcePage"), params=(*_PAGE, *(_param(k) for k in (
                           "name", "type", "uid", "accessPolicyId")))),
            "post": _op("/datasources", "createDataSource", "datasources", "Register a Grafana data source",
                        _ref("DataSource"), body="DataSourceCreate", links=ds_links, extra=(409,))},
        "/datasources/uid/{uid}": {
            "get": _op("/datasources/uid/{uid}", "getDataSource", "datasources", "Get a data source",
                       _ref("DataSource"), params=(_param("uid", "path"),)),
            "put": _op("/datasources/uid/{uid}", "updateDataSource", "datasources", "Update a data source",
                       _ref("DataSource"), params=(_param("uid", "path"),), body="DataSourceUpdate", extra=(409,)),
            "delete": _op("/datasources/uid/{uid}", "deleteDataSource", "datasources",
                          "Delete a data source (and its rules)", None, status=204, params=(_param("uid", "path"),))},
        "/teams": {
            "get": _op("/teams", "listTeams", "teams", "Teams of the org", _ref("TeamPage"),
                       params=(*_PAGE, _param("name"), _param("uid"))),
            "post": _op("/teams", "createTeam", "teams", "Create a team (Grafana's shape)", _ref("TeamCreated"),
                        body="TeamCreate", links=team_links, extra=(409,))},
        "/teams/search": {"get": _op("/teams/search", "searchTeams", "teams", "Grafana's team search",
                                     _ref("TeamSearch"), params=tuple(_param(k) for k in (
                                         "query", "name", "page", "perpage")))},
        "/teams/uid/{uid}": {"get": _op("/teams/uid/{uid}", "getTeamByUid", "teams", "Get a team by uid",
                                        _ref("Team"), params=(_param("uid", "path"),))},
        team[0]: {
            "get": _op(team[0], "getTeam", "teams", "Get a team", _ref("Team"), params=(team[1],)),
            "put": _op(team[0], "updateTeam", "teams", "Update a team", _ref("TeamUpdated"), params=(team[1],),
                       body="TeamUpdate", extra=(409,)),
            "delete": _op(team[0], "deleteTeam", "teams", "Delete a team (and its rules everywhere)",
                          _ref("Message"), params=(team[1],))},
        f"{team[0]}/members": {
            "get": _op(f"{team[0]}/members", "getTeamMembers", "teams", "The team's members", _ref("TeamMembers"),
                       params=(team[1],)),
            "put": _op(f"{team[0]}/members", "putTeamMembers", "teams", "Replace the team's members",
                       _ref("TeamMembersUpdated"), params=(team[1],), body="TeamMembersUpdate")},
        f"{team[0]}/members/{{login}}": {
            "delete": _op(f"{team[0]}/members/{{login}}", "removeTeamMember", "teams", "Remove a member by login",
                          _ref("Message"), params=(team[1], _param("login", "path")))},
    }
    for prefix, suffix in (("/datasources/uid/{uid}", ""), ("/datasources/{uid}", "Legacy")):
        path = f"{prefix}/lbac/teams"
        paths[path] = {method: _op(path, op_id + suffix, "lbac", summary + (" (older path)" if suffix else ""),
                                   _ref("LbacRules"), params=(_param("uid", "path"),), body=body)
                       for method, (op_id, summary, body) in rules_ops.items()}
    return paths


def document(scopes: list[str], region: str) -> Schema:
    """The whole document; ``scopes`` is the catalogue the config endpoint lists, ``region`` the gateway's."""
    return {
        "openapi": "3.0.3",
        "info": {"title": "Access-policy gateway admin API", "version": "1",
                 "description": "Grafana Cloud's Access Policies and Tokens API (laid out as Grafana's gcom spec), "
                                "its read-only Cloud views, and Grafana's data-source LBAC rules and teams API. "
                                "The Cloud paths also answer without the /api prefix (/v1/...)."},
        "servers": [{"url": "/api"}],
        "security": [{"BearerAuth": []}],
        "tags": [{"name": t} for t in ("accesspolicies", "tokens", "audit", "stack-regions", "orgs", "instances",
                                       "datasources", "lbac", "teams")],
        "paths": _paths(region),
        "components": {"securitySchemes": {"BearerAuth": {"type": "http", "scheme": "bearer"}},
                       "schemas": _schemas(scopes)},
    }


@functools.lru_cache(maxsize=4)
def _body(region: str) -> bytes:
    from gateway.policy.scopes import ALL_SCOPES
    return json.dumps(document(sorted(ALL_SCOPES), region), separators=(",", ":")).encode()


async def serve(request: web.Request) -> web.Response:
    """``GET /api/openapi.json``: no token needed (the shapes of the API and the region, nothing of any org)."""
    return web.Response(body=_body(get_state(request).config.region), content_type=JSON)
