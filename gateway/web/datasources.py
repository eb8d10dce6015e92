"""The page's data sources, teams and team LBAC rules: the forms of the data-source API, in HTML.

Every value is checked by the API's own validators (imported from ``gateway.admin.datasources``) and
written through the same store functions, so the audit log names the signed-in token. Saving a data
source's rules replaces its whole rule set, exactly as ``PUT /api/datasources/{uid}/lbac/teams`` does.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

from aiohttp import web

from gateway.admin import datasources as api
from gateway.admin import validate as v
from gateway.admin.errors import ApiError
from gateway.policy.datasource import BACKEND_OF_TYPE, DataSource, Team, TeamRule, rules_to_json
from gateway.policy.model import AccessPolicy
from gateway.state import State
from gateway.store import AdminScope, BadCursor, NotFound
from gateway.store import datasources as store
from gateway.store.datasources import FieldConflict
from gateway.web import session as sess
from gateway.web.forms import lines
from gateway.web.pages import MAX_PAGE, PageError, _size, page, redirect, render
from gateway.web.session import Admin, state_of

DS_READ = api.READ
DS_WRITE = api.WRITE
PERMS = api.PERMISSIONS
_ALL_CAP = 5_000  # the most teams, policies or data sources a single page loads
_RULES_FIELD = re.compile(r"^rules\[(\d+)\]")
_MEMBER_FIELD = re.compile(r"^members\[(\d+)\]")
TYPE_LABELS = {"prometheus": "Prometheus", "loki": "Loki", "tempo": "Tempo"}


# ---- loading -------------------------------------------------------------------------------------------

async def _all(fetch: Any) -> list[Any]:
    """Every item of a paged store listing (up to ``_ALL_CAP``)."""
    out: list[Any] = []
    cursor: str | None = None
    while len(out) < _ALL_CAP:
        got = await fetch(MAX_PAGE, cursor)
        out += got.items
        cursor = got.next_cursor
        if not cursor:
            break
    return out


async def all_teams(st: State, scope: AdminScope) -> list[Team]:
    return await _all(lambda size, cur: store.list_teams(st.store, scope, {}, size, cur))


async def all_datasources(st: State, scope: AdminScope) -> list[DataSource]:
    return await _all(lambda size, cur: store.list_datasources(st.store, scope, {}, size, cur))


async def _datasource(request: web.Request, admin: Admin) -> DataSource:
    try:
        return await store.get_datasource(state_of(request).store, admin.scope, request.match_info["uid"])
    except NotFound:
        raise PageError(404, "Not found", "No such data source (or its access policy is outside your token's"
                        " realm).") from None


def _team_id(request: web.Request) -> int:
    raw = request.match_info["id"]
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 18:
        raise PageError(404, "Not found", "No such page: team ids are numbers.")
    return int(raw)


async def _team(request: web.Request, admin: Admin) -> Team:
    try:
        return await store.get_team(state_of(request).store, admin.scope, _team_id(request))
    except NotFound:
        raise PageError(404, "Not found", "No such team in your org.") from None


def _policy_of(st: State, ds: DataSource) -> AccessPolicy | None:
    return st.cache.policies.get(ds.access_policy_id)


def _flash(request: web.Request, message: str) -> Any:
    async def go() -> None:
        sess.flash(await sess.session(request), message)
    return go()


def _can_edit_rules(admin: Admin) -> bool:
    return not admin.missing(DS_WRITE, PERMS)


def _can_edit_teams(admin: Admin) -> bool:
    return _can_edit_rules(admin) and admin.scope.whole_org


# ---- data sources: list and create ------------------------------------------------------------------

@dataclass
class DataSourceForm:
    uid: str = ""
    name: str = ""
    type: str = "prometheus"
    policy: str = ""
    policy_q: str = ""  # the search that narrowed the access-policy list
    errors: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class PolicyChoice:
    id: str
    label: str
    types: tuple[str, ...]  # the types this policy may still serve


async def policy_choices(st: State, admin: Admin, used: Sequence[DataSource]) -> list[PolicyChoice]:
    """Policies a new data source may use: within reach, with the type's read scope, no label policies
    (``check_policy``, the API's own test), and not yet used by a data source of that type."""
    taken = {(d.access_policy_id, d.type) for d in used}
    policies: list[AccessPolicy] = await _all(lambda size, cur: st.store.list_policies(admin.scope, {}, size, cur))
    out = []
    for p in policies:
        types = []
        for t in BACKEND_OF_TYPE:
            if (p.id, t) in taken:
                continue
            try:
                api.check_policy(p, DataSource(id=0, uid="", org_id=p.org_id, name="", type=t, access_policy_id=p.id))
            except ApiError:
                continue
            types.append(t)
        if types:
            label = p.name + (f" ({p.display_name})" if p.display_name and p.display_name != p.name else "")
            out.append(PolicyChoice(p.id, f"{label}: {', '.join(TYPE_LABELS[t] for t in types)}", tuple(types)))
    return out


CHOICE_CAP = 100  # the most access policies the data-source form lists at once; a search narrows the rest


def narrow(choices: Sequence[PolicyChoice], q: str, chosen: str) -> list[PolicyChoice]:
    """The qualifying policies whose label contains ``q`` (any case), at most CHOICE_CAP, and always the one
    already chosen, so thousands of policies stay one short list."""
    needle = q.casefold()
    hits = [c for c in choices if needle in c.label.casefold()][:CHOICE_CAP]
    if chosen and all(c.id != chosen for c in hits):
        hits += [c for c in choices if c.id == chosen]
    return hits


async def _list_page(request: web.Request, admin: Admin, form: DataSourceForm, status: int = 200) -> web.Response:
    st = state_of(request)
    cursor = request.query.get("cursor") or None
    try:
        page_ = await store.list_datasources(st.store, admin.scope, {}, _size(request), cursor)
    except BadCursor:
        raise PageError(400, "Bad link", "The page cursor in this link is not one the page issued.") from None
    rows = []
    for d in page_.items:
        policy = _policy_of(st, d)
        rows.append({"ds": d, "policy": policy, "teams": len(d.lbac_rules),
                     "tenants": api.realm_tenants(st.config, policy, d.backend) if policy else []})
    can_write = admin.can(DS_WRITE)
    every = await policy_choices(st, admin, await all_datasources(st, admin.scope)) if can_write else []
    form.policy_q = form.policy_q or request.query.get("policy_q", "").strip()
    choices = narrow(every, form.policy_q, form.policy)
    next_url = f"/ui/datasources?{urlencode({'cursor': page_.next_cursor})}" if page_.next_cursor else None
    return await render(request, "datasources.html", {
        "nav": "datasources", "rows": rows, "f": form, "choices": choices, "types": TYPE_LABELS,
        "qualifying": len(every), "cap": CHOICE_CAP,
        "can_write": can_write, "next_url": next_url, "first_url": "/ui/datasources" if cursor else None,
        "missing_write": admin.missing(DS_WRITE)}, status)


@page(DS_READ)
async def datasources(request: web.Request, admin: Admin) -> web.StreamResponse:
    return await _list_page(request, admin, DataSourceForm())


def _field_of(exc: ApiError) -> str:
    return exc.field if exc.field in ("uid", "name", "type", "accessPolicyId") else "form"


@page(DS_READ, DS_WRITE)
async def create_datasource(request: web.Request, admin: Admin) -> web.StreamResponse:
    st = state_of(request)
    post = await request.post()
    f = DataSourceForm(uid=str(post.get("uid", "")).strip(), name=str(post.get("name", "")).strip(),
                       type=str(post.get("type", "")), policy=str(post.get("accessPolicyId", "")),
                       policy_q=str(post.get("policy_q", "")).strip())
    checks: list[tuple[str, Any]] = [
        ("uid", lambda: api.valid_uid(f.uid) if f.uid else api.new_uid()),
        ("name", lambda: api.valid_name(f.name)),
        ("type", lambda: api.valid_type(f.type)),
        ("accessPolicyId", lambda: v.uuid_str(f.policy, "accessPolicyId") if f.policy else
         _raise(ApiError(400, "invalid_argument", "Choose the access policy whose token Grafana uses.",
                         "accessPolicyId")))]
    values: dict[str, Any] = {}
    for key, check in checks:
        try:
            values[key] = check()
        except ApiError as exc:
            f.errors[key] = exc.message
    if f.errors:
        return await _list_page(request, admin, f, 400)
    ds = DataSource(id=0, uid=values["uid"], org_id=admin.scope.org_id, name=values["name"], type=values["type"],
                    access_policy_id=values["accessPolicyId"])
    try:
        created = await store.create_datasource(st.store, admin.scope, ds, admin.token.id, api.datasource_json,
                                                api.check_policy)
    except ApiError as exc:
        f.errors[_field_of(exc)] = exc.message
        return await _list_page(request, admin, f, exc.status)
    except FieldConflict as exc:
        f.errors[exc.field if exc.field in ("uid", "name", "accessPolicyId") else "form"] = str(exc)
        return await _list_page(request, admin, f, 409)
    await st.cache.apply_change("datasources", "INSERT", str(created.id))
    await _flash(request, f"Created data source {created.name} ({created.uid}). Set its team rules below.")
    return redirect(f"/ui/datasources/{created.uid}")


def _raise(exc: Exception) -> Any:
    raise exc


# ---- one data source: its team rules --------------------------------------------------------------

def rules_version(rules: Any) -> str:
    """A short digest of a rule set: the form carries it, and saving refuses when the rules changed meanwhile."""
    return hashlib.sha256(json.dumps(rules_to_json(rules), sort_keys=True).encode()).hexdigest()[:20]


class RulesChanged(Exception):
    """The data source's rules are not the ones the form was opened with."""

    def __init__(self, current: DataSource):
        super().__init__("rules changed")
        self.current = current


@dataclass
class RulesForm:
    texts: dict[int, str] = field(default_factory=dict)  # team id -> its rules, one per line
    errors: dict[str, list[str]] = field(default_factory=dict)  # "team:<id>" or "form" -> messages
    version: str = ""

    def error(self, key: str, message: str) -> None:
        self.errors.setdefault(key, []).append(message)

    @classmethod
    def from_datasource(cls, ds: DataSource) -> RulesForm:
        return cls(texts={tid: "\n".join(r.text for r in rs) for tid, rs in ds.lbac_rules},
                   version=rules_version(ds.lbac_rules))


def _ordered_teams(ds: DataSource, teams: Sequence[Team]) -> list[Team]:
    """Teams with rules first, in the rule set's order; then the others by name."""
    by_id = {t.id: t for t in teams}
    first = [by_id[tid] for tid, _ in ds.lbac_rules if tid in by_id]
    ruled = {t.id for t in first}
    return first + sorted((t for t in teams if t.id not in ruled), key=lambda t: t.name.casefold())


async def _ds_page(request: web.Request, admin: Admin, ds: DataSource, f: RulesForm | None = None,
                   status: int = 200, saved: DataSource | None = None) -> web.Response:
    st = state_of(request)
    policy = _policy_of(st, ds)
    teams = _ordered_teams(ds, await all_teams(st, admin.scope))
    saved_rules: dict[int, tuple[TeamRule, ...]] = dict((saved or ds).lbac_rules)
    return await render(request, "datasource.html", {
        "nav": "datasources", "ds": ds, "policy": policy, "teams": teams, "f": f or RulesForm.from_datasource(ds),
        "tenants": api.realm_tenants(st.config, policy, ds.backend) if policy else [],
        "type_label": TYPE_LABELS.get(ds.type, ds.type), "saved": saved_rules, "conflict": saved is not None,
        "can_edit": _can_edit_rules(admin), "missing_edit": admin.missing(DS_WRITE, PERMS),
        "can_delete": admin.can(DS_WRITE), "max_rules": api.MAX_RULES_PER_TEAM}, status)


@page(DS_READ)
async def datasource_page(request: web.Request, admin: Admin) -> web.StreamResponse:
    return await _ds_page(request, admin, await _datasource(request, admin))


def _team_key(exc: ApiError, order: Sequence[int]) -> str:
    m = _RULES_FIELD.match(exc.field or "")
    return f"team:{order[int(m.group(1))]}" if m and int(m.group(1)) < len(order) else "form"


@page(DS_READ, DS_WRITE, PERMS)
async def save_rules(request: web.Request, admin: Admin) -> web.StreamResponse:
    """Replace the data source's whole rule set with the form's, as the API's PUT does."""
    st = state_of(request)
    ds = await _datasource(request, admin)
    post = await request.post()
    f = RulesForm(version=str(post.get("version", "")))
    for key in post:
        if key.startswith("rules:") and key[6:].isascii() and key[6:].isdigit() and isinstance(post.get(key), str):
            f.texts[int(key[6:])] = str(post.get(key))
    policy = _policy_of(st, ds)
    if policy is None:  # pragma: no cover - the data source is visible only with its policy
        raise PageError(404, "Not found", "The data source's access policy is gone.")
    teams = {t.id: t for t in await all_teams(st, admin.scope)}
    tenants = api.realm_tenants(st.config, policy, ds.backend)
    order: list[int] = []
    body: list[dict[str, Any]] = []
    for tid, text in f.texts.items():
        rules = lines(text)
        if not rules:
            continue
        if tid not in teams:
            f.error("form", f"Team {tid} was deleted meanwhile; its rules were not saved.")
            continue
        for i, raw in enumerate(rules, 1):  # every line on its own, so every message shows at once
            try:
                api.valid_rule(raw, f"line {i}", tenants, ds.backend, policy)
            except ApiError as exc:
                f.error(f"team:{tid}", f"line {i}: {exc.message}")
        order.append(tid)
        body.append({"teamId": tid, "rules": rules})
    if f.errors:
        return await _ds_page(request, admin, ds, f, 400)
    try:
        entries = api.parse_rules_body({"rules": body})  # the API's own parsing (and its limits)

        def build(before: DataSource, pol: AccessPolicy, org_teams: Sequence[Team]) -> store.Rules:
            if rules_version(before.lbac_rules) != f.version:
                raise RulesChanged(before)
            return api.build_rules(st.config, entries, before, pol, org_teams)

        updated = await store.set_lbac_rules(st.store, admin.scope, ds.uid, admin.token.id, build)
    except ApiError as exc:
        f.error(_team_key(exc, order), exc.message)
        return await _ds_page(request, admin, ds, f, 400)
    except RulesChanged as exc:
        f.version = rules_version(exc.current.lbac_rules)
        f.error("form", "Someone changed this data source's rules after you opened the page, so nothing was saved."
                " What is saved now is shown under each team; your text is kept in the boxes. Save again to"
                " replace the saved rules with the boxes' content.")
        return await _ds_page(request, admin, exc.current, f, 409, saved=exc.current)
    except NotFound:
        raise PageError(404, "Not found", "The data source was deleted meanwhile.") from None
    await st.cache.apply_change("datasources", "UPDATE", str(updated.id))
    n = len(updated.lbac_rules)
    await _flash(request, f"Saved the team rules of {updated.name}: {n} team{'' if n == 1 else 's'} with rules"
                 f"{'' if n else '; every user keeps the token’s full access'}.")
    return redirect(f"/ui/datasources/{updated.uid}")


# ---- delete a data source -----------------------------------------------------------------------------

@page(DS_READ, DS_WRITE)
async def delete_datasource_form(request: web.Request, admin: Admin) -> web.StreamResponse:
    ds = await _datasource(request, admin)
    api.check_delete(ds, admin.policy.scopes)
    n = len(ds.lbac_rules)
    return await render(request, "confirm.html", {
        "nav": "datasources", "title": f"Delete data source {ds.name}?",
        "lines": [f"Its rules for {n} team{'' if n == 1 else 's'} go with it: from the next query on, "
                  f"{'its' if n == 1 else 'their'} members get the full access of the data source's token." if n else
                  "It has no team rules, so nobody's access changes.",
                  "Grafana keeps the data source; only the gateway forgets it. This cannot be undone."],
        "action": f"/ui/datasources/{ds.uid}/delete", "button": "Delete data source",
        "cancel": f"/ui/datasources/{ds.uid}"})


@page(DS_READ, DS_WRITE)
async def delete_datasource(request: web.Request, admin: Admin) -> web.StreamResponse:
    st = state_of(request)
    ds = await _datasource(request, admin)
    try:
        gone = await store.delete_datasource(st.store, admin.scope, ds.uid, admin.token.id, api.datasource_json,
                                             lambda before: api.check_delete(before, admin.policy.scopes))
    except NotFound:
        raise PageError(404, "Not found", "The data source was already deleted.") from None
    await st.cache.apply_change("datasources", "DELETE", str(gone.id))
    await _flash(request, f"Deleted data source {gone.name} ({gone.uid}).")
    return redirect("/ui/datasources")


# ---- teams ----------------------------------------------------------------------------------------

@dataclass
class TeamForm:
    name: str = ""
    uid: str = ""
    members: str = ""
    errors: dict[str, list[str]] = field(default_factory=dict)

    def error(self, key: str, message: str) -> None:
        self.errors.setdefault(key, []).append(message)


def check_members(f: TeamForm) -> tuple[str, ...] | None:
    """One login per line, each checked on its own (all messages at once), then the list as the API does."""
    logins = lines(f.members)
    for i, login in enumerate(logins, 1):
        try:
            api.valid_members([login])
        except ApiError as exc:
            f.error("members", f"line {i}: {exc.message}")
    if "members" in f.errors:
        return None
    try:
        return api.valid_members(logins)
    except ApiError as exc:
        m = _MEMBER_FIELD.match(exc.field or "")
        f.error("members", f"line {int(m.group(1)) + 1}: {exc.message}" if m else exc.message)
        return None


def _rules_by_team(dss: Sequence[DataSource]) -> dict[int, list[DataSource]]:
    out: dict[int, list[DataSource]] = {}
    for d in dss:
        for tid, rules in d.lbac_rules:
            if rules:
                out.setdefault(tid, []).append(d)
    return out


async def _teams_page(request: web.Request, admin: Admin, f: TeamForm, status: int = 200) -> web.Response:
    st = state_of(request)
    cursor = request.query.get("cursor") or None
    try:
        page_ = await store.list_teams(st.store, admin.scope, {}, _size(request), cursor)
    except BadCursor:
        raise PageError(400, "Bad link", "The page cursor in this link is not one the page issued.") from None
    used = _rules_by_team(await all_datasources(st, admin.scope))
    next_url = f"/ui/teams?{urlencode({'cursor': page_.next_cursor})}" if page_.next_cursor else None
    return await render(request, "teams.html", {
        "nav": "teams", "teams": page_.items, "used": used, "f": f, "can_edit": _can_edit_teams(admin),
        "why_not": _why_not_teams(admin), "next_url": next_url, "first_url": "/ui/teams" if cursor else None}, status)


def _why_not_teams(admin: Admin) -> str:
    missing = admin.missing(DS_WRITE, PERMS)
    if missing:
        return f"Changing teams needs the {' and '.join(missing)} scope{'' if len(missing) == 1 else 's'}."
    if not admin.scope.whole_org:
        return "Teams span the org: changing them needs a token whose access policy's realm is the whole org."
    return ""


@page(DS_READ)
async def teams(request: web.Request, admin: Admin) -> web.StreamResponse:
    return await _teams_page(request, admin, TeamForm())


def _team_writer(admin: Admin) -> None:
    try:
        api.require_whole_org(admin.scope)
    except ApiError as exc:
        raise PageError(403, "Whole-org realm needed", _why_not_teams(admin) or exc.message) from None


@page(DS_READ, DS_WRITE, PERMS)
async def create_team(request: web.Request, admin: Admin) -> web.StreamResponse:
    _team_writer(admin)
    st = state_of(request)
    post = await request.post()
    f = TeamForm(name=str(post.get("name", "")).strip(), uid=str(post.get("uid", "")).strip(),
                 members=str(post.get("members", "")))
    name = uid = None
    try:
        name = api.valid_name(f.name)
    except ApiError as exc:
        f.error("name", exc.message)
    try:
        uid = api.valid_uid(f.uid) if f.uid else api.new_uid()
    except ApiError as exc:
        f.error("uid", exc.message)
    members = check_members(f)
    if f.errors or name is None or uid is None or members is None:
        return await _teams_page(request, admin, f, 400)
    try:
        created = await store.create_team(st.store, admin.scope, Team(id=0, uid=uid, org_id=admin.scope.org_id,
                                                                      name=name, members=members),
                                          admin.token.id, api.team_json)
    except FieldConflict as exc:
        f.error(exc.field if exc.field in ("name", "uid") else "name", str(exc))
        return await _teams_page(request, admin, f, 409)
    await st.cache.apply_change("teams", "INSERT", str(created.id))
    n = len(created.members)
    await _flash(request, f"Created team {created.name} with {n} member{'' if n == 1 else 's'}.")
    return redirect(f"/ui/teams/{created.id}")


async def _team_page(request: web.Request, admin: Admin, team: Team, name_form: TeamForm | None = None,
                     members_form: TeamForm | None = None, status: int = 200) -> web.Response:
    st = state_of(request)
    used = _rules_by_team(await all_datasources(st, admin.scope)).get(team.id, [])
    rules = [(d, dict(d.lbac_rules).get(team.id, ())) for d in used]
    return await render(request, "team.html", {
        "nav": "teams", "team": team, "rules": rules, "can_edit": _can_edit_teams(admin),
        "why_not": _why_not_teams(admin),
        "nf": name_form or TeamForm(name=team.name),
        "mf": members_form or TeamForm(members="\n".join(team.members))}, status)


@page(DS_READ)
async def team_page(request: web.Request, admin: Admin) -> web.StreamResponse:
    return await _team_page(request, admin, await _team(request, admin))


@page(DS_READ, DS_WRITE, PERMS)
async def rename_team(request: web.Request, admin: Admin) -> web.StreamResponse:
    _team_writer(admin)
    st = state_of(request)
    team = await _team(request, admin)
    f = TeamForm(name=str((await request.post()).get("name", "")).strip())
    try:
        name = api.valid_name(f.name)
        updated = await store.update_team(st.store, admin.scope, team.id, {"name": name}, admin.token.id,
                                          api.team_json)
    except ApiError as exc:
        f.error("name", exc.message)
        return await _team_page(request, admin, team, name_form=f, status=400)
    except FieldConflict as exc:
        f.error("name", str(exc))
        return await _team_page(request, admin, team, name_form=f, status=409)
    except NotFound:
        raise PageError(404, "Not found", "The team was deleted meanwhile.") from None
    await st.cache.apply_change("teams", "UPDATE", str(team.id))
    await _flash(request, f"Renamed team {team.name} to {updated.name}.")
    return redirect(f"/ui/teams/{team.id}")


@page(DS_READ, DS_WRITE, PERMS)
async def set_members(request: web.Request, admin: Admin) -> web.StreamResponse:
    _team_writer(admin)
    st = state_of(request)
    team = await _team(request, admin)
    f = TeamForm(members=str((await request.post()).get("members", "")))
    members = check_members(f)
    if members is None:
        return await _team_page(request, admin, team, members_form=f, status=400)
    try:
        updated = await store.update_team(st.store, admin.scope, team.id, {"members": members}, admin.token.id,
                                          api.team_json, action="team.members.update")
    except NotFound:
        raise PageError(404, "Not found", "The team was deleted meanwhile.") from None
    await st.cache.apply_change("teams", "UPDATE", str(team.id))
    n = len(updated.members)
    await _flash(request, f"Saved the members of {updated.name}: {n} member{'' if n == 1 else 's'}.")
    return redirect(f"/ui/teams/{team.id}")


@page(DS_READ, DS_WRITE, PERMS)
async def delete_team_form(request: web.Request, admin: Admin) -> web.StreamResponse:
    _team_writer(admin)
    team = await _team(request, admin)
    used = _rules_by_team(await all_datasources(state_of(request), admin.scope)).get(team.id, [])
    names = ", ".join(d.name for d in used)
    return await render(request, "confirm.html", {
        "nav": "teams", "title": f"Delete team {team.name}?",
        "lines": [f"Its rules on {len(used)} data source{'' if len(used) == 1 else 's'} ({names}) are removed with it:"
                  " its members lose that restriction from the next query on (unless another team of theirs has"
                  " rules there)." if used else "No data source has rules for it, so nobody's access changes.",
                  "This cannot be undone."],
        "action": f"/ui/teams/{team.id}/delete", "button": "Delete team", "cancel": f"/ui/teams/{team.id}"})


@page(DS_READ, DS_WRITE, PERMS)
async def delete_team(request: web.Request, admin: Admin) -> web.StreamResponse:
    _team_writer(admin)
    st = state_of(request)
    team = await _team(request, admin)
    try:
        touched = await store.delete_team(st.store, admin.scope, team.id, admin.token.id, api.team_json)
    except NotFound:
        raise PageError(404, "Not found", "The team was already deleted.") from None
    await st.cache.apply_change("teams", "DELETE", str(team.id))
    for d in touched:
        await st.cache.apply_change("datasources", "UPDATE", str(d.id))
    await _flash(request, f"Deleted team {team.name}" + (f"; its rules were removed from {len(touched)} data source"
                                                        f"{'' if len(touched) == 1 else 's'}." if touched else "."))
    return redirect("/ui/teams")


def add_routes(ui: web.Application) -> None:
    """Register before the page's catch-all route."""
    r = ui.router
    r.add_get("/datasources", datasources)
    r.add_post("/datasources", create_datasource)
    r.add_get("/datasources/{uid}", datasource_page)
    r.add_post("/datasources/{uid}/rules", save_rules)
    r.add_get("/datasources/{uid}/delete", delete_datasource_form)
    r.add_post("/datasources/{uid}/delete", delete_datasource)
    r.add_get("/teams", teams)
    r.add_post("/teams", create_team)
    r.add_get("/teams/{id}", team_page)
    r.add_post("/teams/{id}/name", rename_team)
    r.add_post("/teams/{id}/members", set_members)
    r.add_get("/teams/{id}/delete", delete_team_form)
    r.add_post("/teams/{id}/delete", delete_team)
