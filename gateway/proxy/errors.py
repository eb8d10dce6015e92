"""Data-path errors in the Prometheus shape, so Grafana shows them: ``{"status":"error",...}``."""

from __future__ import annotations

import json

from aiohttp import web

_ERROR_TYPES = {400: "bad_data", 401: "unauthorized", 403: "forbidden", 404: "not_found", 405: "bad_request",
                413: "bad_data", 429: "too_many_requests", 502: "unavailable", 503: "unavailable",
                504: "timeout"}


class ProxyError(Exception):
    """A refusal or failure with its status; ``reason`` labels the refusal metric."""

    def __init__(self, status: int, message: str, reason: str = "", headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.reason = status, message, reason or _ERROR_TYPES.get(status, "error")
        self.headers = headers or {}


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    body = json.dumps({"status": "error", "errorType": _ERROR_TYPES.get(status, "error"), "error": message})
    return web.Response(status=status, text=body, content_type="application/json", headers=headers)
