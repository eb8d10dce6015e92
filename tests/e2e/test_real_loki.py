"""The gateway against a real Loki (main branch, ``pkg/labelaccess``), opt-in.

Runs only when ``GATEWAY_LOKI_BIN`` names a Loki binary built from grafana/loki main (one with
``-lbac.enabled``); otherwise the tests are deselected (``tests/conftest.py``). Build one with the
repository's vendor directory::

    GOFLAGS=-mod=vendor GOPROXY=off CGO_ENABLED=0 go build -o /tmp/loki ./cmd/loki
    GATEWAY_LOKI_BIN=/tmp/loki .venv/bin/pytest -q tests/e2e/test_real_loki.py

One Loki with ``-lbac.enabled`` and one without are started on free ports in temporary
directories (filesystem storage, in-memory ring). Streams are pushed for two tenants
(``100`` and ``l101``: stacks 100 and 101 of the test config); for each policy set the
streams visible under it are also pushed into a tenant of their own. A token whose realms
carry the policy set reads through the gateway (``lbac: header``, ``enforce`` and ``auto``),
and every answer must equal what Loki itself answers for the visible-only tenant: log queries
(``query_range``), ``labels``, ``label/{name}/values``, ``series`` and ``detected_labels``
without a query (and with an empty one, which Loki reads as none). Loki without LBAC must make
header mode refuse (503) and auto fall back to enforce. In enforce mode, ``index/stats``,
``index/volume`` and ``index/volume_range`` (counted by inclusion-exclusion over the selectors)
must equal the visible-only tenant's answers exactly:
same names, values, order and result type.

The Loki without LBAC reads ``X-Loki-Query-Limits`` (``querier.per_request_limits_enabled``, as
Grafana Cloud's Loki does): for each lokiQueryPolicy field a token's reads through the gateway get the
status, text and result Loki itself gives with the policy's header, the unit tests' fake Loki
(``tests/fake_loki_limits.py``) the same status and text, and what the gateway checks itself the same
answer in front of the LBAC Loki, which ignores the header.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import TEST_CONFIG, free_port
from tests.e2e.gateway_proc import GatewayProcess

pytestmark = pytest.mark.real_loki

LOKI_BIN = os.environ.get("GATEWAY_LOKI_BIN", "")
ROOT = Path(__file__).resolve().parents[2]
TENANTS = {"100": "100", "101": "l101"}  # stack -> its logs tenant in TEST_CONFIG

# Distinct `app` per stream; some lack `env` (env!="prod" matches them) or `team`.
STREAMS: dict[str, list[dict[str, str]]] = {
    "100": [
        {"app": "api-dev-a", "env": "dev", "team": "a"},
        {"app": "api-prod-a", "env": "prod", "team": "a"},
        {"app": "web-dev-b", "env": "dev", "team": "b"},
        {"app": "web-prod-b", "env": "prod", "team": "b"},
        {"app": "db-staging-a", "env": "staging", "team": "a"},
        {"app": "job-a", "team": "a"},
        {"app": "job-b", "team": "b"},
        {"app": "cron-dev", "env": "dev"},
        {"app": "batch-qa-b", "env": "qa", "team": "b", "zone": "z1"},
        # Twins: one `app`, so the same lines at the same times (see push); `keep x`, `drop env, team` or
        # a constant label_format make them one label set. Under "two" the first three are visible.
        {"app": "twin", "env": "dev", "x": "1"},
        {"app": "twin", "env": "dev", "team": "a", "x": "1"},
        {"app": "twin", "env": "staging", "team": "a", "x": "1"},
        {"app": "twin", "env": "prod", "team": "a", "x": "1"},
    ],
    "l101": [
        {"app": "other-dev-a", "env": "dev", "team": "a", "region": "eu"},
        {"app": "other-prod-a", "env": "prod", "team": "a", "region": "us"},
        {"app": "other-dev-b", "env": "dev", "team": "b", "region": "us"},
        {"app": "other-test-a", "env": "test", "team": "a", "region": "ap"},
    ],
}
ORDER = {s["app"]: n for n, s in enumerate(s for streams in STREAMS.values() for s in streams)}
POLICY_SETS: dict[str, tuple[str, ...]] = {
    "one": ('{team="a", env!="prod"}',),
    "two": ('{env="dev"}', '{team="a", env!="prod"}'),
}
NOW_NS = time.time_ns()
START_NS, END_NS = NOW_NS - 600 * 10**9, NOW_NS + 60 * 10**9
QUERIES = ('{app=~".+"}', '{app=~".+"} |= "line 1"', '{env="dev"}', '{team="a"} != "line 0"')
VALUE_NAMES = ("app", "env", "team", "region", "zone", "service_name")
LEVELS = ("info", "error", "info")

_MATCHER = re.compile(r'\s*([A-Za-z_]\w*)\s*(=~|!~|!=|=)\s*"([^"]*)"\s*,?')


def matches(selector: str, labels: dict[str, str]) -> bool:
    """The test's own evaluation of the simple selectors above (an absent label is "")."""
    body = selector.strip()[1:-1]
    pos = 0
    while pos < len(body):
        m = _MATCHER.match(body, pos)
        assert m, f"selector not understood by the test: {selector}"
        name, op, value = m.groups()
        have = labels.get(name, "")
        ok = {"=": have == value, "!=": have != value, "=~": re.fullmatch(value, have) is not None,
              "!~": re.fullmatch(value, have) is None}[op]
        if not ok:
            return False
        pos = m.end()
    return True


def visible_tenant(name: str, tenant: str) -> str:
    return f"vis-{name}-{tenant}"


# ---------------------------------------------------------------------------------------------- HTTP


def http(method: str, url: str, headers: dict[str, str] | None = None, body: Any = None,
         timeout: float = 30) -> tuple[int, Any]:
    data = json.dumps(body).encode() if body is not None else None
    hdrs = {"Content-Type": "application/json", **(headers or {})} if data is not None else dict(headers or {})
    req = urllib.request.Request(url, data=data, headers=hdrs, method=method)  # noqa: S310
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:  # noqa: S310
            status, raw = r.status, r.read()
    except urllib.error.HTTPError as e:
        status, raw = e.code, e.read()
    try:
        return status, json.loads(raw) if raw else None
    except ValueError:
        return status, raw.decode(errors="replace")


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


# ---------------------------------------------------------------------------------------------- Loki


class LokiProcess:
    """A single-binary Loki on free ports, filesystem storage under ``tmp``."""

    def __init__(self, tmp: Path, lbac: bool, per_request_limits: bool = False):
        self.tmp, self.lbac = tmp, lbac
        self.port, self.grpc = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        data = tmp / "data"
        cfg = {
            "auth_enabled": True,
            "server": {"http_listen_address": "127.0.0.1", "http_listen_port": self.port,
                       "grpc_listen_address": "127.0.0.1", "grpc_listen_port": self.grpc, "log_level": "warn"},
            "common": {"instance_addr": "127.0.0.1", "path_prefix": str(data), "replication_factor": 1,
                       "storage": {"filesystem": {"chunks_directory": str(data / "chunks"),
                                                  "rules_directory": str(data / "rules")}},
                       "ring": {"kvstore": {"store": "inmemory"}}},
            "ingester": {"lifecycler": {"min_ready_duration": "0s", "final_sleep": "0s"}},
            "schema_config": {"configs": [{"from": "2020-10-24", "store": "tsdb", "object_store": "filesystem",
                                           "schema": "v13", "index": {"prefix": "index_", "period": "24h"}}]},
            # (the frontend looks for the scheduler every 10 s by default: Loki was ready after 10 s, not 1 s)
            "frontend": {"encoding": "protobuf", "scheduler_dns_lookup_period": "200ms"},
            "limits_config": {"discover_log_levels": False},
            "analytics": {"reporting_enabled": False},
        }
        if per_request_limits:  # X-Loki-Query-Limits read (as Grafana Cloud's Loki does)
            cfg["querier"] = {"per_request_limits_enabled": True}
            # No results cache: a request is asked twice (through the gateway, then directly), and splits a
            # timed-out first one finished would answer the second without running into the timeout.
            cfg["query_range"] = {k: False for k in ("cache_results", "cache_index_stats_results",
                                                     "cache_volume_results", "cache_series_results",
                                                     "cache_label_results")}
        self.config_path = tmp / "loki.yaml"
        self.config_path.write_text(yaml.safe_dump(cfg))
        self.log_path = tmp / "loki.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 90) -> LokiProcess:
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen([LOKI_BIN, f"-config.file={self.config_path}",
                                      f"-lbac.enabled={'true' if self.lbac else 'false'}"],
                                     stdout=log, stderr=log, cwd=self.tmp)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"loki exited with {self.proc.returncode}: {self.log_path.read_text()[-3000:]}")
            status, _ = http("GET", f"{self.url}/ready", timeout=2) if self._listening() else (0, None)
            if status == 200:
                return self
            time.sleep(0.3)
        raise RuntimeError(f"loki not ready in {timeout}s: {self.log_path.read_text()[-3000:]}")

    def _listening(self) -> bool:
        import socket
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", self.port)) == 0

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def push(self, tenant: str, streams: list[dict[str, str]]) -> None:
        # The same entries whichever tenant a stream is pushed to (its own nanosecond offset).
        body = {"streams": [{"stream": s, "values": [[str(NOW_NS - (60 - 20 * i) * 10**9 + ORDER[s["app"]]),
                                                      f"{s['app']} line {i} level={LEVELS[i]} n={i + 1}"]
                                                     for i in range(3)]}
                            for s in streams]}
        status, answer = http("POST", f"{self.url}/loki/api/v1/push", {"X-Scope-OrgID": tenant}, body)
        assert status == 204, (tenant, status, answer)

    def get(self, tenant: str, path: str, params: dict[str, str]) -> tuple[int, Any]:
        return http("GET", f"{self.url}{path}?{urllib.parse.urlencode(params)}", {"X-Scope-OrgID": tenant})


def _load(loki: LokiProcess) -> None:
    for tenant, streams in STREAMS.items():
        loki.push(tenant, streams)
        for name, selectors in POLICY_SETS.items():
            vis = [s for s in streams if any(matches(sel, s) for sel in selectors)]
            assert vis, (name, tenant)
            loki.push(visible_tenant(name, tenant), vis)
    deadline = time.monotonic() + 30  # pushed data is queryable at once; wait only for a slow start
    while time.monotonic() < deadline:
        status, ans = loki.get("100", "/loki/api/v1/series", {"match[]": '{app=~".+"}', "start": str(START_NS),
                                                             "end": str(END_NS)})
        if status == 200 and len(ans["data"]) == len(STREAMS["100"]):
            return
        time.sleep(0.5)
    raise AssertionError(f"pushed streams not readable: {status} {ans}")


@pytest.fixture(scope="module")
def loki_dirs() -> Iterator[Path]:
    base = Path(tempfile.mkdtemp(prefix="gateway-real-loki-"))
    yield base
    shutil.rmtree(base, ignore_errors=True)


def _loki(base: Path, lbac: bool) -> Iterator[LokiProcess]:
    if not LOKI_BIN or not os.access(LOKI_BIN, os.X_OK):
        pytest.fail(f"GATEWAY_LOKI_BIN={LOKI_BIN!r} is not an executable Loki binary")
    tmp = base / ("lbac" if lbac else "plain")
    tmp.mkdir()
    loki = LokiProcess(tmp, lbac, per_request_limits=not lbac).start()
    try:
        _load(loki)
        yield loki
    finally:
        loki.stop()


@pytest.fixture(scope="module")
def loki_lbac(loki_dirs: Path) -> Iterator[LokiProcess]:
    yield from _loki(loki_dirs, lbac=True)


@pytest.fixture(scope="module")
def loki_plain(loki_dirs: Path) -> Iterator[LokiProcess]:
    yield from _loki(loki_dirs, lbac=False)


# ---------------------------------------------------------------------------------------------- gateway


class Gw:
    """A `gateway serve` process in front of one Loki, with tokens per policy set."""

    def __init__(self, proc: GatewayProcess, tokens: dict[str, str], admin: str):
        self.proc, self.tokens, self.admin = proc, tokens, admin

    def get(self, token: str, tenant: str, path: str, params: dict[str, str]) -> tuple[int, Any]:
        return http("GET", f"{self.proc.url}{path}?{urllib.parse.urlencode(params)}", basic(tenant, token))

    def ready(self) -> dict[str, Any]:
        status, body = http("GET", f"{self.proc.url}/ready")
        assert status == 200, body
        return body  # type: ignore[no-any-return]


def _gateway(tmp: Path, dsn: str, loki: LokiProcess, mode: str, policies: bool = True) -> Iterator[Gw]:
    proc = GatewayProcess(tmp, dsn, data_dir=str(tmp / "data"),
                          upstreams={**TEST_CONFIG["upstreams"], "logs": {"url": loki.url, "lbac": mode}})
    r = subprocess.run([sys.executable, "-m", "gateway", "token", "bootstrap", "-c", str(proc.config_path),
                        "--org", "1"], capture_output=True, text=True, timeout=60, cwd=ROOT,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr
    admin = r.stdout.strip()
    proc.start(timeout=30)
    try:
        tokens: dict[str, str] = {}
        for name, selectors in {"all": (), **POLICY_SETS}.items() if policies else ():
            realms = [{"type": "stack", "identifier": stack,
                       "labelPolicies": [{"selector": s} for s in selectors]} for stack in TENANTS]
            status, pol = http("POST", f"{proc.url}/api/v1/accesspolicies", {"Authorization": f"Bearer {admin}"},
                               {"name": f"logs-{name}", "scopes": ["logs:read", "logs:write"], "realms": realms})
            assert status == 200, pol
            status, tok = http("POST", f"{proc.url}/api/v1/tokens", {"Authorization": f"Bearer {admin}"},
                               {"accessPolicyId": pol["id"], "name": f"tok-{name}"})
            assert status == 200, tok
            tokens[name] = tok["token"]
        yield Gw(proc, tokens, admin)
    finally:
        proc.stop()


def _wait_probe(gw: Gw, want: str) -> dict[str, Any]:
    deadline = time.monotonic() + 15
    while True:
        st = gw.ready()["lbac"]["logs"]
        # (enforce mode never probes: its checkedAt stays null, so waiting for it only cost 15 s a test)
        if st["checkedAt"] is not None or st["configured"] == "enforce" or time.monotonic() > deadline:
            assert st["effective"] == want, st
            return st  # type: ignore[no-any-return]
        time.sleep(0.2)


# ---------------------------------------------------------------------------------------------- answers

RANGE = {"start": str(START_NS), "end": str(END_NS)}
Normalizer = Callable[[Any], Any]


def _streams(ans: Any) -> Any:
    assert ans["data"]["resultType"] == "streams", ans
    return sorted((tuple(sorted(r["stream"].items())), tuple(tuple(v[:2]) for v in r["values"]))
                  for r in ans["data"]["result"])


def _sorted(ans: Any) -> Any:
    return sorted(ans.get("data") or [])


def _series(ans: Any) -> Any:
    return sorted(tuple(sorted(s.items())) for s in ans["data"])


def _detected(ans: Any) -> Any:
    return {d["label"]: d.get("cardinality") for d in ans.get("detectedLabels") or []}


def reads(detected: bool = False) -> list[tuple[str, str, dict[str, str], Normalizer]]:
    """The reads compared; ``detected``: only ``detected_labels`` without a query (its own test)."""
    if detected:  # without a query, and with an empty one (Loki reads `query=` as none: Logs Drilldown sends it)
        return [("detected_labels", "/loki/api/v1/detected_labels", dict(RANGE), _detected),
                ("detected_labels query=", "/loki/api/v1/detected_labels", {**RANGE, "query": ""}, _detected)]
    out: list[tuple[str, str, dict[str, str], Normalizer]] = []
    for q in QUERIES:
        for direction in ("forward", "backward"):
            out.append((f"query_range {q} {direction}", "/loki/api/v1/query_range",
                        {"query": q, "limit": "1000", "direction": direction, **RANGE}, _streams))
    out.append(("labels", "/loki/api/v1/labels", dict(RANGE), _sorted))
    out.append(("labels query=", "/loki/api/v1/labels", {**RANGE, "query": ""}, _sorted))
    for name in VALUE_NAMES:
        out.append((f"label/{name}/values", f"/loki/api/v1/label/{name}/values", dict(RANGE), _sorted))
    out.append(("series", "/loki/api/v1/series", {"match[]": '{app=~".+"}', **RANGE}, _series))
    return out


def compare(gw: Gw, loki: LokiProcess, name: str, detected: bool = False) -> list[str]:
    """Every read through the gateway with the token of ``name``, against Loki's visible-only tenant."""
    problems: list[str] = []
    for tenant in TENANTS.values():
        allowed = {s["app"] for s in STREAMS[tenant] if any(matches(sel, s) for sel in POLICY_SETS[name])}
        for what, path, params, norm in reads(detected):
            status, got = gw.get(gw.tokens[name], tenant, path, params)
            estatus, expected = loki.get(visible_tenant(name, tenant), path, params)
            assert estatus == 200, (what, expected)
            if status != 200:
                problems.append(f"{name}/{tenant} {what}: {status} {str(got)[:300]}")
                continue
            g, e = norm(got), norm(expected)
            if what.startswith(("query_range", "series")):  # never a stream outside the policy
                apps = {dict(item[0] if what.startswith("query_range") else item).get("app") for item in g}
                leaked = apps - allowed
                assert not leaked, f"{name}/{tenant} {what}: streams outside the policy {leaked}"
            if g != e:
                problems.append(f"{name}/{tenant} {what}: got {g} expected {e}")
    return problems


# ---------------------------------------------------------------------------------------------- tests


@pytest.fixture
def gw_factory(tmp_path: Path, db_dsn: str) -> Iterator[Callable[[LokiProcess, str], Gw]]:
    gens: list[Iterator[Gw]] = []

    def make(loki: LokiProcess, mode: str, policies: bool = True) -> Gw:
        tmp = tmp_path / f"gw{len(gens)}"
        tmp.mkdir()
        gen = _gateway(tmp, db_dsn, loki, mode, policies)
        gens.append(gen)
        return next(gen)
    yield make
    for gen in gens:
        gen.close()


def test_loki_rejects_a_malformed_policy_header(loki_lbac: LokiProcess, loki_plain: LokiProcess) -> None:
    """The premise of the probe: Loki with LBAC answers 400, without it ignores the header."""
    h = {"X-Scope-OrgID": "100", "X-Prom-Label-Policy": "gateway-lbac-probe"}
    status, body = http("GET", f"{loki_lbac.url}/loki/api/v1/labels", h)
    assert status == 400 and "invalid label policy header value" in str(body), (status, body)
    status, body = http("GET", f"{loki_plain.url}/loki/api/v1/labels", h)
    assert status == 200, (status, body)


@pytest.mark.parametrize("mode", ["header", "enforce", "auto"])
def test_restricted_reads_see_exactly_the_visible_streams(loki_lbac: LokiProcess, gw_factory: Any,
                                                          mode: str) -> None:
    gw = gw_factory(loki_lbac, mode)
    want = "enforce" if mode == "enforce" else "header"
    st = _wait_probe(gw, want)
    if mode != "enforce":
        assert st["backendEnforces"] is True, st
        assert "enforces X-Prom-Label-Policy" in gw.proc.log_path.read_text()
    problems = [p for name in POLICY_SETS for p in compare(gw, loki_lbac, name)]
    # The unrestricted token sees every stream of each tenant.
    for tenant, streams in STREAMS.items():
        status, ans = gw.get(gw.tokens["all"], tenant, "/loki/api/v1/series", {"match[]": '{app=~".+"}', **RANGE})
        assert status == 200 and {s["app"] for s in ans["data"]} == {s["app"] for s in streams}, ans
    assert not problems, "\n".join(problems)


TWIN_PIPELINES = (" | keep x", " | drop env, team", ' | label_format env="same", team="same"', " | keep x, app")


@pytest.mark.parametrize("mode", ["header", "enforce"])
def test_identical_lines_of_streams_a_pipeline_makes_alike_are_all_kept(loki_lbac: LokiProcess, gw_factory: Any,
                                                                        mode: str) -> None:
    """The issue's case on a real Loki: three visible twins with the same three lines at the same times,
    made one label set by the pipeline, answer nine entries (Loki deduplicates within a stream only), as
    the visible-only tenant does; the enforce-mode merge once answered three."""
    gw = gw_factory(loki_lbac, mode)
    _wait_probe(gw, mode)
    problems = []
    for pipeline in TWIN_PIPELINES:
        for direction, limit in (("forward", "1000"), ("backward", "1000"), ("backward", "4")):
            params = {"query": '{app="twin"}' + pipeline, "limit": limit, "direction": direction, **RANGE}
            status, got = gw.get(gw.tokens["two"], "100", "/loki/api/v1/query_range", params)
            estatus, expected = loki_lbac.get(visible_tenant("two", "100"), "/loki/api/v1/query_range", params)
            assert estatus == 200, expected
            n = sum(len(r["values"]) for r in expected["data"]["result"])
            assert n == min(int(limit), 9), (params, expected)
            if status != 200 or _streams(got) != _streams(expected):
                problems.append(f"{mode} {params}: {status} got {str(got)[:400]} expected {_streams(expected)}")
    assert not problems, "\n".join(problems)


# Loki main's LBAC does not filter `detected_labels` without a `query` (a query is filtered): in every
# mode the gateway sends the policy selectors as the query (found by this test on the real Loki).
@pytest.mark.parametrize("mode", ["header", "enforce", "auto"])
def test_detected_labels_without_query_shows_only_visible_labels(loki_lbac: LokiProcess, gw_factory: Any,
                                                                 mode: str) -> None:
    gw = gw_factory(loki_lbac, mode)
    _wait_probe(gw, "enforce" if mode == "enforce" else "header")
    problems = [p for name in POLICY_SETS for p in compare(gw, loki_lbac, name, detected=True)]
    assert not problems, "\n".join(problems)


def test_header_mode_refuses_on_loki_without_lbac(loki_plain: LokiProcess, gw_factory: Any) -> None:
    gw = gw_factory(loki_plain, "header")
    st = _wait_probe(gw, "unverified")
    assert st["backendEnforces"] is False, st
    status, body = gw.get(gw.tokens["one"], "100", "/loki/api/v1/query_range", {"query": '{app=~".+"}', **RANGE})
    assert status == 503 and body["errorType"] == "unavailable", (status, body)
    assert "does not (verifiably) enforce label policies" in body["error"], body
    status, body = gw.get(gw.tokens["all"], "100", "/loki/api/v1/labels", dict(RANGE))
    assert status == 200, (status, body)  # unrestricted reads unaffected


def test_auto_mode_falls_back_to_enforce_on_loki_without_lbac(loki_plain: LokiProcess, gw_factory: Any) -> None:
    gw = gw_factory(loki_plain, "auto")
    st = _wait_probe(gw, "enforce")
    assert st["backendEnforces"] is False, st
    problems = [p for name in POLICY_SETS for p in (*compare(gw, loki_plain, name),
                                                    *compare(gw, loki_plain, name, detected=True))]
    assert not problems, "\n".join(problems)


# ---------------------------------------------------------------------------------------------- counts

COUNT_READS: list[tuple[str, dict[str, str]]] = [
    ("/loki/api/v1/index/stats", {"query": '{app=~".+"}'}),
    ("/loki/api/v1/index/stats", {"query": '{team="a"}'}),
    ("/loki/api/v1/index/volume", {"query": '{app=~".+"}'}),
    ("/loki/api/v1/index/volume", {"query": '{team=~".+"}'}),
    ("/loki/api/v1/index/volume", {"query": '{env!="prod", app=~".+"}'}),
    ("/loki/api/v1/index/volume", {"query": '{app=~".+"}', "targetLabels": "env"}),
    ("/loki/api/v1/index/volume", {"query": '{app=~".+"}', "targetLabels": "team,env"}),
    ("/loki/api/v1/index/volume", {"query": '{app=~".+"}', "aggregateBy": "labels"}),
    ("/loki/api/v1/index/volume", {"query": '{app=~".+"}', "limit": "2"}),
    ("/loki/api/v1/index/volume_range", {"query": '{app=~".+"}', "step": "20"}),
    ("/loki/api/v1/index/volume_range", {"query": '{team=~".+"}', "step": "1m", "targetLabels": "env"}),
    ("/loki/api/v1/index/volume_range", {"query": '{app=~".+"}', "aggregateBy": "labels", "limit": "3"}),
]


def _counted(ans: Any) -> Any:
    if "data" not in ans:
        return ans  # index/stats: {"streams","chunks","bytes","entries"}
    return ans["status"], ans["data"]["resultType"], ans["data"]["result"]


# Streams whose lines share one pattern (stream, lines): under the `two` policy set one matches each
# selector; `{env="dev"}` alone sees the pattern 20 times (Loki drops it: fewer than 30), the other
# selector 35 times, their union 55 times: the per-selector answers add up to 35.
PATTERN_STREAMS = [({"app": "pat-dev", "env": "dev"}, 20), ({"app": "pat-a", "team": "a"}, 35)]
PATTERN_QUERY = '{app=~"pat-.+"}'


@pytest.fixture(scope="module")
def loki_counts(loki_dirs: Path) -> Iterator[LokiProcess]:
    """A Loki without LBAC, with the pattern ingester, holding the streams above and the pattern streams."""
    if not LOKI_BIN or not os.access(LOKI_BIN, os.X_OK):
        pytest.fail(f"GATEWAY_LOKI_BIN={LOKI_BIN!r} is not an executable Loki binary")
    tmp = loki_dirs / "counts"
    tmp.mkdir()
    loki = LokiProcess(tmp, lbac=False)
    cfg = yaml.safe_load(loki.config_path.read_text())
    cfg["pattern_ingester"] = {"enabled": True,  # (ready at once, not 15 s after start)
                               "lifecycler": {"min_ready_duration": "0s", "final_sleep": "0s"}}
    loki.config_path.write_text(yaml.safe_dump(cfg))
    loki.start()
    try:
        _load(loki)
        for tenant in ["100", *(visible_tenant(n, "100") for n in POLICY_SETS)]:
            vis = [(s, n) for s, n in PATTERN_STREAMS if tenant == "100" or any(
                matches(sel, s) for sel in POLICY_SETS[tenant.split("-")[1]])]
            body = {"streams": [{"stream": s, "values": [
                [str(NOW_NS - (200 - 5 * i) * 10**9 + k), f"level=info msg=checkout user={i} took={3 * i}ms"]
                for i in range(n)]} for k, (s, n) in enumerate(vis)]}
            status, answer = http("POST", f"{loki.url}/loki/api/v1/push", {"X-Scope-OrgID": tenant}, body)
            assert status == 204, (tenant, status, answer)
        yield loki
    finally:
        loki.stop()


def _compare_counts(gw: Gw, loki: LokiProcess) -> tuple[list[str], int]:
    problems, volumes = [], 0
    for name in POLICY_SETS:
        for tenant in TENANTS.values():
            for path, params in COUNT_READS:
                p = {**params, **RANGE}
                status, got = gw.get(gw.tokens[name], tenant, path, p)
                estatus, expected = loki.get(visible_tenant(name, tenant), path, p)
                assert estatus == 200, (path, p, expected)
                if status != 200 or _counted(got) != _counted(expected):
                    problems.append(f"{name}/{tenant} {path} {params}: {status} got {str(_counted(got))[:400]} "
                                    f"expected {str(_counted(expected))[:400]}")
                volumes += "data" in expected and bool(expected["data"]["result"])
    return problems, volumes


def test_stats_and_volumes_equal_the_visible_only_tenant(loki_counts: LokiProcess, gw_factory: Any) -> None:
    """From the ingesters (data just pushed), then from the TSDB store after a flush: Loki counts
    per stream in both, so the signed sums are exact in both."""
    gw = gw_factory(loki_counts, "enforce")
    _wait_probe(gw, "enforce")
    problems, volumes = _compare_counts(gw, loki_counts)
    status, _ = http("POST", f"{loki_counts.url}/flush")
    assert status == 204
    pushed = {t: len(streams) for t, streams in STREAMS.items()}
    pushed["100"] += len(PATTERN_STREAMS)
    for name, selectors in POLICY_SETS.items():
        for t, streams in STREAMS.items():
            pushed[visible_tenant(name, t)] = sum(any(matches(sel, s) for sel in selectors) for s in streams) + (
                sum(any(matches(sel, s) for sel in selectors) for s, _ in PATTERN_STREAMS) if t == "100" else 0)
    deadline = time.monotonic() + 60
    while True:  # every tenant's flushed chunks reach the index (the stats count each stream again)
        seen = {t: loki_counts.get(t, "/loki/api/v1/index/stats", {"query": '{app=~".+"}', **RANGE})[1]["streams"]
                for t in pushed}
        if seen == pushed or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert seen == pushed, (seen, pushed)
    for _ in range(5):  # the index may still be settling (a stream's chunks in two places): a real error repeats
        flushed, volumes_flushed = _compare_counts(gw, loki_counts)
        if not flushed:
            break
        time.sleep(2)
    assert volumes >= 20 and volumes_flushed >= 20  # not vacuous
    assert not problems + flushed, "\n".join(problems + ["after flush:"] + flushed)


def test_patterns_one_selector_answered_several_refused(loki_counts: LokiProcess, gw_factory: Any) -> None:
    gw = gw_factory(loki_counts, "enforce")
    _wait_probe(gw, "enforce")
    p = {"query": PATTERN_QUERY, **RANGE}
    deadline = time.monotonic() + 30
    while True:  # the pattern ingester receives pushes on its own: wait until it holds them
        status, union = loki_counts.get(visible_tenant("two", "100"), "/loki/api/v1/patterns", p)
        if status == 200 and union.get("data") or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert [(d["pattern"], sum(v for _, v in d["samples"])) for d in union["data"]] == [
        ("level=info msg=checkout user=<_> took=<_>", 55)], union
    # Why several selectors are refused: Loki prunes each selector's answer on its own.
    alone = {}
    for name, selector in zip(("dev", "team"), POLICY_SETS["two"], strict=True):
        q = PATTERN_QUERY[:-1] + ", " + selector[1:]
        status, ans = loki_counts.get("100", "/loki/api/v1/patterns", {**p, "query": q})
        assert status == 200, ans
        alone[name] = [sum(v for _, v in d["samples"]) for d in ans["data"]]
    assert alone == {"dev": [], "team": [35]}, alone  # 0 + 35 is not 55
    status, body = gw.get(gw.tokens["two"], "100", "/loki/api/v1/patterns", p)
    assert status == 400 and "patterns cannot be restricted by several label policies" in body["error"], body
    status, got = gw.get(gw.tokens["one"], "100", "/loki/api/v1/patterns", p)  # one selector: today's rewrite
    estatus, expected = loki_counts.get(visible_tenant("one", "100"), "/loki/api/v1/patterns", p)
    assert status == estatus == 200 and got == expected and got["data"], (got, expected)


# ---------------------------------------------------------------------------------------------- metric queries

# Under the two overlapping selectors of "two" the union rewrite refuses these (grouping or `drop` of a
# policy label, absence) or may count two streams as one (a parser): the gateway sends inclusion-exclusion
# legs (sums over streams) or one leg per selector (absent_over_time) and combines the numbers.
METRIC_QUERIES = (
    'sum by (level) (count_over_time({app=~".+"} | logfmt [5m]))',
    'sum by (level) (sum_over_time({app=~".+"} | logfmt | unwrap n [5m]))',
    'count_over_time({app=~".+"} | drop env [2m])',
    'rate({app=~".+"} |= "line 1" | drop team, env [1m])',
    'sum(bytes_over_time({app=~".+"} | logfmt | drop env [5m]))',
    'absent_over_time({app="job-a"}[1m])',
    'absent_over_time({app="api-prod-a", env="prod"}[1m])',
    'absent_over_time({app=~".+"} |= "line 9" [5m])',
    'max_over_time({app=~".+"} | logfmt | unwrap n [5m]) by (level)',
    'min_over_time({app=~".+"} | logfmt | drop env | unwrap n [2m]) by (app)',
)


def _numbers(ans: Any) -> Any:
    data = ans["data"]
    out = []
    for s in data["result"]:
        points = s["values"] if "values" in s else [s["value"]]
        out.append((tuple(sorted(s["metric"].items())), tuple((float(t), round(float(v), 9)) for t, v in points)))
    return data["resultType"], sorted(out)


@pytest.mark.parametrize("mode", ["enforce", "auto"])
def test_metric_queries_under_several_selectors(loki_lbac: LokiProcess, loki_plain: LokiProcess, gw_factory: Any,
                                                mode: str) -> None:
    loki = loki_lbac if mode == "enforce" else loki_plain  # auto on a Loki without LBAC: enforce
    gw = gw_factory(loki, mode)
    _wait_probe(gw, "enforce")
    problems: list[str] = []
    compared = nonempty = 0
    for name in POLICY_SETS:
        for tenant in TENANTS.values():
            for query in METRIC_QUERIES:
                for path, params in (("/loki/api/v1/query_range", {"query": query, "step": "30s", **RANGE}),
                                     ("/loki/api/v1/query", {"query": query, "time": str(NOW_NS)})):
                    status, got = gw.get(gw.tokens[name], tenant, path, params)
                    estatus, expected = loki.get(visible_tenant(name, tenant), path, params)
                    assert estatus == 200, (query, expected)
                    compared += 1
                    if status != 200:
                        problems.append(f"{name}/{tenant} {path} {query}: {status} {str(got)[:300]}")
                    elif _numbers(got) != _numbers(expected):
                        problems.append(f"{name}/{tenant} {path} {query}: got {_numbers(got)} "
                                        f"expected {_numbers(expected)}")
                    nonempty += bool(expected["data"]["result"])
    assert not problems, "\n".join(problems)
    assert compared == 80 and nonempty >= 50, (compared, nonempty)


# ---------------------------------------------------------------------------------------------- lokiQueryPolicy

LOG = '{app=~".+"}'
SLOW = 'sum(count_over_time({app=~".+"}[1m]))'
# The timeout cases (maxQueryTime/queryTimeout 1ms) read a tenant of their own holding BULK_STREAMS x BULK_LINES
# lines in the last hour. Loki applies the timeout as a context deadline around the querier's evaluation
# (pkg/logql/engine.go query.Eval) and notices it only at I/O: the ingester checks it before each batch of 512
# samples it streams (pkg/ingester/instance.go sendSampleBatches), the querier on each gRPC receive; the step
# loop itself never looks. Over the 39 lines of tenant 100 a warm query did all its I/O within 1 ms now and
# then, and the frontend tries a split that failed with a 5xx up to 5 times (queryrangebase/retry.go), so one
# fast try answered 200 (seen: the gateway's request 504, the same one directly 200). 20,000 samples are tens
# of batches: no try can stream them within 1 ms (the query takes tens of ms without the header).
BULK_STACK, BULK_STREAMS, BULK_LINES = "200", 4, 5000
BULK = 'sum(count_over_time({app="bulk"}[1m]))'
TIMEOUT_FIELDS = ("maxQueryTime", "queryTimeout")


def _policy_token(gw: Gw, name: str, loki_query_policy: dict[str, Any], stack: str = "100",
                  admin: str | None = None) -> str:
    auth = {"Authorization": f"Bearer {admin or gw.admin}"}
    status, pol = http("POST", f"{gw.proc.url}/api/v1/accesspolicies", auth, {
        "name": f"limits-{name}", "scopes": ["logs:read"], "realms": [{"type": "stack", "identifier": stack}],
        "attributes": {"lokiQueryPolicy": loki_query_policy}})
    assert status == 200, pol
    status, tok = http("POST", f"{gw.proc.url}/api/v1/tokens", auth, {"accessPolicyId": pol["id"], "name": name})
    assert status == 200, tok
    return tok["token"]  # type: ignore[no-any-return]


def _direct(loki: LokiProcess, tenant: str, path: str, params: dict[str, str], header: str) -> tuple[int, Any]:
    """Loki's own answer with the policy's header: what Grafana Cloud's Loki (which reads it) answers."""
    return http("GET", f"{loki.url}{path}?{urllib.parse.urlencode(params)}",
                {"X-Scope-OrgID": tenant, "X-Loki-Query-Limits": header})


def _text(body: Any) -> str:
    """An error's text as Grafana's Loki data source shows it (pkg/tsdb/loki/api.go ``makeLokiError``): a
    JSON body's ``message`` (the gateway's own refusals), or the whole body (Loki's are plain text)."""
    return str(body["message"] if isinstance(body, dict) and body.get("message") else body).strip()


def _result(body: Any) -> Any:
    """An answer without its statistics: streams, a matrix or vector, or a list."""
    data = body.get("data") or []  # (Loki's empty answer to labels or series has none)
    if isinstance(data, list):
        return sorted(json.dumps(d, sort_keys=True) for d in data)
    if data["resultType"] == "streams":
        return data["resultType"], _streams(body)
    return _numbers(body)


def _field_cases(now: float) -> list[tuple[str, dict[str, Any], str, dict[str, str], int, bool]]:
    """(field, lokiQueryPolicy, path, parameters, Loki's status, whether the gateway checks it itself)."""
    t = int(now)
    last_hour = {"start": str(t - 3600), "end": str(t)}
    two_hours = {"start": str(t - 7200), "end": str(t)}
    # A lookback ending 30 s before the first pushed lines (60, 40 and 20 s before NOW_NS): only `line 2`.
    lookback = {"maxQueryLookback": f"{int(now - NOW_NS / 1e9) + 30}s"}
    before = {"start": str(t - 3 * 3600), "end": str(t - 2 * 3600)}
    qr, instant = "/loki/api/v1/query_range", "/loki/api/v1/query"
    entries, length, interval = {"maxEntriesLimitPerQuery": 50}, {"maxQueryLength": "1h"}, {"maxQueryInterval": "1m"}
    return [  # (the lookback first: its boundary, 30 s from NOW_NS, moves with the clock; 10 s either side)
        ("maxQueryLookback", lookback, qr, {"query": LOG, "limit": "1000", **two_hours}, 200, True),
        ("maxQueryLookback", lookback, qr, {"query": LOG, "since": "2h"}, 200, True),
        ("maxQueryLookback", lookback, qr, {"query": LOG, **before}, 200, True),
        ("maxQueryLookback", lookback, qr, {"query": SLOW, "step": "60", **before}, 200, True),
        ("maxQueryLookback", lookback, "/loki/api/v1/labels", before, 200, True),
        ("maxQueryLookback", lookback, "/loki/api/v1/series", {"match[]": LOG, **two_hours}, 200, True),
        ("maxEntriesLimitPerQuery", entries, qr, {"query": LOG, "limit": "500", **last_hour}, 400, True),
        ("maxEntriesLimitPerQuery", entries, qr, {"query": LOG, **last_hour}, 400, True),  # Loki's default 100
        ("maxEntriesLimitPerQuery", entries, qr, {"query": LOG, "limit": "20", **last_hour}, 200, True),
        ("maxEntriesLimitPerQuery", entries, qr, {"query": SLOW, "limit": "500", "step": "60", **last_hour}, 200,
         True),
        ("maxEntriesLimitPerQuery", entries, instant, {"query": LOG, "limit": "500"}, 400, True),  # instant log
        ("maxQueryLength", length, qr, {"query": LOG, **two_hours}, 400, True),
        ("maxQueryLength", length, qr, {"query": LOG, "since": "2h"}, 400, True),
        ("maxQueryLength", length, qr, {"query": LOG, "start": str(t - 1800), "end": str(t)}, 200, True),
        ("maxQueryLength", length, "/loki/api/v1/labels", two_hours, 400, True),
        ("maxQueryLength", length, "/loki/api/v1/label/app/values", {"since": "2h"}, 400, True),
        ("maxQueryLength", length, "/loki/api/v1/series", {"match[]": LOG, **two_hours}, 400, True),
        ("maxQueryInterval", interval, qr, {"query": SLOW.replace("1m", "5m"), "step": "60", **last_hour}, 400,
         False),
        ("maxQueryInterval", interval, instant, {"query": SLOW.replace("1m", "5m"), "time": str(t)}, 400, False),
        ("maxQueryInterval", interval, qr, {"query": SLOW, "step": "60", **last_hour}, 200, False),
        ("requiredLabels", {"requiredLabels": ["env"]}, qr, {"query": LOG, **last_hour}, 400, False),
        ("requiredLabels", {"requiredLabels": ["env"]}, qr, {"query": SLOW, "step": "60", **last_hour}, 400, False),
        ("requiredLabels", {"requiredLabels": ["env"]}, qr, {"query": '{env="dev"}', **last_hour}, 200, False),
        ("minimumLabelsNumber", {"minimumLabelsNumber": 2}, qr, {"query": LOG, **last_hour}, 400, False),
        ("minimumLabelsNumber", {"minimumLabelsNumber": 2}, qr, {"query": '{app=~".+", env="dev"}', **last_hour},
         200, False),
        # (in BULK_STACK: see BULK)
        ("maxQueryTime", {"maxQueryTime": "1ms"}, qr, {"query": BULK, "step": "1", **last_hour}, 504, False),
        ("queryTimeout", {"queryTimeout": "1ms"}, qr, {"query": BULK, "step": "1", **last_hour}, 504, False),
    ]


def _bootstrap(gw: Gw, org: int) -> str:
    """An admin token of another org (its stacks' tenants are untouched by the other tests' data)."""
    r = subprocess.run([sys.executable, "-m", "gateway", "token", "bootstrap", "-c", str(gw.proc.config_path),
                        "--org", str(org)], capture_output=True, text=True, timeout=60, cwd=ROOT,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def _push_bulk(loki: LokiProcess) -> None:
    """BULK_STREAMS x BULK_LINES lines spread over the last hour into BULK_STACK's tenant, and proof that Loki
    holds them all: without the header the timeout cases' query answers, and counts every line."""
    now = time.time_ns()
    body = {"streams": [{"stream": {"app": "bulk", "n": str(k)},
                         "values": [[str(now - (3500 - 3500 * i // BULK_LINES) * 10**9 + i), f"bulk {k} {i}"]
                                    for i in range(BULK_LINES)]} for k in range(BULK_STREAMS)]}
    status, answer = http("POST", f"{loki.url}/loki/api/v1/push", {"X-Scope-OrgID": BULK_STACK}, body)
    assert status == 204, (status, answer)
    query = 'sum(count_over_time({app="bulk"}[1h]))'
    status, answer = loki.get(BULK_STACK, "/loki/api/v1/query", {"query": query, "time": str(now + 10**9)})
    assert status == 200 and float(answer["data"]["result"][0]["value"][1]) == BULK_STREAMS * BULK_LINES, answer
    status, answer = loki.get(BULK_STACK, "/loki/api/v1/query_range", {
        "query": BULK, "step": "1", "start": str(now // 10**9 - 3600), "end": str(now // 10**9)})
    assert status == 200 and answer["data"]["result"], (status, str(answer)[:300])


def test_each_loki_query_policy_field_as_loki_applies_it(loki_plain: LokiProcess, loki_lbac: LokiProcess,
                                                         gw_factory: Any) -> None:
    """Issue 28: a token's lokiQueryPolicy through the gateway gets, field by field, the status, text and
    result Loki itself gives with the policy's header (Grafana Cloud's Loki reads it), and the fake Loki of
    the unit tests (tests/fake_loki_limits.py) gives the same status and text. What the gateway checks
    itself holds the same in front of a Loki that ignores the header (here the LBAC one)."""
    from gateway.limits.lokiquery import parse
    from tests.fake_loki_limits import FakeLokiLimits

    # (the second gateway shares the first one's database, and so its tokens)
    gw, gw_ignoring = gw_factory(loki_plain, "enforce"), gw_factory(loki_lbac, "enforce", policies=False)
    _push_bulk(loki_plain)
    bulk_admin = _bootstrap(gw, 2)
    fake = FakeLokiLimits()
    now, qr = time.time(), "/loki/api/v1/query_range"
    cases = _field_cases(now)
    problems: list[str] = []
    tokens: dict[str, str] = {}
    for n, (name, policy, path, params, want, checked) in enumerate(cases):
        stack = BULK_STACK if name in TIMEOUT_FIELDS else "100"  # (its logs tenant has the same name)
        key = json.dumps([stack, policy], sort_keys=True)
        if key not in tokens:
            tokens[key] = _policy_token(gw, f"{name}-{n}", policy, stack=stack,
                                        admin=bulk_admin if stack == BULK_STACK else None)
        lp = parse(policy)
        assert lp is not None
        what = f"{name} {path} {params}"
        status, body = gw.get(tokens[key], stack, path, params)
        d_status, d_body = _direct(loki_plain, stack, path, params, lp.header)
        if (status, d_status) != (want, want):
            problems.append(f"{what}: gateway {status} {str(body)[:200]}, Loki {d_status} {str(d_body)[:200]}")
            continue
        if want != 200:
            if _text(body) != _text(d_body):
                problems.append(f"{what}: gateway says {_text(body)!r}, Loki {_text(d_body)!r}")
        elif _result(body) != _result(d_body):
            problems.append(f"{what}: gateway answers {_result(body)}, Loki {_result(d_body)}")
        if name not in TIMEOUT_FIELDS:  # the fake does not run queries
            f_status, f_body = fake.answer(path, params, lp.header)
            if (f_status, _text(f_body) if f_status != 200 else "") != (want, _text(d_body) if want != 200 else ""):
                problems.append(f"{what}: the fake says {f_status} {_text(f_body)!r}, Loki {_text(d_body)!r}")
        if checked:  # the gateway's own check: the same answer from a Loki that ignores the header
            i_status, i_body = gw_ignoring.get(tokens[key], "100", path, params)
            if i_status != want or (_text(i_body) if want != 200 else _result(i_body)) != (
                    _text(d_body) if want != 200 else _result(d_body)):
                problems.append(f"{what}: in front of a Loki ignoring the header {i_status} {str(i_body)[:300]}")
        if name == "maxQueryLookback" and path == qr and status == 200 and body["data"]["resultType"] == "streams":
            lines = {re.search(r"line \d", v[1]).group() for r in body["data"]["result"]  # type: ignore[union-attr]
                     for v in r["values"]}
            wholly_before = int(params.get("end", now)) < now - 3600
            assert lines == (set() if wholly_before else {"line 2"}), (what, lines)  # not vacuous: clamped
    assert not problems, "\n".join(problems)


def test_loki_reads_every_size_the_api_accepts(loki_plain: LokiProcess) -> None:
    """Loki drops the whole X-Loki-Query-Limits header when one value does not parse (querylimits
    middleware), so a size Loki's ByteSize cannot read (``1GiB``, ``1.5GB``) would lift every limit of
    the policy: the admin API accepts only sizes Loki reads, and a stored legacy one is sent as bytes."""
    from gateway.admin.errors import ApiError
    from gateway.admin.validate import attributes
    from gateway.limits.lokiquery import parse

    params = {"query": LOG}
    for size in ("500MB", "1gb", "1 GB", "1024", "2kilobytes", "1GiB", "1.5GB", "512 KiB"):
        lp = parse({"requiredLabels": ["env"], "maxQueryBytesRead": size})
        assert lp is not None
        status, body = _direct(loki_plain, "100", "/loki/api/v1/query_range", params, lp.header)
        assert status == 400 and "missing required matchers [env]" in str(body), (size, lp.header, status, body)
        try:
            attributes({"lokiQueryPolicy": {"maxQueryBytesRead": size}})
            accepted = True
        except ApiError:
            accepted = False
        raw = json.dumps({"requiredLabels": ["env"], "maxQueryBytesRead": size})
        status, body = _direct(loki_plain, "100", "/loki/api/v1/query_range", params, raw)
        assert accepted == (status == 400), (size, accepted, status, str(body)[:200])  # Loki read it as given


def test_max_query_bytes_read_is_loki_s(loki_plain: LokiProcess, gw_factory: Any, tmp_path: Path) -> None:
    """maxQueryBytesRead needs Loki's index statistics (chunk sizes, known once flushed): the gateway only
    sends it, and a token's query past it gets Loki's 400 and text, as from Loki itself."""
    from gateway.limits.lokiquery import parse

    gw = gw_factory(loki_plain, "enforce")
    policy = {"maxQueryBytesRead": "2KB"}
    token = _policy_token(gw, "bytes", policy, stack="200", admin=_bootstrap(gw, 2))
    now = time.time_ns()  # tenant 200: 8 KiB in one stream, its own tenant so the other tests' data is untouched
    body = {"streams": [{"stream": {"app": "big"}, "values": [[str(now - (300 - i) * 10**9), f"line {i} " + "x" * 200]
                                                             for i in range(40)]}]}
    assert http("POST", f"{loki_plain.url}/loki/api/v1/push", {"X-Scope-OrgID": "200"}, body)[0] == 204
    assert http("POST", f"{loki_plain.url}/flush")[0] == 204
    rng = {"start": str(now - 3600 * 10**9), "end": str(now + 10**9)}
    deadline = time.monotonic() + 30
    while (stats := loki_plain.get("200", "/loki/api/v1/index/stats", {"query": '{app="big"}', **rng})[1])[
            "bytes"] == 0 and time.monotonic() < deadline:
        time.sleep(0.3)
    assert stats["bytes"] > 2048, stats
    lp = parse(policy)
    assert lp is not None
    for query, want in (('{app="big"} |= "line"', 400), ('sum(count_over_time({app="big"} |= "x" [5m]))', 400),
                        ('{app="big"}', 200)):  # (Loki does not check a log query without a filter)
        params = {"query": query, "step": "60", **rng}
        status, got = gw.get(token, "200", "/loki/api/v1/query_range", params)
        d_status, d_body = _direct(loki_plain, "200", "/loki/api/v1/query_range", params, lp.header)
        assert status == d_status == want, (query, status, got, d_status, d_body)
        if want == 400:
            assert _text(got) == _text(d_body) and _text(got).startswith(
                "the query would read too many bytes (query: ") and "limit: 2.0 KiB)" in _text(got), (got, d_body)
