"""Base URLs that pin the backend: every path under `/mimir`, `/loki` or `/tempo` goes to that backend.

Unprefixed, one path has one backend, and a few paths are served by two (`/prometheus/api/v1/rules`
by Mimir and by Loki's ruler, `/api/prom/rules` by Loki and by a Cortex-style ruler): there the
unprefixed tables pick one. A Grafana data source whose URL ends in its backend's prefix sends every
request, whatever path Grafana adds, to that backend. The prefix is stripped; the rest goes upstream
exactly as sent.
"""

from __future__ import annotations

import dataclasses

from gateway.routes import _PARAM, Route, loki, mimir, otlp, tempo


def pin(prefix: str, routes: tuple[Route, ...]) -> tuple[Route, ...]:
    """``routes`` served under ``prefix``, each sent upstream to the path it is sent to unprefixed."""

    def upstream(r: Route) -> str:
        return r.upstream_path or _PARAM.sub(lambda m: "{" + m.group(1) + "}", r.pattern)

    return tuple(dataclasses.replace(r, pattern=prefix + r.pattern, upstream_path=upstream(r)) for r in routes)


def _otlp(backend: str) -> tuple[Route, ...]:
    return tuple(r for r in otlp.ROUTES if r.backend == backend)


#: The prefix of each backend's pinned base URL.
PREFIXES: dict[str, str] = {"metrics": "/mimir", "logs": "/loki", "traces": "/tempo"}

ROUTES: tuple[Route, ...] = (
    pin("/mimir", mimir.ROUTES + mimir.PINNED_ONLY + _otlp("metrics"))
    + pin("/loki", loki.ROUTES + loki.PINNED_ONLY + _otlp("logs"))
    + pin("/tempo", tempo.ROUTES + _otlp("traces"))
)
