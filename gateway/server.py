"""Process lifecycle: start, listen, drain on SIGTERM, exit 0."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from dataclasses import replace

from aiohttp import web

from gateway.app import build_app, close_state, open_state
from gateway.config import Config

log = logging.getLogger("gateway")
DRAIN_TIMEOUT = 30.0


async def run(cfg: Config, config_path: str | None = None, reuse_port: bool = False,
              stop: asyncio.Event | None = None) -> int:
    """Serve until SIGTERM/SIGINT (or ``stop``); returns the exit status."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    state = await open_state(cfg)
    state.extras["config_path"] = config_path
    app = build_app(state)
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=DRAIN_TIMEOUT)
    await runner.setup()
    host, port = cfg.listen
    site = web.TCPSite(runner, host, port, reuse_port=reuse_port or None)
    await site.start()
    log.info("gateway listening on http://%s:%d (policies: %d, tokens: %d)", host, port,
             len(state.cache.policies), len(state.cache.tokens))
    await stop.wait()
    log.info("stopping: draining in-flight requests (up to %.0fs)", DRAIN_TIMEOUT)
    state.draining = True
    await runner.cleanup()
    await close_state(state)
    log.info("stopped")
    return 0


def _use_uvloop() -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def serve(cfg: Config, config_path: str | None = None, workers: int = 1) -> int:
    """Entry point of ``gateway serve``."""
    _use_uvloop()
    if not cfg.database.url:
        from gateway.store.embedded import start_embedded
        cfg = replace(cfg, database=replace(cfg.database, url=start_embedded(cfg.data_dir)))
    return asyncio.run(run(cfg, config_path))
