"""Verify that a header-mode backend really enforces ``X-Prom-Label-Policy`` before trusting it.

A backend without label-based access control ignores the header and returns everything, so
``lbac: header`` is only safe once shown to work. The probe, run at start-up, after every
config reload and every ``lbac_probe_interval`` seconds, reads with a deliberately malformed
policy for a probe tenant: Loki (``pkg/labelaccess``: ``policyFromHeaderValue``) and GEM answer
400 "invalid label policy header value" (a JSON error), a backend that ignores the header answers 200.
When that is inconclusive (another status), and always for Mimir's own LBAC (the same 400 as plain
text: ``-auth.label-access-control-enabled``, set per component, so a query-frontend may parse the
header for queriers that do not filter), a second probe reads a configured tenant without and then
with a valid policy that matches nothing: enforced means the second answer is empty.

Until a probe has passed, and whenever one fails, :func:`effective_mode` refuses restricted
reads to a ``header`` upstream with 503; ``auto`` falls back to ``enforce`` instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

import aiohttp

from gateway.config import Config, Upstream
from gateway.errors import ProxyError
from gateway.lbac.restrict import path_escape
from gateway.metrics import LBAC_ENFORCES, LBAC_HEADER_MODE

log = logging.getLogger("gateway.lbac")

PROBE_TENANT: Final = "gateway-lbac-probe"
MALFORMED_POLICY: Final = "gateway-lbac-probe"  # no ':' between tenant and selector: a parse error
#: A read every backend of that signal answers for any tenant, through its auth middleware.
PROBE_PATHS: Final[Mapping[str, str]] = {"metrics": "/prometheus/api/v1/labels", "logs": "/loki/api/v1/labels"}
_EXTRAS_KEY: Final = "lbac_probe"
_MAX_PROBE_SECONDS: Final = 10.0


@dataclass(frozen=True, slots=True)
class Verdict:
    """What the last probe of one upstream found; ``enforces`` None = not known (yet)."""

    url: str
    enforces: bool | None
    detail: str
    checked_at: float


class ProbeTask:
    """A prober's background task: ``start`` runs ``run(get_config)`` once per process, ``stop`` cancels it."""

    _task: asyncio.Task[None] | None = None

    async def run(self, get_config: Any) -> None:
        raise NotImplementedError

    def start(self, get_config: Any) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self.run(get_config))

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None


class LbacProbe(ProbeTask):
    """Probe results per signal, the periodic task, and the mode each upstream runs in."""

    def __init__(self) -> None:
        self.verdicts: dict[str, Verdict] = {}
        self.wake = asyncio.Event()

    def verdict(self, up: Upstream) -> Verdict | None:
        v = self.verdicts.get(up.signal)
        return v if v is not None and v.url == up.url_for("read") else None  # a new URL needs a new probe

    def mode(self, up: Upstream) -> str:
        """``enforce``, ``header``, or ``unverified`` (header mode that must not be trusted)."""
        if up.lbac == "enforce" or up.signal not in PROBE_PATHS:
            return "enforce"
        v = self.verdict(up)
        if v is not None and v.enforces is True:
            return "header"
        return "enforce" if up.lbac == "auto" else "unverified"

    def status(self, cfg: Config) -> dict[str, Any]:
        """For /ready: per upstream, configured mode, mode in effect and the probe's finding."""
        out: dict[str, Any] = {}
        for sig, up in cfg.upstreams.items():
            if sig not in PROBE_PATHS:
                continue
            v = self.verdict(up)
            out[sig] = {"configured": up.lbac, "effective": self.mode(up),
                        "backendEnforces": v.enforces if v else None,
                        "detail": v.detail if v else ("not probed (enforce mode)" if up.lbac == "enforce"
                                                      else "not probed yet"),
                        "checkedAt": round(v.checked_at, 3) if v else None}
        return out

    async def refresh(self, cfg: Config) -> None:
        """Probe every header/auto upstream once, concurrently; update metrics and log changes."""
        ups = [u for u in cfg.upstreams.values() if u.signal in PROBE_PATHS and u.lbac != "enforce"]
        for u in cfg.upstreams.values():
            if u.signal in PROBE_PATHS and u.lbac == "enforce":
                self.verdicts.pop(u.signal, None)
                LBAC_ENFORCES.labels(u.signal).set(-1)
                LBAC_HEADER_MODE.labels(u.signal).set(0)
        if not ups:
            return
        tenants = {u.signal: _some_tenant(cfg, u.signal) for u in ups}
        timeout = aiohttp.ClientTimeout(total=_MAX_PROBE_SECONDS)
        async with aiohttp.ClientSession(timeout=timeout, auto_decompress=True) as session:
            found = await asyncio.gather(*(probe_upstream(session, u, tenants[u.signal]) for u in ups))
        for up, v in zip(ups, found, strict=True):
            self._record(up, v)

    def _record(self, up: Upstream, new: Verdict) -> None:
        old = self.verdict(up)
        if new.enforces is None and old is not None and old.enforces is not None:
            # Unreachable or odd answer: keep the last conclusive finding (reads fail anyway while it is down).
            new = Verdict(new.url, old.enforces, f"{new.detail}; keeping the previous result: {old.detail}",
                          new.checked_at)
        self.verdicts[up.signal] = new
        mode = self.mode(up)
        LBAC_ENFORCES.labels(up.signal).set(-1 if new.enforces is None else int(new.enforces))
        LBAC_HEADER_MODE.labels(up.signal).set(1 if mode == "header" else 0)
        if new.enforces is True:
            if old is None or old.enforces is not True:
                log.info("LBAC: %s upstream %s enforces X-Prom-Label-Policy (%s); lbac: %s runs in header mode",
                         up.signal, new.url, new.detail, up.lbac)
        elif up.lbac == "auto":
            if old is None or old.enforces is True or old.detail != new.detail:
                log.warning("LBAC: %s upstream %s does not (verifiably) enforce X-Prom-Label-Policy (%s); "
                            "lbac: auto runs in enforce mode", up.signal, new.url, new.detail)
        else:
            log.error("LBAC: %s upstream %s does NOT (verifiably) enforce X-Prom-Label-Policy (%s): "
                      "label-restricted reads are refused with 503. Enable label-based access control on the "
                      "backend, or set upstreams.%s.lbac to enforce (or auto)", up.signal, new.url, new.detail,
                      up.signal)

    async def run(self, get_config: Any) -> None:
        """Re-probe every interval, and at once when :meth:`kick` is called (config reload)."""
        while True:
            cfg: Config = get_config()
            ups = [u for u in cfg.upstreams.values() if u.signal in PROBE_PATHS and u.lbac != "enforce"]
            interval = min((u.lbac_probe_interval for u in ups), default=300.0)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), interval)
            self.wake.clear()
            try:
                await self.refresh(get_config())
            except Exception:  # a probe must never kill its task
                log.exception("LBAC probe failed")

    def kick(self) -> None:
        self.wake.set()



def probe_of(extras: dict[str, Any]) -> LbacProbe:
    """The process's prober, kept in ``State.extras`` (created on first use)."""
    p = extras.get(_EXTRAS_KEY)
    if not isinstance(p, LbacProbe):
        p = extras[_EXTRAS_KEY] = LbacProbe()
    return p


def effective_mode(extras: dict[str, Any], up: Upstream) -> str:
    """The mode a label-restricted read to ``up`` uses; raises 503 for unverified header mode."""
    mode = probe_of(extras).mode(up)
    if mode == "unverified":
        raise ProxyError(503, f"the {up.signal} backend does not (verifiably) enforce label policies "
                         "(X-Prom-Label-Policy), so label-restricted reads are refused; the operator must enable "
                         f"label-based access control on the backend, or set upstreams.{up.signal}.lbac to "
                         "enforce (or auto) in the gateway config", "lbac_unverified")
    return mode


def _some_tenant(cfg: Config, signal: str) -> str | None:
    for org in cfg.orgs:
        for stack in org.stacks:
            if signal in stack.tenants:
                return stack.tenants[signal]
    return None


async def _get(session: aiohttp.ClientSession, url: str, headers: dict[str, str]) -> tuple[int, bytes]:
    async with session.get(url, headers=headers, allow_redirects=False) as r:
        return r.status, await r.content.read(64 * 1024)


def _data_error(body: bytes) -> bool:
    """Whether ``body`` is a JSON error object (``{"status": "error", ...}``)."""
    try:
        doc = json.loads(body)
    except ValueError:
        return False
    return isinstance(doc, dict) and doc.get("status") == "error"


def _data(body: bytes) -> list[Any] | None:
    """The ``data`` list of a Prometheus/Loki label answer, or None if it is not one."""
    try:
        doc = json.loads(body)
    except ValueError:
        return None
    data = doc.get("data") if isinstance(doc, dict) else None
    return data if isinstance(data, list) else None


async def probe_upstream(session: aiohttp.ClientSession, up: Upstream, tenant: str | None) -> Verdict:
    """One probe of one upstream (never raises)."""
    base = up.url_for("read")
    url = base + PROBE_PATHS[up.signal]
    now = time.time()
    try:
        status, body = await _get(session, url, {"X-Scope-OrgID": PROBE_TENANT,
                                                 "X-Prom-Label-Policy": MALFORMED_POLICY})
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        return Verdict(base, None, f"unreachable: {type(exc).__name__}", now)
    if status == 400 and b"invalid label policy" in body.lower():
        if _data_error(body):  # Loki's and GEL's/GEM's answer: the JSON error of their API
            return Verdict(base, True, "rejected a malformed policy with 400", now)
        # Mimir's own LBAC (-auth.label-access-control-enabled; pkg/labelaccess middleware.go answers with
        # http.Error: plain text). The flag is set per component, and a query-frontend that parses the header
        # proves nothing of the queriers behind it: only an answer a policy empties does.
        first = "Mimir's label-based access control rejected a malformed policy with 400"
    elif 200 <= status < 300:
        return Verdict(base, False, f"answered {status} to a malformed policy: it ignores the header", now)
    else:
        first = f"answered {status} to a malformed policy"
    if tenant is None:
        return Verdict(base, None, f"{first}; no tenant configured for a second probe", now)
    nothing = f"{tenant}:" + path_escape('{__gateway_lbac_probe__="' + os.urandom(8).hex() + '"}')
    try:
        s1, b1 = await _get(session, url, {"X-Scope-OrgID": tenant})
        s2, b2 = await _get(session, url, {"X-Scope-OrgID": tenant, "X-Prom-Label-Policy": nothing})
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        return Verdict(base, None, f"{first}; second probe unreachable: {type(exc).__name__}", now)
    d1, d2 = _data(b1), _data(b2)
    if s1 != 200 or not d1:
        return Verdict(base, None, f"{first}; tenant {tenant} has no labels to compare (status {s1})", now)
    if s2 == 200 and d2 == []:
        return Verdict(base, True, f"{first}; a policy matching nothing emptied the answer" if status == 400
                       else "a policy matching nothing emptied the answer", now)
    if s2 == 200 and d2:
        why = "its queriers do not filter" if status == 400 else "it ignores the header"
        return Verdict(base, False, f"{first}: a policy matching nothing changed nothing, {why}" if status == 400
                       else f"a policy matching nothing changed nothing: {why}", now)
    return Verdict(base, None, f"{first}; a valid policy answered {s2}", now)
