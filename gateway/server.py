"""Process lifecycle: start, listen, reload config on SIGHUP or file change, drain on SIGTERM, exit 0.

With ``--workers N`` a parent process starts the embedded database (if any) and forks N
workers that share the port through SO_REUSEPORT; it forwards signals and restarts a worker
that dies. Each worker holds its own policy snapshot, fed by the same NOTIFY channel.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import time
from dataclasses import replace
from pathlib import Path

from aiohttp import web

from gateway import heap
from gateway.app import build_app, build_metrics_app, close_state, open_state
from gateway.config import Config, ConfigError, load_config
from gateway.dataplane import DataPlane, Settings
from gateway.edge import GuardedAppRunner
from gateway.lbac.probe import probe_of
from gateway.limits import shared as limits_table
from gateway.metrics import RELOAD_OK, RELOAD_TIME, forget_process
from gateway.state import State

log = logging.getLogger("gateway")
WATCH_INTERVAL = 2.0


def reload_config(state: State, path: str) -> bool:
    """Swap in a valid new config for new requests; keep the running one when the file is bad."""
    try:
        new = load_config(path)
    except ConfigError as exc:
        for problem in exc.problems:
            log.error("config reload refused: %s", problem)
        RELOAD_OK.set(0)
        return False
    old = state.config
    if new.listen != old.listen or new.metrics_listen != old.metrics_listen:
        log.warning("config reload: listen addresses change only on restart; keeping %s", old.listen)
    if replace(new.database, url=old.database.url if not new.database.url else new.database.url) != old.database:
        log.warning("config reload: database settings change only on restart; keeping the running ones")
    state.config = replace(new, listen=old.listen, metrics_listen=old.metrics_listen, database=old.database,
                           data_dir=old.data_dir)
    RELOAD_OK.set(1)
    RELOAD_TIME.set(time.time())
    probe_of(state.extras).kick()  # a reload may point header mode at another backend: verify it again
    log.info("config reloaded from %s: %d orgs, upstreams: %s", path, len(new.orgs), ", ".join(new.upstreams))
    return True


def _stamp(path: str) -> tuple[float, int] | None:
    try:
        st = Path(path).stat()
    except OSError:
        return None
    return st.st_mtime, st.st_size


async def _watch(state: State, path: str) -> None:
    """Reload when the file changes (Kubernetes ConfigMaps are swapped by symlink: stat follows it)."""
    last = _stamp(path)
    while True:
        await asyncio.sleep(WATCH_INTERVAL)
        now = _stamp(path)
        if now is not None and now != last:
            last = now
            reload_config(state, path)


async def run(cfg: Config, config_path: str | None = None, reuse_port: bool = False,
              stop: asyncio.Event | None = None) -> int:
    """Serve until SIGTERM/SIGINT (or ``stop``); returns the exit status."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    RELOAD_OK.set(1)  # in this process: a forked worker's gauges start from 0, not the parent's values
    RELOAD_TIME.set(time.time())
    state = await open_state(cfg)
    tasks: list[asyncio.Task[None]] = []
    if config_path:
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signal.SIGHUP, reload_config, state, config_path)
        tasks.append(asyncio.create_task(_watch(state, config_path)))
    app = build_app(state)
    # The first snapshot and what start-up built live as long as the worker: frozen, a full collection
    # no longer walks 100,000 tokens (tens of ms each time; a resync keeps these objects for unchanged rows);
    # young objects collected every 50,000 allocations, not 700 (gateway/heap.py).
    heap.settle()
    runner = GuardedAppRunner(app, lambda: state.config.limits, access_log=None, handle_signals=False,
                              shutdown_timeout=cfg.shutdown.drain_timeout)  # read deadlines, connection cap
    await runner.setup()
    host, port = cfg.listen
    lim = cfg.limits  # the same `limits:` as the aiohttp server's GuardedAppRunner
    # gateway/dataplane serves the data path; it hands the rest of the traffic to `runner`
    site = DataPlane(app, runner.server, Settings(head_timeout=lim.head_timeout, body_timeout=lim.body_idle_timeout,
                                                  max_connections=lim.max_connections))
    await site.start(host, port, reuse_port=reuse_port)
    metrics_runner = None
    if cfg.metrics_listen:
        metrics_runner = web.AppRunner(build_metrics_app(state), access_log=None, handle_signals=False)
        await metrics_runner.setup()
        await web.TCPSite(metrics_runner, *cfg.metrics_listen, reuse_port=reuse_port or None).start()
    log.info("gateway listening on http://%s:%d (pid %d; policies: %d, tokens: %d)", host, port, os.getpid(),
             len(state.cache.policies), len(state.cache.tokens))
    await stop.wait()
    state.draining = True
    delay, drain = state.config.shutdown.delay, state.config.shutdown.drain_timeout
    if delay:
        log.info("stopping: /ready answers 503; still serving for %.1fs so load balancers move away", delay)
        await asyncio.sleep(delay)
    # Close the listener ourselves and wait for in-flight requests: aiohttp's own shutdown stops
    # reading request bodies at once, which would cut a streamed push or a tail short.
    await site.stop_listening()
    log.info("stopping: listener closed; draining %d in-flight requests (up to %.0fs)", state.in_flight, drain)
    if state.in_flight:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(state.idle.wait(), drain)
    if state.in_flight:
        log.warning("drain timeout: cutting %d requests still in flight", state.in_flight)
    for t in tasks:
        t.cancel()
    await site.close()
    await runner.cleanup()
    if metrics_runner:
        await metrics_runner.cleanup()
    await close_state(state)
    log.info("stopped")
    return 0


def _use_uvloop() -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def _worker(cfg: Config, config_path: str | None) -> None:
    """Body of a forked worker: never returns."""
    code = 1
    try:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, signal.SIG_DFL)
        _use_uvloop()
        code = asyncio.run(run(cfg, config_path, reuse_port=True))
    except Exception:
        log.exception("worker %d failed", os.getpid())
    finally:
        os._exit(code)


def _supervise(cfg: Config, config_path: str | None, workers: int) -> int:
    children: dict[int, float] = {}
    stopping = False

    def spawn() -> None:
        pid = os.fork()
        if pid == 0:
            _worker(cfg, config_path)
        children[pid] = time.monotonic()

    def forward(signum: int, _frame: object) -> None:
        nonlocal stopping
        if signum in (signal.SIGTERM, signal.SIGINT):
            stopping = True
        for pid in list(children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM if signum == signal.SIGINT else signum)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, forward)
    forget_process(os.getpid())  # the gauges are the workers' (each publishes its own)
    # What is imported so far is the workers' too, copy-on-write: frozen, the collector never writes into
    # those objects' headers in a worker, so their pages stay shared (bench scale run: PSS 301 -> 280 MB).
    gc.collect()
    gc.freeze()
    for _ in range(workers):
        spawn()
    log.info("started %d workers: %s", workers, ", ".join(map(str, children)))
    status = 0
    while children:
        try:
            pid, raw = os.wait()
        except ChildProcessError:
            break
        except InterruptedError:  # pragma: no cover - PEP 475 retries, kept for clarity
            continue
        started = children.pop(pid, None)
        forget_process(pid)
        code = os.waitstatus_to_exitcode(raw)
        if stopping:
            status = status or (code if code > 0 else 0)
            continue
        log.error("worker %d exited with %d; restarting it", pid, code)
        if started is not None and time.monotonic() - started < 1.0:
            time.sleep(1.0)  # a worker that dies at start must not spin the machine
        spawn()
    return status


def serve(cfg: Config, config_path: str | None = None, workers: int = 1) -> int:
    """Entry point of ``gateway serve``."""
    from gateway import runfile
    from gateway.startup import preflight  # port, data_dir, database: one line each instead of a traceback
    database = runfile.database_of(cfg)
    cfg = replace(cfg, database=replace(cfg.database, url=preflight(cfg, config_path)))
    if config_path:
        runfile.write(config_path, cfg, database)
    n = workers if workers > 0 else (os.cpu_count() or 1)
    limits_table.init()  # before the fork: every worker counts against the same limits
    if n == 1:
        _use_uvloop()
        return asyncio.run(run(cfg, config_path))
    return _supervise(cfg, config_path, n)
