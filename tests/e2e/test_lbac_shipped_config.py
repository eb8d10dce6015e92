"""The shipped config/gateway.yaml against a real Prometheus, which ignores X-Prom-Label-Policy.

Only the upstream URL is changed (nothing listens on 127.0.0.1:9009 here); the `lbac:`
setting is the shipped one. A token restricted to {env="dev"} must never see env="prod",
whatever it asks; `header` mode against the same backend is detected and refused (503),
and `auto` falls back to enforce.
"""

from __future__ import annotations

import base64
import contextlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.config import parse_config
from tests.conftest import bootstrap_token
from tests.e2e.prom import PrometheusProcess, build_tsdb, data_window, openmetrics_text, require_prometheus

ROOT = Path(__file__).resolve().parents[2]
START, END = data_window(hours=1)
SERIES = [
    ({"__name__": "up", "env": "dev", "job": "api"}, 1.0),
    ({"__name__": "up", "env": "prod", "job": "api"}, 1.0),
    ({"__name__": "secret_total", "env": "prod"}, 42.0),
    ({"__name__": "build_info", "env": "dev", "version": "1"}, 1.0),
]


@pytest.fixture(scope="module")
def prom(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrometheusProcess]:
    bins = require_prometheus()
    samples = [(labels, [(t, v) for t in range(START, END + 1, 60)]) for labels, v in SERIES]
    d = tmp_path_factory.mktemp("tsdb-shipped")
    build_tsdb(openmetrics_text(samples), d, promtool=bins.promtool)
    p = PrometheusProcess(d, binary=bins.prometheus, route_prefix="/prometheus").start()
    try:
        yield p
    finally:
        p.stop()


def shipped(db_dsn: str, metrics_url: str, lbac: str | None = None) -> Any:
    raw = yaml.safe_load((ROOT / "config" / "gateway.yaml").read_text())
    for up in raw["upstreams"].values():
        up["url"] = metrics_url  # only the address; nothing else of the shipped file changes
        if lbac is not None:
            up["lbac"] = lbac
    raw["database"] = {"url": db_dsn}
    return parse_config(raw, env={})


@contextlib.asynccontextmanager
async def gateway(db_dsn: str, aiohttp_client: Any, base: str, lbac: str | None = None
                  ) -> AsyncIterator[tuple[Any, dict[str, str]]]:
    from gateway.app import build_app, close_state, open_state

    cfg = shipped(db_dsn, base, lbac)
    if lbac is None:
        assert cfg.upstreams["metrics"].lbac == "enforce"
    state = await open_state(cfg)
    try:
        client = await aiohttp_client(build_app(state))
        admin = {"Authorization": f"Bearer {await bootstrap_token(state)}"}
        realm = {"type": "stack", "identifier": "100", "labelPolicies": [{"selector": '{env="dev"}'}]}
        r = await client.post("/api/v1/accesspolicies", headers=admin,
                              json={"name": "dev-readers", "scopes": ["metrics:read"], "realms": [realm]})
        assert r.status == 200, await r.text()
        r = await client.post("/api/v1/tokens", headers=admin,
                              json={"accessPolicyId": (await r.json())["id"], "name": "grafana"})
        token = (await r.json())["token"]
        yield client, {"Authorization": "Basic " + base64.b64encode(f"100:{token}".encode()).decode()}
    finally:
        await close_state(state)


READS = [
    ("query", [("query", "up"), ("time", str(END))]),
    ("query", [("query", '{__name__=~".+"}'), ("time", str(END))]),
    ("query", [("query", "sum by (env) (up) or secret_total"), ("time", str(END))]),
    ("query_range", [("query", '{env=~".+"}'), ("start", str(START)), ("end", str(END)), ("step", "300")]),
    ("series", [("match[]", '{__name__=~".+"}'), ("start", str(START)), ("end", str(END))]),
    ("label/env/values", [("match[]", '{__name__=~".+"}')]),
]


def envs(path: str, data: Any) -> set[str]:
    if path == "label/env/values":
        return set(data)
    if path == "series":
        return {s.get("env", "") for s in data}
    return {r["metric"].get("env", "") for r in data["result"]}


@pytest.mark.parametrize("lbac", [None, "auto"])
async def test_restricted_token_never_sees_outside_its_policy(prom: PrometheusProcess, db_dsn: str,
                                                              aiohttp_client: Any, lbac: str | None) -> None:
    base = prom.url.removesuffix("/prometheus")
    direct = prom.query('{__name__=~".+"}', END)
    assert {r["metric"]["env"] for r in direct["result"]} == {"dev", "prod"}  # the backend holds both
    async with gateway(db_dsn, aiohttp_client, base, lbac) as (client, auth):
        for path, params in READS:
            for method in ("GET", "POST") if path != "label/env/values" else ("GET",):
                if method == "GET":
                    r = await client.get(f"/prometheus/api/v1/{path}", params=params, headers=auth)
                else:
                    r = await client.post(f"/prometheus/api/v1/{path}", data=params, headers=auth)
                body = await r.json()
                assert r.status == 200, (path, body)
                seen = envs(path, body["data"])
                assert seen <= {"dev"}, (path, method, seen)
                assert seen, (path, method)  # and the visible data is there
        ready = await (await client.get("/ready")).json()
        assert ready["lbac"]["metrics"]["effective"] == "enforce"
        if lbac == "auto":
            assert ready["lbac"]["metrics"]["backendEnforces"] is False  # Prometheus ignores the header


async def test_header_mode_against_prometheus_is_refused(prom: PrometheusProcess, db_dsn: str,
                                                         aiohttp_client: Any) -> None:
    base = prom.url.removesuffix("/prometheus")
    async with gateway(db_dsn, aiohttp_client, base, "header") as (client, auth):
        r = await client.get("/prometheus/api/v1/query", params={"query": "up", "time": str(END)}, headers=auth)
        body = await r.json()
        assert r.status == 503 and "does not (verifiably) enforce" in body["error"], body
