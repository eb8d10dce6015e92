"""The process's own series on /metrics: ``process_*`` per worker, ``python_*`` and ``gateway_build_info``.

prometheus_client's own collectors see only the process that serves the scrape, which with ``--workers N``
is one worker picked by the kernel. So, multiprocess-safe:

* ``process_*`` (CPU, memory, file descriptors, start time) are read from ``/proc/<pid>`` for every live
  worker at scrape time, one series per worker labelled ``pid``. The live workers are those with live
  gauge files in ``PROMETHEUS_MULTIPROC_DIR`` (the supervisor removes a dead worker's) whose parent is this
  worker's parent; without that directory, the one process.
* ``python_gc_*`` are counters in the shared files: each worker adds what its collector did since it was
  forked (published on every scrape it serves and every ``PUBLISH_SECONDS``), so they sum over all workers,
  those that have exited included, and never go back.
* ``python_info`` and ``gateway_build_info{version,revision}`` are the same in every worker.
"""

from __future__ import annotations

import asyncio
import gc
import os
import re
import subprocess
from collections.abc import Callable, Iterator
from functools import cache
from pathlib import Path
from typing import Final

from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from gateway import __version__
from gateway.metrics import REGISTRY

PUBLISH_SECONDS: Final = 5.0
_LIVE_FILE: Final = re.compile(r"gauge_live[a-z]+_(\d+)\.db")

GC_COLLECTED: Final = Counter("python_gc_objects_collected", "Objects collected during gc, all workers.",
                              ["generation"], registry=REGISTRY)
GC_UNCOLLECTABLE: Final = Counter("python_gc_objects_uncollectable",
                                  "Uncollectable objects found during gc, all workers.", ["generation"],
                                  registry=REGISTRY)
GC_COLLECTIONS: Final = Counter("python_gc_collections", "Times this generation was collected, all workers.",
                                ["generation"], registry=REGISTRY)
_GC_SERIES: Final = (("collected", GC_COLLECTED), ("uncollectable", GC_UNCOLLECTABLE),
                     ("collections", GC_COLLECTIONS))
_published: list[dict[str, int]] = [{} for _ in gc.get_stats()]
for _gen in range(len(_published)):  # every generation has its series from the start, at 0
    for _key, _counter in _GC_SERIES:
        _counter.labels(str(_gen))


def _forked() -> None:
    """A forked worker counts its own collections, not those its parent made before the fork."""
    global _published
    _published = [dict(s) for s in gc.get_stats()]


os.register_at_fork(after_in_child=_forked)


def publish_gc() -> None:
    """Add this process's collections since the last call to the shared counters."""
    for gen, stats in enumerate(gc.get_stats()):
        seen = _published[gen]
        for key, counter in _GC_SERIES:
            delta = stats[key] - seen.get(key, 0)
            if delta > 0:
                counter.labels(str(gen)).inc(delta)
            seen[key] = stats[key]


@cache
def revision() -> str:
    """The git commit this code runs from: ``GATEWAY_REVISION`` (set when an image is built), else what
    git says of the source checkout the package is imported from, else "unknown"."""
    given = os.environ.get("GATEWAY_REVISION", "").strip()
    if given:
        return given
    source = Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(["git", "-C", str(source), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out if re.fullmatch(r"[0-9a-f]{40,64}", out) else "unknown"


def worker_pids(multiproc_dir: str | None) -> list[int]:
    """This process alone, or every live worker of its supervisor (see the module docstring)."""
    if not multiproc_dir:
        return [os.getpid()]
    try:
        names = os.listdir(multiproc_dir)
    except OSError:
        return [os.getpid()]
    pids = {int(m.group(1)) for name in names if (m := _LIVE_FILE.fullmatch(name))} | {os.getpid()}
    return sorted(pid for pid in pids if pid == os.getpid() or _parent(pid) == os.getppid())


def _parent(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return int(f.read().rsplit(b")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def _constant(pid: int) -> Callable[[], int]:
    return lambda: pid


class RuntimeCollector(Collector):
    """``process_*`` per worker, ``python_info`` and ``gateway_build_info``, built at scrape time."""

    def __init__(self) -> None:
        self._process: dict[int, ProcessCollector] = {}

    def _processes(self) -> list[tuple[int, ProcessCollector]]:
        pids = worker_pids(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
        self._process = {pid: self._process.get(pid) or ProcessCollector(pid=_constant(pid), registry=None)
                         for pid in pids}
        return list(self._process.items())

    def collect(self) -> Iterator[Metric]:
        families: dict[str, Metric] = {}
        for pid, collector in self._processes():
            for metric in collector.collect():
                family = families.setdefault(metric.name, Metric(metric.name, metric.documentation, metric.type))
                for sample in metric.samples:
                    family.add_sample(sample.name, {**sample.labels, "pid": str(pid)}, sample.value)
        yield from families.values()
        yield from PlatformCollector(registry=None).collect()
        build = GaugeMetricFamily("gateway_build_info", "The gateway's version and the git commit it was built "
                                  "from (\"unknown\" when not known); always 1.", labels=["version", "revision"])
        build.add_metric([__version__, revision()], 1)
        yield build


_RUNTIME: Final = CollectorRegistry(auto_describe=False)
_RUNTIME.register(RuntimeCollector())


def exposition() -> bytes:
    """The runtime series' text exposition, to follow the gateway's own (call ``publish_gc`` before both)."""
    return generate_latest(_RUNTIME)


async def publish_periodically() -> None:
    """Keep this worker's GC counts in the shared files while other workers serve the scrapes."""
    while True:
        await asyncio.sleep(PUBLISH_SECONDS)
        publish_gc()
