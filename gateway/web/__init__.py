"""The Access Policies page under ``/ui/``, served by the gateway itself with aiohttp-jinja2.

A sub-application: its own middlewares (HTML errors, the session cookie, security headers)
never touch the data path, and every ``/ui`` path is answered here, so none reaches the proxy.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from datetime import datetime
from pathlib import Path

import aiohttp_jinja2
import jinja2
from aiohttp import web

from gateway.admin import text
from gateway.admin.errors import ApiError
from gateway.policy.scopes import enforced
from gateway.state import STATE
from gateway.web import datasources, pages
from gateway.web import session as sess
from gateway.web.session import WEB, PageError, WebState

log = logging.getLogger("gateway.web")
PREFIX = "/ui"
_HERE = Path(__file__).parent
_CSP = ("default-src 'none'; style-src 'self'; script-src 'self'; img-src 'self'; form-action 'self'; "
        "frame-ancestors 'none'; base-uri 'none'")


@web.middleware
async def _guard(request: web.Request,
                 handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
    """HTML for every failure, the session cookie saved, and headers that keep pages private and unframed."""
    try:
        resp = await _unstorable(request) or await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        resp = await pages.render_error(request, PageError(exc.status, exc.reason, exc.reason))
    except Exception:
        log.exception("page %s %s failed", request.method, request.path)
        resp = await pages.render_error(request, PageError(500, "Internal error",
                                                           "Something went wrong; the gateway's log has the details."))
    if isinstance(resp, web.Response) and not resp.prepared:
        await sess.save_session(request, resp)
        if sess.COOKIE in resp.cookies and sess.is_https(request):
            resp.cookies[sess.COOKIE]["secure"] = True
    resp.headers["X-Content-Type-Options"] = "nosniff"
    resp.headers["Referrer-Policy"] = "same-origin"
    if not request.path.startswith(f"{PREFIX}/static/"):
        resp.headers["Content-Security-Policy"] = _CSP
        resp.headers["X-Frame-Options"] = "DENY"
        resp.headers["Cache-Control"] = "no-store"  # pages show admin data, and once a token's secret
    return resp


async def _unstorable(request: web.Request) -> web.StreamResponse | None:
    """A 400 page for a query or path parameter the store cannot hold (NUL, a lone surrogate), before any
    handler reads it: the API's check (:mod:`gateway.admin.text`). Form fields are the validators' (which
    use the same check), so the error shows beside its field."""
    try:
        text.check_params(request.query, request.match_info)
    except ApiError as exc:
        return await pages.render_error(request, PageError(400, "Bad request", exc.message))
    return None


def _when(value: datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M UTC") if value else "—"


async def _load_key(ui: web.Application) -> None:
    ui[WEB].storage = sess.make_storage(await sess.load_key(ui[STATE].store))


def setup(app: web.Application) -> None:
    """Mount the page at ``/ui`` on ``app`` (before the data path's catch-all route)."""
    ui = web.Application(middlewares=[_guard])
    ui[WEB] = WebState()
    ui[STATE] = app[STATE]  # the same object: reloads swap its config in place
    env = aiohttp_jinja2.setup(ui, loader=jinja2.FileSystemLoader(str(_HERE / "templates")), autoescape=True,
                               undefined=jinja2.StrictUndefined, filters={"when": _when})
    env.tests["enforced"] = enforced  # {% if s is enforced %}: a scope the gateway grants something for
    datasources.add_routes(ui)  # before the page's catch-all route
    pages.add_routes(ui, _HERE / "static")
    ui.on_startup.append(_load_key)
    app.add_subapp(PREFIX, ui)
