"""How each kind of proxy tells the auth service which request it is asking about, and what it understands.

| caller          | original method and path                                   | query seen | answers it understands |
|-----------------|------------------------------------------------------------|------------|------------------------|
| db-auth-gateway | POST JSON ``{path, method, requiredScope}``                 | no         | 200, 401, 403          |
| nginx           | ``X-Original-Method`` + ``X-Original-URI`` (or ``-URL``)    | yes        | 2xx, 401, 403          |
| ingress-nginx   | ``X-Original-Method`` + ``X-Original-URL`` (or ``-URI``)    | yes        | 2xx, 401, 403          |
| traefik         | ``X-Forwarded-Method`` + ``X-Forwarded-Uri``                | yes        | any (relayed)          |
| envoy           | the check request's own method; its path after the prefix  | yes        | any (relayed)          |

db-auth-gateway (``pkg/auth/forward.go``) copies the original headers onto its POST and answers anything but
200/401/403 with 502; nginx's ``auth_request`` treats anything but 2xx/401/403 as an error (500). So for
those a refusal is always 401 or 403 (``deny_only``). db-auth-gateway takes repeated X-Prom-Label-Policy
headers; nginx before 1.23 keeps only the first of repeated upstream headers in ``$upstream_http_*``, so
the others get one comma-joined header (Loki's ``pkg/labelaccess`` splits values on ``,``; selectors are
PathEscaped, so a ``,`` inside one is ``%2C``).
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Final
from urllib.parse import urlsplit

from aiohttp import web

from gateway.errors import ProxyError

MAX_BODY: Final = 4096  # db-auth-gateway's JSON is three short strings
ENVOY_PREFIX: Final = "/forward-auth/envoy"


@dataclass(frozen=True, slots=True)
class Original:
    """The request the proxy asks about. ``query`` None: the caller does not send it."""

    method: str
    path: str  # raw (still percent-encoded where the caller sends it so)
    query: str | None
    required_scope: str | None = None


def _bad(message: str) -> ProxyError:
    return ProxyError(400, f"forward-auth request: {message}", "bad_forward_auth_request")


def _split_uri(uri: str) -> tuple[str, str]:
    """``/path?query`` or an absolute URL → (raw path, raw query)."""
    if uri.startswith(("http://", "https://")):
        parts = urlsplit(uri)
        return parts.path or "/", parts.query
    path, _, query = uri.partition("?")
    return path, query


def _header(request: web.Request, *names: str) -> str:
    for name in names:
        value = request.headers.get(name)
        if value:
            return value.strip()
    raise _bad(f"the {' or '.join(names)} header is missing: configure the proxy to send it")


async def _db_auth_gateway(request: web.Request) -> Original:
    if request.method != "POST":
        raise _bad("db-auth-gateway POSTs its JSON sub-request")
    if request.content_length is not None and request.content_length > MAX_BODY:
        raise _bad(f"body exceeds {MAX_BODY} bytes")
    raw = await request.content.read(MAX_BODY + 1)
    if len(raw) > MAX_BODY:
        raise _bad(f"body exceeds {MAX_BODY} bytes")
    try:
        doc = json.loads(raw)
    except ValueError:
        raise _bad("body is not JSON") from None
    if not isinstance(doc, dict) or not all(isinstance(doc.get(k), str) and doc[k]
                                            for k in ("path", "method", "requiredScope")):
        raise _bad('body must be {"path", "method", "requiredScope"} (non-empty strings)')
    return Original(doc["method"].upper(), doc["path"], None, doc["requiredScope"])


async def _nginx(request: web.Request) -> Original:
    path, query = _split_uri(_header(request, "X-Original-URI", "X-Original-URL"))
    return Original(_header(request, "X-Original-Method").upper(), path, query)


async def _ingress_nginx(request: web.Request) -> Original:
    path, query = _split_uri(_header(request, "X-Original-URL", "X-Original-URI", "X-Forwarded-Uri"))
    return Original(_header(request, "X-Original-Method").upper(), path, query)


async def _traefik(request: web.Request) -> Original:
    path, query = _split_uri(_header(request, "X-Forwarded-Uri"))
    return Original(_header(request, "X-Forwarded-Method").upper(), path, query)


async def _envoy(request: web.Request) -> Original:
    path = request.rel_url.raw_path[len(ENVOY_PREFIX):]
    if not path.startswith("/"):
        raise _bad(f"Envoy's http_service path_prefix must be {ENVOY_PREFIX}")
    return Original(request.method, path, request.rel_url.raw_query_string)


@dataclass(frozen=True, slots=True)
class Caller:
    kind: str  # the metric label and the access log's ``forward_auth`` field
    read: Callable[[web.Request], Awaitable[Original]]
    deny_only: bool  # the proxy understands only 401 and 403 as refusals
    joined_policies: bool  # one comma-joined X-Prom-Label-Policy header instead of one per selector
    strip_headers: bool = False  # Envoy: list the request headers to drop (x-envoy-auth-headers-to-remove)


CALLERS: Final = {c.kind: c for c in (
    Caller("db-auth-gateway", _db_auth_gateway, deny_only=True, joined_policies=False),
    Caller("nginx", _nginx, deny_only=True, joined_policies=True),
    Caller("ingress-nginx", _ingress_nginx, deny_only=True, joined_policies=True),
    Caller("traefik", _traefik, deny_only=False, joined_policies=True),
    Caller("envoy", _envoy, deny_only=False, joined_policies=True, strip_headers=True),
)}
