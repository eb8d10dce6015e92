"""Admin API errors: JSON ``{"code", "message", "field"}`` with the right 4xx, never a stack trace."""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable

import asyncpg
from aiohttp import web

log = logging.getLogger("gateway.admin")


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, field: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.field = status, code, message, field
        self.headers = headers or {}


def bad_request(message: str, field: str | None = None) -> ApiError:
    return ApiError(400, "invalid_argument", message, field)


def json_error(status: int, code: str, message: str, field: str | None = None,
               headers: dict[str, str] | None = None) -> web.Response:
    body: dict[str, str] = {"code": code, "message": message}
    if field:
        body["field"] = field
    return web.Response(status=status, text=json.dumps(body), content_type="application/json", headers=headers)


#: The paths of Grafana Cloud's API (the Access Policies API and its read-only views): their errors
#: follow the Cloud's OpenAPI spec, the rest keep the gateway's own codes.
CLOUD_PREFIXES = ("/api/v1/accesspolicies", "/v1/accesspolicies", "/api/v1/tokens", "/v1/tokens",
                  "/api/instances", "/api/orgs/", "/api/stack-regions")
#: The spec's error ``code`` per status (``ErrorNotFound``, ``ErrorConflict``, ...). Invalid arguments are
#: ``409 Conflict`` there ("Invalid arguments: wrong or missing parameters"), as are taken names.
CLOUD_CODES = {401: "InvalidCredentials", 403: "Forbidden", 404: "NotFound", 409: "Conflict",
               503: "ServiceUnavailable"}


def is_cloud_path(path: str) -> bool:
    return path.startswith(CLOUD_PREFIXES) and not path.startswith("/api/v1/auditlog")


def cloud_dialect(path: str, status: int, code: str) -> tuple[int, str]:
    """(status, code) as the Cloud spec documents them for a Cloud path; unchanged elsewhere."""
    if not is_cloud_path(path):
        return status, code
    if status == 400:
        status = 409
    return status, CLOUD_CODES.get(status, code)


_STATUS_CODES = {400: "invalid_argument", 401: "unauthenticated", 403: "permission_denied", 404: "not_found",
                 405: "method_not_allowed", 409: "already_exists", 413: "payload_too_large",
                 415: "unsupported_media_type", 503: "unavailable"}


@web.middleware
async def error_middleware(request: web.Request,
                           handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
    """Map every failure of an admin handler to a JSON error and log it once."""
    try:
        return await handler(request)
    except ApiError as exc:
        status, code = cloud_dialect(request.path, exc.status, exc.code)
        log.info("admin %s %s -> %d %s: %s", request.method, request.path, status, code, exc.message)
        return json_error(status, code, exc.message, exc.field, exc.headers)
    except (OSError, TimeoutError, asyncpg.InterfaceError, asyncpg.PostgresConnectionError,
            asyncpg.CannotConnectNowError) as exc:
        log.warning("admin %s %s -> 503: database unavailable (%s)", request.method, request.path,
                    exc.__class__.__name__)
        status, code = cloud_dialect(request.path, 503, "unavailable")
        return json_error(status, code, "the policy database is unavailable; the data path keeps serving "
                          "from its snapshot. Retry shortly.", headers={"Retry-After": "5"})
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        status, code = cloud_dialect(request.path, exc.status, _STATUS_CODES.get(exc.status, "error"))
        message = exc.reason if exc.status != 413 else "request body too large"
        log.info("admin %s %s -> %d %s", request.method, request.path, status, code)
        allow = exc.headers.get("Allow")
        return json_error(status, code, message, headers={"Allow": allow} if allow is not None else None)


def refuse_other_methods(app: web.Application, first: int) -> None:
    """Every other method on the admin paths registered from resource number ``first`` on is a JSON 405
    with ``Allow``, not a request for the data path's catch-all route."""
    for resource in list(app.router.resources())[first:]:
        if isinstance(resource, web.Resource):
            allowed = frozenset(r.method for r in resource)

            async def not_allowed(request: web.Request, allowed: frozenset[str] = allowed) -> web.StreamResponse:
                raise web.HTTPMethodNotAllowed(request.method, allowed)

            resource.add_route("*", not_allowed)
