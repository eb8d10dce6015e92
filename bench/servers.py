"""The processes a benchmark run starts on 127.0.0.1: the nginx upstream and sink, nginx as a plain
reverse proxy, and `gateway serve --workers N`; plus what /proc says about their CPU and memory."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import yaml

#: The upstream's answer to an instant query: a small, fixed Prometheus vector (167 bytes).
PROM_BODY = ('{"status":"success","data":{"resultType":"vector","result":[{"metric":{"__name__":"up",'
             '"job":"prometheus","instance":"localhost:9090"},"value":[1700000000.123,"1"]}]}}')
CLK_TCK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ensure_tools() -> None:
    """nginx and wrk from Debian: installed when missing and we are root (like .ci/run)."""
    need = [pkg for pkg, exe in (("nginx", "nginx"), ("wrk", "wrk")) if not _which(exe)]
    if not need:
        return
    if shutil.which("apt-get") and os.geteuid() == 0:
        print(f"bench: installing {' '.join(need)} from Debian", flush=True)
        subprocess.run(["apt-get", "update", "-qq"], check=True)
        subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *need], check=True,
                       env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"}, stdout=subprocess.DEVNULL)
    missing = [exe for exe in ("nginx", "wrk") if not _which(exe)]
    if missing:
        raise SystemExit(f"bench: missing {', '.join(missing)}: install them (apt-get install nginx wrk)")


def _which(exe: str) -> str | None:
    return shutil.which(exe) or shutil.which(exe, path="/usr/sbin:/usr/bin:/sbin:/bin")


# ---- /proc ------------------------------------------------------------------------------------------

def children(pid: int) -> list[int]:
    """Direct children of ``pid`` (all threads' lists)."""
    out: list[int] = []
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError):
                out += [int(c) for c in (task / "children").read_text().split()]
    return sorted(set(out))


def cpu_seconds(pids: Iterable[int]) -> float:
    """User + system CPU of ``pids`` (not their children), in seconds."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError, IndexError, ValueError):
            raw = Path(f"/proc/{pid}/stat").read_text()
            fields = raw[raw.rindex(")") + 2:].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
    return total / CLK_TCK


def _status_kb(pid: int, key: str) -> int:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def rss_mb(pid: int) -> float:
    return _status_kb(pid, "VmRSS") / 1024


def peak_rss_mb(pid: int) -> float:
    """VmHWM: the highest resident set size the process has had."""
    return _status_kb(pid, "VmHWM") / 1024


def pss_mb(pid: int) -> float:
    """Proportional set size: shared (forked, copy-on-write) pages split between their sharers."""
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) / 1024
    return 0.0


# ---- processes ------------------------------------------------------------------------------------

class Server:
    """A child process (nginx master or gateway supervisor) with worker children."""

    name = "server"
    cwd: Path | None = None  # where the process starts (``python -m`` imports from there first)

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = workdir / f"{self.name}.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def workers(self) -> list[int]:
        return children(self.pid) if self.proc else []

    def all_pids(self) -> list[int]:
        return [self.pid, *self.workers()] if self.proc else []

    def cpu(self) -> float:
        return cpu_seconds(self.all_pids())

    def _spawn(self, argv: list[str], env: dict[str, str] | None = None) -> None:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=log, env=env or dict(os.environ), cwd=self.cwd,
                                         start_new_session=True)

    def stop(self, timeout: float = 20.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)

    def wait_http(self, path: str, timeout: float, want: int = 200) -> float:
        """Poll ``path`` until it answers ``want``; returns the seconds waited."""
        started = time.monotonic()
        deadline = started + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}: {self.tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}{path}", timeout=1) as r:  # noqa: S310 - loopback
                    if r.status == want:
                        return time.monotonic() - started
            except urllib.error.HTTPError as exc:
                if exc.code == want:
                    return time.monotonic() - started
            except OSError:
                pass
            time.sleep(0.02)
        raise RuntimeError(f"{self.name} not answering {path} in {timeout}s: {self.tail()}")

    def tail(self, n: int = 2000) -> str:
        """The last ``n`` bytes of the log (the gateway's access log makes it large)."""
        with contextlib.suppress(OSError), self.log_path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - n))
            return f.read().decode(errors="replace")
        return ""


class Nginx(Server):
    """nginx in the foreground with a generated config; SIGTERM stops it (fast shutdown)."""

    def __init__(self, workdir: Path, name: str, workers: int):
        self.name = name
        super().__init__(workdir)
        self.nginx_workers = workers
        self.conf = workdir / f"{name}.conf"
        self.prefix = workdir / f"{name}-prefix"

    def _common(self) -> str:
        p = self.prefix
        return (f"worker_processes {self.nginx_workers};\ndaemon off;\nmaster_process on;\n"
                f"pid {p}/nginx.pid;\nerror_log {p}/error.log warn;\n"
                "events { worker_connections 8192; multi_accept on; }\n")

    def _http_common(self) -> str:
        p = self.prefix
        return (f"  client_body_temp_path {p}/body; proxy_temp_path {p}/proxy; fastcgi_temp_path {p}/fcgi;\n"
                f"  uwsgi_temp_path {p}/uwsgi; scgi_temp_path {p}/scgi;\n"
                "  access_log off; keepalive_requests 100000000; keepalive_timeout 300s; server_tokens off;\n")

    def write_config(self, text: str) -> None:
        self.prefix.mkdir(parents=True, exist_ok=True)
        self.prefix.chmod(0o755)
        self.conf.write_text(text)

    def start(self) -> Self:
        exe = _which("nginx") or "nginx"
        check = subprocess.run([exe, "-t", "-q", "-p", str(self.prefix), "-c", str(self.conf)],
                               capture_output=True, text=True, check=False)
        if check.returncode != 0:
            raise RuntimeError(f"nginx config {self.conf} refused: {check.stderr}")
        self._spawn([exe, "-p", str(self.prefix), "-c", str(self.conf)])
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"{self.name} did not listen: {self.tail()}")


class Upstream(Nginx):
    """The fixed-response upstream: an instant-query JSON body, and a write sink (remote_write, Loki push)
    that reads the whole body before it answers 204 (request buffering in front of a unix-socket server
    that discards it), as a real Mimir or Loki must."""

    def __init__(self, workdir: Path, workers: int, streams_file: Path | None = None):
        super().__init__(workdir, "upstream", workers)
        self.sink_sock = self.prefix / "sink.sock"
        self.sink_log = self.prefix / "sink.log"
        self.streams_file = streams_file  # the abuse section: every Loki query_range answers this file

    def configure(self) -> Self:
        self.write_config(self._common() + "http {\n" + self._http_common() + f"""
  log_format sink '$request_length $status $upstream_status $content_length';
  upstream sink {{ server unix:{self.sink_sock}; keepalive 64; }}
  server {{
    listen unix:{self.sink_sock};
    client_max_body_size 128m;
    location / {{ return 204; }}
  }}
  server {{
    listen 127.0.0.1:{self.port} backlog=4096;
    location = /prometheus/api/v1/query {{
      default_type application/json;
      return 200 '{PROM_BODY}';
    }}
    # the gateway's LBAC probe: answer a malformed X-Prom-Label-Policy as a backend that enforces it does,
    # so the header-mode gateway trusts this upstream (workload b)
    location = /prometheus/api/v1/labels {{
      default_type application/json;
      if ($http_x_prom_label_policy = "gateway-lbac-probe") {{
        return 400 '{{"status":"error","error":"invalid label policy header value"}}';
      }}
      return 200 '{{"status":"success","data":[]}}';
    }}
{self._streams_location()}
    location ~ ^/(api/v1/push|loki/api/v1/push)$ {{
      client_max_body_size 128m;
      client_body_buffer_size 2m;
      proxy_request_buffering on;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_pass http://sink;
      access_log {self.sink_log} sink buffer=64k flush=1s;
    }}
    location / {{ return 404; }}
  }}
}}
""")
        return self


    def _streams_location(self) -> str:
        f = self.streams_file
        if f is None:
            return ""
        return (f"    location = /loki/api/v1/query_range {{ default_type application/json; root {f.parent}; "
                f"try_files /{f.name} =404; }}")


class NginxProxy(Nginx):
    """nginx as a plain reverse proxy to the upstream: keep-alive pool, tenant header set, request bodies
    streamed (like the gateway), same worker count as the gateway."""

    def __init__(self, workdir: Path, workers: int, upstream_port: int):
        super().__init__(workdir, "nginx-proxy", workers)
        self.upstream_port = upstream_port

    def configure(self) -> Self:
        self.write_config(self._common() + "http {\n" + self._http_common() + f"""
  upstream up {{ server 127.0.0.1:{self.upstream_port}; keepalive 128; }}
  server {{
    listen 127.0.0.1:{self.port} backlog=4096;
    client_max_body_size 128m;
    location / {{
      proxy_pass http://up;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Authorization "";
      proxy_set_header X-Scope-OrgID 100;
      proxy_request_buffering off;
    }}
  }}
}}
""")
        return self


BENCH_ORGS: list[dict[str, Any]] = [
    {"id": 1, "name": "acme", "stacks": [
        {"id": 100, "name": "acme-prod", "tenants": {"metrics": "100", "logs": "100", "traces": "100"}},
        {"id": 101, "name": "acme-dev", "tenants": {"metrics": "101", "logs": "l101", "traces": "t101"}},
    ]},
]


class FloorProxy(Server):
    """`python -m bench.floor`: Python's floor, a Protocol + httptools proxy without auth (bench/floor.py)."""

    name = "floor"

    def __init__(self, workdir: Path, workers: int, upstream_port: int):
        super().__init__(workdir)
        self.fl_workers, self.upstream_port = workers, upstream_port

    def start(self, timeout: float = 30.0) -> Self:
        self._spawn([sys.executable, "-m", "bench.floor", "--listen", f"127.0.0.1:{self.port}",
                     "--upstream", f"127.0.0.1:{self.upstream_port}", "--workers", str(self.fl_workers)])
        deadline = time.monotonic() + timeout
        while self.log_path.read_text(errors="replace").count("floor listening") < self.fl_workers:
            if time.monotonic() > deadline:
                raise RuntimeError(f"floor proxy did not start: {self.tail()}")
            time.sleep(0.05)
        return self


def gateway_config(port: int, dsn: str, upstream_url: str, lbac: str, data_dir: Path,
                   limits: dict[str, Any] | None = None) -> dict[str, Any]:
    """The gateway's config for a run: every signal to the bench upstream; production defaults otherwise
    (log level info, so the JSON access log line is written for every request, to a file)."""
    return {
        **({"limits": limits} if limits else {}),
        "listen": f"127.0.0.1:{port}", "region": "local", "data_dir": str(data_dir), "log_level": "info",
        "database": {"url": dsn, "resync_interval": 60, "usage_flush_interval": 10},
        "orgs": BENCH_ORGS,
        "upstreams": {"metrics": {"url": upstream_url, "lbac": lbac}, "logs": {"url": upstream_url, "lbac": lbac},
                      "traces": {"url": upstream_url}},
    }


class GatewayServer(Server):
    """`python -m gateway serve -c FILE --workers N`; with ``tree``, the ``gateway`` package of that checkout
    (``python -m bench --baseline``: run from it, with it alone on PYTHONPATH, in the same venv). ``extra`` are
    further top-level config sections (``tenant_limits`` for ``--limits``)."""

    def __init__(self, workdir: Path, name: str, dsn: str, upstream_url: str, lbac: str, workers: int,
                 limits: dict[str, Any] | None = None, tree: Path | None = None,
                 extra: dict[str, Any] | None = None):
        self.name = name
        super().__init__(workdir)
        self.gw_workers = workers
        self.tree = self.cwd = tree
        self.config_path = workdir / f"{name}.yaml"
        self.config_path.write_text(yaml.safe_dump(
            {**gateway_config(self.port, dsn, upstream_url, lbac, workdir / f"{name}-data", limits), **(extra or {})}))
        self.started_at = 0.0

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
        if self.tree is not None:
            env["PYTHONPATH"] = str(self.tree)
        return env

    def start(self, timeout: float = 60.0) -> float:
        """Start; returns the seconds to the first ``/ready`` 200."""
        self.started_at = time.monotonic()
        self._spawn([sys.executable, "-m", "gateway", "serve", "-c", str(self.config_path),
                     "--workers", str(self.gw_workers)], env=self.env())
        return self.wait_http("/ready", timeout)

    def wait_all_listening(self, timeout: float = 60.0) -> float:
        """Seconds from spawn until every worker has logged that it listens (each has its snapshot)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.log_path.read_text(errors="replace").count("gateway listening on") >= self.gw_workers:
                return time.monotonic() - self.started_at
            time.sleep(0.02)
        raise RuntimeError(f"{self.name}: workers not all listening in {timeout}s: {self.tail()}")

    def bootstrap_token(self) -> str:
        out = subprocess.run([sys.executable, "-m", "gateway", "token", "bootstrap", "-c", str(self.config_path),
                              "--org", "1"], capture_output=True, text=True, check=True, timeout=60,
                             env=self.env(), cwd=self.tree)
        return out.stdout.strip().splitlines()[-1]


@dataclass
class MemorySample:
    rss_mb: float
    pss_mb: float
    peak_rss_mb: float
    worker_rss_mb: list[float]


def memory(server: Server) -> MemorySample:
    pids = server.all_pids()
    workers = server.workers()
    return MemorySample(rss_mb=round(sum(rss_mb(p) for p in pids), 1), pss_mb=round(sum(pss_mb(p) for p in pids), 1),
                        peak_rss_mb=round(sum(peak_rss_mb(p) for p in pids), 1),
                        worker_rss_mb=[round(rss_mb(p), 1) for p in workers])
