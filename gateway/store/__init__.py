"""PostgreSQL access: policies, tokens and the audit log. Every mutation writes its audit row
in the same transaction, and triggers announce it on the ``gateway_changes`` channel."""

from __future__ import annotations

import base64
import binascii
import ipaddress
import json
import logging
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from gateway.config import DatabaseConfig
from gateway.policy.model import AccessPolicy, Realm, Token
from gateway.policy.trace_selector import parse_label_policy
from gateway.store import migrate

log = logging.getLogger("gateway.store")
CHANNEL = "gateway_changes"


class NotFound(Exception):
    """No such row (or not visible to the caller)."""


class Conflict(Exception):
    """A unique name is taken."""


class BadCursor(ValueError):
    """The page cursor is not one we issued."""


@dataclass(frozen=True, slots=True)
class Page:
    items: list[Any]
    next_cursor: str | None


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Rows by id (as text) with their versions, all read in one transaction."""

    policies: dict[str, tuple[AccessPolicy, int]]
    tokens: dict[str, tuple[Token, int]]
    datasources: dict[str, tuple[Any, int]]
    teams: dict[str, tuple[Any, int]]


@dataclass(frozen=True, slots=True)
class AdminScope:
    """What an admin token may see: its org, and either the whole org or some stacks of it."""

    org_id: str
    whole_org: bool
    stacks: frozenset[str]


async def _init_conn(conn: asyncpg.Connection) -> None:
    await conn.set_type_codec("jsonb", encoder=json.dumps, decoder=json.loads, schema="pg_catalog")


def encode_cursor(created_at: datetime, row_id: Any) -> str:
    return base64.urlsafe_b64encode(f"{created_at.isoformat()}|{row_id}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, Any]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        at, _, rid = raw.partition("|")
        parsed_at = datetime.fromisoformat(at)
        if rid.isascii() and rid.isdigit():
            if len(rid) > 18:  # beyond bigint: never one of ours
                raise ValueError(rid)
            return parsed_at, int(rid)
        return parsed_at, uuid.UUID(rid)
    except (binascii.Error, ValueError, UnicodeDecodeError):
        raise BadCursor("pageCursor is not a cursor this API issued") from None


def policy_from_row(row: asyncpg.Record) -> AccessPolicy:
    """Selectors and subnets are stored as written (migration 005) and parsed here for enforcement."""
    realms = tuple(
        Realm(r["type"], str(r["identifier"]),
              tuple(parse_label_policy(lp["selector"]) for lp in r.get("labelPolicies") or ()), r.get("written"))
        for r in row["realms"]
    )
    texts = tuple(row["allowed_subnets"])
    attributes = row.get("attributes")
    return AccessPolicy(
        id=str(row["id"]), org_id=row["org_id"], name=row["name"], display_name=row["display_name"],
        scopes=frozenset(row["scopes"]), realms=realms,
        allowed_subnets=tuple(ipaddress.ip_network(t.strip(), strict=False) for t in texts),
        status=row["status"], created_at=row["created_at"], updated_at=row["updated_at"],
        subnet_texts=texts,
        attributes_json=None if attributes is None else json.dumps(attributes, sort_keys=True),
    )


def _attributes(policy: AccessPolicy) -> Any:
    return None if policy.attributes_json is None else json.loads(policy.attributes_json)


def token_from_row(row: asyncpg.Record) -> Token:
    return Token(
        id=str(row["id"]), access_policy_id=str(row["access_policy_id"]), name=row["name"],
        display_name=row["display_name"], secret_hash=bytes(row["secret_sha256"]),
        expires_at=row["expires_at"], created_at=row["created_at"], updated_at=row["updated_at"],
        first_used_at=row["first_used_at"], last_used_at=row["last_used_at"], org_id=row["org_id"],
    )


def realms_to_json(realms: Sequence[Realm]) -> list[dict[str, Any]]:
    """The stored form; an org realm given by slug also keeps the slug (``written``)."""
    return [{"type": r.type, "identifier": r.identifier,
             "labelPolicies": [{"selector": s.text} for s in r.label_policies],
             **({"written": r.written} if r.written is not None else {})} for r in realms]


def _like(text: str) -> str:
    """A LIKE pattern matching ``text`` anywhere, its own % and _ taken literally."""
    return "%" + text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


def _scope_sql(scope: AdminScope, args: list[Any], realms_col: str = "p.realms") -> str:
    """SQL condition: the policy's realms are all within the admin's reach."""
    args.append(scope.org_id)
    cond = f"p.org_id = ${len(args)}"
    if not scope.whole_org:
        args.append(list(scope.stacks))
        cond += (f" AND NOT EXISTS (SELECT 1 FROM jsonb_array_elements({realms_col}) r WHERE NOT"
                 f" (r->>'type' = 'stack' AND r->>'identifier' = ANY(${len(args)}::text[])))")
    return cond


_TOKEN_BATCH = 2000  # token rows per cursor fetch in load_snapshot


class Store:
    """The database. One pool; the cache holds its own LISTEN connection."""

    def __init__(self, pool: asyncpg.Pool, dsn: str, db: DatabaseConfig):
        self.pool = pool
        self.dsn = dsn
        self.db = db

    @classmethod
    async def open(cls, dsn: str, db: DatabaseConfig, run_migrations: bool = True) -> Store:
        pool = await asyncpg.create_pool(
            dsn, min_size=db.pool_min, max_size=db.pool_max, timeout=db.connect_timeout,
            command_timeout=db.command_timeout, init=_init_conn,
        )
        store = cls(pool, dsn, db)
        if run_migrations:
            async with pool.acquire() as conn:
                await migrate.apply(conn)
        return store

    async def close(self) -> None:
        await self.pool.close()

    async def connect_listener(self) -> asyncpg.Connection:
        conn: asyncpg.Connection = await asyncpg.connect(
            self.dsn, timeout=self.db.connect_timeout, command_timeout=self.db.command_timeout)
        await _init_conn(conn)
        return conn

    # ---- snapshot loading (the cache) -------------------------------------------------------------

    async def load_all(self) -> tuple[list[AccessPolicy], list[Token]]:
        """Everything the snapshot needs, in one consistent read.

        Tokens carry only what authorization and the page's labels use (id, policy, name, hash,
        expiry): at 100,000 tokens that halves load time and memory. The API reads the rest from
        the database.
        """
        async with self.pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
            policies = [policy_from_row(r) for r in await conn.fetch("SELECT * FROM access_policies")]
            rows = await conn.fetch("SELECT id::text, access_policy_id::text, name, secret_sha256, expires_at"
                                    " FROM tokens")
        interned = {p.id: p.id for p in policies}  # one string object per policy id, shared by its tokens
        tokens = [Token(r[0], interned.get(r[1], r[1]), r[2], "", r[3], r[4]) for r in rows]
        return policies, tokens

    async def load_policy(self, policy_id: str) -> AccessPolicy | None:
        row = await self.pool.fetchrow("SELECT * FROM access_policies WHERE id = $1", uuid.UUID(policy_id))
        return policy_from_row(row) if row else None

    async def load_token(self, token_id: str) -> Token | None:
        row = await self.pool.fetchrow("SELECT * FROM tokens WHERE id = $1", uuid.UUID(token_id))
        return token_from_row(row) if row else None

    # ---- versioned reads (the cache: issue 12) ----------------------------------------------------

    async def load_snapshot(self) -> Snapshot:
        """Every policy, token, data source and team with its version, in ONE repeatable-read
        transaction: the four tables are seen at the same instant, so no row of one can be older
        than a row of another that depends on it."""
        from gateway.store.datasources import datasource_from_row, team_from_row
        async with self.pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
            prows = await conn.fetch("SELECT * FROM access_policies")
            policies = {str(r["id"]): (policy_from_row(r), r["version"]) for r in prows}
            del prows
            interned = {pid: pid for pid in policies}  # one string object per policy id, shared by its tokens
            # Tokens by a cursor, a batch at a time: 100,000 rows fetched at once stayed resident after the
            # load as freed but fragmented memory (bench scale run: 29 MB per worker).
            tokens: dict[str, tuple[Token, int]] = {}
            async for r in conn.cursor("SELECT id::text, access_policy_id::text, name, secret_sha256, expires_at,"
                                       " version FROM tokens", prefetch=_TOKEN_BATCH):
                tokens[r[0]] = (Token(r[0], interned.get(r[1], r[1]), r[2], "", r[3], r[4]), r[5])
            drows = await conn.fetch("SELECT * FROM datasources")
            mrows = await conn.fetch("SELECT * FROM teams")
        return Snapshot(policies, tokens, {str(r["id"]): (datasource_from_row(r), r["version"]) for r in drows},
                        {str(r["id"]): (team_from_row(r), r["version"]) for r in mrows})

    async def load_versioned(self, table: str, row_id: str) -> tuple[Any, int] | None:
        """One row of a cached table and its version, or None when it does not exist (any more)."""
        from gateway.store.datasources import datasource_from_row, team_from_row
        convert: dict[str, tuple[Callable[[asyncpg.Record], Any], Callable[[str], Any]]] = {
            "access_policies": (policy_from_row, uuid.UUID), "tokens": (token_from_row, uuid.UUID),
            "datasources": (datasource_from_row, int), "teams": (team_from_row, int)}
        from_row, key = convert[table]
        row = await self.pool.fetchrow(f"SELECT * FROM {table} WHERE id = $1", key(row_id))  # noqa: S608 - fixed names
        return (from_row(row), row["version"]) if row else None

    async def lookup_token(self, token_id: str) -> tuple[Token, int, AccessPolicy, int] | None:
        """Read-through for a token the snapshot does not know: the token and its policy, read together."""
        async with self.pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
            trow = await conn.fetchrow("SELECT * FROM tokens WHERE id = $1", uuid.UUID(token_id))
            if trow is None:
                return None
            prow = await conn.fetchrow("SELECT * FROM access_policies WHERE id = $1", trow["access_policy_id"])
        if prow is None:
            return None
        return token_from_row(trow), trow["version"], policy_from_row(prow), prow["version"]

    # ---- audit --------------------------------------------------------------------------------------

    @staticmethod
    async def _audit(conn: asyncpg.Connection, org_id: str, actor: str, action: str, rtype: str, rid: str,
                     before: Any, after: Any) -> None:
        await conn.execute(
            "INSERT INTO audit_log (org_id, actor, action, resource_type, resource_id, before, after)"
            " VALUES ($1, $2, $3, $4, $5, $6, $7)", org_id, actor, action, rtype, rid, before, after)

    AUDIT_FILTERS = {  # filter -> SQL condition on its value; a resource by its id or its name (before or after)
        "actor": "actor = ANY(${0}::text[])", "resourceType": "resource_type = ${0}",
        "resource": "(resource_id = ${0} OR COALESCE(after->>'name', before->>'name') = ${0})",
        "since": "at >= ${0}", "until": "at < ${0}"}

    async def list_audit(self, org_id: str, page_size: int, cursor: str | None,
                         filters: dict[str, Any] | None = None) -> Page:
        """Newest first; ``filters`` keys are AUDIT_FILTERS (``actor`` a list of token ids or "cli",
        ``since``/``until`` datetimes)."""
        args: list[Any] = [org_id]
        where = "org_id = $1"
        for key, value in (filters or {}).items():
            args.append(value)
            where += " AND " + self.AUDIT_FILTERS[key].format(len(args))
        if cursor:
            _, last_id = decode_cursor(cursor)
            if not isinstance(last_id, int):
                raise BadCursor("pageCursor is not a cursor this API issued")
            args.append(last_id)
            where += f" AND id < ${len(args)}"
        args.append(page_size + 1)
        rows = await self.pool.fetch(
            f"SELECT * FROM audit_log WHERE {where} ORDER BY id DESC LIMIT ${len(args)}", *args)
        more = len(rows) > page_size
        rows = rows[:page_size]
        nxt = encode_cursor(rows[-1]["at"], rows[-1]["id"]) if more else None
        return Page([dict(r) for r in rows], nxt)

    # ---- policies -----------------------------------------------------------------------------------

    async def create_policy(self, policy: AccessPolicy, actor: str, as_json: Callable[[AccessPolicy], Any]
                            ) -> AccessPolicy:
        async with self.pool.acquire() as conn, conn.transaction():
            try:
                row = await conn.fetchrow(
                    "INSERT INTO access_policies (id, org_id, name, display_name, scopes, realms,"
                    " allowed_subnets, status, attributes) VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9) RETURNING *",
                    uuid.UUID(policy.id), policy.org_id, policy.name, policy.display_name,
                    sorted(policy.scopes), realms_to_json(policy.realms),
                    list(policy.subnet_text()), policy.status, _attributes(policy))
            except asyncpg.UniqueViolationError:
                raise Conflict(f"an access policy named {policy.name!r} already exists") from None
            created = policy_from_row(row)
            await self._audit(conn, policy.org_id, actor, "accesspolicy.create", "accesspolicy", created.id,
                              None, as_json(created))
        return created

    async def get_policy(self, scope: AdminScope, policy_id: str) -> AccessPolicy:
        args: list[Any] = [uuid.UUID(policy_id)]
        cond = _scope_sql(scope, args)
        row = await self.pool.fetchrow(f"SELECT * FROM access_policies p WHERE p.id = $1 AND {cond}", *args)
        if row is None:
            raise NotFound("access policy not found")
        return policy_from_row(row)

    async def list_policies(self, scope: AdminScope, filters: dict[str, str], page_size: int,
                            cursor: str | None) -> Page:
        args: list[Any] = []
        conds = [_scope_sql(scope, args)]
        if "name" in filters:
            args.append(filters["name"])
            conds.append(f"p.name = ${len(args)}")
        if "text" in filters:  # the page's search box: name or display name contains the text
            args.append(_like(filters["text"]))
            conds.append(f"(p.name ILIKE ${len(args)} OR p.display_name ILIKE ${len(args)})")
        if "status" in filters:
            args.append(filters["status"])
            conds.append(f"p.status = ${len(args)}")
        if "realmType" in filters:
            realm: dict[str, str] = {"type": filters["realmType"]}
            if "realmIdentifier" in filters:
                realm["identifier"] = filters["realmIdentifier"]
            args.append([realm])
            conds.append(f"p.realms @> ${len(args)}::jsonb")
        return await self._page(
            "SELECT p.* FROM access_policies p", conds, args, page_size, cursor, policy_from_row, "p")

    async def _page(self, select: str, conds: list[str], args: list[Any], page_size: int,
                    cursor: str | None, convert: Callable[[asyncpg.Record], Any], alias: str) -> Page:
        if cursor:
            at, rid = decode_cursor(cursor)
            args += [at, rid]
            conds.append(f"({alias}.created_at, {alias}.id) > (${len(args) - 1}, ${len(args)})")
        args.append(page_size + 1)
        sql = (f"{select} WHERE {' AND '.join(conds)} ORDER BY {alias}.created_at, {alias}.id"
               f" LIMIT ${len(args)}")
        try:
            rows = await self.pool.fetch(sql, *args)
        except asyncpg.DataError:  # a forged cursor whose id is of the other list's type
            if cursor:
                raise BadCursor("pageCursor is not a cursor this API issued") from None
            raise
        more = len(rows) > page_size
        rows = rows[:page_size]
        nxt = encode_cursor(rows[-1]["created_at"], rows[-1]["id"]) if more else None
        return Page([convert(r) for r in rows], nxt)

    async def update_policy(self, scope: AdminScope, policy_id: str, changes: dict[str, Any], actor: str,
                            as_json: Callable[[AccessPolicy], Any],
                            check: Callable[[AccessPolicy, AccessPolicy], None] | None = None
                            ) -> AccessPolicy:
        """Apply ``changes`` (model field → value); ``check(before, after)`` may veto (raises)."""
        async with self.pool.acquire() as conn, conn.transaction():
            args: list[Any] = [uuid.UUID(policy_id)]
            cond = _scope_sql(scope, args)
            row = await conn.fetchrow(
                f"SELECT * FROM access_policies p WHERE p.id = $1 AND {cond} FOR UPDATE", *args)
            if row is None:
                raise NotFound("access policy not found")
            before = policy_from_row(row)
            from dataclasses import replace
            after = replace(before, **changes)
            if check:
                check(before, after)
            row = await conn.fetchrow(
                "UPDATE access_policies SET display_name=$2, scopes=$3, realms=$4, allowed_subnets=$5,"
                " status=$6, attributes=$7, updated_at=now() WHERE id=$1 RETURNING *",
                uuid.UUID(policy_id), after.display_name, sorted(after.scopes), realms_to_json(after.realms),
                list(after.subnet_text()), after.status, _attributes(after))
            updated = policy_from_row(row)
            await self._audit(conn, before.org_id, actor, "accesspolicy.update", "accesspolicy", policy_id,
                              as_json(before), as_json(updated))
        return updated

    async def delete_policy(self, scope: AdminScope, policy_id: str, actor: str,
                            as_json: Callable[[AccessPolicy], Any]) -> None:
        async with self.pool.acquire() as conn, conn.transaction():
            args: list[Any] = [uuid.UUID(policy_id)]
            cond = _scope_sql(scope, args)
            row = await conn.fetchrow(
                f"DELETE FROM access_policies p WHERE p.id = $1 AND {cond} RETURNING *", *args)
            if row is None:
                raise NotFound("access policy not found")
            before = policy_from_row(row)
            await self._audit(conn, before.org_id, actor, "accesspolicy.delete", "accesspolicy", policy_id,
                              as_json(before), None)

    async def count_tokens(self, policy_ids: Sequence[str]) -> dict[str, int]:
        rows = await self.pool.fetch(
            "SELECT access_policy_id, count(*) AS n FROM tokens WHERE access_policy_id = ANY($1::uuid[])"
            " GROUP BY access_policy_id", [uuid.UUID(p) for p in policy_ids])
        return {str(r["access_policy_id"]): r["n"] for r in rows}

    # ---- tokens -------------------------------------------------------------------------------------

    async def create_token(self, scope: AdminScope, token: Token, actor: str,
                           as_json: Callable[[Token], Any]) -> Token:
        async with self.pool.acquire() as conn, conn.transaction():
            args: list[Any] = [uuid.UUID(token.access_policy_id)]
            cond = _scope_sql(scope, args)
            prow = await conn.fetchrow(
                f"SELECT p.org_id FROM access_policies p WHERE p.id = $1 AND {cond} FOR SHARE", *args)
            if prow is None:
                raise NotFound("access policy not found")
            try:
                row = await conn.fetchrow(
                    "INSERT INTO tokens (id, org_id, access_policy_id, name, display_name, secret_sha256,"
                    " expires_at) VALUES ($1,$2,$3,$4,$5,$6,$7) RETURNING *",
                    uuid.UUID(token.id), prow["org_id"], uuid.UUID(token.access_policy_id), token.name,
                    token.display_name, token.secret_hash, token.expires_at)
            except asyncpg.UniqueViolationError:
                raise Conflict(f"a token named {token.name!r} already exists") from None
            created = token_from_row(row)
            await self._audit(conn, prow["org_id"], actor, "token.create", "token", created.id, None,
                              as_json(created))
        return created

    _TOKEN_SELECT = "SELECT t.* FROM tokens t JOIN access_policies p ON p.id = t.access_policy_id"

    async def get_token(self, scope: AdminScope, token_id: str) -> Token:
        args: list[Any] = [uuid.UUID(token_id)]
        cond = _scope_sql(scope, args)
        row = await self.pool.fetchrow(f"{self._TOKEN_SELECT} WHERE t.id = $1 AND {cond}", *args)
        if row is None:
            raise NotFound("token not found")
        return token_from_row(row)

    async def list_tokens(self, scope: AdminScope, filters: dict[str, Any], page_size: int,
                          cursor: str | None) -> Page:
        args: list[Any] = []
        conds = [_scope_sql(scope, args)]
        simple = {"accessPolicyId": ("t.access_policy_id", uuid.UUID), "accessPolicyName": ("p.name", str),
                  "name": ("t.name", str), "accessPolicyStatus": ("p.status", str)}
        for key, (col, conv) in simple.items():
            if key in filters:
                args.append(conv(filters[key]))
                conds.append(f"{col} = ${len(args)}")
        if "expiresBefore" in filters:
            args.append(filters["expiresBefore"])
            conds.append(f"t.expires_at < ${len(args)}")
        if "expiresAfter" in filters:
            args.append(filters["expiresAfter"])
            conds.append(f"t.expires_at > ${len(args)}")
        if "accessPolicyIds" in filters:  # Cloud's comma list, parsed by the API
            args.append([uuid.UUID(i) for i in filters["accessPolicyIds"]])
            conds.append(f"t.access_policy_id = ANY(${len(args)}::uuid[])")
        if filters.get("includeExpired") is False:  # Cloud's lists leave expired tokens out by default
            conds.append("(t.expires_at IS NULL OR t.expires_at > now())")
        if "accessPolicyRealmType" in filters:
            realm = {"type": filters["accessPolicyRealmType"]}
            if "accessPolicyRealmIdentifier" in filters:
                realm["identifier"] = filters["accessPolicyRealmIdentifier"]
            args.append([realm])
            conds.append(f"p.realms @> ${len(args)}::jsonb")
        return await self._page(self._TOKEN_SELECT, conds, args, page_size, cursor, token_from_row, "t")

    async def update_token(self, scope: AdminScope, token_id: str, changes: dict[str, Any], actor: str,
                           as_json: Callable[[Token], Any]) -> Token:
        async with self.pool.acquire() as conn, conn.transaction():
            args: list[Any] = [uuid.UUID(token_id)]
            cond = _scope_sql(scope, args)
            row = await conn.fetchrow(f"{self._TOKEN_SELECT} WHERE t.id = $1 AND {cond} FOR UPDATE OF t", *args)
            if row is None:
                raise NotFound("token not found")
            before = token_from_row(row)
            display = changes.get("display_name", before.display_name)
            expires = changes["expires_at"] if "expires_at" in changes else before.expires_at
            row = await conn.fetchrow(
                "UPDATE tokens SET display_name=$2, expires_at=$3, updated_at=now() WHERE id=$1 RETURNING *",
                uuid.UUID(token_id), display, expires)
            updated = token_from_row(row)
            await self._audit(conn, row["org_id"], actor, "token.update", "token", token_id,
                              as_json(before), as_json(updated))
        return updated

    async def delete_token(self, scope: AdminScope, token_id: str, actor: str,
                           as_json: Callable[[Token], Any]) -> None:
        async with self.pool.acquire() as conn, conn.transaction():
            args: list[Any] = [uuid.UUID(token_id)]
            cond = _scope_sql(scope, args)
            row = await conn.fetchrow(
                f"DELETE FROM tokens t USING access_policies p WHERE p.id = t.access_policy_id AND t.id = $1"
                f" AND {cond} RETURNING t.*", *args)
            if row is None:
                raise NotFound("token not found")
            await self._audit(conn, row["org_id"], actor, "token.delete", "token", token_id,
                              as_json(token_from_row(row)), None)

    async def find_policy_by_name(self, org_id: str, name: str) -> AccessPolicy | None:
        row = await self.pool.fetchrow("SELECT * FROM access_policies WHERE org_id=$1 AND name=$2", org_id, name)
        return policy_from_row(row) if row else None

    # ---- usage --------------------------------------------------------------------------------------

    async def flush_usage(self, usage: dict[str, tuple[datetime, datetime]]) -> None:
        """Merge first/last-used times; LEAST/GREATEST keep the extremes across replicas.

        Every worker of every replica writes such batches. An UPDATE over a join locks its rows in
        whatever order the plan visits them, so two overlapping batches could each hold a row the
        other waits for (a deadlock, issue 23). The rows are locked first, in id order, by one
        ``SELECT ... ORDER BY id FOR NO KEY UPDATE`` (rows are locked after the sort): batches then
        always take their common rows in the same order, and never wait on each other in a cycle.
        """
        if not usage:
            return
        order = sorted(usage)
        ids = [uuid.UUID(k) for k in order]
        firsts = [usage[k][0] for k in order]
        lasts = [usage[k][1] for k in order]
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT 1 FROM tokens WHERE id = ANY($1::uuid[]) ORDER BY id FOR NO KEY UPDATE", ids)
            await conn.execute(
                "UPDATE tokens t SET first_used_at = LEAST(COALESCE(t.first_used_at, u.f), u.f),"
                " last_used_at = GREATEST(COALESCE(t.last_used_at, u.l), u.l)"
                " FROM unnest($1::uuid[], $2::timestamptz[], $3::timestamptz[]) AS u(id, f, l) WHERE t.id = u.id",
                ids, firsts, lasts)


Listener = Callable[[str, str, str], Awaitable[None]]
