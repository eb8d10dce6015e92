"""The edge of a worker for the aiohttp server (issue 12): read deadlines and a connection cap.

aiohttp bounds an idle keep-alive connection but not a client that trickles its request: a head sent
one byte at a time, or a body that pauses forever, holds a connection (and a handler) as long as the
client likes. Here, per connection:

- the request head must arrive within ``limits.head_timeout`` of its first byte (or of the connection
  opening): otherwise a 408 with a JSON body, and the connection closes;
- while a handler waits for body bytes, the client may pause at most ``limits.body_idle_timeout``
  between chunks: otherwise the connection closes (the handler is cancelled with it). A pause caused by
  the gateway itself (its buffer full, reading paused, bytes not yet consumed) does not count;
- a worker holds at most ``limits.max_connections`` connections: one more gets a 503 with a JSON body
  and ``Retry-After``, and is closed at once.

This hooks aiohttp's request handler (``RequestHandler``; aiohttp's minor version is pinned).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Final, cast

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from gateway.config import Limits
from gateway.metrics import REFUSALS

log = logging.getLogger("gateway.edge")
_REASONS: Final = {408: "Request Timeout", 503: "Service Unavailable"}


def raw_response(status: int, message: str, headers: dict[str, str] | None = None) -> bytes:
    """A complete HTTP/1.1 error response with a JSON body, for a connection about to be closed."""
    body = json.dumps({"status": "error", "error": message}).encode()
    head = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}", "Content-Type: application/json",
            f"Content-Length: {len(body)}", "Connection: close",
            *(f"{k}: {v}" for k, v in (headers or {}).items())]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


class GuardedRequestHandler(RequestHandler):
    """aiohttp's per-connection protocol, with the deadlines and the cap above."""

    def __init__(self, manager: web.Server, limits: Callable[[], Limits], **kwargs: Any):
        super().__init__(manager, **kwargs)
        self._limits = limits
        self._deadline: asyncio.TimerHandle | None = None
        self._last_data = 0.0
        self._refused = False

    # ---- the connection -------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        limits = self._limits()
        manager: Any = self._manager
        if len(manager._connections) >= limits.max_connections:
            self._refused = True
            REFUSALS.labels("too_many_connections").inc()
            log.warning("refusing a connection: this worker already holds %d (limits.max_connections)",
                        limits.max_connections)
            transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
            transport.write(raw_response(503, "too many connections to this gateway worker; retry shortly",
                                         {"Retry-After": "1"}))
            transport.close()
            return
        super().connection_made(transport)
        self._arm(limits.head_timeout, self._head_expired)

    def connection_lost(self, exc: BaseException | None) -> None:
        self._disarm()
        if not self._refused:
            super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        self._last_data = self._loop.time()
        if self._deadline is None and self._current_request is None and not self._messages:
            self._arm(self._limits().head_timeout, self._head_expired)  # first byte of the next head
        super().data_received(data)

    async def _handle_request(self, request: web.BaseRequest, start_time: float | None,
                              request_handler: Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]
                              ) -> tuple[web.StreamResponse, bool]:
        self._disarm()  # the head is complete
        self._last_data = self._loop.time()
        if not request.content.is_eof():
            self._arm(self._limits().body_idle_timeout, self._body_check)
        try:
            return await super()._handle_request(request, start_time, request_handler)
        finally:
            self._disarm()

    # ---- the deadlines --------------------------------------------------------------------------

    def _arm(self, delay: float, callback: Callable[[], None]) -> None:
        self._disarm()
        self._deadline = self._loop.call_later(delay, callback)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _head_expired(self) -> None:
        self._deadline = None
        if self._current_request is not None or self._messages or self.transport is None:
            return
        timeout = self._limits().head_timeout
        REFUSALS.labels("head_timeout").inc()
        log.info("closing a connection from %s: no complete request head within %.0fs (limits.head_timeout)",
                 _peer(self), timeout)
        self.transport.write(raw_response(408, f"request head not received within {timeout:g}s"))
        self.force_close()

    def _body_check(self) -> None:
        self._deadline = None
        request = self._current_request
        if request is None or request.content.is_eof() or self.transport is None:
            return
        idle = self._limits().body_idle_timeout
        waited = self._loop.time() - self._last_data
        content: Any = request.content
        if waited < idle or self._reading_paused or content._size:  # the client is not the slow one
            self._arm(max(idle - waited, 0.05) if waited < idle else idle, self._body_check)
            return
        REFUSALS.labels("body_timeout").inc()
        log.info("closing a connection from %s: %s %s sent no body bytes for %.0fs (limits.body_idle_timeout)",
                 _peer(self), request.method, request.path, idle)
        self.force_close()


def _peer(handler: RequestHandler) -> str:
    peer = handler.transport.get_extra_info("peername") if handler.transport is not None else None
    return str(peer[0]) if isinstance(peer, tuple) and peer else "?"


class GuardedServer(web.Server):
    """aiohttp's connection factory, making ``GuardedRequestHandler`` connections."""

    limits: Callable[[], Limits]

    def __call__(self) -> RequestHandler:
        return GuardedRequestHandler(self, self.limits, loop=self._loop, **self._kwargs)


class GuardedAppRunner(web.AppRunner):
    """``web.AppRunner`` whose server guards its connections; ``limits`` is read for each connection
    (a config reload applies to new connections)."""

    def __init__(self, app: web.Application, limits: Callable[[], Limits], **kwargs: Any):
        super().__init__(app, **kwargs)
        self._guard_limits = limits

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        server.__class__ = GuardedServer
        server.limits = self._guard_limits  # type: ignore[attr-defined]
        return server
