"""Every spelling of a restricted Prometheus read, judged by a REAL Prometheus (Debian's package).

Two Prometheus instances hold the same data, one only the series the policy ``{ns="allowed"}`` shows.
Each request of tests/test_lbac_params.py's spellings (absent, empty, bare, in the body, in the URL, repeated,
encoded name) goes through the gateway in enforce mode to the full one, and the same request straight to
the visible-only one: Prometheus' own reading of that spelling (``r.FormValue``, ``r.Form["match[]"]``) is
the oracle. The gateway's answer must equal the oracle's, or be a 400 where Prometheus refuses it too or the
gateway will not guess which copy of a repeated parameter is meant.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from tests.conftest import require
from tests.e2e.prom import PrometheusProcess, build_tsdb, data_window, find_prometheus, openmetrics_text
from tests.fake_loki import stack_realm
from tests.test_lbac_params import FORM, REPEATED, spellings
from tests.test_proxy import Env, _env, basic

STEP = 60
START, END = data_window(hours=1, step_s=STEP)
POLICY = '{ns="allowed"}'
SAMPLES = [(t, float(i)) for i, t in enumerate(range(START, END + 1, STEP))]
SERIES = [({"__name__": "lp_up", "ns": ns, "instance": inst}, SAMPLES) for ns in ("allowed", "other")
          for inst in ("a", "b")] + [
    ({"__name__": "lp_mine", "ns": "allowed", "mine_label": "m"}, SAMPLES),
    ({"__name__": "lp_secret", "ns": "other", "secret_label": "s"}, SAMPLES),
]
SEL = '{__name__=~"lp_.*"}'
RANGE = f"start={START}&end={END}"
READS = [  # (path, parameter, value, the other parameters)
    ("/prometheus/api/v1/query", "query", "lp_up", f"time={END}"),
    ("/api/prom/api/v1/query", "query", 'sum by (ns) (lp_up{instance="a"})', f"time={END}"),
    ("/prometheus/api/v1/query_range", "query", "lp_up", f"start={END - 600}&end={END}&step=60"),
    ("/prometheus/api/v1/query_exemplars", "query", "lp_up", RANGE),
    ("/prometheus/api/v1/series", "match[]", SEL, RANGE),
    ("/prometheus/api/v1/labels", "match[]", SEL, RANGE),
    ("/prometheus/api/v1/label/ns/values", "match[]", SEL, RANGE),
    ("/prometheus/api/v1/label/__name__/values", "match[]", "lp_secret", RANGE),
]


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, PrometheusProcess]]:
    bins = find_prometheus()
    require(bins is not None, "prometheus and promtool (Debian: apt-get install prometheus)")
    assert bins is not None
    procs: dict[str, PrometheusProcess] = {}
    try:
        for key, keep in (("full", SERIES), ("visible", [s for s in SERIES if s[0]["ns"] == "allowed"])):
            tsdb = build_tsdb(openmetrics_text(keep), tmp_path_factory.mktemp(f"tsdb-{key}") / "data", bins.promtool)
            procs[key] = PrometheusProcess(tsdb, route_prefix="/prometheus", binary=bins.prometheus).start()
        yield procs
    finally:
        for p in procs.values():
            p.stop()


def _direct(prom: PrometheusProcess, method: str, path: str, raw: str, body: str | None) -> tuple[int, Any]:
    path = path.replace("/api/prom/", "/prometheus/", 1)  # the gateway's alias of Mimir's prefix
    url = f"http://127.0.0.1:{prom.port}{path}" + (f"?{raw}" if raw else "")
    req = urllib.request.Request(url, method=method, data=body.encode() if body is not None else None,
                                 headers={"Content-Type": FORM} if body is not None else {})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def _norm(doc: Any) -> Any:
    data = doc.get("data")
    if isinstance(data, dict) and "result" in data:
        return data["resultType"], sorted(json.dumps(x, sort_keys=True) for x in data["result"])
    if isinstance(data, list):
        return sorted(json.dumps(x, sort_keys=True) for x in data)
    return data


async def test_every_spelling_reads_as_prometheus_reads_it(prometheus: dict[str, PrometheusProcess], db_dsn: str,
                                                           aiohttp_client: Any, aiohttp_server: Any) -> None:
    full = prometheus["full"]
    ups = {"metrics": {"url": f"http://127.0.0.1:{full.port}", "lbac": "enforce"}}
    problems: list[str] = []
    n = 0
    answered: list[str] = []  # rows answered with data, equal to Prometheus' on the visible data
    async with _env(db_dsn, aiohttp_client, aiohttp_server, upstreams=ups) as env:
        h = basic("100", await env.token(["metrics:read"], stack_realm((POLICY,))))
        for path, name, value, rest in READS:
            for spelling, method, raw, body in spellings(name, value, rest):
                if method == "POST" and "/label/" in path:
                    continue  # Prometheus' label values are GET only (so are the gateway's routes)
                n += 1
                problems += await _check(env, h, prometheus["visible"], f"{method} {path} {spelling}", method, path,
                                         raw, body, spelling, answered)
    assert n == 80 and len(answered) >= 30, (n, answered)
    assert not problems, f"{len(problems)} of {n}:\n" + "\n".join(problems)


async def _check(env: Env, h: dict[str, str], visible: PrometheusProcess, rid: str, method: str, path: str,
                 raw: str, body: str | None, spelling: str, answered: list[str]) -> list[str]:
    url = path + (f"?{raw}" if raw else "")
    r = await env.gw.client.request(method, url, data=body.encode() if body is not None else None,
                                    headers={**h, **({"Content-Type": FORM} if body is not None else {})})
    got = await r.json()
    status, want = _direct(visible, method, path, raw, body)
    if status == 400 and path.endswith("/series") and spelling == "absent":
        # Prometheus needs a match[] here; restricted, the gateway sends the policy as the only one
        status, want = _direct(visible, method, path, f"{raw}&match%5B%5D=%7B__name__%3D~%22.%2B%22%7D", body)
    if r.status == 200:
        if status != 200 or _norm(got) != _norm(want):
            return [f"{rid}: the gateway answered {_norm(got)}, Prometheus on the visible data {status} "
                    f"{_norm(want)}"]
        if _norm(got) not in (None, [], ("vector", []), ("matrix", [])):
            answered.append(rid)
        return []
    if r.status != 400 or got.get("status") != "error":
        return [f"{rid}: {r.status} {got}"]
    if status == 200 and spelling not in REPEATED:
        return [f"{rid}: refused ({got.get('error')}), but Prometheus reads it: {_norm(want)}"]
    return []
