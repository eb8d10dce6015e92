"""Two gateways side by side in one run: ``python -m bench --baseline REF`` and ``python -m bench --limits``.

``--baseline REF`` (issue 24): this tree's gateway against REF's, checked out into a temporary git worktree
(removed afterwards, whatever happens) and run from it, with only it on PYTHONPATH, in the same venv. Each side
has its own database (on the same embedded PostgreSQL), migrated by its own code, and tokens made through its
own admin API; the config is the one ``bench.servers`` writes, which both must accept (a gateway that refuses
it fails to start with its config error in the message). Workloads (a), (b), (c).

``--limits`` (issue 28): this tree's gateway with ``tenant_limits`` defaults and the bench policies'
``attributes.gatewayLimits`` set above the load, against the same gateway without limits. Workload (a): rates
far above what 2 cores can send; with ``all`` concurrent queries too, 200 (4 x the 50 connections: configured,
not hit, and small enough that the workers lease its slots a few at a time).
It exits 1 (the figures written anyway) if a request failed (wrk counts a 429 or 503 as one) or
``gateway_limited_requests_total`` counted one; a request of another tenant, blocked by the same config,
proves first that the limits are live and that the counter is read.

Both sides share the upstream, wrk's settings and the worker count; rounds are interleaved (A B, B A, ...).
Per workload: each side's medians (run.summarize) and the ratio of the first side to the second per round, its
median and spread (min-max). Only this runs; results.json keeps its other sections and gets ``compare`` (or
``compare_limits``) with both commits and the date.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg

from bench.loadgen import Workload, WrkResult
from bench.micro import basic
from bench.run import (
    Bench,
    build_workloads,
    check_through,
    create_tokens,
    gateway_mode,
    log,
    machine,
    machine_line,
    scratch,
    start_database,
    started,
    summarize,
)
from bench.scale import with_db
from bench.servers import GatewayServer, Server, Upstream, ensure_tools

REPO = Path(__file__).resolve().parents[1]
BASELINE_WORKLOADS = ("a", "b", "c_cached", "c_uncached")
FAR = 1_000_000  # requests per second and burst: far above what 2 cores can send through a gateway
RATES = {"requests_per_second": FAR, "burst": FAR, "write_bytes_per_second": 2_000_000_000}
POLICY_RATES = {"requestsPerSecond": FAR, "burst": FAR, "writeBytesPerSecond": 2_000_000_000}
CONCURRENT = 200  # queries in flight, with --limits all (workload (a) keeps 50 in flight)
PROOF_TENANT = "101"  # blocked by the --limits config: a request of it proves the limits are live


def git(*argv: str) -> str:
    return subprocess.run(["git", "-C", str(REPO), *argv], capture_output=True, text=True, check=True).stdout.strip()


def current_commit() -> str:
    """HEAD, marked ``+dirty`` when the tree measured has uncommitted changes to tracked files."""
    dirty = git("status", "--porcelain", "--untracked-files=no")
    return git("rev-parse", "HEAD") + ("+dirty" if dirty else "")


@contextlib.contextmanager
def checkout(ref: str, where: Path) -> Iterator[str]:
    """``ref`` checked out (detached) at ``where`` as a git worktree of this repository; yields its commit.
    The worktree is removed afterwards, also when the run fails."""
    try:
        commit = git("rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}")
    except subprocess.CalledProcessError:
        raise SystemExit(f"bench: --baseline {ref!r} is not a commit of {REPO}") from None
    try:
        git("worktree", "add", "--detach", "--quiet", str(where), commit)
        yield commit
    finally:
        with contextlib.suppress(subprocess.CalledProcessError):
            git("worktree", "remove", "--force", str(where))
        with contextlib.suppress(subprocess.CalledProcessError):
            git("worktree", "prune")


def imported_from(gw: GatewayServer) -> str:
    """Where ``gw`` (started from its tree, with its environment) imports ``gateway`` from: it must be its
    tree, not the venv's editable install nor the tree the harness runs from."""
    assert gw.tree is not None
    out = subprocess.run([sys.executable, "-c", "import gateway; print(gateway.__file__)"], cwd=gw.cwd,
                         env=gw.env(), capture_output=True, text=True, check=True)
    path = out.stdout.strip()
    if not Path(path).resolve().is_relative_to(gw.tree.resolve()):
        raise RuntimeError(f"{gw.name}, started from {gw.tree}, would import {path}")
    return path


def create_database(dsn: str, name: str) -> str:
    """An empty database ``name`` beside ``dsn``'s (the gateway started on it migrates it); returns its DSN."""
    async def create() -> None:
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()
    asyncio.run(create())
    return with_db(dsn, name)


@dataclass
class Side:
    """One of the two gateways: its code (a checkout), database and extra config, then its gateways (one per
    ``lbac`` mode its workloads need) and workloads (with its own tokens)."""

    name: str
    tree: Path
    commit: str
    dsn: str
    config: dict[str, Any] = field(default_factory=dict)
    attributes: dict[str, Any] | None = None
    gateways: dict[str, GatewayServer] = field(default_factory=dict)
    tokens: dict[str, str] = field(default_factory=dict)
    workloads: dict[str, Workload] = field(default_factory=dict)

    def start(self, workdir: Path, up: Upstream, workers: int, names: tuple[str, ...],
              servers: list[Server]) -> None:
        own = workdir / self.name
        own.mkdir(mode=0o755)
        for mode in sorted({gateway_mode(n) for n in names}):
            gw = GatewayServer(own, f"gateway-{self.name}-{mode}", self.dsn, up.url, mode, workers,
                               tree=self.tree, extra=self.config)
            log(f"  {gw.name}: gateway from {imported_from(gw)}")
            servers.append(gw)
            gw.start()
            gw.wait_all_listening()
            self.gateways[mode] = gw
        self.tokens = create_tokens(next(iter(self.gateways.values())), self.attributes)
        self.workloads = {w.name: w for w in build_workloads(own, self.tokens) if w.name in names}
        for w in self.workloads.values():
            check_through(self.gateways[gateway_mode(w.name)], w)

    def stop(self) -> None:
        for gw in self.gateways.values():
            gw.stop()


class SideBench(Bench):
    """run.Bench's measured run (wrk, CPU per request from /proc) with the sides' gateways as its paths."""

    def __init__(self, args: argparse.Namespace, workdir: Path, up: Upstream, sides: tuple[Side, Side]):
        self.args, self.workdir, self.up, self.counter = args, workdir, up, 0
        self.sides = sides

    def target(self, path: str, w: Workload) -> Server:
        return next(s for s in self.sides if s.name == path).gateways[gateway_mode(w.name)]

    def workload(self, w: Workload) -> dict[str, Any]:
        """``w`` on both sides, interleaved round by round; the first side over the second per round."""
        a = self.args
        runs: dict[str, list[WrkResult]] = {s.name: [] for s in self.sides}
        for s in self.sides:
            self.one(s.name, s.workloads[w.name], a.warmup)
        for rnd in range(a.reps):
            for s in self.sides if rnd % 2 == 0 else self.sides[::-1]:
                r = self.one(s.name, s.workloads[w.name], a.duration)
                runs[s.name].append(r)
                log(f"  {w.name:<10} {s.name:<9} {r.rps:>9.0f} req/s  CPU {r.extra['cpu_s_per_10k'] * 100:.1f} µs/req")
        first, second = (runs[s.name] for s in self.sides)
        return {"title": w.title, "connections": w.connections,
                "summary": {name: summarize(rs) for name, rs in runs.items()},
                "ratio": {"cpu_per_request": per_round(first, second, lambda r: r.extra["cpu_s_per_10k"]),
                          "rps": per_round(first, second, lambda r: r.rps)},
                "runs": {name: [r.as_dict() for r in rs] for name, rs in runs.items()}}


def per_round(first: list[WrkResult], second: list[WrkResult], get: Callable[[WrkResult], float]) -> dict[str, float]:
    """The ratio first/second of each round (the two runs sit next to each other): median, min and max."""
    vals = [get(x) / get(y) for x, y in zip(first, second, strict=True) if get(y)]
    if not vals:
        return {}
    return {"median": round(statistics.median(vals), 3), "min": round(min(vals), 3), "max": round(max(vals), 3)}


def compare(bench: SideBench, names: tuple[str, ...], workers: int, note: str) -> dict[str, Any]:
    a = bench.args
    first, second = bench.sides
    log(f"{first.name} {short(first.commit)} against {second.name} {short(second.commit)}: {', '.join(names)}")
    out: dict[str, Any] = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "note": note, "machine": machine(),
        "workers": workers, "duration_s": a.duration,
        "rounds": a.reps, "ratio": f"{first.name} / {second.name}",
        "sides": {s.name: {"commit": s.commit, "config": s.config, "attributes": s.attributes} for s in bench.sides},
        "workloads": {}}
    for name in names:
        out["workloads"][name] = bench.workload(first.workloads[name])
    return out


def limited_total(gw: GatewayServer) -> dict[str, float]:
    """``gateway_limited_requests_total`` from the gateway's /metrics (all workers), per label set."""
    with urllib.request.urlopen(f"{gw.url}/metrics", timeout=10) as r:  # noqa: S310 - loopback
        text = r.read().decode()
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
            if line.startswith("gateway_limited_requests_total{")}


def prove_live(side: Side) -> None:
    """A request of the tenant the config blocks is refused and counted: the limits are in force on this
    gateway and ``limited_total`` reads the counter."""
    gw = side.gateways["header"]
    req = urllib.request.Request(f"{gw.url}{side.workloads['a'].path}",  # noqa: S310 - loopback
                                 headers={"Authorization": basic(PROOF_TENANT, side.tokens["open"])})
    try:
        with urllib.request.urlopen(req, timeout=5) as r:  # noqa: S310 - loopback
            status = r.status
    except urllib.error.HTTPError as exc:
        status = exc.code
    counted = limited_total(gw)
    if status != 503 or sum(counted.values()) != 1:
        raise RuntimeError(f"--limits: the blocked tenant got {status} (want 503); counted {counted} (want one)")


def limits_config(kind: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the YAML's ``tenant_limits``, the policies' ``attributes``): every tenant and the bench policies limited
    far above the load (``all``: concurrent queries too); one other tenant blocked, for :func:`prove_live`."""
    rates: dict[str, Any] = dict(RATES)
    policy: dict[str, Any] = dict(POLICY_RATES)
    if kind == "all":
        rates["concurrent_queries"] = policy["concurrentQueries"] = CONCURRENT
    block = {"reads": {"status": 503, "message": "bench: blocked to prove the limits are live"}}
    return ({"defaults": rates, "tenants": {PROOF_TENANT: {"block": block}}}, {"gatewayLimits": policy})


def record_refusals(result: dict[str, Any], side: Side) -> None:
    """Whether anything was refused: a failed request on either side (wrk counts a 429 or 503 as one), or a
    count in ``gateway_limited_requests_total`` beyond the proof's."""
    failed = {name: s["errors"] for name, s in result["workloads"]["a"]["summary"].items() if s["errors"]}
    counted = {k: v for k, v in limited_total(side.gateways["header"]).items() if f'name="{PROOF_TENANT}"' not in k}
    result["limited"] = {"failed_requests": failed, "gateway_limited_requests_total": counted,
                         "none_refused": not failed and not any(counted.values())}


def main(args: argparse.Namespace) -> int:
    """Set up (embedded PostgreSQL, the nginx upstream, the sides), compare, write and print."""
    ensure_tools()
    workers = args.workers or os.cpu_count() or 2
    keep = set(args.only.split(",")) if args.only else set()
    names = tuple(n for n in BASELINE_WORKLOADS if not keep or n in keep)
    if args.baseline and not names:
        raise SystemExit(f"bench: --only picks none of {', '.join(BASELINE_WORKLOADS)}")
    out: dict[str, Any] = {}
    commit = current_commit()
    with scratch() as workdir, contextlib.ExitStack() as stack:
        base: tuple[Path, str] | None = None  # the baseline's tree and commit
        if args.baseline:
            tree = workdir / "baseline-tree"
            base = tree, stack.enter_context(checkout(args.baseline, tree))
            log(f"baseline {args.baseline} = {base[1]}")
        servers: list[Server] = []
        stack.enter_context(started(servers))
        log(f"machine: {machine_line()}; starting embedded PostgreSQL and the nginx upstream")
        dsn = start_database(workdir)
        up = Upstream(workdir, workers).configure().start()
        servers.append(up)
        if base is not None:
            pair = (Side("current", REPO, commit, dsn), Side("baseline", *base, create_database(dsn, "bench_baseline")))
            out["compare"] = run_pair(args, workdir, up, workers, pair, names, servers,
                                      f"--baseline {args.baseline}")
        if args.limits:
            tenant_limits, attributes = limits_config(args.limits)
            limited = Side("limits", REPO, commit, create_database(dsn, "bench_limits"),
                           {"tenant_limits": tenant_limits}, attributes)
            plain = Side("no-limits", REPO, commit, create_database(dsn, "bench_no_limits"))
            out["compare_limits"] = run_pair(args, workdir, up, workers, (limited, plain), ("a",), servers,
                                             f"--limits {args.limits}", check=True)
    return write(args.out / "results.json", out)


def run_pair(args: argparse.Namespace, workdir: Path, up: Upstream, workers: int, pair: tuple[Side, Side],
             names: tuple[str, ...], servers: list[Server], note: str, check: bool = False) -> dict[str, Any]:
    for s in pair:
        log(f"starting {s.name} ({short(s.commit)}, {s.tree})")
        s.start(workdir, up, workers, names, servers)
    try:
        if check:
            prove_live(pair[0])
        result = compare(SideBench(args, workdir, up, pair), names, workers, note)
        if check:
            record_refusals(result, pair[0])
        return result
    finally:
        for s in pair:
            s.stop()


def write(path: Path, sections: dict[str, Any]) -> int:
    """Put the comparison's sections into results.json (its other sections stay), and print them; 1 when
    ``--limits`` found a request refused (the figures are written anyway)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    results = json.loads(path.read_text()) if path.exists() else {}
    results.update(sections)
    path.write_text(json.dumps(results, indent=2) + "\n")
    for section in sections.values():
        print(table(section))
    log(f"wrote {', '.join(sections)} into {path}")
    if all(s.get("limited", {}).get("none_refused", True) for s in sections.values()):
        return 0
    log("--limits: requests were refused, so the limits were hit: the comparison does not measure what it should")
    return 1


def table(c: dict[str, Any]) -> str:
    """The comparison as text: per workload, each side's medians, then the ratio with its spread."""
    sides = list(c["sides"])
    head = (f"{c['ratio']} ({c['note']}), {c['when']}: " + ", ".join(
        f"{n} {short(c['sides'][n]['commit'])}" for n in sides) +
        f"\n{c['workers']} workers each, {c['duration_s']} s runs x {c['rounds']} interleaved rounds, medians; "
        f"{machine_line(c['machine'])}")
    cols = f"{'workload':<52} {'side':<10} {'req/s':>9} {'CPU µs/req':>11} {'user':>6} {'sys':>6} {'errors':>6}"
    lines = [head, "", cols, "-" * len(cols)]
    for w in c["workloads"].values():
        for i, n in enumerate(sides):
            s = w["summary"][n]
            us = [f"{s[k] * 100:.1f}" if k in s else "-" for k in ("user_s_per_10k", "system_s_per_10k")]
            lines.append(f"{w['title'] if i == 0 else '':<52} {n:<10} {s['rps']:>9,.0f} "
                         f"{s['cpu_s_per_10k'] * 100:>11.1f} {us[0]:>6} {us[1]:>6} {s['errors']:>6}")
        r = w["ratio"]
        lines.append(f"{'':<52} {c['ratio']}: CPU per request {_spread(r['cpu_per_request'])}, "
                     f"req/s {_spread(r['rps'])}")
    if "limited" in c:
        lines.append(f"failed requests during the runs: {c['limited']['failed_requests'] or 'none'}; "
                     f"gateway_limited_requests_total: {c['limited']['gateway_limited_requests_total'] or 'none'}")
    return "\n".join(lines)


def short(commit: str) -> str:
    return commit[:12] + ("+dirty" if commit.endswith("+dirty") else "")


def _spread(r: dict[str, float]) -> str:
    return f"x{r['median']:.3f} (rounds {r['min']:.3f}-{r['max']:.3f})" if r else "-"
