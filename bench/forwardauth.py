"""Forward-auth row (issue 26): nginx + ``auth_request`` to the gateway, beside plain nginx and the gateway's
own data path, on workload (a).

Two nginx proxies to the same upstream, each with the shipped snippets of ``deploy/forward-auth/nginx``
(sub-request to ``/forward-auth/nginx`` of the header-mode gateway): one asks on every request, one caches
the 200 answers keyed by Authorization and the other request facts the decision depends on, for the
gateway's ``forward_auth.max_age`` (5 s by default, the answer's ``Cache-Control``). Runs are interleaved
like the main table's. CPU per request of an auth path is nginx's plus the gateway's (both serve it).

    python -m bench --only a --no-scale --no-sweep --forward-auth --out /tmp/bench   # this row and (a)
"""

from __future__ import annotations

import shutil
import statistics
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self

from bench import loadgen
from bench.loadgen import Workload, WrkResult
from bench.servers import Nginx, Server

if TYPE_CHECKING:
    from bench.run import Bench

SNIPPETS = Path(__file__).resolve().parents[1] / "deploy" / "forward-auth" / "nginx"
PATHS = ("nginx", "gateway", "nginx_auth", "nginx_auth_cached")


class AuthNginx(Nginx):
    """nginx in front of the upstream, every request decided by the gateway through ``auth_request``."""

    def __init__(self, workdir: Path, workers: int, upstream_port: int, gateway_port: int, cached: bool):
        super().__init__(workdir, "nginx-auth-cached" if cached else "nginx-auth", workers)
        self.conf = self.prefix / "nginx.conf"  # the snippets' relative includes resolve next to it
        self.upstream_port, self.gateway_port, self.cached = upstream_port, gateway_port, cached

    def configure(self) -> Self:
        snippets = self.prefix / "gateway"
        snippets.mkdir(parents=True, exist_ok=True)
        for name in ("gateway-auth-location.conf", "gateway-auth.conf", "gateway-auth-cache.conf"):
            shutil.copy(SNIPPETS / name, snippets / name)
        if not self.cached:
            (snippets / "gateway-auth-cache.conf").write_text("# no cache\n")
        cache_path = (f"  proxy_cache_path {self.prefix}/cache levels=1 keys_zone=gateway_auth:10m max_size=64m "
                      "inactive=60s;\n") if self.cached else ""
        self.write_config(self._common() + "http {\n" + self._http_common() + cache_path + f"""
  upstream up {{ server 127.0.0.1:{self.upstream_port}; keepalive 128; }}
  upstream gateway_forward_auth {{ server 127.0.0.1:{self.gateway_port}; keepalive 128; }}
  server {{
    listen 127.0.0.1:{self.port} backlog=4096;
    include gateway/gateway-auth-location.conf;
    location / {{
      include gateway/gateway-auth.conf;
      proxy_pass http://up;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
    }}
  }}
}}
""")
        return self


def _one(bench: Bench, path: str, srv: Server, extra: list[Server], w: Workload, seconds: float) -> WrkResult:
    bench.counter += 1
    sp = bench.workdir / f"wrk-fa-{path}-{bench.counter}.lua"
    sp.write_text(loadgen.script(w, counter_base=bench.counter * 10_000_000))
    serving = [srv, *extra]
    cpu0 = sum(s.cpu() for s in serving)
    r = loadgen.run_wrk(srv.url, sp, seconds, w.connections)
    r.extra["cpu_s_per_10k"] = round((sum(s.cpu() for s in serving) - cpu0) / max(1, r.requests) * 10_000, 3)
    if r.failed:
        raise RuntimeError(f"forward-auth bench: {path} failed requests: {r.errors}")
    return r


def run(bench: Bench, w: Workload, workers: int) -> dict[str, Any]:
    """The row: per path, median req/s, p50/p99 and CPU µs per request, and nginx+auth's ratio to nginx."""
    gw = bench.gws["header"]
    auth = {c: AuthNginx(bench.workdir, workers, bench.up.port, gw.port, c).configure().start() for c in (False, True)}
    try:
        targets: dict[str, tuple[Server, list[Server]]] = {
            "nginx": (bench.px, []), "gateway": (gw, []),
            "nginx_auth": (auth[False], [gw]), "nginx_auth_cached": (auth[True], [gw])}
        runs: dict[str, list[WrkResult]] = {p: [] for p in PATHS}
        for p in PATHS:
            _one(bench, p, *targets[p], w, bench.args.warmup)
        for rep in range(bench.args.reps):
            for p in PATHS if rep % 2 == 0 else tuple(reversed(PATHS)):
                r = _one(bench, p, *targets[p], w, bench.args.duration)
                runs[p].append(r)
                print(f"  fa {p:<18} {r.rps:>9.0f} req/s  p50 {r.latency_ms['p50']:.2f} ms  "
                      f"p99 {r.latency_ms['p99']:.2f} ms  CPU {r.extra['cpu_s_per_10k'] * 100:.1f} µs/req", flush=True)
    finally:
        for s in auth.values():
            s.stop()

    def med(p: str, get: Any) -> float:
        return round(statistics.median(get(r) for r in runs[p]), 3)

    out: dict[str, Any] = {"title": w.title, "connections": w.connections, "paths": {}}
    for p in PATHS:
        out["paths"][p] = {"rps": med(p, lambda r: r.rps), "p50_ms": med(p, lambda r: r.latency_ms["p50"]),
                           "p99_ms": med(p, lambda r: r.latency_ms["p99"]),
                           "cpu_us_per_req": round(med(p, lambda r: r.extra["cpu_s_per_10k"]) * 100, 1),
                           "x_nginx": round(statistics.median(
                               a.rps / n.rps for a, n in zip(runs[p], runs["nginx"], strict=True)), 3)}
    out["runs"] = {p: [r.as_dict() for r in runs[p]] for p in PATHS}
    return out
