"""`gateway serve --workers 2`: /metrics has every worker's process series (by pid), whichever worker answers,
GC counters summed over the workers that never go back, and the series follow a restarted worker."""

from __future__ import annotations

import os
import signal
import time
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.gateway_proc import GatewayProcess


def _scrape(url: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    with urllib.request.urlopen(f"{url}/metrics", timeout=5) as r:  # noqa: S310
        text = r.read().decode()
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def _pids(got: dict[str, list[tuple[dict[str, str], float]]], name: str) -> set[int]:
    return {int(labels["pid"]) for labels, _ in got.get(name, [])}


def _children(pid: int) -> set[int]:
    out = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_bytes()
            except OSError:
                continue
            if int(stat.rsplit(b")", 1)[1].split()[1]) == pid:
                out.add(int(entry))
    return out


def _gc(got: dict[str, list[tuple[dict[str, str], float]]]) -> dict[str, float]:
    return {f"{name}{labels['generation']}": v for name in ("python_gc_collections_total",
                                                            "python_gc_objects_collected_total")
            for labels, v in got[name]}


def test_every_workers_process_series_and_a_restart(tmp_path: Path, db_dsn: str) -> None:
    gp = GatewayProcess(tmp_path, db_dsn).start(extra_args=("--workers", "2"))
    try:
        assert gp.proc is not None
        workers = _children(gp.proc.pid)
        assert len(workers) == 2, workers
        seen_by: set[int] = set()
        for _ in range(10):  # whichever worker answers, it reports both
            got = _scrape(gp.url)
            for name in ("process_cpu_seconds_total", "process_resident_memory_bytes", "process_open_fds",
                         "process_max_fds", "process_start_time_seconds", "process_virtual_memory_bytes"):
                assert _pids(got, name) == workers, name
            seen_by.add(len(got["gateway_build_info"]))
        assert seen_by == {1}  # one build series, not one per worker
        assert {labels["generation"] for labels, _ in got["python_gc_collections_total"]} == {"0", "1", "2"}
        before = _gc(got)

        victim = min(workers)
        os.kill(victim, signal.SIGKILL)  # the supervisor restarts it
        deadline = time.monotonic() + 20
        now: set[int] = set()
        while time.monotonic() < deadline:
            now = _children(gp.proc.pid)
            if len(now) == 2 and victim not in now:
                try:
                    got = _scrape(gp.url)
                except OSError:
                    continue
                if _pids(got, "process_cpu_seconds_total") == now:
                    break
            time.sleep(0.2)
        assert _pids(got, "process_cpu_seconds_total") == now and victim not in now, (now, got)
        after = _gc(got)
        assert all(after[k] >= v for k, v in before.items()), (before, after)  # the dead worker's counts stay
    finally:
        assert gp.stop() == 0
