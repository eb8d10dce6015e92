"""The refusal every stage raises: a status, a message and a reason, with no HTTP framework attached.

Kept at the bottom of the package graph so that decide (``gateway.proxy.decide``), the planners
(``gateway.lbac``) and the transports (``gateway.proxy.forward``) raise the same type without an import
that runs back up; the edge (``gateway.proxy.errors.error_response``) answers it in the Prometheus shape.

    raise ProxyError(403, "token lacks the metrics:read scope", "missing_scope")
"""

from __future__ import annotations

from typing import Final

ERROR_TYPES: Final = {400: "bad_data", 401: "unauthorized", 403: "forbidden", 404: "not_found", 405: "bad_request",
                      413: "bad_data", 429: "too_many_requests", 502: "unavailable", 503: "unavailable",
                      504: "timeout"}


class ProxyError(Exception):
    """A refusal or failure with its status; ``reason`` labels the refusal metric."""

    def __init__(self, status: int, message: str, reason: str = "", headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.reason = status, message, reason or ERROR_TYPES.get(status, "error")
        self.headers = headers or {}
        self.lbac: str | None = None  # the LBAC mode of a narrowed read refused after it was chosen (access log)


def body_too_large(limit: int) -> ProxyError:
    """The body limit's refusal (the one place it is worded: read bounded, streamed, or announced)."""
    return ProxyError(413, f"request body exceeds {limit} bytes", "body_too_large")


def check_body_length(length: int | None, limit: int) -> None:
    """Refuse a body whose announced or read length is past ``limit`` bytes."""
    if length is not None and length > limit:
        raise body_too_large(limit)
