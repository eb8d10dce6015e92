"""Data-path errors in the Prometheus shape, so Grafana shows them: ``{"status":"error",...}``.

The error type itself lives in :mod:`gateway.errors` (every stage raises it); this is the edge that answers it.
"""

from __future__ import annotations

import json

from aiohttp import web

from gateway.errors import ERROR_TYPES, ProxyError

__all__ = ["ProxyError", "error_response", "internal_error"]


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    """``message`` repeats ``error`` for Grafana's Loki data source, which shows a JSON error's ``message``
    and otherwise the whole body (pkg/tsdb/loki/api.go ``makeLokiError``); Loki's own errors are plain text."""
    body = json.dumps({"status": "error", "errorType": ERROR_TYPES.get(status, "error"), "error": message,
                       "message": message})
    return web.Response(status=status, text=body, content_type="application/json", headers=headers)


def internal_error() -> web.Response:
    """The answer to a request whose handling crashed (the log has the traceback)."""
    body = json.dumps({"status": "error", "errorType": "internal", "error": "internal gateway error",
                       "message": "internal gateway error"})
    return web.Response(status=500, text=body, content_type="application/json")
