"""The ``gateway`` command: serve, migrate, check-config, token bootstrap."""

from __future__ import annotations

import argparse
import asyncio
import atexit
import logging
import os
import shutil
import sys
import tempfile
import uuid
from collections.abc import Sequence

from gateway import __version__, logfmt
from gateway.config import Config, ConfigError, load_config
from gateway.startup import StartupError

DEFAULT_CONFIG = "config/gateway.yaml"

DESCRIPTION = """\
The access-policy gateway: Grafana Cloud-style access policies, tokens, IP ranges and
label-based access control in front of Grafana Mimir, Loki and Tempo.

Typical first run:
  gateway check-config -c config/gateway.yaml     # validate the YAML, one line per problem
  gateway serve -c config/gateway.yaml            # start (embedded PostgreSQL when no database.url)
  gateway token bootstrap -c config/gateway.yaml --org 1   # print an admin token for the API and the page
  then open http://127.0.0.1:8080/ in a browser and paste the token.

Relative paths in the file (data_dir) are relative to the file's directory.
"""


def _add_config(p: argparse.ArgumentParser) -> None:
    p.add_argument("-c", "--config", default=DEFAULT_CONFIG, metavar="FILE",
                   help=f"the YAML configuration (default: {DEFAULT_CONFIG})")
    p.add_argument("--log-level", choices=("debug", "info", "warning", "error"),
                   help="override log_level from the file")
    p.add_argument("--log-format", choices=logfmt.FORMATS, default=None,
                   help="one format for every log line on stderr (default: text on a terminal, json otherwise)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gateway", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"gateway {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("serve", help="run the gateway (data path, admin API, page, /metrics)",
                       description="Run the gateway. Applies pending database migrations, loads the policy "
                       "snapshot, then listens on `listen` from the config. /ready answers 200 once the "
                       "snapshot is loaded.")
    _add_config(p)
    p.add_argument("--workers", type=int, default=0, metavar="N",
                   help="processes sharing the port through SO_REUSEPORT (default 0 = one per core)")

    p = sub.add_parser("migrate", help="apply pending database migrations and exit",
                       description="Apply the versioned SQL migrations shipped with this version, in order, "
                       "each once. `serve` does this too at start; run it alone before a rolling upgrade.")
    _add_config(p)

    p = sub.add_parser("check-config", help="validate the YAML file and exit 1 on problems",
                       description="Validate the configuration and print one line per problem, with its path "
                       "in the file, e.g. `orgs[0].stacks[1].tenants.logs: must be a non-empty string`. "
                       "Exit status 0 when valid, 1 otherwise.")
    _add_config(p)

    tok = sub.add_parser("token", help="token administration from the command line")
    tsub = tok.add_subparsers(dest="token_command", metavar="ACTION", required=True)
    p = tsub.add_parser("bootstrap", help="create the bootstrap-admin policy (once) and print a new token",
                        description="Create, if absent, an org-realm access policy named bootstrap-admin with the "
                        "accesspolicies:* and datasources:* scopes, then create a new token of it and print the "
                        "token alone on stdout. Use it as `Authorization: Bearer <token>` on the admin API. "
                        "Running it again prints another new token of the same policy.")
    _add_config(p)
    p.add_argument("--org", required=True, metavar="ID", help="the org id (from `orgs` in the config)")
    p.add_argument("--name", default=None, help="token name (default: bootstrap-<random>)")
    return parser


log = logging.getLogger("gateway")


def _load(args: argparse.Namespace) -> Config:
    """The config; its problems one line each (as log lines under ``serve``, whose stderr is a log)."""
    logfmt.setup(args.log_level or "info", args.log_format)
    try:
        cfg = load_config(args.config)
    except ConfigError as exc:
        for line in exc.problems:
            msg = f"{args.config}: {line}" if not line.startswith(str(args.config)) else line
            if args.command == "serve":
                log.error("%s", msg)
            else:
                print(msg, file=sys.stderr)
        raise SystemExit(1) from None
    logging.getLogger().setLevel(getattr(logging, (args.log_level or cfg.log_level).upper()))
    return cfg


async def _database(cfg: Config, config_path: str) -> str:
    """The database URL for a one-off command, started (embedded) and checked, or a StartupError."""
    from gateway import startup
    loop = asyncio.get_running_loop()
    dsn = cfg.database.url
    if not dsn:
        dsn = await loop.run_in_executor(None, startup.start_embedded_db, cfg, config_path)
    await startup.check_database(dsn, cfg, config_path)
    return dsn


def cmd_check_config(args: argparse.Namespace) -> int:
    cfg = _load(args)
    stacks = sum(len(o.stacks) for o in cfg.orgs)
    print(f"{args.config}: ok ({len(cfg.orgs)} orgs, {stacks} stacks, upstreams: {', '.join(cfg.upstreams)})")
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    cfg = _load(args)

    async def run() -> list[str]:
        from gateway.store import Store, migrate
        store = await Store.open(await _database(cfg, args.config), cfg.database, run_migrations=False)
        try:
            async with store.pool.acquire() as conn:
                return await migrate.apply(conn)
        finally:
            await store.close()

    applied = asyncio.run(run())
    print(f"applied {len(applied)} migration(s)" + (f": {', '.join(applied)}" if applied else ""))
    return 0


def cmd_bootstrap(args: argparse.Namespace) -> int:
    cfg = _load(args)
    org = str(args.org)
    if org not in cfg.orgs_by_id:
        print(f"error: --org {org}: no such org in {args.config} (known: {', '.join(cfg.orgs_by_id)})",
              file=sys.stderr)
        return 1
    refusal = _second_database(cfg, args.config)
    if refusal:
        print(f"error: {refusal}", file=sys.stderr)
        return 1

    async def run() -> str:
        from gateway.admin.serialize import policy_json, token_json
        from gateway.policy import tokens as tokfmt
        from gateway.policy.model import AccessPolicy, Realm, Token
        from gateway.store import AdminScope, Store
        store = await Store.open(await _database(cfg, args.config), cfg.database)
        try:
            policy = await store.find_policy_by_name(org, "bootstrap-admin")
            if policy is None:
                policy = await store.create_policy(AccessPolicy(
                    id=str(uuid.uuid4()), org_id=org, name="bootstrap-admin", display_name="Bootstrap admin",
                    scopes=frozenset({"accesspolicies:read", "accesspolicies:write", "accesspolicies:delete",
                                      "datasources:read", "datasources:write", "datasources.permissions:write"}),
                    realms=(Realm("org", org),)), "cli", policy_json)
                logging.getLogger("gateway").info("created access policy bootstrap-admin (%s)", policy.id)
            secret = tokfmt.new_secret()
            name = args.name or f"bootstrap-{uuid.uuid4().hex[:8]}"
            token = await store.create_token(
                AdminScope(org, True, frozenset()),
                Token(id=str(uuid.uuid4()), access_policy_id=policy.id, name=name, display_name=name,
                      secret_hash=tokfmt.hash_secret(secret)), "cli", token_json)
            return tokfmt.encode(org, token.id, secret, cfg.region)
        finally:
            await store.close()

    print(asyncio.run(run()))
    return 0


def _second_database(cfg: Config, config_path: str) -> str | None:
    """Why bootstrapping now would create a new, empty database beside the one a running gateway of the
    same config serves (so its token would be refused there), or None when it would not."""
    from gateway import runfile
    if cfg.database.url or (cfg.data_dir / "pg" / "PG_VERSION").exists():
        return None
    other = runfile.running(config_path)
    mine = runfile.database_of(cfg)
    if other is None or other.get("database") == mine:
        return None
    return (f"the gateway serving {config_path} (pid {other['pid']}, {other.get('listen')}) uses"
            f" {other.get('database')}; this command would create a new, empty {mine} and print a token that"
            " gateway refuses. Run it with the gateway's database settings (the same GATEWAY_DATABASE_URL or"
            " database.url).")


def cmd_serve(args: argparse.Namespace) -> int:
    cfg = _load(args)
    if args.workers < 0:
        print("error: --workers must be 0 (one per core) or more", file=sys.stderr)
        return 2
    workers = args.workers or (os.cpu_count() or 1)
    if workers != 1 and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        # Must be set before prometheus_client is imported, so /metrics merges all workers.
        metrics_dir = tempfile.mkdtemp(prefix="gateway-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
        atexit.register(shutil.rmtree, metrics_dir, True)
    from gateway.server import serve
    return serve(cfg, args.config, workers=workers)


COMMANDS = {"check-config": cmd_check_config, "migrate": cmd_migrate, "token": cmd_bootstrap, "serve": cmd_serve}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except StartupError as exc:
        log.error("%s", exc)
        return 1
