"""Credentials from the Authorization header: HTTP Basic (tenant ID, token) or Bearer (token)."""

from __future__ import annotations

import binascii
from typing import Final

from gateway.proxy.errors import ProxyError

CHALLENGE = {"WWW-Authenticate": 'Basic realm="gateway"'}
_BASIC: Final = "Basic "  # how clients spell the scheme: read without the general parse (the same result)
_A2B: Final = binascii.a2b_base64


def credentials(header: str | None) -> tuple[str, str | None]:
    """Return (token, basic username or None); ProxyError 401 for anything else."""
    if not header:
        raise ProxyError(401, "authentication required: use Basic auth (tenant ID, token) or a Bearer token",
                         "missing_credentials", CHALLENGE)
    if header.startswith(_BASIC):
        value = header[6:].strip()
    else:
        kind, _, value = header.strip().partition(" ")
        kind = kind.lower()
        value = value.strip()
        if kind == "bearer" and value:
            return value, None
        if kind != "basic":
            value = ""
    if not value:
        raise ProxyError(401, "unsupported Authorization scheme: use Basic or Bearer", "malformed_credentials",
                         CHALLENGE)
    try:  # (base64.b64decode(validate=True) is this; a non-ASCII value, bad base64, not UTF-8: ValueErrors)
        decoded = _A2B(value, strict_mode=True).decode("utf-8")
    except ValueError:
        raise ProxyError(401, "malformed Basic credentials: not base64 of user:password",
                         "malformed_credentials", CHALLENGE) from None
    user, sep, password = decoded.partition(":")
    if not sep or not user or not password:
        raise ProxyError(401, "malformed Basic credentials: expected tenant ID and token",
                         "malformed_credentials", CHALLENGE)
    return password, user
