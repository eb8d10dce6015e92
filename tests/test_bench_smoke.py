"""The benchmark harness imports and its network-free parts produce numbers (no timing assertions)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, where bench/ lives

from bench import loadgen, micro, payloads, report  # noqa: E402


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
