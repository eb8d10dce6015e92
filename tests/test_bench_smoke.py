"""The benchmark harness imports and its network-free parts produce numbers (no timing assertions)."""

from __future__ import annotations

import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, where bench/ lives

from bench import compare, loadgen, micro, payloads, perreq, report, run  # noqa: E402
from bench.servers import GatewayServer  # noqa: E402
from tests.conftest import require  # noqa: E402


def _is_number(v: object) -> bool:
    return isinstance(v, int | float) and math.isfinite(v) and v >= 0


def test_micro_benchmarks_produce_numbers() -> None:
    out = micro.run(n_tokens=200, n_policies=20, n=20)
    assert out["snapshot_tokens"] == 200
    for key in ("decision_us", "decision_restricted_us", "decision_token_cold_us", "route_match_us",
                "token_decode_cached_us", "identify_us", "authorize_us", "upstream_headers_us",
                "promql_cold_us", "promql_cached_us", "promql_enforce_cached_us", "logql_cold_us", "logql_cached_us"):
        assert _is_number(out[key]), key


def test_decision_is_the_real_one() -> None:
    snap = micro.build_snapshot(40, 4)
    headers = micro._incoming(micro.basic("100", snap.restricted_token))
    out = micro.decide(snap, headers, "GET", micro.READ_PATH, "127.0.0.1")
    assert out["X-Scope-OrgID"] == "100"
    assert out.getall("X-Prom-Label-Policy") == ["100:%7Bnamespace=%22team-a%22%7D"]
    assert "Authorization" not in out


def test_payloads_and_wrk_script() -> None:
    body, series = payloads.remote_write_body(target=20_000)
    assert len(body) >= 20_000 and series > 0
    prefix, suffix = payloads.varying_query_path()
    assert prefix.startswith("/prometheus/api/v1/query?query=") and suffix
    w = loadgen.Workload("x", "x", "/p", {"Authorization": "Basic a]]b"}, vary=(prefix, suffix))
    lua = loadgen.script(w, delay_ms=10)
    assert "function delay()" in lua and "function request()" in lua and "a]]b" in lua


def test_profile_folding_and_targets() -> None:
    raw = ("run (asyncio/runners.py:118);handle (gateway/proxy/handler.py:81);forward (gateway/proxy/forward.py:74) 3\n"
           "run (asyncio/runners.py:118);handle (gateway/proxy/handler.py:81) 1\n")
    prof = report.fold_profile(raw)
    assert prof["samples"] == 4
    assert prof["parts"]["handler (handle)"] == 100.0
    assert prof["parts"]["forward (client + response)"] == 75.0
    assert report.targets({}) == []


def _summary(cpu: float, rps: float) -> dict[str, float]:
    return {"rps": rps, "p50_ms": 1.0, "p90_ms": 1.0, "p99_ms": 1.0, "cpu_s_per_10k": cpu, "errors": 0,
            "user_s_per_10k": cpu * 0.4, "system_s_per_10k": cpu * 0.6}


def test_machine_and_calibration_beside_the_figures() -> None:
    m = run.machine()
    assert m["cpu_model"] and m["kernel"] and m["cores"] >= 1 and len(m["load_before"]) == 3
    assert _is_number(run.python_speed_us(batches=1, n=10))
    s = {p: _summary(c, r) for p, c, r in (("direct", 0.07, 9e4), ("nginx", 0.15, 5e4), ("floor", 0.2, 5e4),
                                           ("gateway", 0.4, 3e4))}
    s["gateway"].update(x_nginx=0.6, cpu_x_floor=2.0, cpu_x_nginx=2.67,
                        spread={"x_nginx": [0.55, 0.62], "cpu_x_nginx": [2.5, 2.8], "cpu_x_floor": [1.9, 2.1]})
    results = {"machine": m, "python_us": 1.5, "workloads": {"a": {
        "title": "(a) t", "summary": s, "gateway_memory": {"peak_rss_mb": 1.0}, "nginx_memory": {"peak_rss_mb": 1.0}}}}
    results["calibration"] = run.calibration(results)
    assert results["calibration"]["floor_cpu_us_per_req"] == 20.0
    assert results["calibration"]["floor_user_us_per_req"] == 8.0
    results["targets"] = report.targets(results)
    text = report.table(results)
    assert m["kernel"] in text and "floor 20.0 / nginx 15.0 CPU µs per (a) request" in text
    assert "2.00" in text and "2.67" in text  # the gateway's CPU over the floor's and over nginx's
    floor_ratio = next(t for t in results["targets"] if "gateway / floor" in t["target"])
    assert floor_ratio["value"] == 2.0 and floor_ratio["holds"] is None
    assert "0.600 (runs 0.550-0.620) (target >= 0.5)" in text  # the spread of the repetitions beside the median
    assert "no calibration" not in report.table({}) and "machine not recorded" in report.table({})


def test_perreq_counter_readers(tmp_path: Path) -> None:
    assert set(perreq.tcp_counters()) == {k for k in perreq.TCP_KEYS}
    out = tmp_path / "perf.txt"
    out.write_text("# started\n\n1234,,raw_syscalls:sys_enter,100,100.00,,\n"
                   "600,,syscalls:sys_enter_write,100,100.00,,\n<not counted>,,syscalls:sys_enter_futex,0,0,,\n")
    assert perreq.read_perf(out) == {"syscalls": 1234.0, "write": 600.0}


def test_baseline_checkout_runs_its_own_code_and_is_removed(tmp_path: Path) -> None:
    """--baseline's worktree: a gateway started from it imports its package (not the venv's editable
    install), and the worktree is gone afterwards even when the run fails."""
    require(shutil.which("git") is not None and (compare.REPO / ".git").exists(), "git and a git checkout")
    tree = tmp_path / "baseline"
    with pytest.raises(RuntimeError, match="the run failed"), compare.checkout("HEAD", tree) as commit:
        assert commit == compare.git("rev-parse", "HEAD")
        gw = GatewayServer(tmp_path, "gw", "postgresql:///x", "http://127.0.0.1:9", "header", 1, tree=tree)
        assert compare.imported_from(gw) == str(tree / "gateway" / "__init__.py")
        raise RuntimeError("the run failed")
    assert not tree.exists()
    assert str(tree) not in subprocess.run(["git", "-C", str(compare.REPO), "worktree", "list"],
                                           capture_output=True, text=True, check=True).stdout
    with pytest.raises(SystemExit, match="not a commit"), compare.checkout("no-such-ref-xyz", tree):
        pass


def _wrk(rps: float, cpu: float) -> loadgen.WrkResult:
    lat = {"p50": 1.0, "p75": 1.0, "p90": 1.0, "p99": 2.0, "p99.9": 3.0}
    return loadgen.WrkResult(requests=int(rps), seconds=1.0, rps=rps, bytes_read=0, errors={"status": 0},
                             latency_ms=lat, mean_ms=1.0, max_ms=3.0, connections=50,
                             extra={"cpu_s_per_10k": cpu, "user_s_per_10k": cpu / 2, "system_s_per_10k": cpu / 2})


def test_compare_ratio_per_round_and_table() -> None:
    first = [_wrk(1000, 0.40), _wrk(900, 0.44), _wrk(1100, 0.30)]
    second = [_wrk(1000, 0.40), _wrk(1000, 0.40), _wrk(1000, 0.40)]
    cpu = compare.per_round(first, second, lambda r: r.extra["cpu_s_per_10k"])
    assert cpu == {"median": 1.0, "min": 0.75, "max": 1.1}
    c = {"when": "2026-12-05T23:00:00+0000", "note": "--baseline X", "machine": run.machine(), "workers": 2,
         "duration_s": 4.0, "rounds": 3, "ratio": "current / baseline",
         "sides": {"current": {"commit": "a" * 40 + "+dirty"}, "baseline": {"commit": "b" * 40}},
         "workloads": {"a": {"title": "(a) t", "summary": {"current": run.summarize(first),
                                                           "baseline": run.summarize(second)},
                             "ratio": {"cpu_per_request": cpu, "rps": compare.per_round(first, second,
                                                                                        lambda r: r.rps)}}}}
    text = compare.table(c)
    assert "current aaaaaaaaaaaa+dirty, baseline bbbbbbbbbbbb" in text
    assert "CPU per request x1.000 (rounds 0.750-1.100)" in text and "req/s x1.000 (rounds 0.900-1.100)" in text
    assert "40.0" in text  # the CPU µs per request medians of both sides
