"""HTTP load with Debian's wrk: one generated Lua script per workload, results read back as JSON.

Closed-loop runs (no delay) measure the maximum throughput. Runs at a fixed offered load use a Lua
``delay()`` per connection (wrk2 is not in Debian): with C connections and a mean think time of D ms,
each connection sends about 1000/(D + latency) requests a second, the same schedule for every path.
Think times are drawn uniformly in [D/2, 3D/2] so the connections do not march in step.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

PERCENTILES = (50, 75, 90, 99, 99.9)
MARK = "BENCHJSON "


@dataclass(frozen=True)
class Workload:
    """The same requests for every path; ``vary`` = (prefix, suffix) of a path with a counter between."""

    name: str
    title: str
    path: str
    headers: dict[str, str]
    method: str = "GET"
    body_file: Path | None = None
    body_bytes: int = 0
    vary: tuple[str, str] | None = None
    connections: int = 50


@dataclass
class WrkResult:
    requests: int
    seconds: float
    rps: float
    bytes_read: int
    errors: dict[str, int]
    latency_ms: dict[str, float]
    mean_ms: float
    max_ms: float
    connections: int
    delay_ms: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def failed(self) -> int:
        return sum(self.errors.values())

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _lua_str(value: str) -> str:
    """A Lua long string literal that cannot be closed by ``value``."""
    level = 0
    while f"]{'=' * level}]" in value:
        level += 1
    eq = "=" * level
    return f"[{eq}[{value}]{eq}]"


def script(w: Workload, delay_ms: float | None = None, counter_base: int = 0) -> str:
    """The wrk Lua script for ``w``; ``delay_ms`` turns on the per-connection think time."""
    lines = [f"wrk.method = {_lua_str(w.method)}", f"wrk.path = {_lua_str(w.path)}"]
    for k, v in w.headers.items():
        lines.append(f"wrk.headers[ {_lua_str(k)} ] = {_lua_str(v)}")
    if w.body_file is not None:
        lines.append(f"local f = assert(io.open({_lua_str(str(w.body_file))}, 'rb'))")
        lines.append("wrk.body = f:read('*a')")
        lines.append("f:close()")
    lines.append(f"local counter = {int(counter_base)}")
    lines.append("function setup(thread) thread:set('tid', (tid_next or 0)); tid_next = (tid_next or 0) + 1 end")
    lines.append("function init(args) counter = counter + (tid or 0) * 100000000; "
                 "math.randomseed(counter + os.time()) end")
    if w.vary is not None:
        prefix, suffix = w.vary
        lines.append(f"local prefix, suffix = {_lua_str(prefix)}, {_lua_str(suffix)}")
        lines.append("function request() counter = counter + 1; "
                     "return wrk.format(nil, prefix .. counter .. suffix) end")
    if delay_ms is not None:
        lo, hi = max(0, round(delay_ms * 0.5)), max(1, round(delay_ms * 1.5))
        lines.append(f"function delay() return math.random({lo}, {hi}) end")
    pct = ", ".join(str(p) for p in PERCENTILES)
    lines.append(f"""
function done(summary, latency, requests)
  local ps = {{}}
  for _, p in ipairs({{{pct}}}) do ps[#ps + 1] = string.format('"%s": %d', tostring(p), latency:percentile(p)) end
  local e = summary.errors
  io.write(string.format('{MARK}{{"requests": %d, "duration_us": %d, "bytes": %d, ' ..
    '"errors": {{"connect": %d, "read": %d, "write": %d, "status": %d, "timeout": %d}}, ' ..
    '"latency_us": {{%s}}, "mean_us": %f, "max_us": %d}}\\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status, e.timeout,
    table.concat(ps, ", "), latency.mean, latency.max))
end""")
    return "\n".join(lines) + "\n"


def run_wrk(url: str, script_path: Path, seconds: float, connections: int, threads: int = 1,
            delay_ms: float | None = None) -> WrkResult:
    """Run wrk once against ``url`` (the path comes from the script) and parse its JSON line."""
    exe = shutil.which("wrk") or "wrk"
    argv = [exe, "-t", str(threads), "-c", str(connections), "-d", f"{max(1, round(seconds))}s",
            "--timeout", "10s", "-s", str(script_path), url]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60, check=False)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith(MARK)), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed ({proc.returncode}): {proc.stdout[-1500:]} {proc.stderr[-1500:]}")
    raw = json.loads(line[len(MARK):])
    secs = raw["duration_us"] / 1e6
    return WrkResult(
        requests=raw["requests"], seconds=round(secs, 3), rps=round(raw["requests"] / secs, 1),
        bytes_read=raw["bytes"], errors=raw["errors"],
        latency_ms={f"p{p:g}": raw["latency_us"][str(p)] / 1000 for p in PERCENTILES},
        mean_ms=round(raw["mean_us"] / 1000, 3), max_ms=raw["max_us"] / 1000, connections=connections,
        delay_ms=delay_ms)


def delay_for(rate: float, connections: int, latency_ms: float = 0.0) -> float:
    """Mean think time (ms) that makes ``connections`` closed-loop connections offer about ``rate`` req/s."""
    return max(1.0, connections * 1000.0 / rate - latency_ms)
