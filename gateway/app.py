"""Wiring: open the store, load the cache, build the aiohttp application."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from gateway import runtime
from gateway.accesslog import AccessLog
from gateway.admin import datasources as datasources_api
from gateway.admin import routes as admin_routes
from gateway.admin.errors import error_middleware
from gateway.cache import PolicyCache
from gateway.config import Config
from gateway.forwardauth import enforcement as forward_auth_enforcement
from gateway.forwardauth.handler import add_routes as add_forward_auth_routes
from gateway.freshness import database_gate_middleware, read_through_middleware
from gateway.lbac import pool as rewrite_pool
from gateway.lbac.probe import probe_of
from gateway.metrics import CACHE_AGE, CACHE_POLICIES, CACHE_TOKENS, DB_UP, exposition
from gateway.proxy import budget as merge_pool
from gateway.proxy.forward import Upstreams
from gateway.proxy.handler import ACCESS_LOG, UPSTREAMS
from gateway.proxy.handler import handle as proxy_handler
from gateway.state import STATE, State
from gateway.store import Store
from gateway.store.embedded import start_embedded
from gateway.tally import TALLY
from gateway.web import setup as setup_page

log = logging.getLogger("gateway")


async def resolve_dsn(cfg: Config) -> str:
    """The configured database, or the embedded PostgreSQL under data_dir."""
    if cfg.database.url:
        return cfg.database.url
    return await asyncio.get_running_loop().run_in_executor(None, start_embedded, cfg.data_dir)


async def open_state(cfg: Config, run_migrations: bool = True) -> State:
    dsn = await resolve_dsn(cfg)
    store = await Store.open(dsn, cfg.database, run_migrations=run_migrations)
    cache = PolicyCache(store, cfg.database.resync_interval, cfg.database.usage_flush_interval,
                        cfg.database.max_staleness, cfg.database.reconnect_max_backoff)
    await cache.start()
    return State(cfg, store, cache)


async def close_state(state: State) -> None:
    await state.cache.stop()
    await state.store.close()


async def health(_request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def ready(request: web.Request) -> web.Response:
    st = request.app[STATE]
    c = st.cache
    ok = c.loaded and not c.stale and not st.draining
    body = {
        "status": "ready" if ok else "not ready",
        "database": "ok" if c.db_ok else "unreachable",
        "detail": "draining" if st.draining else c.detail,
        "snapshotAgeSeconds": round(c.age, 3) if c.loaded else None,
        "policies": len(c.policies), "tokens": len(c.tokens),
        "lbac": probe_of(st.extras).status(st.config),  # header-mode upstreams: verified or refused
        "forwardAuth": forward_auth_enforcement.probe_of(st.extras).status(st.config),
    }
    return web.json_response(body, status=200 if ok else 503)


async def metrics(request: web.Request) -> web.Response:
    c = request.app[STATE].cache
    CACHE_POLICIES.set(len(c.policies))
    CACHE_TOKENS.set(len(c.tokens))
    CACHE_AGE.set(c.age if c.loaded else -1)
    DB_UP.set(1 if c.db_ok else 0)
    TALLY.flush()
    runtime.publish_gc()
    return web.Response(body=exposition() + runtime.exposition(), headers={"Content-Type": CONTENT_TYPE_LATEST})


_FAVICON = (Path(__file__).parent / "web" / "static" / "favicon.ico").read_bytes()


async def favicon(_request: web.Request) -> web.Response:
    """What every browser asks for: an answer here, not a refusal counted on the data path."""
    return web.Response(body=_FAVICON, content_type="image/vnd.microsoft.icon",
                        headers={"Cache-Control": "public, max-age=86400"})


async def root(request: web.Request) -> web.StreamResponse:
    """A browser opening the gateway's address lands on the page; API clients get the data path's 404."""
    if "text/html" in request.headers.get("Accept", ""):
        return web.Response(status=302, headers={"Location": "/ui/"})
    return await proxy_handler(request)


def build_app(state: State) -> web.Application:
    """The single application: health, /metrics, the admin API, and everything else to the data path
    (where the route tables decide: unknown paths answer 404)."""
    # auto_decompress off: the gateway checks and forwards the client's bytes as sent (a gzip push must
    # reach the backend still gzipped, and a compressed form must not be parsed inflated but sent deflated).
    # handler_cancellation on: a client that hangs up cancels its handler, and so the upstream call.
    app = web.Application(middlewares=[error_middleware, database_gate_middleware, read_through_middleware],
                          client_max_size=state.config.limits.max_admin_body,
                          handler_args={"auto_decompress": False, "handler_cancellation": True})
    app[STATE] = state
    app[UPSTREAMS] = Upstreams()
    app[ACCESS_LOG] = AccessLog()
    app.router.add_get("/health", health)
    app.router.add_get("/ready", ready)
    app.router.add_get("/favicon.ico", favicon)
    if state.config.metrics_listen is None:
        app.router.add_get("/metrics", metrics)
    admin_routes.add_routes(app)
    datasources_api.add_routes(app)
    setup_page(app)
    app.router.add_get("/", root)
    add_forward_auth_routes(app)
    app.router.add_route("*", "/{tail:.*}", proxy_handler)
    app.on_startup.append(_start_lbac_probe)
    app.on_startup.append(_start_runtime_publisher)
    app.on_cleanup.append(_close_upstreams)
    return app


_RUNTIME_TASK = web.AppKey("runtime_publisher", asyncio.Task[None])


async def _start_runtime_publisher(app: web.Application) -> None:
    """This worker's GC counts reach the shared /metrics files while other workers answer the scrapes."""
    await asyncio.to_thread(runtime.revision)  # git runs once, off the event loop, before the first scrape
    app[_RUNTIME_TASK] = asyncio.create_task(runtime.publish_periodically())


async def _start_lbac_probe(app: web.Application) -> None:
    """Probe header-mode upstreams before serving, then periodically (see gateway.lbac.probe)."""
    st = app[STATE]
    probe = probe_of(st.extras)
    await probe.refresh(st.config)
    probe.start(lambda: st.config)
    fa_probe = forward_auth_enforcement.probe_of(st.extras)
    await fa_probe.refresh(st.config)
    fa_probe.start(lambda: st.config)


def build_metrics_app(state: State) -> web.Application:
    app = web.Application()
    app[STATE] = state
    app.router.add_get("/metrics", metrics)
    return app


async def _close_upstreams(app: web.Application) -> None:
    if (task := app.get(_RUNTIME_TASK)) is not None:
        task.cancel()
    await probe_of(app[STATE].extras).stop()
    await forward_auth_enforcement.probe_of(app[STATE].extras).stop()
    rewrite_pool.shutdown()
    merge_pool.shutdown()
    app[ACCESS_LOG].flush()
    TALLY.flush()
    await app[UPSTREAMS].close()
