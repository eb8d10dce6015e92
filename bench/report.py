"""The printed table, the targets verdict, the PNG chart and the py-spy profile summary."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Any

PATHS = ("direct", "nginx", "floor", "gateway")


def _get(d: dict[str, Any], *keys: str) -> Any:
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def _half_load(results: dict[str, Any]) -> dict[str, Any] | None:
    levels = _get(results, "sweep", "levels") or []
    return next((lv for lv in levels if lv["fraction"] == 0.5), None)


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target of issues 7 and 17 with the measured value and whether it holds (None: not measured)."""
    out: list[dict[str, Any]] = []

    def add(name: str, value: Any, limit: str, ok: bool | None, spread: list[float] | None = None) -> None:
        out.append({"target": name, "value": value, "limit": limit, "holds": ok, **({"spread": spread} if spread
                                                                                    else {})})

    wls = results.get("workloads") or {}
    a = _get(results, "workloads", "a", "summary")
    if a:
        ratio = a["gateway"].get("x_nginx")
        spread = a["gateway"].get("spread") or {}
        add("throughput gateway/nginx on (a), same workers", ratio, ">= 0.5", ratio is not None and ratio >= 0.5,
            spread.get("x_nginx"))
        cpu = round(a["gateway"]["cpu_s_per_10k"] / max(a["nginx"]["cpu_s_per_10k"], 1e-9), 2)
        add("CPU per request on (a), gateway / nginx proxy", cpu, "<= 2.5", cpu <= 2.5, spread.get("cpu_x_nginx"))
        fl = round(a["gateway"]["cpu_s_per_10k"] / max(a["floor"]["cpu_s_per_10k"], 1e-9), 2)
        add("CPU per request on (a), gateway / floor (same interpreter, uvloop and httptools; no target)", fl, "-",
            None, spread.get("cpu_x_floor"))
        for name in ("b", "c_cached"):
            other = _get(wls, name, "summary", "gateway", "rps")
            if other is not None:
                rel = round(other / a["gateway"]["rps"], 3)
                add(f"throughput ({name}) / (a) through the gateway", rel, ">= 0.9", rel >= 0.9)
    for name, limit in (("d", 0.8), ("e", 0.5)):
        s = _get(wls, name, "summary")
        if s and s["gateway"].get("mb_per_s") is not None and s["nginx"].get("mb_per_s"):
            rel = round(s["gateway"]["mb_per_s"] / s["nginx"]["mb_per_s"], 3)
            add(f"({name}) gateway / nginx MB/s", rel, f">= {limit}", rel >= limit)
    half = _half_load(results)
    if half:
        p50, p99 = half["added_ms"]["gateway_p50"], half["added_ms"]["gateway_p99"]
        note = " (gateway saturated at that moment: machine noise)" if "gateway" in half.get("saturated", ()) else ""
        add(f"gateway-added latency p50 at half the gateway's max{note}", p50, "<= 1 ms", p50 <= 1.0)
        add(f"gateway-added latency p99 at half the gateway's max{note}", p99, "<= 2 ms", p99 <= 2.0)
    m = results.get("micro") or {}
    if "decision_us" in m:
        warm = max(m["decision_us"], m["decision_restricted_us"])
        add("hot-path decision (µs, worse of open/restricted token)", warm, "<= 5 µs", warm <= 5)
        cold = m["decision_token_cold_us"]
        add("hot-path decision, first use of a token (decode cache miss, µs)", cold, "<= 15 µs", cold <= 15)
    if "promql_cached_us" in m:
        worst = max(m["promql_cached_us"], m["logql_cached_us"])
        add("cached rewrite, restrict_promql/restrict_logql (µs)", worst, "<= 5 µs", worst <= 5)
        add("cached rewrite incl. query-string parse/re-encode, lbac.enforce (µs)", m["promql_enforce_cached_us"],
            "<= 5 µs", m["promql_enforce_cached_us"] <= 5)
    d = _get(results, "workloads", "d")
    if d:
        mbs = d["summary"]["gateway"].get("mb_per_s")
        add("remote_write through the gateway (MB/s)", mbs, ">= 150 MB/s", mbs is not None and mbs >= 150)
        mem = d["gateway_memory"]
        growth = round(mem["rss_max_during_mb"] - mem["rss_before_mb"], 1)
        add("remote_write memory growth during the runs (MB, all workers)", growth, "flat: <= 64 MB", growth <= 64)
    ab = results.get("abuse")
    if ab:
        for name, ph in ab["phases"].items():
            add(f"abuse ({name}): another tenant's added p99 (ms)", ph["added_p99_ms"], "<= 50 ms",
                ph["added_p99_ms"] <= 50)
            add(f"abuse ({name}): worker RSS growth (MB, largest worker)", ph["worker_rss_growth_max_mb"],
                f"<= {ab['budget_mb']:.0f} MB (limits.fanout_memory)",
                ph["worker_rss_growth_max_mb"] <= ab["budget_mb"])
    s = results.get("scale")
    if s:
        add(f"{s['tokens']} tokens: seconds to every worker ready", s["all_workers_ready_s"], "<= 5 s",
            s["all_workers_ready_s"] <= 5)
        add(f"{s['tokens']} tokens: memory (PSS, parent + workers)", s["pss_mb"], "<= 250 MB", s["pss_mb"] <= 250)
        add(f"{s['tokens']} tokens: memory (RSS of the largest worker)", s["max_worker_rss_mb"], "<= 250 MB",
            s["max_worker_rss_mb"] <= 250)
    return out


def _fmt(v: Any, nd: int = 2) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.{nd}f}"
    return str(v)


def calibration_tag(results: dict[str, Any]) -> str:
    """The machine and its calibration (the floor's CPU per request on (a)), printed beside each block of
    figures: a figure without the machine it was taken on does not travel."""
    m = results.get("machine") or {}
    c = results.get("calibration") or {}
    who = (f"{m.get('cpu_model', '?')}, {m.get('cores', '?')} cores, kernel {m.get('kernel', '?')}" if m
           else "machine not recorded")
    if m.get("load_before"):
        who += f", load {m['load_before'][0]:.2f} before"
    cal = (f"floor {c['floor_cpu_us_per_req']:.1f} / nginx {c['nginx_cpu_us_per_req']:.1f} CPU µs per (a) request"
           if "floor_cpu_us_per_req" in c else "workload (a) not run")
    if "floor_user_us_per_req" in c:
        cal += f" (floor user {c['floor_user_us_per_req']:.1f} + system {c['floor_system_us_per_req']:.1f})"
    if "python_us" in c:
        cal += f", a fixed Python function {c['python_us']:.2f} µs"
    return f"[{who}; calibration: {cal}]"


def table(results: dict[str, Any]) -> str:
    lines: list[str] = []
    w = results.get("workloads") or {}
    tag = calibration_tag(results)
    lines.append("")
    lines.append(f"Benchmark: {results.get('cores')} cores, {results.get('workers')} workers each for nginx and "
                 f"the gateway, {results.get('duration_s')} s runs x {results.get('reps')} interleaved reps, "
                 f"{results.get('nginx')}, Python {results.get('python')}; medians")
    lines.append(tag)
    lines.append("x nginx = throughput / nginx's; CPU x fl, CPU x ng = the gateway's CPU per request / the floor's, "
                 "/ nginx's (medians of the ratios within each repetition)")
    lines.append("")
    head = (f"{'workload':<52} {'path':<8} {'req/s':>9} {'MB/s':>7} {'p50 ms':>7} {'p90 ms':>7} {'p99 ms':>7} "
            f"{'CPU µs/req':>10} {'x nginx':>8} {'CPU x fl':>8} {'CPU x ng':>8} {'peak RSS MB':>11}")
    lines.append(head)
    lines.append("-" * len(head))
    for wl in w.values():
        s = wl["summary"]
        for p in PATHS:
            r = s[p]
            ratio = _fmt(r.get("x_nginx"), 3) if p in ("gateway", "floor") else ""
            cpu_fl = _fmt(r.get("cpu_x_floor"), 2) if p == "gateway" else ""
            cpu_ng = _fmt(r.get("cpu_x_nginx"), 2) if p == "gateway" else ""
            rss = ""
            if p == "gateway":
                rss = _fmt(wl["gateway_memory"]["peak_rss_mb"], 0)
            elif p == "nginx":
                rss = _fmt(wl["nginx_memory"]["peak_rss_mb"], 0)
            err = f"  ({r['errors']} errors)" if r["errors"] else ""
            lines.append(f"{wl['title'] if p == 'direct' else '':<52.52} {p:<8} {r['rps']:>9,.0f} "
                         f"{_fmt(r.get('mb_per_s'), 0):>7} {r['p50_ms']:>7.2f} {r['p90_ms']:>7.2f} "
                         f"{r['p99_ms']:>7.2f} {r['cpu_s_per_10k'] * 100:>10.1f} {ratio:>8} {cpu_fl:>8} {cpu_ng:>8} "
                         f"{rss:>11}{err}")
    sweep = results.get("sweep")
    if sweep:
        lines.append("")
        lines.append(f"Latency at a fixed offered load (workload a, {sweep['connections']} connections with a "
                     f"think time; added = minus direct) {tag}:")
        head = (f"{'offered':>14} {'path':<8} {'req/s':>8} {'p50 ms':>7} {'p90 ms':>7} {'p99 ms':>7} "
                f"{'added p50':>9} {'added p99':>9}")
        lines.append(head)
        lines.append("-" * len(head))
        for lv in sweep["levels"]:
            for p in PATHS:
                r = lv["summary"][p]
                a50 = _fmt(lv["added_ms"].get(f"{p}_p50"), 3) if p != "direct" else ""
                a99 = _fmt(lv["added_ms"].get(f"{p}_p99"), 3) if p != "direct" else ""
                label = f"{lv['fraction']:.2f}x {lv['offered_rps']:,.0f}" if p == "direct" else ""
                if p in lv.get("saturated", ()):
                    a99 += " saturated"
                lines.append(f"{label:>14} {p:<8} {r['rps']:>8,.0f} {r['p50_ms']:>7.2f} {r['p90_ms']:>7.2f} "
                             f"{r['p99_ms']:>7.2f} {a50:>9} {a99:>9}")
    m = results.get("micro")
    if m:
        lines.append("")
        lines.append(f"Micro-benchmarks (µs per call, best batch; snapshot {m['snapshot_tokens']} tokens, "
                     f"{m['snapshot_policies']} policies) {tag}:")
        items = [(k.removesuffix("_us"), v) for k, v in m.items() if k.endswith("_us")]
        for i in range(0, len(items), 3):
            lines.append("  " + "  ".join(f"{k:<26} {v:>8.2f}" for k, v in items[i:i + 3]))
    s = results.get("scale")
    if s:
        lines.append("")
        lines.append(f"Scale: {s['tokens']} tokens + {s['policies']} policies (COPY {s['copy_s']} s): first /ready "
                     f"{s['ready_s']} s, every worker {s['all_workers_ready_s']} s; RSS {s['rss_mb']} MB "
                     f"(workers {s['worker_rss_mb']}), PSS {s['pss_mb']} MB; sample tokens {s['sample_tokens_ok']}")
    prof = results.get("profile")
    if prof:
        for name, p in prof.items():
            if not p:
                continue
            lines.append("")
            lines.append(f"py-spy, one gateway worker under {name} ({p['samples']} samples, wall clock while not idle; "
                         "time a worker waits for a CPU after a socket write lands in that write):")
            lines.append("  by part (inclusive %): " + ", ".join(f"{k} {v}" for k, v in p.get("parts", {}).items()))
            lines.append("  by function (self % | inclusive %):")
            for fn, inc, own in p["top_self"][:12]:
                lines.append(f"    {own:5.1f} | {inc:5.1f}  {fn}")
    if results.get("abuse"):
        from bench.abuse import table as abuse_table
        lines += abuse_table(results["abuse"])
    t = results.get("targets") or []
    if t:
        lines.append("")
        lines.append(f"Targets {tag}:")
        for x in t:
            mark = "info" if x["limit"] == "-" else {True: "HOLDS", False: "MISSES", None: "n/a"}[x["holds"]]
            runs = f" (runs {x['spread'][0]:.3f}-{x['spread'][1]:.3f})" if x.get("spread") else ""
            lines.append(f"  [{mark:^6}] {x['target']}: {_fmt(x['value'], 3)}{runs} (target {x['limit']})")
    lines.append(f"\nelapsed {results.get('elapsed_s')} s")
    return "\n".join(lines)


#: Parts of a gateway request, as (label, function) of the folded profile; inclusive shares.
PROFILE_PARTS = (
    ("aiohttp server (_handle_request)", "aiohttp/web_protocol.py:RequestHandler._handle_request"),
    ("protocol server: parsing (data_received)", "gateway/dataplane/server.py:HttpProtocol.data_received"),
    ("protocol server: writes (HttpProtocol.write)", "gateway/dataplane/server.py:HttpProtocol.write"),
    ("lean client: send (_Conn.start)", "gateway/proxy/fastclient.py:_Conn.start"),
    ("metrics (tally)", "gateway/tally.py:Tally.request"),
    ("access log (AccessLog.write)", "gateway/accesslog.py:AccessLog.write"),
    ("routing (UrlDispatcher.resolve)", "aiohttp/web_urldispatcher.py:UrlDispatcher.resolve"),
    ("callback exchange: decision and upstream head (fastpath.prepare)", "gateway/proxy/fastpath.py:prepare"),
    ("plan stage (plan.plan)", "gateway/proxy/plan.py:plan"),
    ("callback exchange: start (exchange.start)", "gateway/dataplane/exchange.py:start"),
    ("callback exchange: relayed answer (Exchange._relayed)", "gateway/dataplane/exchange.py:Exchange._relayed"),
    ("callback exchange: lean client's answer (Exchange._answered)",
     "gateway/dataplane/exchange.py:Exchange._answered"),
    ("handler (handle)", "gateway/proxy/handler.py:handle"),
    ("forward (client + response)", "gateway/proxy/forward.py:forward"),
    ("_serve (decide, plan, execute)", "gateway/proxy/handler.py:_serve"),
    ("aiohttp client (ClientSession._request)", "aiohttp/client.py:ClientSession._request"),
    ("response headers out (StreamResponse.prepare)", "aiohttp/web_response.py:StreamResponse.prepare"),
    ("socket writes (StreamWriter._write)", "aiohttp/http_writer.py:StreamWriter._write"),
    ("access log (Logger.info)", "logging/__init__.py:Logger.info"),
    ("json.dumps", "json/__init__.py:dumps"),
    ("metrics: counter inc", "prometheus_client/values.py:MultiProcessValue.<locals>.MmapedValue.inc"),
    ("metrics: histogram observe", "prometheus_client/metrics.py:Histogram.observe"),
    ("client_ip", "gateway/clientip.py:client_ip"),
    ("identify (token)", "gateway/policy/decision.py:identify"),
    ("lbac enforce", "gateway/lbac/restrict.py:enforce"),
    ("promql rewrite (uncached)", "gateway/lbac/promql.py:_restrict"),
)
_FRAME = re.compile(r"^(?P<fn>.*?) \((?P<file>[^()]*?)(?::\d+)?\)$")


def _short(frame: str) -> str:
    """``function (path/to/module.py:123)`` -> ``module.py:function``, grouped by function."""
    m = _FRAME.match(frame.strip())
    if not m:
        return frame.strip()
    file = m.group("file")
    for marker in ("site-packages/", "/work/main/", "lib/python3"):
        if marker in file:
            file = file.split(marker, 1)[1]
    return f"{file}:{m.group('fn')}"


def fold_profile(raw: str, top: int = 30) -> dict[str, Any]:
    """Summarise py-spy's raw (collapsed-stack) output: % of samples in which a function is on the stack
    (inclusive) and at the top of it (self)."""
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [_short(f) for f in stack.split(";") if f.strip()]
        if not frames:
            continue
        total += n
        for f in set(frames):
            inclusive[f] += n
        own[frames[-1]] += n
    if not total:
        return {"samples": 0, "top": []}
    parts = {}
    for label, fn in PROFILE_PARTS:
        parts[label] = round(100 * inclusive.get(fn, 0) / total, 1)
    parts["gateway logic (handle minus forward)"] = round(
        parts["handler (handle)"] - parts["forward (client + response)"], 1)
    ranked = sorted(inclusive, key=lambda f: (-inclusive[f], f))
    rows = [(f, round(100 * inclusive[f] / total, 1), round(100 * own[f] / total, 1)) for f in ranked[:top]]
    self_rows = [(f, round(100 * inclusive[f] / total, 1), round(100 * c / total, 1)) for f, c in own.most_common(top)]
    return {"samples": total, "parts": parts, "top": rows, "top_self": self_rows}


def chart(results: dict[str, Any], path: Path) -> Path | None:
    """Latency percentiles against offered load (direct, nginx, gateway) and max throughput per workload."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    colors = {"direct": "#7f7f7f", "nginx": "#2ca02c", "floor": "#1f77b4", "gateway": "#d62728"}
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5))
    sweep = results.get("sweep")
    if sweep:
        for p in PATHS:
            pts = [(lv["offered_rps"], lv["summary"][p]["p50_ms"], lv["summary"][p]["p99_ms"])
                   for lv in sweep["levels"]]
            w = (results.get("workloads") or {}).get("a")
            if w:  # the closed-loop run: each path at its own maximum
                s = w["summary"][p]
                pts.append((s["rps"], s["p50_ms"], s["p99_ms"]))
            pts.sort()
            xs = [x for x, _, _ in pts]
            ax1.plot(xs, [y for _, y, _ in pts], "o-", color=colors[p], label=f"{p} p50")
            ax1.plot(xs, [y for _, _, y in pts], "s--", color=colors[p], label=f"{p} p99")
        ax1.set_xscale("log")
        ax1.set_yscale("log")
        ax1.set_xlabel("offered load (req/s; each path's last point: closed loop, its max throughput)")
        ax1.set_ylabel("latency (ms)")
        ax1.set_title("(a) GET query=up: latency against load")
        ax1.grid(True, which="both", alpha=0.3)
        ax1.legend(fontsize=8)
    wl = results.get("workloads") or {}
    if wl:
        names = list(wl)
        width = 0.2
        for i, p in enumerate(PATHS):
            ax2.bar([j + (i - 1.5) * width for j in range(len(names))], [wl[n]["summary"][p]["rps"] for n in names],
                    width, color=colors[p], label=p)
        ax2.set_xticks(range(len(names)), names)
        ax2.set_yscale("log")
        ax2.set_ylabel("max throughput (req/s, log)")
        ax2.set_title("Max throughput per workload (closed loop)")
        for j, n in enumerate(names):
            s = wl[n]["summary"]
            if s["gateway"].get("x_nginx") is not None:
                ax2.annotate(f"{s['gateway']['x_nginx']:.2f}x", (j + 1.5 * width, s["gateway"]["rps"]),
                             ha="center", va="bottom", fontsize=8)
        ax2.legend(fontsize=8)
        ax2.grid(True, axis="y", alpha=0.3)
    fig.suptitle(f"access-policy gateway vs nginx vs Python's floor vs direct ({results.get('cores')} cores, "
                 f"{results.get('workers')} workers, {results.get('when', '')})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
