"""Real `gateway serve` processes: config hot reload, workers, metrics merge, graceful stop."""

from __future__ import annotations

import signal
import time
import urllib.request
from pathlib import Path

import yaml

from tests.e2e.gateway_proc import GatewayProcess


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:  # noqa: S310
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def _reload_gauge(url: str) -> str:
    _, text = _get(f"{url}/metrics")
    line = next(ln for ln in text.splitlines() if ln.startswith("gateway_config_last_reload_successful"))
    return line.split()[-1]


def _wait(pred, timeout: float = 10.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.1)
    return False


def test_bad_config_reload_keeps_running_and_good_one_swaps_in(tmp_path: Path, db_dsn: str) -> None:
    gp = GatewayProcess(tmp_path, db_dsn).start()
    try:
        good = gp.config_path.read_text()
        gp.config_path.write_text(good + "\nnot_a_key: 1\n")
        assert gp.proc is not None
        gp.proc.send_signal(signal.SIGHUP)
        assert _wait(lambda: float(_reload_gauge(gp.url)) == 0.0), "bad reload not reported"
        assert _get(f"{gp.url}/ready")[0] == 200
        assert "not_a_key: unknown key" in gp.log_path.read_text()
        raw = yaml.safe_load(good)
        raw["orgs"][0]["stacks"].append({"id": 102, "name": "new", "tenants": {"metrics": "102"}})
        gp.config_path.write_text(yaml.safe_dump(raw))  # picked up by the file watcher, no signal
        assert _wait(lambda: float(_reload_gauge(gp.url)) == 1.0), "good reload not applied"
        assert "config reloaded" in gp.log_path.read_text()
    finally:
        assert gp.stop() == 0


def test_workers_share_the_port_and_stop_cleanly(tmp_path: Path, db_dsn: str) -> None:
    gp = GatewayProcess(tmp_path, db_dsn).start(extra_args=("--workers", "2"))
    try:
        for _ in range(20):
            assert _get(f"{gp.url}/ready")[0] == 200
        status, body = _get(f"{gp.url}/prometheus/api/v1/query?query=up")
        assert status == 401
        # each worker moves its counts into the shared series at least every second (gateway/tally.py)
        assert _wait(lambda: 'gateway_auth_refusals_total{reason="missing_credentials"}'
                     in _get(f"{gp.url}/metrics")[1]), "the other worker's count never showed"
        assert "started 2 workers" in gp.log_path.read_text()
    finally:
        assert gp.stop() == 0


def test_metrics_on_a_separate_listener(tmp_path: Path, db_dsn: str) -> None:
    from tests.conftest import free_port

    mport = free_port()
    gp = GatewayProcess(tmp_path, db_dsn, metrics_listen=f"127.0.0.1:{mport}").start()
    try:
        status, text = _get(f"http://127.0.0.1:{mport}/metrics")
        assert status == 200 and "gateway_requests_total" in text
        assert _get(f"{gp.url}/metrics")[0] == 404  # not on the data path's address
    finally:
        assert gp.stop() == 0
