"""The `gateway` command as an operator runs it: help, migrate, bootstrap, and the embedded default."""

from __future__ import annotations

import base64
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from gateway.config import load_config
from tests.conftest import TEST_CONFIG, free_port

ROOT = Path(__file__).resolve().parents[2]


def _run(*args: str, timeout: float = 60, cwd: Path = ROOT, env: dict[str, str] | None = None
         ) -> subprocess.CompletedProcess[str]:
    # PYTHONPATH: this checkout's package even when run from another directory
    return subprocess.run([sys.executable, "-m", "gateway", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd, env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})


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


# ---- issue 16: start-up, paths, log format ------------------------------------------------------------

def _write(tmp_path: Path, name: str = "g.yaml", **overrides: object) -> Path:
    raw = {**TEST_CONFIG, "listen": f"127.0.0.1:{free_port()}", **overrides}
    f = tmp_path / name
    f.write_text(yaml.safe_dump(raw))
    return f


def _one_error_line(r: subprocess.CompletedProcess[str]) -> str:
    """The run failed with exactly one log line (a JSON line: stderr is not a terminal), no traceback."""
    assert r.returncode == 1, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    lines = [json.loads(ln) for ln in r.stderr.splitlines()]
    errors = [ln for ln in lines if ln["level"] == "error"]
    assert len(errors) == 1, r.stderr
    return str(errors[0]["msg"])


def _serve(cfg: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "gateway", "serve", "-c", str(cfg), *args], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})


def _wait_ready(proc: subprocess.Popen[str], port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=1) as resp:  # noqa: S310
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise AssertionError("not ready in time")


def _stop(proc: subprocess.Popen[str]) -> str:
    proc.terminate()
    _, err = proc.communicate(timeout=40)
    assert proc.returncode == 0, err
    return err


def _port(cfg: Path) -> int:
    return int(yaml.safe_load(cfg.read_text())["listen"].rsplit(":", 1)[1])


@pytest.mark.parametrize("setting", ["listen", "metrics_listen"])
def test_port_in_use_is_one_line_naming_the_address_and_setting(tmp_path: Path, db_dsn: str, setting: str) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        cfg = _write(tmp_path, database={"url": db_dsn}, **{setting: f"127.0.0.1:{port}"})
        msg = _one_error_line(_run("serve", "-c", str(cfg)))
    assert f"cannot listen on 127.0.0.1:{port}" in msg and f"change `{setting}` in {cfg}" in msg


def test_unreachable_database_is_one_line_without_the_password(tmp_path: Path) -> None:
    cfg = _write(tmp_path, database={"url": f"postgresql://gw:s3cret@127.0.0.1:{free_port()}/gw",
                                     "connect_timeout": 2})
    for args in (("serve",), ("migrate",), ("token", "bootstrap", "--org", "1")):
        r = _run(*args, "-c", str(cfg))
        msg = _one_error_line(r)
        assert msg.startswith("database unreachable at postgresql://gw:***@127.0.0.1:") and "database.url" in msg
        assert "s3cret" not in r.stderr


def test_data_dir_that_cannot_be_written_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("")
    cfg = _write(tmp_path, data_dir="a-file/data")
    msg = _one_error_line(_run("serve", "-c", str(cfg)))
    assert msg.startswith(f"data_dir {tmp_path / 'a-file' / 'data'} is not a writable directory")
    assert "change `data_dir`" in msg


def test_embedded_postgres_that_fails_to_start_is_one_line(tmp_path: Path) -> None:
    pg = tmp_path / "data" / "pg"
    pg.mkdir(parents=True)
    (pg / "PG_VERSION").write_text("9.1\n")  # a data directory PostgreSQL refuses
    cfg = _write(tmp_path, data_dir="data")
    msg = _one_error_line(_run("serve", "-c", str(cfg)))
    assert msg.startswith(f"embedded PostgreSQL in {pg} did not start: ") and f"its log: {pg / 'log'}" in msg


def test_relative_paths_are_relative_to_the_config_file(tmp_path: Path) -> None:
    (tmp_path / "conf").mkdir()
    cfg = _write(tmp_path / "conf", data_dir="state")
    assert load_config(cfg).data_dir == tmp_path / "conf" / "state"
    here = Path.cwd()
    try:
        os.chdir(tmp_path)
        assert load_config("conf/g.yaml").data_dir == tmp_path / "conf" / "state"
    finally:
        os.chdir(here)


def test_start_up_line_names_the_page_and_the_bootstrap_command(tmp_path: Path, db_dsn: str) -> None:
    cfg = _write(tmp_path, database={"url": db_dsn})
    port = _port(cfg)
    proc = _serve(cfg, "--workers", "2", "--log-format", "text")
    _wait_ready(proc, port)
    req = urllib.request.Request(f"http://127.0.0.1:{port}/", headers={"Accept": "text/html"})
    with urllib.request.urlopen(req, timeout=5) as resp:  # noqa: S310 - follows the redirect to the page
        assert resp.url.endswith("/ui/signin?next=%2Fui%2Fpolicies")
    err = _stop(proc)
    page = [ln for ln in err.splitlines() if "the Access Policies page:" in ln]
    assert len(page) == 1, err  # once, not once per worker
    cmd = f"{sys.executable} -m gateway token bootstrap -c {cfg} --org ID"
    assert f"http://127.0.0.1:{port}/ui/; no admin token exists yet: run `{cmd}` (ID: one of 1, 2)" in page[0]
    r = _run("token", "bootstrap", "-c", str(cfg), "--org", "1")
    assert r.returncode == 0, r.stderr
    proc = _serve(cfg, "--workers", "1", "--log-format", "text")
    _wait_ready(proc, port)
    err = _stop(proc)
    assert f"the Access Policies page: http://127.0.0.1:{port}/ui/ (sign in with an admin token)" in err


_TEXT_LINE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z (DEBUG|INFO|WARNING|ERROR|CRITICAL) [\w.]+: ")


@pytest.mark.parametrize("fmt", ["json", "text"])
def test_every_log_line_has_the_chosen_format(tmp_path: Path, db_dsn: str, fmt: str) -> None:
    cfg = _write(tmp_path, database={"url": db_dsn})
    port = _port(cfg)
    proc = _serve(cfg, "--workers", "1", "--log-format", fmt)
    _wait_ready(proc, port)
    with pytest.raises(urllib.error.HTTPError):  # an access-log line too
        urllib.request.urlopen(f"http://127.0.0.1:{port}/prometheus/api/v1/query?query=up", timeout=5)  # noqa: S310
    time.sleep(0.5)  # the access log is written in batches every 200 ms
    lines = _stop(proc).splitlines()
    assert any("gateway.access" in ln for ln in lines) and any("listening" in ln for ln in lines)
    for ln in lines:
        if fmt == "json":
            rec = json.loads(ln)
            assert "time" in rec and ("level" in rec or "status" in rec), ln
        else:
            assert _TEXT_LINE.match(ln), ln


def test_bootstrap_from_another_directory_joins_the_running_gateways_database(tmp_path: Path) -> None:
    cfg = _write(tmp_path, data_dir="data")  # relative: tmp_path/data, wherever the command runs
    port = _port(cfg)
    proc = _serve(cfg, "--workers", "1")
    try:
        _wait_ready(proc, port, 40)
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        r = _run("token", "bootstrap", "-c", str(cfg), "--org", "1", cwd=elsewhere)
        assert r.returncode == 0, r.stderr
        assert not (elsewhere / "data").exists()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/api/v1/accesspolicies",
                                     headers={"Authorization": f"Bearer {r.stdout.strip()}"})
        deadline = time.monotonic() + 10
        while True:  # the running gateway learns of the new token through NOTIFY
            try:
                with urllib.request.urlopen(req, timeout=5) as resp:  # noqa: S310
                    assert resp.status == 200
                    break
            except urllib.error.HTTPError as exc:
                assert exc.code == 401 and time.monotonic() < deadline
                time.sleep(0.2)
    finally:
        _stop(proc)


def test_bootstrap_refuses_a_new_database_beside_the_one_being_served(tmp_path: Path, db_dsn: str) -> None:
    cfg = _write(tmp_path, data_dir="data")
    port = _port(cfg)
    proc = _serve(cfg, "--workers", "1", env={"GATEWAY_DATABASE_URL": db_dsn})
    try:
        _wait_ready(proc, port)
        r = _run("token", "bootstrap", "-c", str(cfg), "--org", "1", env={"GATEWAY_DATABASE_URL": ""})
        assert r.returncode == 1 and r.stdout == ""
        lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
        assert len(lines) == 1 and f"(pid {proc.pid}, 127.0.0.1:{port})" in lines[0]
        assert "would create a new, empty embedded PostgreSQL in" in lines[0] and "GATEWAY_DATABASE_URL" in lines[0]
        assert not (tmp_path / "data" / "pg").exists()
        r = _run("token", "bootstrap", "-c", str(cfg), "--org", "1", env={"GATEWAY_DATABASE_URL": db_dsn})
        assert r.returncode == 0 and r.stdout.startswith("glc_"), r.stderr
    finally:
        _stop(proc)
    r = _run("token", "bootstrap", "-c", str(cfg), "--org", "1", env={"GATEWAY_DATABASE_URL": ""})
    assert r.returncode == 0, r.stderr  # no gateway serves it any more: a first embedded database is fine
