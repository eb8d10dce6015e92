"""Load and validate the one YAML file operators edit; the result is an immutable snapshot.

Validation collects every problem as ``path: message`` (``orgs[0].stacks[1].tenants.logs:
must be a non-empty string without '|'``) so an operator fixes a file in one pass.
Unknown keys are errors: a typo must never silently drop a setting.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final
from urllib.parse import urlsplit

import yaml

from gateway.policy.model import Network
from gateway.tenant_limits import TenantLimits
from gateway.tenant_limits import parse as parse_tenant_limits

log = logging.getLogger("gateway.config")
SIGNALS: Final = ("metrics", "logs", "traces", "profiles")
LBAC_MODES: Final = ("enforce", "header", "auto")
ROLES: Final = ("write", "read", "rules", "alertmanager")
LOG_LEVELS: Final = ("debug", "info", "warning", "error")
#: ``data_path`` chose aiohttp's server for the data path until issue 24 left the protocol server the only one.
REMOVED_DATA_PATH: Final = ("the aiohttp data path was removed: the data path is always the protocol server "
                            "(uvloop + httptools; the admin API, the page and WebSockets stay on aiohttp, same port); "
                            "delete the key")
_TENANT_RE: Final = re.compile(r"[A-Za-z0-9!\-_.*'()]{1,150}")  # Mimir's tenant ID charset, minus '|'
_NAME_RE: Final = re.compile(r"[a-z0-9][a-z0-9_-]{0,254}")  # both matched whole (fullmatch)


class ConfigError(Exception):
    """The file is unusable; ``problems`` has one ``path: message`` line per problem."""

    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass(frozen=True, slots=True)
class Stack:
    id: str
    name: str
    org_id: str
    tenants: Mapping[str, str]  # signal -> tenant ID


@dataclass(frozen=True, slots=True)
class Org:
    id: str
    name: str
    stacks: tuple[Stack, ...]


@dataclass(frozen=True, slots=True)
class Upstream:
    """One backend; ``urls`` maps a role (write/read/rules/alertmanager) to its base URL.

    ``lbac``: ``enforce`` (the gateway rewrites queries; right on every backend), ``header``
    (send X-Prom-Label-Policy, trusted only once a probe showed the backend enforces it) or
    ``auto`` (header when the probe passes, enforce otherwise); the probe repeats every
    ``lbac_probe_interval`` seconds.
    """

    signal: str
    urls: Mapping[str, str]
    lbac: str = "enforce"
    connect_timeout: float = 5.0
    read_timeout: float = 300.0
    lbac_probe_interval: float = 300.0

    def url_for(self, role: str) -> str:
        return self.urls[role]


@dataclass(frozen=True, slots=True)
class DatabaseConfig:
    url: str | None = None
    pool_min: int = 1
    pool_max: int = 10
    connect_timeout: float = 5.0
    command_timeout: float = 10.0
    resync_interval: float = 60.0
    usage_flush_interval: float = 10.0
    max_staleness: float = 3600.0
    reconnect_max_backoff: float = 0.5  # bounds how late a worker hears a write after an outage (issue 23)


@dataclass(frozen=True, slots=True)
class Limits:
    """Request sizes, and the edge of each worker (issue 12): how long a client may take to send a
    request head, how long it may pause between body chunks, and how many connections a worker holds
    open (beyond that a new connection gets a 503 and is closed). Read by either server."""

    max_request_body: int = 64 * 1024 * 1024
    max_admin_body: int = 1024 * 1024
    head_timeout: float = 30.0
    body_idle_timeout: float = 30.0
    max_connections: int = 4096
    fanout_memory: int = 256 * 1024 * 1024  # bytes of fan-out answers a worker holds at once (issue 22)


@dataclass(frozen=True, slots=True)
class Shutdown:
    """SIGTERM: /ready answers 503 for ``delay`` seconds while still serving, then the listener
    closes and in-flight requests get up to ``drain_timeout`` seconds to finish."""

    delay: float = 0.0
    drain_timeout: float = 30.0


@dataclass(frozen=True, slots=True)
class EnforcingBackend:
    """``forward_auth.label_policies.<signal>``: the backend another proxy sends this signal to, which the
    operator says enforces X-Prom-Label-Policy; the gateway probes ``url`` (as header mode does) every
    ``probe_interval`` seconds and passes label policies only while the probe confirms it."""

    signal: str
    url: str
    probe_interval: float = 300.0


@dataclass(frozen=True, slots=True)
class ForwardAuth:
    """``forward_auth:``, the policy engine behind another proxy (gateway.forwardauth).

    ``max_age``: the Cache-Control max-age of an allowing answer (0: ``no-store``); a proxy that caches it
    lets a revoked token through for that long. ``enforcing``: per signal, the backend that enforces label
    policies (a label-restricted read of any other signal is refused). ``ruler_tenant_federation``: whether
    the Mimir ruler may evaluate federated rule groups; the auth service never sees a rule group's body, so
    while it may (the default), metrics rule-group writes are refused (use the data path for them).
    """

    max_age: int = 5
    enforcing: Mapping[str, EnforcingBackend] = field(default_factory=dict)
    ruler_tenant_federation: bool = True


@dataclass(frozen=True)
class Config:
    """A validated, immutable configuration snapshot; swapped whole on reload."""

    listen: tuple[str, int] = ("127.0.0.1", 8080)
    metrics_listen: tuple[str, int] | None = None
    data_dir: Path = Path(".data")
    database: DatabaseConfig = field(default_factory=DatabaseConfig)
    region: str = "local"
    log_level: str = "info"
    orgs: tuple[Org, ...] = ()
    upstreams: Mapping[str, Upstream] = field(default_factory=dict)
    trusted_proxies: tuple[Network, ...] = ()
    limits: Limits = field(default_factory=Limits)
    grafana_user_header: str = "X-Grafana-User"
    shutdown: Shutdown = field(default_factory=Shutdown)
    source: str | None = None
    forward_auth: ForwardAuth = field(default_factory=ForwardAuth)
    tenant_limits: TenantLimits = field(default_factory=TenantLimits)  # gateway.tenant_limits
    # Derived indexes, built once in __post_init__ for O(1) lookups on the hot path.
    orgs_by_id: Mapping[str, Org] = field(init=False, repr=False)
    stacks_by_id: Mapping[str, Stack] = field(init=False, repr=False)
    stack_by_tenant: Mapping[tuple[str, str], Stack] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        stacks = {s.id: s for o in self.orgs for s in o.stacks}
        by_tenant = {(sig, t): s for s in stacks.values() for sig, t in s.tenants.items()}
        object.__setattr__(self, "orgs_by_id", MappingProxyType({o.id: o for o in self.orgs}))
        object.__setattr__(self, "stacks_by_id", MappingProxyType(stacks))
        object.__setattr__(self, "stack_by_tenant", MappingProxyType(by_tenant))

    def realm_exists(self, realm_type: str, identifier: str) -> bool:
        if realm_type == "org":
            return identifier in self.orgs_by_id
        return realm_type == "stack" and identifier in self.stacks_by_id

    def realm_org(self, realm_type: str, identifier: str) -> str | None:
        """The org a realm belongs to, or None for an unknown realm."""
        if realm_type == "org":
            return identifier if identifier in self.orgs_by_id else None
        stack = self.stacks_by_id.get(identifier)
        return stack.org_id if stack else None


class _Checker:
    """Collects problems while walking the raw YAML, each with its path."""

    def __init__(self) -> None:
        self.problems: list[str] = []

    def add(self, path: str, msg: str) -> None:
        self.problems.append(f"{path}: {msg}" if path else msg)

    def mapping(self, value: Any, path: str, allowed: tuple[str, ...], required: tuple[str, ...] = ()
                ) -> dict[str, Any]:
        if value is None:
            value = {}
        if not isinstance(value, dict):
            self.add(path, "must be a mapping")
            return {}
        for key in value:
            if key not in allowed:
                self.add(_join(path, str(key)), f"unknown key (allowed: {', '.join(allowed)})")
        for key in required:
            if key not in value or value[key] is None:
                self.add(_join(path, key), "is required")
        return value

    def typed(self, value: Any, path: str, check: Callable[[Any], bool], msg: str, default: Any) -> Any:
        if value is None:
            return default
        if not check(value):
            self.add(path, msg)
            return default
        return value


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _is_pos_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and v > 0


def _is_pos_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def parse_hostport(value: Any) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` → (host, port); ValueError with a reason otherwise."""
    if not isinstance(value, str) or ":" not in value:
        raise ValueError("must be host:port, e.g. 127.0.0.1:8080")
    host, _, port = value.rpartition(":")
    host = host.strip("[]") or "0.0.0.0"
    if not (port.isascii() and port.isdigit()) or not 0 <= int(port) <= 65535:
        raise ValueError("port must be a number from 0 to 65535")
    return host, int(port)


def _url(c: _Checker, value: Any, path: str) -> str | None:
    if not isinstance(value, str):
        c.add(path, "must be an http:// or https:// URL")
        return None
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.query or parts.fragment:
        c.add(path, "must be an http:// or https:// URL without query or fragment")
        return None
    return value.rstrip("/")


def _id(c: _Checker, value: Any, path: str) -> str:
    if isinstance(value, bool) or not isinstance(value, int | str) or not str(value).strip():
        c.add(path, "must be a number or a non-empty string")
        return ""
    s = str(value).strip()
    if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", s):
        c.add(path, "must be 1-64 characters of letters, digits, '-' or '_'")
    return s


def _orgs(c: _Checker, raw: Any) -> tuple[Org, ...]:
    if raw is None:
        raw = []
    if not isinstance(raw, list):
        c.add("orgs", "must be a list")
        return ()
    orgs: list[Org] = []
    seen_ids: dict[str, str] = {}
    seen_tenants: dict[tuple[str, str], str] = {}
    for i, o in enumerate(raw):
        p = f"orgs[{i}]"
        om = c.mapping(o, p, ("id", "name", "stacks"), ("id", "name"))
        oid = _id(c, om.get("id"), _join(p, "id")) if "id" in om else ""
        oname = c.typed(om.get("name"), _join(p, "name"), lambda v: isinstance(v, str) and bool(v),
                        "must be a non-empty string", "")
        if oid and oid in seen_ids:
            c.add(_join(p, "id"), f"duplicates the id of {seen_ids[oid]} (org and stack ids share one space)")
        seen_ids.setdefault(oid, p)
        stacks: list[Stack] = []
        raw_stacks = om.get("stacks") or []
        if not isinstance(raw_stacks, list):
            c.add(_join(p, "stacks"), "must be a list")
            raw_stacks = []
        for j, s in enumerate(raw_stacks):
            sp = f"{p}.stacks[{j}]"
            sm = c.mapping(s, sp, ("id", "name", "tenants"), ("id", "name", "tenants"))
            sid = _id(c, sm.get("id"), _join(sp, "id")) if "id" in sm else ""
            if sid and sid in seen_ids:
                c.add(_join(sp, "id"), f"duplicates the id of {seen_ids[sid]}")
            seen_ids.setdefault(sid, sp)
            sname = c.typed(sm.get("name"), _join(sp, "name"), lambda v: isinstance(v, str) and bool(v),
                            "must be a non-empty string", "")
            tm = c.mapping(sm.get("tenants"), _join(sp, "tenants"), SIGNALS)
            tenants: dict[str, str] = {}
            for sig, tenant in tm.items():
                tp = _join(sp, f"tenants.{sig}")
                if isinstance(tenant, int) and not isinstance(tenant, bool):
                    tenant = str(tenant)
                if sig not in SIGNALS:
                    continue
                if not isinstance(tenant, str) or not _TENANT_RE.fullmatch(tenant) or tenant in (".", ".."):
                    c.add(tp, "must be a non-empty string without '|' (letters, digits, !-_.*'())")
                    continue
                if (sig, tenant) in seen_tenants:
                    c.add(tp, f"tenant {tenant!r} is already used for {sig} by {seen_tenants[(sig, tenant)]}")
                seen_tenants[(sig, tenant)] = sp
                tenants[sig] = tenant
            stacks.append(Stack(sid, sname, oid, MappingProxyType(tenants)))
        orgs.append(Org(oid, oname, tuple(stacks)))
    return tuple(orgs)


def _upstreams(c: _Checker, raw: Any) -> dict[str, Upstream]:
    um = c.mapping(raw, "upstreams", SIGNALS)
    result: dict[str, Upstream] = {}
    for sig, u in um.items():
        if sig not in SIGNALS:
            continue
        p = f"upstreams.{sig}"
        keys = ("url", "lbac", "lbac_probe_interval", "connect_timeout", "read_timeout") + tuple(
            f"{r}_url" for r in ROLES)
        m = c.mapping(u, p, keys)
        base = _url(c, m["url"], _join(p, "url")) if m.get("url") is not None else None
        urls: dict[str, str] = {}
        for role in ROLES:
            key = f"{role}_url"
            given = _url(c, m[key], _join(p, key)) if m.get(key) is not None else None
            if given or base:
                urls[role] = given or base  # type: ignore[assignment]
        if not urls and "url" not in m:
            c.add(_join(p, "url"), "is required (or give write_url/read_url/rules_url/alertmanager_url)")
        lbac = m.get("lbac") or "enforce"
        if lbac not in LBAC_MODES:
            c.add(_join(p, "lbac"), f"must be one of {', '.join(LBAC_MODES)}")
            lbac = "enforce"
        probe_every = c.typed(m.get("lbac_probe_interval"), _join(p, "lbac_probe_interval"), _is_pos_number,
                              "must be a positive number of seconds", 300.0)
        ct = c.typed(m.get("connect_timeout"), _join(p, "connect_timeout"), _is_pos_number,
                     "must be a positive number of seconds", 5.0)
        rt = c.typed(m.get("read_timeout"), _join(p, "read_timeout"), _is_pos_number,
                     "must be a positive number of seconds", 300.0)
        result[sig] = Upstream(sig, MappingProxyType(urls), lbac, float(ct), float(rt), float(probe_every))
    return result


def _forward_auth(c: _Checker, raw: Any, upstreams: Mapping[str, Upstream]) -> ForwardAuth:
    fm = c.mapping(raw, "forward_auth", ("max_age", "label_policies", "ruler_tenant_federation"))
    max_age = c.typed(fm.get("max_age"), "forward_auth.max_age",
                      lambda v: isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 3600,
                      "must be a whole number of seconds from 0 to 3600", 5)
    federation = c.typed(fm.get("ruler_tenant_federation"), "forward_auth.ruler_tenant_federation",
                         lambda v: isinstance(v, bool), "must be true or false", True)
    lm = c.mapping(fm.get("label_policies"), "forward_auth.label_policies", SIGNALS)
    enforcing: dict[str, EnforcingBackend] = {}
    for sig, raw_sig in lm.items():
        p = f"forward_auth.label_policies.{sig}"
        if sig not in SIGNALS:
            continue
        if sig not in LABEL_POLICY_SIGNALS:
            c.add(p, f"label policies apply to {' and '.join(LABEL_POLICY_SIGNALS)} only")
            continue
        m = c.mapping(raw_sig, p, ("enforced_by_backend", "url", "probe_interval"), ("enforced_by_backend",))
        enforced = m.get("enforced_by_backend")
        if enforced is not None and not isinstance(enforced, bool):
            c.add(_join(p, "enforced_by_backend"), "must be true or false")
            continue
        every = c.typed(m.get("probe_interval"), _join(p, "probe_interval"), _is_pos_number,
                        "must be a positive number of seconds", 300.0)
        if not enforced:
            if m.get("url") is not None:
                c.add(_join(p, "url"), "is only used with enforced_by_backend: true")
            continue
        url = _url(c, m["url"], _join(p, "url")) if m.get("url") is not None else None
        if url is None and m.get("url") is None:
            up = upstreams.get(sig)
            url = up.url_for("read") if up is not None and "read" in up.urls else None
            if url is None:
                c.add(_join(p, "url"), f"is required (the {sig} backend behind the proxy, which the gateway "
                      f"probes) unless upstreams.{sig} names it")
        if url is not None:
            enforcing[sig] = EnforcingBackend(sig, url, float(every))
    return ForwardAuth(max_age, MappingProxyType(enforcing), federation)


def _networks(c: _Checker, raw: Any, path: str) -> tuple[Network, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        c.add(path, "must be a list of CIDRs")
        return ()
    nets: list[Network] = []
    for i, v in enumerate(raw):
        try:
            nets.append(ipaddress.ip_network(str(v), strict=False))
        except ValueError:
            c.add(f"{path}[{i}]", f"{v!r} is not an IPv4 or IPv6 address or CIDR")
    return tuple(nets)


_DB_DEFAULTS: Final = DatabaseConfig()
_LIMIT_DEFAULTS: Final = Limits()
TOP_KEYS: Final = ("listen", "metrics_listen", "data_dir", "database", "region", "log_level", "orgs",
                   "upstreams", "trusted_proxies", "limits", "grafana_user_header", "shutdown", "data_path",
                   "forward_auth", "tenant_limits")
#: Signals whose backends can enforce label policies (and be probed for it): Loki, and Mimir/GEM.
LABEL_POLICY_SIGNALS: Final = ("metrics", "logs")


def parse_config(raw: Any, source: str | None = None, env: Mapping[str, str] | None = None) -> Config:
    """Validate a parsed YAML document; raises ConfigError listing every problem."""
    env = os.environ if env is None else env
    c = _Checker()
    top = c.mapping(raw, "", TOP_KEYS)
    listen: tuple[str, int] = ("127.0.0.1", 8080)
    metrics_listen: tuple[str, int] | None = None
    for key in ("listen", "metrics_listen"):
        if top.get(key) is not None:
            try:
                hp = parse_hostport(top[key])
            except ValueError as exc:
                c.add(key, str(exc))
                continue
            if key == "listen":
                listen = hp
            else:
                metrics_listen = hp
    data_dir = c.typed(top.get("data_dir"), "data_dir", lambda v: isinstance(v, str) and bool(v),
                       "must be a directory path", ".data")
    dbm = c.mapping(top.get("database"), "database",
                    ("url", "pool_min", "pool_max", "connect_timeout", "command_timeout",
                     "resync_interval", "usage_flush_interval", "max_staleness", "reconnect_max_backoff"))
    db_url = env.get("GATEWAY_DATABASE_URL") or dbm.get("url")
    if db_url is not None and (not isinstance(db_url, str)
                               or urlsplit(db_url).scheme not in ("postgres", "postgresql")):
        c.add("database.url", "must be a postgresql:// URL")
        db_url = None
    num = {k: c.typed(dbm.get(k), f"database.{k}", _is_pos_number, "must be a positive number",
                      getattr(_DB_DEFAULTS, k))
           for k in ("connect_timeout", "command_timeout", "resync_interval", "usage_flush_interval",
                     "max_staleness", "reconnect_max_backoff")}
    pool_min = c.typed(dbm.get("pool_min"), "database.pool_min", _is_pos_int, "must be a positive integer", 1)
    pool_max = c.typed(dbm.get("pool_max"), "database.pool_max", _is_pos_int, "must be a positive integer", 10)
    if pool_min > pool_max:
        c.add("database.pool_min", "must not exceed database.pool_max")
    region = c.typed(top.get("region"), "region", lambda v: isinstance(v, str) and bool(v),
                     "must be a non-empty string", "local")
    log_level = c.typed(top.get("log_level"), "log_level", lambda v: v in LOG_LEVELS,
                        f"must be one of {', '.join(LOG_LEVELS)}", "info")
    lm = c.mapping(top.get("limits"), "limits", ("max_request_body", "max_admin_body", "head_timeout",
                                                 "body_idle_timeout", "max_connections", "fanout_memory"))
    limits = Limits(
        c.typed(lm.get("max_request_body"), "limits.max_request_body", _is_pos_int,
                "must be a positive number of bytes", _LIMIT_DEFAULTS.max_request_body),
        c.typed(lm.get("max_admin_body"), "limits.max_admin_body", _is_pos_int,
                "must be a positive number of bytes", _LIMIT_DEFAULTS.max_admin_body),
        float(c.typed(lm.get("head_timeout"), "limits.head_timeout", _is_pos_number,
                      "must be a positive number of seconds", _LIMIT_DEFAULTS.head_timeout)),
        float(c.typed(lm.get("body_idle_timeout"), "limits.body_idle_timeout", _is_pos_number,
                      "must be a positive number of seconds", _LIMIT_DEFAULTS.body_idle_timeout)),
        c.typed(lm.get("max_connections"), "limits.max_connections", _is_pos_int,
                "must be a positive number of connections", _LIMIT_DEFAULTS.max_connections),
        c.typed(lm.get("fanout_memory"), "limits.fanout_memory", _is_pos_int,
                "must be a positive number of bytes", _LIMIT_DEFAULTS.fanout_memory),
    )
    user_header = c.typed(top.get("grafana_user_header"), "grafana_user_header",
                          lambda v: isinstance(v, str) and re.fullmatch(r"[A-Za-z0-9-]+", v) is not None,
                          "must be an HTTP header name", "X-Grafana-User")
    sm = c.mapping(top.get("shutdown"), "shutdown", ("delay", "drain_timeout"))
    shutdown = Shutdown(
        float(c.typed(sm.get("delay"), "shutdown.delay", lambda v: _is_pos_number(v) or v == 0,
                      "must be a number of seconds >= 0", 0.0)),
        float(c.typed(sm.get("drain_timeout"), "shutdown.drain_timeout", _is_pos_number,
                      "must be a positive number of seconds", 30.0)))
    if "data_path" in top:  # accepted as `protocol` (the only data path now), refused as `aiohttp`
        if top["data_path"] != "protocol":
            c.add("data_path", REMOVED_DATA_PATH)
        else:
            log.warning("config: data_path is deprecated and ignored: the protocol server is the only data path")
    orgs = _orgs(c, top.get("orgs"))
    upstreams = _upstreams(c, top.get("upstreams"))
    trusted = _networks(c, top.get("trusted_proxies"), "trusted_proxies")
    forward_auth = _forward_auth(c, top.get("forward_auth"), upstreams)
    tenant_limits = parse_tenant_limits(c, top.get("tenant_limits"))
    if c.problems:
        raise ConfigError(c.problems)
    return Config(
        listen=listen, metrics_listen=metrics_listen, data_dir=Path(data_dir),
        database=DatabaseConfig(db_url, pool_min, pool_max, **{k: float(v) for k, v in num.items()}),
        region=region, log_level=log_level, orgs=orgs, upstreams=MappingProxyType(upstreams),
        trusted_proxies=trusted, limits=limits, grafana_user_header=user_header, shutdown=shutdown,
        source=source, forward_auth=forward_auth, tenant_limits=tenant_limits,
    )


def load_config(path: str | os.PathLike[str], env: Mapping[str, str] | None = None) -> Config:
    """Read and validate a YAML file; raises ConfigError (never a traceback for bad input)."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"{p}: cannot read: {exc.strerror or exc}"]) from None
    except UnicodeDecodeError:
        raise ConfigError([f"{p}: is not UTF-8 text"]) from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise ConfigError([f"{p}: {where}invalid YAML: {getattr(exc, 'problem', None) or exc}"]) from None
    cfg = parse_config(raw, source=str(p), env=env)
    return resolve_paths(cfg, p)


def resolve_paths(cfg: Config, config_file: Path) -> Config:
    """Relative paths in the file mean relative to the file, not to where a command happens to run:
    ``gateway token bootstrap`` started from another directory must find the same database."""
    base = config_file.resolve().parent
    if not cfg.data_dir.is_absolute():
        cfg = replace(cfg, data_dir=base / cfg.data_dir)
    return cfg
