"""The end-of-run line of tests/conftest.py: which end-to-end suites did not run, and how to install what
they need; under CI=true the same missing component fails the run instead."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_SUITE = '''
from tests.conftest import require

def test_needs_chromium():
    require(False, "chromium")

def test_needs_prometheus():
    require(False, "prometheus and promtool (Debian: apt-get install prometheus)")

def test_plain():
    pass
'''


def _pytest(tmp_path: Path, ci: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / "test_suite_e2e.py").write_text(_SUITE)
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "tests.conftest",
                           "--rootdir", str(tmp_path), str(tmp_path / "test_suite_e2e.py")],
                          capture_output=True, text=True, timeout=120, cwd=ROOT,
                          env={**os.environ, "CI": ci, "PYTHONPATH": str(ROOT)})


def test_skipped_suites_are_named_last_with_the_install_command(tmp_path: Path) -> None:
    r = _pytest(tmp_path, "")
    assert r.returncode == 0, r.stdout + r.stderr
    last = r.stdout.strip().splitlines()[-1]
    assert last.startswith("end-to-end suites NOT run (missing components): ") and "test_suite_e2e.py" in last
    assert "`apt-get install -y chromium prometheus`" in last


def test_ci_turns_the_skips_into_failures_and_prints_no_such_line(tmp_path: Path) -> None:
    r = _pytest(tmp_path, "true")
    assert r.returncode == 1 and "2 failed, 1 passed" in r.stdout, r.stdout
    assert "required component missing in CI: chromium" in r.stdout and "NOT run" not in r.stdout
