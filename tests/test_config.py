"""Configuration validation: one line per problem, with its path; unknown keys are errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from gateway.config import ConfigError, load_config, parse_config

ROOT = Path(__file__).resolve().parent.parent


def problems(raw: Any) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(raw, env={})
    return info.value.problems


def test_example_config_is_valid() -> None:
    cfg = load_config(ROOT / "config" / "gateway.yaml", env={})
    assert cfg.listen == ("127.0.0.1", 8080)
    assert cfg.stack_by_tenant[("metrics", "100")].id == "100"
    assert cfg.upstreams["metrics"].lbac == "enforce"  # correct on every backend (issue 11)
    assert cfg.upstreams["logs"].lbac == "enforce"
    assert cfg.database.url is None


def test_env_overrides_database_url() -> None:
    cfg = load_config(ROOT / "config" / "gateway.yaml", env={"GATEWAY_DATABASE_URL": "postgresql://h/db"})
    assert cfg.database.url == "postgresql://h/db"


@pytest.mark.parametrize("raw, expected", [
    ({"orgs": [{"id": 1, "name": "a", "stacks": [{"id": 2, "name": "s", "tenants": {"logs": "a|b"}}]}]},
     "orgs[0].stacks[0].tenants.logs: must be a non-empty string without '|'"),
    ({"orgs": [{"id": 1, "name": "a", "stacks": [{"id": 2, "name": "s", "tenants": {"logs": ""}}]}]},
     "orgs[0].stacks[0].tenants.logs: must be a non-empty string"),
    ({"bogus": 1}, "bogus: unknown key"),
    ({"orgs": [{"id": 1, "name": "a", "colour": "red"}]}, "orgs[0].colour: unknown key"),
    ({"upstreams": {"metrics": {"url": "ftp://x"}}}, "upstreams.metrics.url: must be an http"),
    ({"upstreams": {"metrics": {"url": "http://x", "lbac": "maybe"}}}, "upstreams.metrics.lbac: must be one of"),
    ({"upstreams": {"metrics": {}}}, "upstreams.metrics.url: is required"),
    ({"upstreams": {"metrics": {"url": "http://x", "lbac_probe_interval": 0}}},
     "upstreams.metrics.lbac_probe_interval: must be a positive number"),
    ({"upstreams": {"pyroscope": {"url": "http://x"}}}, "upstreams.pyroscope: unknown key"),
    ({"trusted_proxies": ["10.0.0.0/33"]}, "trusted_proxies[0]: '10.0.0.0/33' is not an IPv4 or IPv6"),
    ({"listen": "nope"}, "listen: must be host:port"),
    ({"database": {"url": "mysql://x"}}, "database.url: must be a postgresql:// URL"),
    ({"database": {"pool_min": 5, "pool_max": 2}}, "database.pool_min: must not exceed"),
    ({"database": {"reconnect_max_backoff": 0}}, "database.reconnect_max_backoff: must be a positive number"),
    ({"shutdown": {"drain_timeout": -1}}, "shutdown.drain_timeout: must be a positive number"),
    ({"orgs": [{"id": 1, "name": "a", "stacks": [{"id": 1, "name": "s", "tenants": {}}]}]},
     "orgs[0].stacks[0].id: duplicates the id of orgs[0]"),
    ({"orgs": [{"id": 1, "name": "a", "stacks": [
        {"id": 2, "name": "s", "tenants": {"metrics": "x"}}, {"id": 3, "name": "t", "tenants": {"metrics": "x"}}]}]},
     "orgs[0].stacks[1].tenants.metrics: tenant 'x' is already used"),
    ([1, 2], "must be a mapping"),
])
def test_each_problem_is_named_with_its_path(raw: Any, expected: str) -> None:
    assert any(p.startswith(expected) for p in problems(raw)), problems(raw)


def test_all_problems_are_reported_at_once() -> None:
    found = problems({"bogus": 1, "listen": "x", "upstreams": {"logs": {"url": "x"}}})
    assert len(found) == 3


def test_split_upstream_roles_default_to_url() -> None:
    cfg = parse_config({"upstreams": {"metrics": {"url": "http://q:1", "write_url": "http://d:2/"}}}, env={})
    up = cfg.upstreams["metrics"]
    assert up.url_for("write") == "http://d:2"
    assert up.url_for("read") == "http://q:1"


def _check(tmp_path: Path, text: str) -> subprocess.CompletedProcess[str]:
    f = tmp_path / "g.yaml"
    f.write_text(text)
    return subprocess.run([sys.executable, "-m", "gateway", "check-config", "-c", str(f)],
                          capture_output=True, text=True, timeout=60)


def test_check_config_cli_exits_1_with_lines(tmp_path: Path) -> None:
    r = _check(tmp_path, "listen: x\norgs:\n  - {id: 1, name: a, stacks: [{id: 2, name: s, tenants: {logs: 'a|b'}}]}\n")
    assert r.returncode == 1
    assert "orgs[0].stacks[0].tenants.logs: must be a non-empty string without '|'" in r.stderr
    assert "listen: must be host:port" in r.stderr
    assert "Traceback" not in r.stderr


def test_check_config_cli_reports_yaml_syntax(tmp_path: Path) -> None:
    r = _check(tmp_path, "orgs: [\n")
    assert r.returncode == 1 and "invalid YAML" in r.stderr and "Traceback" not in r.stderr


def test_check_config_cli_ok(tmp_path: Path) -> None:
    r = _check(tmp_path, (ROOT / "config" / "gateway.yaml").read_text())
    assert r.returncode == 0, r.stderr
    assert "ok" in r.stdout


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "absent.yaml")
    assert "cannot read" in info.value.problems[0]


def test_the_removed_aiohttp_data_path_is_refused_and_protocol_is_accepted_with_a_warning(
        caplog: pytest.LogCaptureFixture) -> None:
    """``data_path: aiohttp`` was removed (issue 24): a config naming it fails to load with the reason, so no
    deployment silently changes server; ``protocol`` (the only one) still loads, with a deprecation line."""
    found = problems({"data_path": "aiohttp"})
    assert found == ["data_path: the aiohttp data path was removed: the data path is always the protocol server "
                     "(uvloop + httptools; the admin API, the page and WebSockets stay on aiohttp, same port); "
                     "delete the key"]
    with caplog.at_level("WARNING", logger="gateway.config"):
        parse_config({"data_path": "protocol"}, env={})
    assert "data_path is deprecated and ignored" in caplog.text
