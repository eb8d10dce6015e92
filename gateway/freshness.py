"""Read-through before the admin API and the page's sign-in decide (issue 12).

Their token checks are synchronous lookups in the snapshot; this middleware first asks the cache
to look up a token it does not know yet (a token created a moment ago through another worker or
replica), so that the check that follows sees it. Known tokens cost a dict lookup; the data path
does its own read-through in ``PolicyCache.identify`` and only pays a prefix test here.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Final

from aiohttp import web

from gateway.state import STATE

_ADMIN_PREFIXES: Final = ("/api/", "/v1/")
SIGNIN_PATH: Final = "/ui/signin"

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
