"""PostgreSQL access for Grafana data sources, teams, members and team LBAC rules.

Same rules as the policy store: every mutation writes its audit row in its transaction, and the
triggers of ``002_datasources.sql`` announce it. A data source is visible to an admin exactly when
its access policy is (``_scope_sql``); teams are org-wide objects, confined to the admin's org.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any

import asyncpg

from gateway.policy.datasource import DataSource, Team, TeamRule, rules_from_json, rules_to_json
from gateway.policy.model import AccessPolicy
from gateway.store import AdminScope, Conflict, NotFound, Page, Store, _like, _scope_sql, policy_from_row

Rules = tuple[tuple[int, tuple[TeamRule, ...]], ...]
ToJson = Callable[[Any], Any]

_CONFLICT_FIELDS = {"datasources_uid_key": ("uid", "a data source with uid {uid!r} already exists"),
                    "datasources_name_key": ("name", "a data source named {name!r} already exists"),
                    "datasources_policy_key": ("accessPolicyId", "another {type} data source already uses access "
                                               "policy {policy}; its tokens must identify one data source"),
                    "teams_uid_key": ("uid", "a team with uid {uid!r} already exists"),
                    "teams_name_key": ("name", "a team named {name!r} already exists")}


class FieldConflict(Conflict):
    """A unique value is taken; ``field`` names the API field at fault."""

    def __init__(self, message: str, field: str):
        super().__init__(message)
        self.field = field


def _conflict(exc: asyncpg.UniqueViolationError, **values: Any) -> FieldConflict:
    field, template = _CONFLICT_FIELDS.get(exc.constraint_name or "", ("", "already exists"))
    return FieldConflict(template.format(**values), field)


def datasource_from_row(row: asyncpg.Record) -> DataSource:
    return DataSource(id=row["id"], uid=row["uid"], org_id=row["org_id"], name=row["name"], type=row["type"],
                      access_policy_id=str(row["access_policy_id"]), lbac_rules=rules_from_json(row["lbac_rules"]),
                      created_at=row["created_at"], updated_at=row["updated_at"])


def team_from_row(row: asyncpg.Record) -> Team:
    return Team(id=row["id"], uid=row["uid"], org_id=row["org_id"], name=row["name"],
                members=tuple(row["members"]), created_at=row["created_at"], updated_at=row["updated_at"],
                email=row.get("email") or "")


# ---- snapshot loading (the cache) -----------------------------------------------------------------

async def load_all(store: Store) -> tuple[list[DataSource], list[Team]]:
    """Every data source and team, from one consistent snapshot."""
    async with store.pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
        datasources = [datasource_from_row(r) for r in await conn.fetch("SELECT * FROM datasources")]
        teams = [team_from_row(r) for r in await conn.fetch("SELECT * FROM teams")]
    return datasources, teams


async def load_datasource(store: Store, ds_id: int) -> DataSource | None:
    row = await store.pool.fetchrow("SELECT * FROM datasources WHERE id = $1", ds_id)
    return datasource_from_row(row) if row else None


async def load_team(store: Store, team_id: int) -> Team | None:
    row = await store.pool.fetchrow("SELECT * FROM teams WHERE id = $1", team_id)
    return team_from_row(row) if row else None


# ---- data sources ---------------------------------------------------------------------------------

_DS_SELECT = "SELECT d.* FROM datasources d JOIN access_policies p ON p.id = d.access_policy_id"


async def _policy(conn: asyncpg.Connection, scope: AdminScope, policy_id: str) -> AccessPolicy | None:
    """The policy if it exists and the admin reaches it (locked against deletion meanwhile)."""
    args: list[Any] = [uuid.UUID(policy_id)]
    cond = _scope_sql(scope, args)
    row = await conn.fetchrow(f"SELECT p.* FROM access_policies p WHERE p.id = $1 AND {cond} FOR SHARE", *args)
    return policy_from_row(row) if row else None


async def _locked_datasource(conn: asyncpg.Connection, scope: AdminScope, uid: str) -> DataSource:
    args: list[Any] = [uid]
    cond = _scope_sql(scope, args)
    row = await conn.fetchrow(f"{_DS_SELECT} WHERE d.uid = $1 AND {cond} FOR UPDATE OF d", *args)
    if row is None:
        raise NotFound(f"no data source with uid {uid!r}")
    return datasource_from_row(row)


async def create_datasource(store: Store, scope: AdminScope, ds: DataSource, actor: str, as_json: ToJson,
                            check_policy: Callable[[AccessPolicy | None, DataSource], None]) -> DataSource:
    """Insert ``ds`` (its id is assigned); ``check_policy`` vets its access policy (None = not visible)."""
    async with store.pool.acquire() as conn, conn.transaction():
        check_policy(await _policy(conn, scope, ds.access_policy_id), ds)
        try:
            row = await conn.fetchrow(
                "INSERT INTO datasources (org_id, uid, name, type, access_policy_id) VALUES ($1,$2,$3,$4,$5)"
                " RETURNING *", scope.org_id, ds.uid, ds.name, ds.type, uuid.UUID(ds.access_policy_id))
        except asyncpg.UniqueViolationError as exc:
            raise _conflict(exc, uid=ds.uid, name=ds.name, type=ds.type, policy=ds.access_policy_id) from None
        created = datasource_from_row(row)
        await Store._audit(conn, scope.org_id, actor, "datasource.create", "datasource", created.uid, None,
                           as_json(created))
    return created


async def get_datasource(store: Store, scope: AdminScope, uid: str) -> DataSource:
    args: list[Any] = [uid]
    cond = _scope_sql(scope, args)
    row = await store.pool.fetchrow(f"{_DS_SELECT} WHERE d.uid = $1 AND {cond}", *args)
    if row is None:
        raise NotFound(f"no data source with uid {uid!r}")
    return datasource_from_row(row)


async def list_datasources(store: Store, scope: AdminScope, filters: Mapping[str, str], page_size: int,
                           cursor: str | None) -> Page:
    args: list[Any] = []
    conds = [_scope_sql(scope, args)]
    for key, col in (("name", "d.name"), ("type", "d.type"), ("uid", "d.uid")):
        if key in filters:
            args.append(filters[key])
            conds.append(f"{col} = ${len(args)}")
    if "accessPolicyId" in filters:
        args.append(uuid.UUID(filters["accessPolicyId"]))
        conds.append(f"d.access_policy_id = ${len(args)}")
    return await store._page(_DS_SELECT, conds, args, page_size, cursor, datasource_from_row, "d")


async def update_datasource(store: Store, scope: AdminScope, uid: str, changes: Mapping[str, Any], actor: str,
                            as_json: ToJson,
                            check: Callable[[DataSource, DataSource, AccessPolicy | None], None]) -> DataSource:
    """Apply ``changes`` (name, type, access_policy_id); ``check(before, after, after's policy)`` may veto."""
    async with store.pool.acquire() as conn, conn.transaction():
        before = await _locked_datasource(conn, scope, uid)
        after = replace(before, **changes)
        check(before, after, await _policy(conn, scope, after.access_policy_id))
        try:
            row = await conn.fetchrow(
                "UPDATE datasources SET name=$2, type=$3, access_policy_id=$4, updated_at=now() WHERE id=$1"
                " RETURNING *", before.id, after.name, after.type, uuid.UUID(after.access_policy_id))
        except asyncpg.UniqueViolationError as exc:
            raise _conflict(exc, uid=uid, name=after.name, type=after.type, policy=after.access_policy_id) from None
        updated = datasource_from_row(row)
        await Store._audit(conn, scope.org_id, actor, "datasource.update", "datasource", uid, as_json(before),
                           as_json(updated))
    return updated


async def delete_datasource(store: Store, scope: AdminScope, uid: str, actor: str, as_json: ToJson,
                            check: Callable[[DataSource], None]) -> DataSource:
    """Delete the data source (and with it its rules); ``check(before)`` may veto."""
    async with store.pool.acquire() as conn, conn.transaction():
        before = await _locked_datasource(conn, scope, uid)
        check(before)
        await conn.execute("DELETE FROM datasources WHERE id = $1", before.id)
        await Store._audit(conn, scope.org_id, actor, "datasource.delete", "datasource", uid, as_json(before), None)
    return before


def _rules_audit(ds: DataSource) -> dict[str, Any]:
    """What a rules change records: an object (like every other audit entry), rules as stored."""
    return {"uid": ds.uid, "name": ds.name, "lbacRules": rules_to_json(ds.lbac_rules)}


async def set_lbac_rules(store: Store, scope: AdminScope, uid: str, actor: str,
                         build: Callable[[DataSource, AccessPolicy, Sequence[Team]], Rules]) -> DataSource:
    """Replace the data source's whole rule set with ``build(data source, its policy, the org's teams)``."""
    async with store.pool.acquire() as conn, conn.transaction():
        # Lock order teams → data source, as in delete_team: no deadlock, and no rule for a team being deleted.
        teams = [team_from_row(r) for r in await conn.fetch(
            "SELECT * FROM teams WHERE org_id = $1 ORDER BY id FOR KEY SHARE", scope.org_id)]
        before = await _locked_datasource(conn, scope, uid)
        policy = await _policy(conn, scope, before.access_policy_id)
        if policy is None:  # pragma: no cover - the join above already proved it visible
            raise NotFound(f"no data source with uid {uid!r}")
        rules = build(before, policy, teams)
        row = await conn.fetchrow("UPDATE datasources SET lbac_rules=$2, updated_at=now() WHERE id=$1 RETURNING *",
                                  before.id, rules_to_json(rules))
        updated = datasource_from_row(row)
        await Store._audit(conn, scope.org_id, actor, "datasource.lbacrules.update", "datasource", uid,
                           _rules_audit(before), _rules_audit(updated))
    return updated


# ---- teams ----------------------------------------------------------------------------------------

async def create_team(store: Store, scope: AdminScope, team: Team, actor: str, as_json: ToJson) -> Team:
    async with store.pool.acquire() as conn, conn.transaction():
        try:
            row = await conn.fetchrow(
                "INSERT INTO teams (org_id, uid, name, members, email) VALUES ($1,$2,$3,$4,$5) RETURNING *",
                scope.org_id, team.uid, team.name, list(team.members), team.email)
        except asyncpg.UniqueViolationError as exc:
            raise _conflict(exc, uid=team.uid, name=team.name) from None
        created = team_from_row(row)
        await Store._audit(conn, scope.org_id, actor, "team.create", "team", str(created.id), None, as_json(created))
    return created


async def get_team(store: Store, scope: AdminScope, team_id: int) -> Team:
    row = await store.pool.fetchrow("SELECT * FROM teams WHERE id = $1 AND org_id = $2", team_id, scope.org_id)
    if row is None:
        raise NotFound(f"no team with id {team_id}")
    return team_from_row(row)


async def get_team_by_uid(store: Store, scope: AdminScope, uid: str) -> Team:
    row = await store.pool.fetchrow("SELECT * FROM teams WHERE uid = $1 AND org_id = $2", uid, scope.org_id)
    if row is None:
        raise NotFound(f"no team with uid {uid!r}")
    return team_from_row(row)


async def team_uids(store: Store, org_id: str, team_ids: Sequence[int]) -> dict[int, str]:
    """id → uid of the org's teams among ``team_ids`` (for the rules answer's ``teamUid``)."""
    rows = await store.pool.fetch("SELECT id, uid FROM teams WHERE org_id = $1 AND id = ANY($2::bigint[])",
                                  org_id, list(team_ids))
    return {r["id"]: r["uid"] for r in rows}


async def search_teams(store: Store, scope: AdminScope, query: str | None, name: str | None, page: int,
                       per_page: int) -> tuple[int, list[Team]]:
    """Grafana's team search: ``query`` is a case-insensitive substring of the name, ``name`` the exact
    name; pages count from 1, by name. Returns (total matches, this page)."""
    args: list[Any] = [scope.org_id]
    conds = ["org_id = $1"]
    if query:
        args.append(_like(query))
        conds.append(f"name ILIKE ${len(args)}")
    if name is not None:
        args.append(name)
        conds.append(f"name = ${len(args)}")
    where = " AND ".join(conds)
    total = await store.pool.fetchval(f"SELECT count(*) FROM teams WHERE {where}", *args)
    args += [per_page, (page - 1) * per_page]
    rows = await store.pool.fetch(
        f"SELECT * FROM teams WHERE {where} ORDER BY name, id LIMIT ${len(args) - 1} OFFSET ${len(args)}", *args)
    return int(total), [team_from_row(r) for r in rows]


async def list_teams(store: Store, scope: AdminScope, filters: Mapping[str, str], page_size: int,
                     cursor: str | None) -> Page:
    args: list[Any] = [scope.org_id]
    conds = ["t.org_id = $1"]
    for key in ("name", "uid"):
        if key in filters:
            args.append(filters[key])
            conds.append(f"t.{key} = ${len(args)}")
    return await store._page("SELECT t.* FROM teams t", conds, args, page_size, cursor, team_from_row, "t")


async def _locked_team(conn: asyncpg.Connection, scope: AdminScope, team_id: int) -> Team:
    row = await conn.fetchrow("SELECT * FROM teams WHERE id = $1 AND org_id = $2 FOR UPDATE", team_id, scope.org_id)
    if row is None:
        raise NotFound(f"no team with id {team_id}")
    return team_from_row(row)


async def update_team(store: Store, scope: AdminScope, team_id: int, changes: Mapping[str, Any], actor: str,
                      as_json: ToJson, action: str = "team.update") -> Team:
    """Apply ``changes`` (name, members); ``action`` names the audit entry."""
    async with store.pool.acquire() as conn, conn.transaction():
        before = await _locked_team(conn, scope, team_id)
        after = replace(before, **changes)
        try:
            row = await conn.fetchrow(
                "UPDATE teams SET name=$2, members=$3, email=$4, updated_at=now() WHERE id=$1 RETURNING *",
                team_id, after.name, list(after.members), after.email)
        except asyncpg.UniqueViolationError as exc:
            raise _conflict(exc, uid=after.uid, name=after.name) from None
        updated = team_from_row(row)
        await Store._audit(conn, scope.org_id, actor, action, "team", str(team_id), as_json(before),
                           as_json(updated))
    return updated


async def delete_team(store: Store, scope: AdminScope, team_id: int, actor: str, as_json: ToJson
                      ) -> list[DataSource]:
    """Delete the team and strip its rules from every data source (each strip audited); returns those."""
    touched: list[DataSource] = []
    async with store.pool.acquire() as conn, conn.transaction():
        # The team lock waits for rule PUTs holding it (KEY SHARE); the strip below then sees their rules.
        before = await _locked_team(conn, scope, team_id)
        await conn.execute("DELETE FROM teams WHERE id = $1", team_id)
        rows = await conn.fetch(
            "SELECT * FROM datasources WHERE org_id = $1 AND lbac_rules @> $2::jsonb ORDER BY id FOR UPDATE",
            scope.org_id, [{"teamId": team_id}])
        for row in rows:
            ds = datasource_from_row(row)
            kept = tuple(e for e in ds.lbac_rules if e[0] != team_id)
            row = await conn.fetchrow(
                "UPDATE datasources SET lbac_rules=$2, updated_at=now() WHERE id=$1 RETURNING *",
                ds.id, rules_to_json(kept))
            touched.append(datasource_from_row(row))
            await Store._audit(conn, scope.org_id, actor, "datasource.lbacrules.update", "datasource", ds.uid,
                               _rules_audit(ds), _rules_audit(touched[-1]))
        await Store._audit(conn, scope.org_id, actor, "team.delete", "team", str(team_id), as_json(before), None)
    return touched
