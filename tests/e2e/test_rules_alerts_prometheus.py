"""Rule and alert state filtered for a label-restricted token, against real Prometheus evaluating a rules file.

Prometheus (route prefix ``/prometheus``, evaluation every second, an empty TSDB) runs four groups whose
alerts fire at once (``absent()`` of a series that does not exist takes the selector's equality labels):
``dev`` reads only ``{env="dev"}``, ``prod`` only ``{env="prod"}``, ``mixed`` reads both a dev selector and an
unrestricted one, ``constant`` reads nothing (``vector(1)``) and labels its alert ``env="prod"``. Through the
gateway, a token limited to ``{env="dev"}`` must get exactly Prometheus's own ``/api/v1/rules`` groups
``dev`` and ``constant`` (whole), and exactly Prometheus's own ``/api/v1/alerts`` whose labels carry
``env="dev"`` (``mixed``'s dev alert among them: alerts are judged by their labels, groups by their queries).
"""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.prom import PrometheusProcess, require_prometheus
from tests.test_proxy import Env, _env, basic

RULES = """
groups:
- name: dev
  rules:
  - alert: DevAbsent
    expr: absent(probe_metric{env="dev"})
  - record: dev:count
    expr: count(probe_metric{env="dev"})
- name: prod
  rules:
  - alert: ProdAbsent
    expr: absent(probe_metric{env="prod"})
- name: mixed
  rules:
  - alert: DevAbsentJobX
    expr: absent(probe_metric{env="dev", job="x"})
  - record: all:count
    expr: count(probe_metric)
- name: constant
  rules:
  - alert: Static
    expr: vector(1)
    labels:
      env: prod
"""


def _get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.loads(r.read())


@pytest.fixture(scope="module")
def prom(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrometheusProcess]:
    bins = require_prometheus()
    d = tmp_path_factory.mktemp("rules")
    (d / "rules.yml").write_text(RULES)
    cfg = f"global:\n  scrape_interval: 1h\n  evaluation_interval: 1s\nrule_files:\n  - {d / 'rules.yml'}\n"
    p = PrometheusProcess(Path(d / "tsdb"), route_prefix="/prometheus", config_yaml=cfg,
                          binary=bins.prometheus).start()
    try:
        deadline = time.monotonic() + 30
        while len(_get(f"{p.url}/api/v1/alerts")["data"]["alerts"]) < 4:  # every alert has fired once
            assert time.monotonic() < deadline, p.log_text()
            time.sleep(0.2)
        yield p
    finally:
        p.stop()


@pytest.fixture
async def env(prom: PrometheusProcess, db_dsn: str, aiohttp_client: Any, aiohttp_server: Any) -> AsyncIterator[Env]:
    base = prom.url.removesuffix("/prometheus")
    ups = {"metrics": {"url": base, "lbac": "enforce"}, "logs": {"url": base, "lbac": "enforce"}}
    async with _env(db_dsn, aiohttp_client, aiohttp_server, upstreams=ups) as e:
        yield e


def _shape(groups: list[dict[str, Any]]) -> list[tuple[str, list[tuple[str, str, list[Any]]]]]:
    """What does not change between two evaluations: names, queries, alert label sets."""
    return [(g["name"], [(r["name"], r["query"], sorted(json.dumps(a["labels"], sort_keys=True)
                                                         for a in r.get("alerts", []))) for r in g["rules"]])
            for g in groups]


async def test_real_prometheus_rules_and_alerts_through_a_restricted_token(env: Env, prom: PrometheusProcess
                                                                           ) -> None:
    realm = [{"type": "stack", "identifier": "100", "labelPolicies": [{"selector": '{env="dev"}'}]}]
    dev = basic("100", await env.token(["rules:read"], realm))
    full = basic("100", await env.token(["rules:read"]))
    c = env.gw.client

    truth = _get(f"{prom.url}/api/v1/rules")["data"]["groups"]
    r = await c.get("/prometheus/api/v1/rules", headers=dev)
    assert r.status == 200, await r.text()
    got = (await r.json())["data"]["groups"]
    assert _shape(got) == _shape([g for g in truth if g["name"] in ("dev", "constant")])
    r = await c.get("/prometheus/api/v1/rules", headers=full)
    assert _shape((await r.json())["data"]["groups"]) == _shape(truth)
    # Prometheus's own filters still apply; a group is judged on all its rules, not on those a filter kept
    # (`mixed` without its recording rule would look visible)
    r = await c.get("/prometheus/api/v1/rules?type=alert", headers=dev)
    assert sorted((g["name"], [x["name"] for x in g["rules"]]) for g in (await r.json())["data"]["groups"]) == [
        ("constant", ["Static"]), ("dev", ["DevAbsent"])]
    r = await c.get("/prometheus/api/v1/rules?type=alert", headers=full)
    assert len((await r.json())["data"]["groups"]) == 4

    alerts = _get(f"{prom.url}/api/v1/alerts")["data"]["alerts"]
    r = await c.get("/prometheus/api/v1/alerts", headers=dev)
    assert r.status == 200
    got_alerts = sorted(json.dumps(a["labels"], sort_keys=True) for a in (await r.json())["data"]["alerts"])
    want = sorted(json.dumps(a["labels"], sort_keys=True) for a in alerts if a["labels"].get("env") == "dev")
    assert got_alerts == want and len(want) == 2
