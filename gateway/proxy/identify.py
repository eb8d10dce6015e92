"""Credentials from the Authorization header: HTTP Basic (tenant ID, token) or Bearer (token)."""

from __future__ import annotations

import binascii

from gateway.proxy.errors import ProxyError

CHALLENGE = {"WWW-Authenticate": 'Basic realm="gateway"'}


def credentials(header: str | None) -> tuple[str, str | None]:
    """Return (token, basic username or None); ProxyError 401 for anything else."""
    if not header:
        raise ProxyError(401, "authentication required: use Basic auth (tenant ID, token) or a Bearer token",
                         "missing_credentials", CHALLENGE)
    kind, _, value = header.strip().partition(" ")
    kind = kind.lower()
    value = value.strip()
    if kind == "bearer" and value:
        return value, None
    if kind == "basic" and value:
        try:  # (base64.b64decode(validate=True) is this; a non-ASCII value fails its encode)
            decoded = binascii.a2b_base64(value.encode("ascii"), strict_mode=True).decode("utf-8")
        except (binascii.Error, UnicodeError):
            raise ProxyError(401, "malformed Basic credentials: not base64 of user:password",
                             "malformed_credentials", CHALLENGE) from None
        user, sep, password = decoded.partition(":")
        if not sep or not user or not password:
            raise ProxyError(401, "malformed Basic credentials: expected tenant ID and token",
                             "malformed_credentials", CHALLENGE)
        return password, user
    raise ProxyError(401, "unsupported Authorization scheme: use Basic or Bearer", "malformed_credentials",
                     CHALLENGE)
