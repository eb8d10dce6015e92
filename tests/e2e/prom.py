"""Start real Prometheus instances (Debian's 2.42 package) for end-to-end tests.

Plain functions and classes, no fixtures: the lead wires them into ``conftest.py``.

* :func:`find_prometheus` / :func:`require_binary` locate the binaries; a missing binary
  skips the test locally but FAILS it when ``CI=true``, because CI must not pass by
  silently skipping every end-to-end test.
* :func:`build_tsdb` turns OpenMetrics text into TSDB blocks with ``promtool`` (about a
  second, instead of scraping for hours).
* :class:`PrometheusProcess` runs ``prometheus`` on a free 127.0.0.1 port with a minimal
  config, waits for ``/-/ready`` and stops it cleanly.

Data timestamps: ``promtool tsdb create-blocks-from`` only accepts samples in the past,
and Prometheus drops blocks older than its retention, so test data should live in a
window ending a few minutes before "now" (:func:`data_window`) and the instances run with
a long retention (:data:`DEFAULT_RETENTION`).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import pytest

DEFAULT_RETENTION = "3650d"
"""Long enough that blocks built from data in the recent past are never deleted at start."""


@dataclass(frozen=True)
class PrometheusBinaries:
    prometheus: str
    promtool: str


def find_prometheus() -> PrometheusBinaries | None:
    """Paths of ``prometheus`` and ``promtool`` (``$PROMETHEUS_BIN``/``$PROMTOOL_BIN`` or PATH), or None."""
    prom = os.environ.get("PROMETHEUS_BIN") or shutil.which("prometheus")
    tool = os.environ.get("PROMTOOL_BIN") or shutil.which("promtool")
    if not prom or not tool:
        return None
    return PrometheusBinaries(prom, tool)


def require_binary(name: str) -> str:
    """Path of executable ``name``; skip the test if missing, or fail it when ``CI=true``.

    CI installs every binary the end-to-end tests need, so a missing one there is a
    broken pipeline, not a reason to report green.
    """
    env_var = f"{name.upper().replace('-', '_')}_BIN"
    path = os.environ.get(env_var) or shutil.which(name)
    if path:
        return path
    msg = f"{name} not found on PATH (or ${env_var}); install it (Debian: apt-get install {name})"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(msg)
    pytest.skip(msg)
    raise AssertionError("unreachable")  # pragma: no cover - skip() raises


def require_prometheus() -> PrometheusBinaries:
    """Both binaries, with :func:`require_binary`'s skip/fail policy."""
    return PrometheusBinaries(require_binary("prometheus"), require_binary("promtool"))


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (tiny race window, fine for tests)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def data_window(hours: float = 2.0, step_s: int = 60, margin_s: int = 600) -> tuple[int, int]:
    """``(start, end)`` unix seconds: ``hours`` long, ending ``margin_s`` before now, aligned to ``step_s``.

    promtool refuses samples from the future, and keeping the data near "now" keeps it
    inside retention and visible to instant queries at chosen times within the window.
    """
    end = (int(time.time()) - margin_s) // step_s * step_s
    return end - int(hours * 3600), end


def _escape_label_value(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def openmetrics_text(series: Iterable[tuple[Mapping[str, str], Sequence[tuple[int, float]]]]) -> str:
    """Render ``(labels incl. __name__, [(ts_seconds, value), ...])`` as OpenMetrics text.

    Samples of one metric family are grouped (OpenMetrics requires it) and typed
    ``unknown``: PromQL in Prometheus 2.x ignores metric types, and ``counter`` would
    force the OpenMetrics ``_total`` naming rules on the test data.
    """
    by_name: dict[str, list[tuple[Mapping[str, str], Sequence[tuple[int, float]]]]] = {}
    for labels, samples in series:
        by_name.setdefault(labels["__name__"], []).append((labels, samples))
    lines: list[str] = []
    for name in sorted(by_name):
        lines.append(f"# TYPE {name} unknown")
        for labels, samples in by_name[name]:
            body = ",".join(f'{k}="{_escape_label_value(v)}"' for k, v in sorted(labels.items()) if k != "__name__")
            sel = f"{name}{{{body}}}" if body else name
            for ts, value in samples:
                lines.append(f"{sel} {_fmt_value(value)} {ts}")
    lines.append("# EOF")
    return "\n".join(lines) + "\n"


def _fmt_value(v: float) -> str:
    if v != v:
        return "NaN"
    if v in (float("inf"), float("-inf")):
        return "+Inf" if v > 0 else "-Inf"
    return repr(float(v))


def build_tsdb(openmetrics: str, tsdb_dir: str | os.PathLike[str], promtool: str | None = None) -> Path:
    """Write TSDB blocks for ``openmetrics`` text into ``tsdb_dir`` with promtool; returns the dir."""
    tool = promtool or require_binary("promtool")
    out = Path(tsdb_dir)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", suffix=".om", delete=False, encoding="utf-8") as f:
        f.write(openmetrics)
        src = f.name
    try:
        proc = subprocess.run(
            [tool, "tsdb", "create-blocks-from", "openmetrics", "--quiet", src, str(out)],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    finally:
        os.unlink(src)
    if proc.returncode != 0:
        raise RuntimeError(f"promtool failed ({proc.returncode}): {proc.stderr or proc.stdout}")
    return out


class PrometheusError(RuntimeError):
    """Prometheus answered a query with an error (``errorType``/``error`` are attributes)."""

    def __init__(self, status: int, error_type: str, error: str) -> None:
        super().__init__(f"{status} {error_type}: {error}")
        self.status = status
        self.error_type = error_type
        self.error = error


class PrometheusProcess:
    """A Prometheus server on a free 127.0.0.1 port; use as a (sync) context manager.

    ``url`` is the base including the route prefix (no trailing slash). The config
    scrapes nothing, so the data is exactly what the TSDB directory holds plus whatever
    arrives through remote write (``remote_write_receiver=True``).
    """

    def __init__(
        self,
        tsdb_dir: str | os.PathLike[str],
        *,
        remote_write_receiver: bool = False,
        route_prefix: str = "",
        extra_args: Sequence[str] = (),
        config_yaml: str = "global:\n  scrape_interval: 1h\n  evaluation_interval: 1h\n",
        binary: str | None = None,
        startup_timeout: float = 30.0,
    ) -> None:
        self.tsdb_dir = Path(tsdb_dir)
        self.remote_write_receiver = remote_write_receiver
        self.route_prefix = "/" + route_prefix.strip("/") if route_prefix.strip("/") else ""
        self.extra_args = list(extra_args)
        self.config_yaml = config_yaml
        self.binary = binary
        self.startup_timeout = startup_timeout
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self._workdir: tempfile.TemporaryDirectory[str] | None = None
        self._log: Any = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{self.route_prefix}"

    def start(self) -> PrometheusProcess:
        binary = self.binary or require_binary("prometheus")
        self._workdir = tempfile.TemporaryDirectory(prefix="prom-e2e-")
        cfg = Path(self._workdir.name) / "prometheus.yml"
        cfg.write_text(self.config_yaml, encoding="utf-8")
        self._log = open(Path(self._workdir.name) / "prometheus.log", "wb")  # noqa: SIM115
        self.port = free_port()
        args = [
            binary,
            f"--config.file={cfg}",
            f"--storage.tsdb.path={self.tsdb_dir}",
            f"--storage.tsdb.retention.time={DEFAULT_RETENTION}",
            f"--web.listen-address=127.0.0.1:{self.port}",
            "--log.level=warn",
        ]
        if self.route_prefix:
            args.append(f"--web.route-prefix={self.route_prefix}")
        if self.remote_write_receiver:
            args.append("--web.enable-remote-write-receiver")
        args.extend(self.extra_args)
        self.proc = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"prometheus exited with {self.proc.returncode}:\n{self.log_text()}")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, OSError) as exc:
                last = exc
            time.sleep(0.05)
        raise RuntimeError(f"prometheus not ready after {self.startup_timeout}s ({last}):\n{self.log_text()}")

    def log_text(self) -> str:
        if self._workdir is None:
            return ""
        try:
            return (Path(self._workdir.name) / "prometheus.log").read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def stop(self) -> None:
        """SIGTERM, wait, then SIGKILL if Prometheus does not exit within 10 s."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.proc = None
        if self._log is not None:
            self._log.close()
            self._log = None
        if self._workdir is not None:
            self._workdir.cleanup()
            self._workdir = None

    def __enter__(self) -> PrometheusProcess:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # -- tiny synchronous API client (urllib: no event loop needed in sync tests) --

    def api(self, path: str, params: Mapping[str, Any] | Sequence[tuple[str, Any]]) -> Any:
        """GET ``/api/v1/<path>`` with ``params`` (a sequence of pairs allows repeated ``match[]``).

        Returns ``data`` on success; raises :class:`PrometheusError` on an API error.
        """
        return api_get(self.url, path, params)

    def query(self, query: str, time_s: float) -> Any:
        return self.api("query", {"query": query, "time": _fmt_ts(time_s)})

    def query_range(self, query: str, start: float, end: float, step: float) -> Any:
        return self.api(
            "query_range",
            {"query": query, "start": _fmt_ts(start), "end": _fmt_ts(end), "step": repr(float(step))},
        )

    def series(self, matches: Sequence[str], start: float, end: float) -> list[dict[str, str]]:
        params: list[tuple[str, Any]] = [("match[]", m) for m in matches]
        params += [("start", _fmt_ts(start)), ("end", _fmt_ts(end))]
        return list(self.api("series", params))

    def remote_read(self, body: bytes) -> tuple[str, bytes]:
        """POST a snappy ``ReadRequest`` to ``/api/v1/read``: ``(content type, raw answer body)``."""
        req = urllib.request.Request(f"{self.url}/api/v1/read", data=body, method="POST", headers={
            "Content-Type": "application/x-protobuf", "Content-Encoding": "snappy",
            "X-Prometheus-Remote-Read-Version": "0.1.0"})
        try:
            with urllib.request.urlopen(req, timeout=60) as resp:
                return resp.headers.get("Content-Type", ""), resp.read()
        except urllib.error.HTTPError as exc:
            text = exc.read()[:500].decode(errors="replace")
            exc.close()
            raise PrometheusError(exc.code, "remote_read", text) from None

    def format_query(self, query: str) -> str:
        """Prometheus's own printing of ``query`` (an oracle that it parses and what it means)."""
        return str(self.api("format_query", {"query": query}))


def _fmt_ts(t: float) -> str:
    return f"{t:.3f}"


def api_get(base_url: str, path: str, params: Mapping[str, Any] | Sequence[tuple[str, Any]]) -> Any:
    """GET ``<base_url>/api/v1/<path>``: ``data`` or :class:`PrometheusError`."""
    items = list(params.items()) if isinstance(params, Mapping) else list(params)
    url = f"{base_url}/api/v1/{path}?{urllib.parse.urlencode(items)}"
    try:
        with urllib.request.urlopen(url, timeout=60) as resp:
            status, body = resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        status, body = exc.code, exc.read()
        exc.close()
    try:
        doc = json.loads(body)
    except ValueError:
        raise PrometheusError(status, "bad_response", body[:500].decode(errors="replace")) from None
    if doc.get("status") != "success":
        raise PrometheusError(status, str(doc.get("errorType")), str(doc.get("error")))
    return doc["data"]
