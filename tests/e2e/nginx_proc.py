"""Run Debian's nginx on a temporary prefix and config, on 127.0.0.1, for end-to-end tests."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType

NGINX_PATHS = ("/usr/sbin/nginx",)


def find_nginx() -> str | None:
    return shutil.which("nginx") or next((p for p in NGINX_PATHS if Path(p).is_file()), None)


def http_block_paths(prefix: Path) -> str:
    """The temp paths nginx writes to, all under ``prefix`` (a non-root user cannot use the defaults)."""
    return "\n".join(f"  {name}_temp_path {prefix}/{name};" for name in
                     ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))


class NginxProcess:
    """``nginx -p PREFIX -c nginx.conf`` in the foreground; waits for ``port`` to accept, stops with SIGQUIT."""

    def __init__(self, binary: str, prefix: Path, http_conf: str, port: int):
        self.binary, self.prefix, self.port = binary, prefix, port
        prefix.mkdir(parents=True, exist_ok=True)
        self.conf = prefix / "nginx.conf"
        # as root, workers would run as nobody, who cannot enter pytest's 0700 temporary directories
        user = "user root;\n" if os.geteuid() == 0 else ""
        self.conf.write_text(
            f"{user}daemon off;\nworker_processes 1;\npid {prefix}/nginx.pid;\nerror_log {prefix}/error.log warn;\n"
            f"events {{ worker_connections 512; }}\nhttp {{\n  access_log off;\n{http_block_paths(prefix)}\n"
            f"{http_conf}\n}}\n", encoding="utf-8")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 10.0) -> NginxProcess:
        self.proc = subprocess.Popen([self.binary, "-p", str(self.prefix), "-c", str(self.conf),
                                      "-e", str(self.prefix / "error.log")],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"nginx exited with {self.proc.returncode}: {self.log()}")
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return self
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"nginx did not listen on {self.port}: {self.log()}")

    def log(self) -> str:
        try:
            return (self.prefix / "error.log").read_text(errors="replace")[-3000:]
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self.proc = None

    def __enter__(self) -> NginxProcess:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
