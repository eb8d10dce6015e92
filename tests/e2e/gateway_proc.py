"""Run real `gateway serve` processes for end-to-end tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from tests.conftest import TEST_CONFIG, free_port


class GatewayProcess:
    """A `python -m gateway serve` child on a free port, with its config written to ``tmp``."""

    def __init__(self, tmp: Path, dsn: str, name: str = "gw", **overrides: Any):
        self.port = free_port()
        database = {"resync_interval": 30, "usage_flush_interval": 1, **overrides.pop("database", {}), "url": dsn}
        raw = {**TEST_CONFIG, **overrides, "listen": f"127.0.0.1:{self.port}", "database": database}
        self.config_path = tmp / f"{name}.yaml"
        self.config_path.write_text(yaml.safe_dump(raw))
        self.log_path = tmp / f"{name}.log"
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: Any = None

    def start(self, timeout: float = 20.0, extra_args: tuple[str, ...] = ()) -> GatewayProcess:
        log = self._log = self.log_path.open("ab")
        if "--workers" not in extra_args:
            extra_args = ("--workers", "1", *extra_args)
        self.proc = subprocess.Popen([sys.executable, "-m", "gateway", "serve", "-c", str(self.config_path),
                                      *extra_args], stdout=log, stderr=log, env={**os.environ})
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gateway exited with {self.proc.returncode}: {self.log_path.read_text()}")
            try:
                with urllib.request.urlopen(f"{self.url}/ready", timeout=1) as r:  # noqa: S310
                    if r.status == 200:
                        return self
            except OSError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"gateway not ready in {timeout}s: {self.log_path.read_text()}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 40.0) -> int:
        try:
            if self.proc is None or self.proc.poll() is not None:
                return self.proc.returncode if self.proc else 0
            self.proc.send_signal(sig)
            try:
                return self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                return self.proc.wait()
        finally:
            if self._log is not None:
                self._log.close()
                self._log = None

    def __enter__(self) -> GatewayProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
