"""The `gateway` command as an operator runs it: help, migrate, bootstrap, and the embedded default."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.conftest import TEST_CONFIG, free_port

ROOT = Path(__file__).resolve().parents[2]


def _run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


@pytest.mark.parametrize("args", [(), ("serve",), ("migrate",), ("check-config",), ("token", "bootstrap")])
def test_help_teaches(args: tuple[str, ...]) -> None:
    r = _run(*args, "--help")
    assert r.returncode == 0
    assert "usage: gateway" in r.stdout and "-c FILE" in r.stdout or not args
    if not args:
        for cmd in ("serve", "migrate", "check-config", "token"):
            assert cmd in r.stdout
        assert "Typical first run" in r.stdout


def _config(tmp_path: Path, dsn: str | None) -> Path:
    raw = {**TEST_CONFIG, "listen": f"127.0.0.1:{free_port()}", "data_dir": str(tmp_path / "data")}
    if dsn:
        raw["database"] = {"url": dsn}
    f = tmp_path / "g.yaml"
    f.write_text(yaml.safe_dump(raw))
    return f


def test_migrate_then_bootstrap_prints_a_working_token_alone(tmp_path: Path, db_dsn: str) -> None:
    cfg = _config(tmp_path, db_dsn)
    r = _run("migrate", "-c", str(cfg))
    assert r.returncode == 0 and "applied 0 migration(s)" in r.stdout  # the template is already migrated
    r = _run("token", "bootstrap", "-c", str(cfg), "--org", "1")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == 1 and lines[0].startswith("glc_")
    payload = json.loads(base64.urlsafe_b64decode(lines[0][4:] + "=="))
    assert payload["o"] == "1" and len(payload["k"]) >= 43
    assert lines[0] not in r.stderr
    r2 = _run("token", "bootstrap", "-c", str(cfg), "--org", "1")
    assert r2.returncode == 0 and r2.stdout != r.stdout  # a new token of the same policy
    r3 = _run("token", "bootstrap", "-c", str(cfg), "--org", "42")
    assert r3.returncode == 1 and "no such org" in r3.stderr


def test_serve_refuses_a_bad_config_clearly(tmp_path: Path) -> None:
    f = tmp_path / "bad.yaml"
    f.write_text("listen: nowhere\nupstreams: {metrics: {url: 'x'}}\n")
    r = _run("serve", "-c", str(f))
    assert r.returncode == 1
    assert "listen: must be host:port" in r.stderr and "upstreams.metrics.url" in r.stderr
    assert "Traceback" not in r.stderr


def test_embedded_default_is_ready_within_20_seconds(tmp_path: Path) -> None:
    cfg = _config(tmp_path, None)
    port = yaml.safe_load(cfg.read_text())["listen"].rsplit(":", 1)[1]
    started = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "gateway", "serve", "-c", str(cfg)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        while True:
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=1) as resp:  # noqa: S310
                    if resp.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() - started < 20, "not ready within 20 s"
            time.sleep(0.1)
        print(f"\nembedded default ready after {time.monotonic() - started:.2f} s")
        assert (tmp_path / "data" / "pg" / "PG_VERSION").exists()
    finally:
        proc.terminate()
        assert proc.wait(30) == 0
