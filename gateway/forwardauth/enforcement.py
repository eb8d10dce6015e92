"""Whether the backend behind the other proxy enforces label policies: configured, then verified.

Label policies leave forward-auth as ``X-Prom-Label-Policy`` headers, so they hold only if the backend
the proxy forwards to enforces them. The operator names that backend per signal
(``forward_auth.label_policies.<signal>``) and the gateway probes it with header mode's probe
(``gateway.lbac.probe.probe_upstream``: a malformed policy must be rejected with 400, else a policy that
matches nothing must empty the answer) at start-up, after a config change and every ``probe_interval``.
Until a probe has passed, and whenever one fails, :func:`check` refuses label-restricted reads with 403.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from types import MappingProxyType
from typing import Any, Final

import aiohttp

from gateway.config import Config, EnforcingBackend, Upstream
from gateway.errors import ProxyError
from gateway.lbac.probe import ProbeTask, Verdict, _some_tenant, probe_upstream
from gateway.metrics import FORWARD_AUTH_ENFORCES

log = logging.getLogger("gateway.forwardauth")
_EXTRAS_KEY: Final = "forward_auth_probe"
_MAX_PROBE_SECONDS: Final = 10.0
_CONFIG_POLL: Final = 1.0  # how soon a reloaded config's backends are probed


def _as_upstream(b: EnforcingBackend) -> Upstream:
    return Upstream(b.signal, MappingProxyType({"read": b.url}), "header", lbac_probe_interval=b.probe_interval)


class EnforcementProbe(ProbeTask):
    """Probe verdicts per signal for the configured enforcing backends, and the task that renews them."""

    def __init__(self) -> None:
        self.verdicts: dict[str, Verdict] = {}

    def verified(self, cfg: Config, signal: str) -> bool:
        """True while the configured backend for ``signal`` has passed its latest probe."""
        b = cfg.forward_auth.enforcing.get(signal)
        v = self.verdicts.get(signal)
        return b is not None and v is not None and v.url == b.url and v.enforces is True

    def status(self, cfg: Config) -> dict[str, Any]:
        """For /ready: per configured signal, the backend and whether it is verified."""
        out: dict[str, Any] = {}
        for sig, b in cfg.forward_auth.enforcing.items():
            v = self.verdicts.get(sig)
            v = v if v is not None and v.url == b.url else None
            out[sig] = {"url": b.url, "verified": self.verified(cfg, sig),
                        "detail": v.detail if v else "not probed yet"}
        return out

    async def refresh(self, cfg: Config) -> None:
        """Probe every configured backend once, concurrently (never raises)."""
        backends = list(cfg.forward_auth.enforcing.values())
        for sig in list(self.verdicts):
            if sig not in cfg.forward_auth.enforcing:
                del self.verdicts[sig]
                FORWARD_AUTH_ENFORCES.labels(sig).set(-1)
        if not backends:
            return
        timeout = aiohttp.ClientTimeout(total=_MAX_PROBE_SECONDS)
        async with aiohttp.ClientSession(timeout=timeout, auto_decompress=True) as session:
            found = await asyncio.gather(*(probe_upstream(session, _as_upstream(b), _some_tenant(cfg, b.signal))
                                           for b in backends))
        for b, new in zip(backends, found, strict=True):
            old = self.verdicts.get(b.signal)
            self.verdicts[b.signal] = new
            FORWARD_AUTH_ENFORCES.labels(b.signal).set(-1 if new.enforces is None else int(new.enforces))
            if new.enforces is True:
                if old is None or old.enforces is not True:
                    log.info("forward-auth: %s backend %s enforces X-Prom-Label-Policy (%s)", b.signal, b.url,
                             new.detail)
            elif old is None or old.enforces is True or old.detail != new.detail:
                log.error("forward-auth: %s backend %s does NOT (verifiably) enforce X-Prom-Label-Policy (%s): "
                          "label-restricted reads of %s are refused with 403", b.signal, b.url, new.detail,
                          b.signal)

    async def run(self, get_config: Callable[[], Config]) -> None:
        """Re-probe every ``probe_interval`` and as soon as the config object changes (a reload); the first
        probe is the caller's (``refresh`` at start-up)."""
        loop = asyncio.get_running_loop()
        probed = get_config()
        due = loop.time() + min((b.probe_interval for b in probed.forward_auth.enforcing.values()), default=300.0)
        while True:
            await asyncio.sleep(_CONFIG_POLL)
            cfg = get_config()
            if cfg is not probed or loop.time() >= due:
                try:
                    await self.refresh(cfg)
                except Exception:  # a probe must never kill its task
                    log.exception("forward-auth probe failed")
                probed = cfg
                every = min((b.probe_interval for b in cfg.forward_auth.enforcing.values()), default=300.0)
                due = loop.time() + every



def probe_of(extras: dict[str, Any]) -> EnforcementProbe:
    """The process's prober, kept in ``State.extras`` (created on first use)."""
    p = extras.get(_EXTRAS_KEY)
    if not isinstance(p, EnforcementProbe):
        p = extras[_EXTRAS_KEY] = EnforcementProbe()
    return p


def check(extras: dict[str, Any], cfg: Config, signal: str) -> None:
    """Refuse (403) a label-restricted read whose backend is not a verified enforcing one."""
    if probe_of(extras).verified(cfg, signal):
        return
    configured = signal in cfg.forward_auth.enforcing
    why = ("its backend has not (yet) passed the probe showing it enforces them" if configured
           else f"forward_auth.label_policies.{signal} names no backend that enforces them")
    raise ProxyError(403, f"this token's label policies need the gateway's own data path or a {signal} backend "
                     f"that enforces X-Prom-Label-Policy; {why}, so label-restricted reads through this proxy "
                     "are refused", "lbac_unenforced")
