"""A client that asks a forward-auth service exactly as db-auth-gateway does, written from its Go source.

``pkg/auth/forward.go`` (``ForwardAuthenticator.Authenticate``): POST ``{"path","method","requiredScope"}``
(json.Marshal of ``authRequestBody``) to ``--forward-auth.url``, after copying every header of the original
request, then ``X-Forwarded-For`` set to the client IP (port stripped) and ``Content-Type: application/json``.
401 → ErrUnauthorized, 403 → ErrForbidden, 200 → parsed, anything else → an error (the proxy answers 502).
``pkg/auth/authenticator.go`` (``NewAuthResult``): ``X-Scope-OrgID`` must be a single header of ``|``-separated,
non-empty, unique tenant IDs; every ``X-Prom-Label-Policy`` value is split on ``,``, each entry at its first
``:`` into a non-empty tenant and a ``url.PathUnescape``d selector that ``ParseMetricSelector`` accepts, and
its tenant must be one of the tenant IDs. ``AuthResultHeaders`` re-emits them as ``tenant:PathEscape(sel)``.
The response's other headers, minus Content-Length/-Type/-Encoding, Transfer-Encoding, Date and Server,
travel upstream as extra headers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from tests.loki_lbac import PolicyHeaderError, parse_metric_selector, path_unescape

_STRIPPED = {"content-length", "content-type", "content-encoding", "transfer-encoding", "date", "server"}


class Unauthorized(Exception):
    pass


class Forbidden(Exception):
    pass


class InvalidResult(Exception):
    """What makes db-auth-gateway answer 502 (ErrInvalidTenant / ErrInvalidPolicy / unexpected status)."""


@dataclass
class AuthResult:
    tenant_ids: list[str]
    label_policies: list[tuple[str, list[tuple[str, str, str]]]]  # (tenant, matchers)
    extra_headers: dict[str, list[str]] = field(default_factory=dict)


def _tenant_ids(values: list[str]) -> list[str]:
    if len(values) > 1:
        raise InvalidResult("X-Scope-OrgID must not be set more than once")
    ids: list[str] = []
    for value in values:
        for tid in value.split("|"):
            tid = tid.strip()
            if not tid or tid in ids:
                raise InvalidResult(f"X-Scope-OrgID: empty or duplicate tenant ID in {value!r}")
            ids.append(tid)
    if not ids:
        raise InvalidResult("no tenant ID specified")
    return ids


def _policies(values: list[str]) -> list[tuple[str, list[tuple[str, str, str]]]]:
    out = []
    for value in values:
        for entry in value.split(","):
            entry = entry.strip()
            tenant, sep, encoded = entry.partition(":")
            if not entry or not sep or not tenant:
                raise InvalidResult(f"invalid X-Prom-Label-Policy entry {entry!r}")
            try:
                out.append((tenant, parse_metric_selector(path_unescape(encoded))))
            except PolicyHeaderError as exc:
                raise InvalidResult(str(exc)) from None
    return out


async def authenticate(session: aiohttp.ClientSession, url: str, method: str, path: str, required_scope: str,
                       headers: dict[str, str], client_ip: str) -> AuthResult:
    """``ForwardAuthenticator.Authenticate`` for a request ``method path`` with ``headers`` from ``client_ip``."""
    sub = dict(headers)
    sub["X-Forwarded-For"] = client_ip
    sub["Content-Type"] = "application/json"
    body = json.dumps({"path": path, "method": method, "requiredScope": required_scope}, separators=(",", ":"))
    async with session.post(url, data=body.encode(), headers=sub) as resp:
        await resp.read()
        if resp.status == 401:
            raise Unauthorized()
        if resp.status == 403:
            raise Forbidden()
        if resp.status != 200:
            raise InvalidResult(f"forward auth: unexpected status {resp.status}")
        ids = _tenant_ids(resp.headers.getall("X-Scope-OrgID", []))
        policies = _policies(resp.headers.getall("X-Prom-Label-Policy", []))
        for tenant, _ in policies:
            if tenant not in ids:
                raise InvalidResult(f"label policy tenant {tenant!r} not in authorised tenant list")
        extra: dict[str, Any] = {}
        for k, v in resp.headers.items():
            if k.lower() not in _STRIPPED:
                extra.setdefault(k.lower(), []).append(v)
        return AuthResult(ids, policies, extra)
