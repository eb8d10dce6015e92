"""Read-through before the admin API and the page's sign-in decide (issue 12), and no acknowledged
write while this worker cannot hear changes (issue 23).

Their token checks are synchronous lookups in the snapshot; this middleware first asks the cache
to look up a token it does not know yet (a token created a moment ago through another worker or
replica), so that the check that follows sees it. Known tokens cost a dict lookup; the data path
does its own read-through in ``PolicyCache.identify`` and only pays a prefix test here.

While this worker's change feed is down (its LISTEN connection lost, or not yet resynced after a
reconnect), the admin API and the page's writes answer 503 with ``Retry-After: 1``, as ``/ready``'s
``database: unreachable`` and ``gateway_database_up 0`` say at that moment: the API never
acknowledges a write in a state it reports as "database unreachable".
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Final

from aiohttp import web

from gateway.admin.errors import ApiError
from gateway.proxy.handler import handle as data_path_handler
from gateway.state import STATE

_ADMIN_PREFIXES: Final = ("/api/", "/v1/")
SIGNIN_PATH: Final = "/ui/signin"
_PAGE_PREFIX: Final = "/ui/"
_SAFE_METHODS: Final = frozenset({"GET", "HEAD", "OPTIONS"})

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def read_through_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    path = request.path
    presented: object = None
    if path.startswith(_ADMIN_PREFIXES):
        kind, _, value = request.headers.get("Authorization", "").partition(" ")
        if kind.lower() == "bearer":
            presented = value
    elif path == SIGNIN_PATH and request.method == "POST" and request.content_type in (
            "application/x-www-form-urlencoded", "multipart/form-data"):
        presented = (await request.post()).get("token")  # parsed once: the handler reads the same form
    if isinstance(presented, str) and presented.strip():
        await request.config_dict[STATE].cache.read_through(presented.strip())
    return await handler(request)


@web.middleware
async def database_gate_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """503 for the admin API, and for the page's writes, while this worker's change feed is down (never
    for the data path: ``/api/v1/push`` and the like keep serving from the snapshot)."""
    path = request.path
    gated = path.startswith(_ADMIN_PREFIXES) or (path.startswith(_PAGE_PREFIX) and request.method not in _SAFE_METHODS)
    if gated and not request.config_dict[STATE].cache.db_ok and request.match_info.handler is not data_path_handler:
        raise ApiError(503, "unavailable", "the policy database is unreachable from this gateway worker (see /ready);"
                       " retry shortly", headers={"Retry-After": "1"})
    return await handler(request)
