"""Data sources, teams and the Data Source LBAC rules API (seed 003, Grafana Cloud's shapes).

Grafana OSS cannot attach team LBAC rules to its queries, so the gateway keeps them: a data source
names the access policy whose token Grafana uses, teams list Grafana user logins, and the rules of a
data source say which selectors each team's members are narrowed to (see gateway.policy.datasource).

Permissions (same Bearer tokens as the Access Policies API):

* reads need ``datasources:read``; data-source writes need ``datasources:write``;
* anything that changes who is restricted to what needs ``datasources:write`` AND
  ``datasources.permissions:write``: the rules PUT, every team write (teams decide whom rules hit),
  and deleting a data source that has rules;
* a data source is visible when its access policy is within the token's org and realm reach; teams are
  org-wide, so team writes also need a token whose realm is the whole org.

A rules PUT replaces the data source's WHOLE rule set, as the seed says ("Deleting a team from the list
will remove the team's LBAC rules"): also the one-team form ``{"teamId": 1, "rules": [...]}``, which
leaves exactly that team with rules and removes every other team's. GET and PUT answer in both of
Grafana's shapes at once: ``rules`` (current Grafana's ``TeamLBACRule``, what Terraform's
``grafana_data_source_config_lbac_rules`` reads back) and the seed's ``lbacRules``.

Teams answer in Grafana's HTTP API shapes (``pkg/api/team.go``, ``TeamDTO``, ``TeamMemberDTO``), with the
gateway's ``members`` (Grafana user logins) beside them.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Collection, Sequence
from typing import Any, Final

from aiohttp import web

from gateway.admin import text
from gateway.admin import validate as v
from gateway.admin.api import _actor, _page_params, _paged, authenticate, read_json
from gateway.admin.errors import ApiError, bad_request, refuse_other_methods
from gateway.admin.serialize import rfc3339
from gateway.config import Config
from gateway.policy.datasource import (
    BACKEND_OF_TYPE,
    HEADER,
    READ_SCOPE_OF_TYPE,
    DataSource,
    Team,
    TeamRule,
    fold_login,
    parse_rule,
)
from gateway.policy.model import AccessPolicy
from gateway.policy.selector import SelectorError
from gateway.state import get_state
from gateway.store import AdminScope, BadCursor, NotFound
from gateway.store import datasources as store
from gateway.store.datasources import FieldConflict, Rules

READ: Final = "datasources:read"
WRITE: Final = "datasources:write"
PERMISSIONS: Final = "datasources.permissions:write"
UID_RE: Final = re.compile(r"[A-Za-z0-9_-]{1,40}")  # Grafana's uid rule
MAX_NAME: Final = 190
MAX_MEMBERS: Final = 10_000
MAX_TEAMS_PER_SOURCE: Final = 1_000
MAX_RULES_PER_TEAM: Final = 100
MAX_LOGIN: Final = 255
RULES_UPDATED: Final = "Data source LBAC rules updated"


# ---- JSON shapes ----------------------------------------------------------------------------------

def datasource_json(d: DataSource) -> dict[str, Any]:
    return {"id": d.id, "uid": d.uid, "orgId": d.org_id, "name": d.name, "type": d.type,
            "accessPolicyId": d.access_policy_id, "createdAt": rfc3339(d.created_at),
            "updatedAt": rfc3339(d.updated_at)}


def _num(value: str) -> int | str:
    return int(value) if value.isascii() and value.isdigit() and len(value) <= 15 else value


def team_json(t: Team) -> dict[str, Any]:
    """Grafana's ``TeamDTO`` (id, uid, orgId, name, email, avatarUrl, memberCount, permission), plus the
    gateway's ``members``, ``createdAt`` and ``updatedAt``."""
    return {"id": t.id, "uid": t.uid, "orgId": _num(t.org_id), "name": t.name, "email": t.email, "avatarUrl": "",
            "memberCount": len(t.members), "permission": 0, "members": list(t.members),
            "createdAt": rfc3339(t.created_at), "updatedAt": rfc3339(t.updated_at)}


def member_json(t: Team, login: str) -> dict[str, Any]:
    """Grafana's ``TeamMemberDTO`` for a member known only by login (the gateway has no user ids)."""
    return {"orgId": _num(t.org_id), "teamId": t.id, "teamUID": t.uid, "userId": 0, "userUID": "",
            "auth_module": "", "email": login if "@" in login else "", "name": login, "login": login,
            "avatarUrl": "", "labels": [], "permission": 0}


def lbac_rules_json(rules: Rules) -> list[dict[str, Any]]:
    """The seed's shape: ``[{"teamId": 1, "rules": [{"header": ..., "value": "<tenant>:<selector>"}]}]``."""
    return [{"teamId": tid, "rules": [{"header": HEADER, "value": r.text} for r in rs]} for tid, rs in rules]


def grafana_rules_json(rules: Rules, uids: dict[int, str]) -> list[dict[str, Any]]:
    """Grafana's current shape (``TeamLBACRule``, what ``grafana_data_source_config_lbac_rules`` reads):
    ``[{"teamId": "1", "teamUid": "...", "rules": ["{ foo=\"bar\" }"]}]``: each rule's selector as written,
    without its tenant (Grafana adds the data source's tenant itself)."""
    return [{"teamId": str(tid), "teamUid": uids.get(tid, ""), "rules": [r.text.partition(":")[2] for r in rs]}
            for tid, rs in rules]


# ---- small validators -----------------------------------------------------------------------------

def valid_name(value: Any, field: str = "name") -> str:
    if not isinstance(value, str) or not value.strip() or len(value) > MAX_NAME:
        raise bad_request(f"{field} must be a non-empty string of at most {MAX_NAME} characters", field)
    return text.check(value.strip(), field)


def valid_uid(value: Any, field: str = "uid") -> str:
    if not isinstance(value, str) or not UID_RE.fullmatch(value):
        raise bad_request(f"{field} must be 1-40 characters of letters, digits, '-' and '_'", field)
    return value


def new_uid() -> str:
    return secrets.token_hex(7)


def valid_type(value: Any) -> str:
    if not isinstance(value, str) or value not in BACKEND_OF_TYPE:
        raise bad_request(f"type must be one of {', '.join(BACKEND_OF_TYPE)}", "type")
    return str(value)


def valid_members(value: Any, field: str = "members") -> tuple[str, ...]:
    """Grafana logins; duplicates (compared case-insensitively, as Grafana does) are dropped."""
    if not isinstance(value, list) or len(value) > MAX_MEMBERS:
        raise bad_request(f"{field} must be a list of at most {MAX_MEMBERS} Grafana user logins", field)
    out: dict[str, str] = {}
    for i, login in enumerate(value):
        if (not isinstance(login, str) or not login.strip() or len(login) > MAX_LOGIN
                or any(ord(ch) < 32 or ord(ch) == 127 for ch in login)):
            raise bad_request(f"must be a Grafana user login (1-{MAX_LOGIN} printable characters)", f"{field}[{i}]")
        out.setdefault(fold_login(login), login.strip())
    return tuple(out.values())


def _team_id(request: web.Request) -> int:
    raw = request.match_info["id"]
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 18:
        raise ApiError(404, "not_found", "no such team (team ids are numbers)")
    return int(raw)


def _not_found(exc: NotFound) -> ApiError:
    return ApiError(404, "not_found", str(exc))


def _conflict(exc: FieldConflict) -> ApiError:
    return ApiError(409, "already_exists", str(exc), exc.field or None)


def check_policy(policy: AccessPolicy | None, ds: DataSource) -> None:
    """A data source's policy: in reach, able to read the type's signal, and without label policies
    (as on Grafana Cloud: the token's label policies would override the team rules anyway)."""
    if policy is None:
        raise bad_request("no access policy with that id in your org and realm", "accessPolicyId")
    need = READ_SCOPE_OF_TYPE[ds.type]
    if need not in policy.scopes:
        raise bad_request(f"access policy {policy.name!r} lacks the {need} scope a {ds.type} data source needs",
                          "accessPolicyId")
    if any(r.label_policies for r in policy.realms):
        raise bad_request(f"access policy {policy.name!r} has label policies; a data source with team LBAC rules "
                          "needs a policy without them", "accessPolicyId")


def check_delete(ds: DataSource, scopes: Collection[str]) -> None:
    """Deleting a data source that has rules changes who is restricted: it also needs the permissions scope."""
    if ds.lbac_rules and PERMISSIONS not in scopes:
        raise ApiError(403, "permission_denied",
                       f"the data source has LBAC rules; deleting it needs the {PERMISSIONS} scope")


def require_whole_org(scope: AdminScope) -> None:
    """Teams span the org: changing them needs an admin whose realm is the whole org."""
    if not scope.whole_org:
        raise ApiError(403, "permission_denied", "teams span the org; changing them needs a token whose realm is "
                       "the whole org")


# ---- data sources ---------------------------------------------------------------------------------

async def create_datasource(request: web.Request) -> web.Response:
    ident, scope = authenticate(request, WRITE)
    st = get_state(request)
    body = v.obj(await read_json(request), ("uid", "name", "type", "accessPolicyId"),
                 ("name", "type", "accessPolicyId"))
    ds = DataSource(id=0, uid=valid_uid(body["uid"]) if body.get("uid") is not None else new_uid(),
                    org_id=scope.org_id, name=valid_name(body["name"]), type=valid_type(body["type"]),
                    access_policy_id=v.uuid_str(body["accessPolicyId"], "accessPolicyId"))
    try:
        created = await store.create_datasource(st.store, scope, ds, _actor(ident), datasource_json, check_policy)
    except FieldConflict as exc:
        raise _conflict(exc) from None
    await st.cache.apply_change("datasources", "INSERT", str(created.id))
    return web.json_response(datasource_json(created))


async def list_datasources(request: web.Request) -> web.Response:
    _, scope = authenticate(request, READ)
    size, cursor = _page_params(request)
    filters = {k: request.query[k] for k in ("name", "type", "uid", "accessPolicyId") if k in request.query}
    if "type" in filters:
        valid_type(filters["type"])
    if "accessPolicyId" in filters:
        v.uuid_str(filters["accessPolicyId"], "accessPolicyId")
    try:
        page = await store.list_datasources(get_state(request).store, scope, filters, size, cursor)
    except BadCursor as exc:
        raise bad_request(str(exc), "pageCursor") from None
    return _paged(request, [datasource_json(d) for d in page.items], size, page.next_cursor)


async def get_datasource(request: web.Request) -> web.Response:
    _, scope = authenticate(request, READ)
    try:
        ds = await store.get_datasource(get_state(request).store, scope, request.match_info["uid"])
    except NotFound as exc:
        raise _not_found(exc) from None
    return web.json_response(datasource_json(ds))


async def update_datasource(request: web.Request) -> web.Response:
    """Fields present change (``uid`` cannot); moving a data source that has rules to another policy or
    type is refused: its rules were validated for the old one, so clear them first."""
    ident, scope = authenticate(request, WRITE)
    st = get_state(request)
    uid = request.match_info["uid"]
    body = v.obj(await read_json(request), ("uid", "name", "type", "accessPolicyId"))
    if "uid" in body and body["uid"] != uid:
        raise bad_request("uid cannot change; create a new data source instead", "uid")
    changes: dict[str, Any] = {}
    if "name" in body:
        changes["name"] = valid_name(body["name"])
    if "type" in body:
        changes["type"] = valid_type(body["type"])
    if "accessPolicyId" in body:
        changes["access_policy_id"] = v.uuid_str(body["accessPolicyId"], "accessPolicyId")

    def check(before: DataSource, after: DataSource, policy: AccessPolicy | None) -> None:
        moved = [f for f, a, b in (("accessPolicyId", before.access_policy_id, after.access_policy_id),
                                   ("type", before.type, after.type)) if a != b]
        if moved and before.lbac_rules:
            raise bad_request(f"{moved[0]} cannot change while the data source has LBAC rules; clear them first "
                              "with PUT .../lbac/teams {\"rules\": []}", moved[0])
        if moved:
            check_policy(policy, after)

    try:
        updated = await store.update_datasource(st.store, scope, uid, changes, _actor(ident), datasource_json,
                                                check)
    except NotFound as exc:
        raise _not_found(exc) from None
    except FieldConflict as exc:
        raise _conflict(exc) from None
    await st.cache.apply_change("datasources", "UPDATE", str(updated.id))
    return web.json_response(datasource_json(updated))


async def delete_datasource(request: web.Request) -> web.Response:
    ident, scope = authenticate(request, WRITE)
    st = get_state(request)

    def check(before: DataSource) -> None:
        check_delete(before, ident.policy.scopes)

    try:
        gone = await store.delete_datasource(st.store, scope, request.match_info["uid"], _actor(ident),
                                             datasource_json, check)
    except NotFound as exc:
        raise _not_found(exc) from None
    await st.cache.apply_change("datasources", "DELETE", str(gone.id))
    return web.Response(status=204)


# ---- LBAC rules -----------------------------------------------------------------------------------

TeamRef = tuple[int | None, str | None, str]  # (teamId, teamUid, field prefix)
Entry = tuple[TeamRef, list[tuple[Any, str]]]  # (team reference, [(raw rule, field)])


def _team_ref(entry: dict[str, Any], prefix: str) -> TeamRef:
    team_id: int | None = None
    team_uid: str | None = None
    if entry.get("teamId") not in (None, ""):  # Grafana's client may send an empty teamId beside teamUid
        raw = entry["teamId"]
        if isinstance(raw, str) and (raw.isascii() and raw.isdigit()) and len(raw) <= 18:
            raw = int(raw)
        if not isinstance(raw, int) or isinstance(raw, bool) or raw < 1:
            raise bad_request("teamId must be the numeric id of a team", f"{prefix}teamId")
        team_id = raw
    if entry.get("teamUid") not in (None, ""):
        team_uid = valid_uid(entry["teamUid"], f"{prefix}teamUid")
    if team_id is None and team_uid is None:
        raise bad_request("teamId (or teamUid) is required", f"{prefix}teamId")
    return team_id, team_uid, prefix


def _entry(entry: Any, prefix: str) -> Entry:
    if not isinstance(entry, dict):
        raise bad_request("must be an object {teamId, rules}", prefix.rstrip(".") or None)
    for key in entry:
        if key not in ("teamId", "teamUid", "rules"):
            raise bad_request(f"unknown field {key!r} (allowed: teamId, teamUid, rules)", f"{prefix}{key}")
    ref = _team_ref(entry, prefix)
    rules = entry.get("rules")
    if rules is None:
        rules = []
    if not isinstance(rules, list) or len(rules) > MAX_RULES_PER_TEAM:
        raise bad_request(f"rules must be a list of at most {MAX_RULES_PER_TEAM} rules", f"{prefix}rules")
    return ref, [(r, f"{prefix}rules[{j}]") for j, r in enumerate(rules)]


def parse_rules_body(body: Any) -> list[Entry]:
    """The three shapes: one team ``{"teamId", "rules": [{header, value}]}``; all teams
    ``{"rules": [{"teamId", "rules": [...]}]}``; Grafana's newer ``{"rules": [{"teamUid", "rules": ["{...}"]}]}``."""
    if not isinstance(body, dict):
        raise bad_request("request body must be a JSON object")
    if "teamId" in body or "teamUid" in body:
        return [_entry(body, "")]
    for key in body:
        if key != "rules":
            raise bad_request(f"unknown field {key!r} (allowed: rules, or teamId with rules)", key)
    rules = body.get("rules")
    if not isinstance(rules, list):
        raise bad_request("rules is required: a list of {teamId, rules} objects (an empty list removes all rules)",
                          "rules")
    if len(rules) > MAX_TEAMS_PER_SOURCE:
        raise bad_request(f"at most {MAX_TEAMS_PER_SOURCE} teams", "rules")
    return [_entry(e, f"rules[{i}].") for i, e in enumerate(rules)]


def realm_tenants(cfg: Config, policy: AccessPolicy, signal: str) -> list[str]:
    """The ``signal`` tenants of the stacks the policy's realms cover, in config order."""
    out: dict[str, None] = {}
    for r in policy.realms:
        if r.type == "stack":
            stacks: Sequence[Any] = [s for s in (cfg.stacks_by_id.get(r.identifier),) if s is not None]
        else:
            org = cfg.orgs_by_id.get(r.identifier)
            stacks = org.stacks if org else ()
        for s in stacks:
            if signal in s.tenants and s.org_id == policy.org_id:
                out.setdefault(s.tenants[signal], None)
    return list(out)


def valid_rule(raw: Any, field: str, tenants: list[str], signal: str, policy: AccessPolicy) -> TeamRule:
    """``{header, value: "<tenant>:<selector>"}``, ``"<tenant>:<selector>"``, or a bare ``"{...}"`` for the
    data source's single tenant (a bare selector must start with ``{``)."""
    if isinstance(raw, dict):
        for key in raw:
            if key not in ("header", "value"):
                raise bad_request(f"unknown field {key!r} (allowed: header, value)", f"{field}.{key}")
        header = raw.get("header")
        if not isinstance(header, str) or header.strip().lower() != HEADER.lower():
            raise bad_request(f"header must be {HEADER}", f"{field}.header")
        value, field = raw.get("value"), f"{field}.value"
        if not isinstance(value, str) or ":" not in value:
            raise bad_request("value must be <tenant>:<selector>, e.g. 18042:{env=\"dev\"}", field)
        text = value
    elif isinstance(raw, str) and raw.strip():
        text = raw  # kept as written: both answer shapes return it verbatim
        if raw.strip().startswith("{"):
            if len(tenants) != 1:
                have = ", ".join(tenants) or "none"
                raise bad_request(f"a bare selector needs the data source's single {signal} tenant, but access "
                                  f"policy {policy.name!r} covers {have}; write <tenant>:<selector>", field)
            text = f"{tenants[0]}:{raw}"
    else:
        raise bad_request(f"must be a rule {{\"header\": \"{HEADER}\", \"value\": \"<tenant>:<selector>\"}} "
                          "or a selector string", field)
    tenant, sep, selector = text.partition(":")
    if not sep or not tenant.strip() or not selector.strip():
        raise bad_request("must be <tenant>:<selector>, e.g. 18042:{env=\"dev\"}", field)
    if tenant.strip() not in tenants:
        raise bad_request(f"{tenant.strip()!r} is not a {signal} tenant of a stack in access policy "
                          f"{policy.name!r}'s realm (its tenants: {', '.join(tenants) or 'none'})", field)
    try:
        return parse_rule(text, signal)
    except SelectorError as exc:
        raise bad_request(f"selector {exc}", field) from None
    except ValueError as exc:  # pragma: no cover - the checks above cover parse_rule's own
        raise bad_request(str(exc), field) from None


def build_rules(cfg: Config, entries: list[Entry], ds: DataSource, policy: AccessPolicy, teams: Sequence[Team]
                ) -> Rules:
    """Resolve teams and validate every rule against the policy's realm; the data source's new rule set."""
    by_id = {t.id: t for t in teams}
    by_uid = {t.uid: t for t in teams}
    signal = ds.backend
    tenants = realm_tenants(cfg, policy, signal)
    out: dict[int, tuple[TeamRule, ...]] = {}
    for (team_id, team_uid, prefix), raws in entries:
        field = f"{prefix}teamId" if team_id is not None else f"{prefix}teamUid"
        team = by_id.get(team_id) if team_id is not None else by_uid.get(team_uid or "")
        if team is None:
            what = f"id {team_id}" if team_id is not None else f"uid {team_uid!r}"
            raise bad_request(f"no team with {what} in this org", field)
        if team_uid is not None and team.uid != team_uid:
            raise bad_request(f"team {team.id} has uid {team.uid!r}, not {team_uid!r}", f"{prefix}teamUid")
        if team.id in out:
            raise bad_request(f"team {team.id} is listed twice", field)
        rules: dict[tuple[str, Any], TeamRule] = {}
        for raw, rfield in raws:
            rule = valid_rule(raw, rfield, tenants, signal, policy)
            rules.setdefault((rule.tenant, rule.selector), rule)
        out[team.id] = tuple(rules.values())
    return tuple((tid, rs) for tid, rs in out.items() if rs)


def _rules_response(ds: DataSource, uids: dict[int, str], message: str | None = None) -> web.Response:
    """Both of Grafana's shapes at once: ``rules`` (current Grafana, Terraform) and ``lbacRules`` (the seed)."""
    body: dict[str, Any] = {"message": message} if message else {}
    body.update(id=ds.id, uid=ds.uid, name=ds.name, rules=grafana_rules_json(ds.lbac_rules, uids),
                lbacRules=lbac_rules_json(ds.lbac_rules))
    return web.json_response(body)


async def get_lbac_rules(request: web.Request) -> web.Response:
    _, scope = authenticate(request, READ)
    st = get_state(request)
    try:
        ds = await store.get_datasource(st.store, scope, request.match_info["uid"])
    except NotFound as exc:
        raise _not_found(exc) from None
    uids = await store.team_uids(st.store, ds.org_id, [tid for tid, _ in ds.lbac_rules]) if ds.lbac_rules else {}
    return _rules_response(ds, uids)


async def put_lbac_rules(request: web.Request) -> web.Response:
    """Replace the whole rule set (see the module docstring); 200 with the seed's response."""
    ident, scope = authenticate(request, WRITE, PERMISSIONS)
    st = get_state(request)
    entries = parse_rules_body(await read_json(request))
    cfg = st.config
    uids: dict[int, str] = {}

    def build(ds: DataSource, policy: AccessPolicy, teams: Sequence[Team]) -> Rules:
        uids.update((t.id, t.uid) for t in teams)
        return build_rules(cfg, entries, ds, policy, teams)

    try:
        updated = await store.set_lbac_rules(st.store, scope, request.match_info["uid"], _actor(ident), build)
    except NotFound as exc:
        raise _not_found(exc) from None
    await st.cache.apply_change("datasources", "UPDATE", str(updated.id))
    return _rules_response(updated, uids, RULES_UPDATED)


# ---- teams ----------------------------------------------------------------------------------------

def _team_writer(request: web.Request) -> tuple[str, AdminScope]:
    """Team writes change whom the rules of every data source hit: both scopes and the whole org."""
    ident, scope = authenticate(request, WRITE, PERMISSIONS)
    require_whole_org(scope)
    return _actor(ident), scope


def valid_email(value: Any) -> str:
    if value is None:
        return ""
    if not isinstance(value, str) or len(value) > MAX_LOGIN or any(ord(ch) < 32 for ch in value):
        raise bad_request(f"email must be a string of at most {MAX_LOGIN} printable characters", "email")
    return value


async def create_team(request: web.Request) -> web.Response:
    """Grafana's ``POST /api/teams`` (``{"name", "email"}``; also ``uid`` and the gateway's ``members``);
    answers Grafana's ``{"message": "Team created", "teamId", "uid"}`` and the team itself."""
    actor, scope = _team_writer(request)
    st = get_state(request)
    body = v.obj(await read_json(request), ("uid", "name", "email", "members"), ("name",))
    team = Team(id=0, uid=valid_uid(body["uid"]) if body.get("uid") not in (None, "") else new_uid(),
                org_id=scope.org_id, name=valid_name(body["name"]),
                members=valid_members(body["members"]) if body.get("members") is not None else (),
                email=valid_email(body.get("email")))
    try:
        created = await store.create_team(st.store, scope, team, actor, team_json)
    except FieldConflict as exc:
        raise _conflict(exc) from None
    await st.cache.apply_change("teams", "INSERT", str(created.id))
    return web.json_response({"message": "Team created", "teamId": created.id, **team_json(created)})


async def search_teams(request: web.Request) -> web.Response:
    """Grafana's ``GET /api/teams/search?query=&name=&page=&perpage=``: ``{totalCount, teams, page, perPage}``."""
    _, scope = authenticate(request, READ)
    page = _positive(request, "page", 1)
    per_page = min(_positive(request, "perpage", 1000), 1000)
    total, teams = await store.search_teams(get_state(request).store, scope, request.query.get("query") or None,
                                            request.query.get("name"), page, per_page)
    return web.json_response({"totalCount": total, "teams": [team_json(t) for t in teams], "page": page,
                              "perPage": per_page})


def _positive(request: web.Request, key: str, default: int) -> int:
    """Grafana reads these leniently: absent, empty or below 1 means the default."""
    raw = request.query.get(key, "")
    if not raw:
        return default
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 9:
        raise bad_request(f"{key} must be a positive integer", key)
    return int(raw) if int(raw) >= 1 else default


async def list_teams(request: web.Request) -> web.Response:
    _, scope = authenticate(request, READ)
    size, cursor = _page_params(request)
    filters = {k: request.query[k] for k in ("name", "uid") if k in request.query}
    try:
        page = await store.list_teams(get_state(request).store, scope, filters, size, cursor)
    except BadCursor as exc:
        raise bad_request(str(exc), "pageCursor") from None
    return _paged(request, [team_json(t) for t in page.items], size, page.next_cursor)


async def get_team(request: web.Request) -> web.Response:
    """``/api/teams/{id}``; ``/api/teams/uid/{uid}`` finds a team by uid."""
    _, scope = authenticate(request, READ)
    st = get_state(request)
    try:
        if "uid" in request.match_info:
            team = await store.get_team_by_uid(st.store, scope, request.match_info["uid"])
        else:
            team = await store.get_team(st.store, scope, _team_id(request))
    except NotFound as exc:
        raise _not_found(exc) from None
    return web.json_response(team_json(team))


async def update_team(request: web.Request) -> web.Response:
    actor, scope = _team_writer(request)
    st = get_state(request)
    team_id = _team_id(request)
    body = v.obj(await read_json(request), ("uid", "name", "email", "members"))
    changes: dict[str, Any] = {}
    if "name" in body:
        changes["name"] = valid_name(body["name"])
    if "email" in body:
        changes["email"] = valid_email(body["email"])
    if "members" in body:
        changes["members"] = valid_members(body["members"])
    try:
        if "uid" in body and body["uid"] != (await store.get_team(st.store, scope, team_id)).uid:
            raise bad_request("uid cannot change; create a new team instead", "uid")
        updated = await store.update_team(st.store, scope, team_id, changes, actor, team_json)
    except NotFound as exc:
        raise _not_found(exc) from None
    except FieldConflict as exc:
        raise _conflict(exc) from None
    await st.cache.apply_change("teams", "UPDATE", str(team_id))
    return web.json_response({"message": "Team updated", **team_json(updated)})


async def delete_team(request: web.Request) -> web.Response:
    """Deleting a team also removes its rules from every data source (audited per data source)."""
    actor, scope = _team_writer(request)
    st = get_state(request)
    team_id = _team_id(request)
    try:
        touched = await store.delete_team(st.store, scope, team_id, actor, team_json)
    except NotFound as exc:
        raise _not_found(exc) from None
    await st.cache.apply_change("teams", "DELETE", str(team_id))
    for ds in touched:
        await st.cache.apply_change("datasources", "UPDATE", str(ds.id))
    return web.json_response({"message": "Team deleted"})  # Grafana's 200


async def get_members(request: web.Request) -> web.Response:
    """Grafana's answer: a JSON array of ``TeamMemberDTO``, one per login."""
    _, scope = authenticate(request, READ)
    try:
        team = await store.get_team(get_state(request).store, scope, _team_id(request))
    except NotFound as exc:
        raise _not_found(exc) from None
    return web.json_response([member_json(team, login) for login in team.members])


async def put_members(request: web.Request) -> web.Response:
    """Replace the member list, as Grafana's ``PUT /api/teams/{id}/members`` (``{"members": [...],
    "admins": [...]}``, logins or emails; admins are members too here)."""
    actor, scope = _team_writer(request)
    st = get_state(request)
    team_id = _team_id(request)
    body = v.obj(await read_json(request), ("members", "admins"), ("members",))
    admins = body.get("admins")
    if admins is not None and not isinstance(admins, list):
        raise bad_request("admins must be a list of Grafana user logins", "admins")
    members = valid_members(body["members"] + (admins or []) if isinstance(body["members"], list)
                            else body["members"])
    try:
        updated = await store.update_team(st.store, scope, team_id, {"members": members}, actor, team_json,
                                          action="team.members.update")
    except NotFound as exc:
        raise _not_found(exc) from None
    await st.cache.apply_change("teams", "UPDATE", str(team_id))
    return web.json_response({"message": "Team memberships have been updated", "members": list(updated.members)})


async def remove_member(request: web.Request) -> web.Response:
    """Grafana's ``DELETE /api/teams/{id}/members/{userId}``, by login (the gateway knows no user ids)."""
    actor, scope = _team_writer(request)
    st = get_state(request)
    team_id = _team_id(request)
    login = fold_login(request.match_info["login"])
    try:
        team = await store.get_team(st.store, scope, team_id)
        kept = tuple(m for m in team.members if fold_login(m) != login)
        if len(kept) == len(team.members):
            raise ApiError(404, "not_found", "no such member of the team")
        await store.update_team(st.store, scope, team_id, {"members": kept}, actor, team_json,
                                action="team.members.update")
    except NotFound as exc:
        raise _not_found(exc) from None
    await st.cache.apply_change("teams", "UPDATE", str(team_id))
    return web.json_response({"message": "Team Member removed"})


def add_routes(app: web.Application) -> None:
    """Register the data-source, rules and team routes on ``app``."""
    r = app.router
    first = len(r.resources())
    r.add_post("/api/datasources", create_datasource)
    r.add_get("/api/datasources", list_datasources)
    r.add_get("/api/datasources/uid/{uid}", get_datasource)
    r.add_put("/api/datasources/uid/{uid}", update_datasource)
    r.add_delete("/api/datasources/uid/{uid}", delete_datasource)
    for path in ("/api/datasources/{uid}/lbac/teams", "/api/datasources/uid/{uid}/lbac/teams"):
        r.add_get(path, get_lbac_rules)
        r.add_put(path, put_lbac_rules)
    r.add_post("/api/teams", create_team)
    r.add_get("/api/teams", list_teams)
    r.add_get("/api/teams/search", search_teams)  # before /api/teams/{id}
    r.add_get("/api/teams/uid/{uid}", get_team)
    r.add_get("/api/teams/{id}", get_team)
    r.add_put("/api/teams/{id}", update_team)
    r.add_delete("/api/teams/{id}", delete_team)
    r.add_get("/api/teams/{id}/members", get_members)
    r.add_put("/api/teams/{id}/members", put_members)
    r.add_delete("/api/teams/{id}/members/{login}", remove_member)
    refuse_other_methods(app, first)

