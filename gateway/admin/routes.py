"""The admin API's routes in their order: the Cloud-compatible routes (``gateway.admin.cloud``) before the
Access Policies / Tokens API (``gateway.admin.api``) they build on, so ``/accesspolicies/config`` wins over
``/accesspolicies/{id}``. Kept here so neither module imports the other both ways."""

from __future__ import annotations

from aiohttp import web

from gateway.admin import api, cloud, openapi
from gateway.admin.errors import refuse_other_methods


def add_routes(app: web.Application) -> None:
    first = len(app.router.resources())
    app.router.add_get("/api/openapi.json", openapi.serve)
    cloud.add_routes(app)  # first: /accesspolicies/config must win over /accesspolicies/{id}
    api.add_routes(app)
    refuse_other_methods(app, first)
