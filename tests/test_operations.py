"""Operations (issue 29, item 7): the runtime series on /metrics and /favicon.ico, through the real server."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway import __version__, runtime
from tests.conftest import Gateway, require

ROOT = Path(__file__).resolve().parent.parent


def samples(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Every sample of an exposition by name, parsed by prometheus_client's own parser."""
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


async def test_metrics_have_process_python_and_build_info_series(gw: Gateway) -> None:
    r = await gw.client.get("/metrics")
    assert r.status == 200
    got = samples(await r.text())
    me = str(os.getpid())  # the test server runs in this process: one process, labelled by its pid
    for name in ("process_cpu_seconds_total", "process_resident_memory_bytes", "process_virtual_memory_bytes",
                 "process_open_fds", "process_max_fds", "process_start_time_seconds"):
        assert [labels for labels, _ in got[name]] == [{"pid": me}], name
    assert dict(got["process_resident_memory_bytes"][0][0]) and got["process_resident_memory_bytes"][0][1] > 1e6
    assert got["process_open_fds"][0][1] >= 3
    assert {labels["generation"] for labels, _ in got["python_gc_collections_total"]} == {"0", "1", "2"}
    assert got["python_gc_objects_collected_total"] and got["python_gc_objects_uncollectable_total"]
    assert got["python_info"][0][0]["implementation"] == "CPython"
    git = ["git", "-C", str(ROOT), "rev-parse", "HEAD"]
    head = (await asyncio.to_thread(subprocess.run, git, capture_output=True, text=True)).stdout.strip()
    assert got["gateway_build_info"] == [({"version": __version__, "revision": head or "unknown"}, 1.0)]
    text = await (await gw.client.get("/metrics")).text()
    assert "gateway_requests_total" in text  # the rest is still there
    require(shutil.which("promtool") is not None, "promtool (Debian package prometheus)")
    lint = await asyncio.to_thread(subprocess.run, ["promtool", "check", "metrics"], input=text,
                                   capture_output=True, text=True)
    assert lint.returncode == 0, lint.stdout + lint.stderr  # Prometheus' own linter: names, types, help


def test_gc_counters_only_grow_by_what_this_process_collected() -> None:
    before = runtime.GC_COLLECTIONS.labels("2")._value.get()  # noqa: SLF001 - the counter's own value
    import gc
    gc.collect()
    runtime.publish_gc()
    after = runtime.GC_COLLECTIONS.labels("2")._value.get()  # noqa: SLF001
    assert after == before + 1
    runtime.publish_gc()  # nothing new: nothing added
    assert runtime.GC_COLLECTIONS.labels("2")._value.get() == after  # noqa: SLF001


def test_revision_from_the_environment_else_git_else_unknown(monkeypatch: pytest.MonkeyPatch) -> None:
    runtime.revision.cache_clear()
    monkeypatch.setenv("GATEWAY_REVISION", "0123abc")
    assert runtime.revision() == "0123abc"
    runtime.revision.cache_clear()
    monkeypatch.delenv("GATEWAY_REVISION")
    monkeypatch.setenv("PATH", "/nonexistent")  # no git: unknown, never an error
    assert runtime.revision() == "unknown"
    runtime.revision.cache_clear()


def test_worker_pids_are_live_siblings_only(tmp_path: Path) -> None:
    me = os.getpid()
    assert runtime.worker_pids(None) == [me]
    # pid 1 has live files but is not a sibling (another parent); 2**22 + 1 is no process at all
    for pid in (me, 1, 2**22 + 1):
        (tmp_path / f"gauge_livesum_{pid}.db").write_bytes(b"")
    (tmp_path / "counter_12345.db").write_bytes(b"")  # counters stay after a worker exits: not a live worker
    assert runtime.worker_pids(str(tmp_path)) == [me]
    child = subprocess.Popen(["sleep", "30"])  # noqa: S607 - a child of ours: a sibling of no one here
    try:
        (tmp_path / f"gauge_livemax_{child.pid}.db").write_bytes(b"")
        assert runtime.worker_pids(str(tmp_path)) == [me]
    finally:
        child.kill()
        child.wait()


async def test_favicon_is_served_and_not_a_refusal(gw: Gateway) -> None:
    def refusals(text: str) -> float:
        return sum(v for labels, v in samples(text).get("gateway_auth_refusals_total", [])
                   if labels.get("reason") == "unknown_path")

    before = refusals(await (await gw.client.get("/metrics")).text())
    r = await gw.client.get("/favicon.ico")
    assert r.status == 200 and r.content_type == "image/vnd.microsoft.icon"
    body = await r.read()
    assert body[:4] == b"\x00\x00\x01\x00" and body == (ROOT / "gateway/web/static/favicon.ico").read_bytes()
    assert "max-age" in r.headers["Cache-Control"]
    r = await gw.client.get("/favicon.png")  # anything else still is the data path's 404
    assert r.status == 404
    assert refusals(await (await gw.client.get("/metrics")).text()) == before + 1
