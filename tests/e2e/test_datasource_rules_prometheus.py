"""Team LBAC rules of a data source against a REAL Prometheus (Debian's 2.42) in enforce mode.

Prometheus does not read ``X-Prom-Label-Policy``, so the gateway rewrites every selector itself:
a member of the dev team must see only ``env="dev"`` series, a user in no team everything the
data source's token allows, and a PUT that leaves the team out lifts the restriction at once.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest

from tests.conftest import require
from tests.e2e.prom import PrometheusProcess, build_tsdb, data_window, find_prometheus, openmetrics_text
from tests.test_proxy import Env, _env, basic

STEP = 60
START, END = data_window(hours=1, step_s=STEP)
METRIC = "dsr_requests"
SERIES = [({"__name__": METRIC, "env": env, "instance": inst}, [(t, float(i)) for i, t in
                                                                  enumerate(range(START, END + 1, STEP))])
          for env in ("dev", "prod") for inst in ("a", "b")]


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrometheusProcess]:
    """One Prometheus for the module, answering on Mimir's paths (``/prometheus/api/v1/...``)."""
    bins = find_prometheus()
    require(bins is not None, "prometheus and promtool (Debian: apt-get install prometheus)")
    assert bins is not None
    tsdb = build_tsdb(openmetrics_text(SERIES), tmp_path_factory.mktemp("tsdb") / "data", bins.promtool)
    with PrometheusProcess(tsdb, route_prefix="/prometheus", binary=bins.prometheus) as prom:
        yield prom


async def _query(env: Env, token: str, user: str | None, path: str, params: list[tuple[str, str]]) -> Any:
    headers = basic("100", token)
    if user is not None:
        headers["X-Grafana-User"] = user
    r = await env.gw.client.get(path, params=params, headers=headers)
    body = await r.json()
    assert r.status == 200 and body["status"] == "success", (r.status, body)
    return body["data"]


async def envs_seen(env: Env, token: str, user: str | None) -> set[str]:
    """The env labels visible to ``user`` through an instant query, a range query and the series API."""
    instant = await _query(env, token, user, "/prometheus/api/v1/query", [("query", METRIC), ("time", str(END))])
    ranged = await _query(env, token, user, "/prometheus/api/v1/query_range", [
        ("query", f"sum by (env) (rate({METRIC}[5m]))"), ("start", str(END - 1800)), ("end", str(END)),
        ("step", "300")])
    series = await _query(env, token, user, "/prometheus/api/v1/series", [
        ("match[]", METRIC), ("start", str(START)), ("end", str(END))])
    seen = [{s["metric"]["env"] for s in instant["result"]}, {s["metric"]["env"] for s in ranged["result"]},
            {s["env"] for s in series}]
    assert seen[0] == seen[1] == seen[2], seen
    if seen[0]:
        assert len(instant["result"]) == 2 * len(seen[0])  # both instances of every visible env
    return seen[0]


async def _setup(env: Env) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """Data source ``grafana`` on a stack-100 policy; team dev {env="dev"}: alice; team prod {env="prod"}: bob."""
    gw = env.gw
    name = f"grafana-{os.urandom(3).hex()}"
    policy = await gw.policy(name, ["metrics:read"], [{"type": "stack", "identifier": "100"}])
    token = str((await gw.token(policy["id"], name))["token"])
    await gw.api("POST", "/api/datasources", {"uid": "grafana", "name": "Mimir", "type": "prometheus",
                                              "accessPolicyId": policy["id"]})
    dev = await gw.api("POST", "/api/teams", {"name": "dev", "members": ["alice"]})
    prod = await gw.api("POST", "/api/teams", {"name": "prod", "members": ["bob"]})
    await gw.api("PUT", "/api/datasources/grafana/lbac/teams", {"rules": [
        {"teamId": dev["id"], "rules": [{"header": "X-Prom-Label-Policy", "value": '100:{ env="dev" }'}]},
        {"teamUid": prod["uid"], "rules": ['{env="prod"}']}]})
    return token, dev, prod


async def test_team_rules_are_enforced_by_rewriting(prometheus: PrometheusProcess, db_dsn: str, aiohttp_client: Any,
                                                    aiohttp_server: Any) -> None:
    ups = {"metrics": {"url": f"http://127.0.0.1:{prometheus.port}", "lbac": "enforce"}}
    async with _env(db_dsn, aiohttp_client, aiohttp_server, upstreams=ups) as env:
        token, dev, prod = await _setup(env)
        assert await envs_seen(env, token, "alice") == {"dev"}
        assert await envs_seen(env, token, "bob") == {"prod"}
        assert await envs_seen(env, token, "dave") == {"dev", "prod"}  # in no team: the token's full access
        assert await envs_seen(env, token, None) == {"dev", "prod"}
        # a member of both teams sees the union
        await env.gw.api("PUT", f"/api/teams/{prod['id']}/members", {"members": ["bob", "alice"]})
        assert await envs_seen(env, token, "alice") == {"dev", "prod"}
        await env.gw.api("PUT", f"/api/teams/{prod['id']}/members", {"members": ["bob"]})
        assert await envs_seen(env, token, "alice") == {"dev"}
        # the one-team PUT replaces the whole set: the dev team loses its rule at once
        await env.gw.api("PUT", "/api/datasources/grafana/lbac/teams", {"teamId": prod["id"], "rules": [
            {"header": "X-Prom-Label-Policy", "value": '100:{env="prod"}'}]})
        assert await envs_seen(env, token, "alice") == {"dev", "prod"}
        assert await envs_seen(env, token, "bob") == {"prod"}
        assert dev["id"] != prod["id"]


async def test_rules_of_one_datasource_do_not_touch_another(prometheus: PrometheusProcess, db_dsn: str,
                                                            aiohttp_client: Any, aiohttp_server: Any) -> None:
    ups = {"metrics": {"url": f"http://127.0.0.1:{prometheus.port}", "lbac": "enforce"}}
    async with _env(db_dsn, aiohttp_client, aiohttp_server, upstreams=ups) as env:
        token_a, _, _ = await _setup(env)
        policy_b = await env.gw.policy("grafana-b", ["metrics:read"], [{"type": "stack", "identifier": "100"}])
        token_b = str((await env.gw.token(policy_b["id"], "grafana-b"))["token"])
        await env.gw.api("POST", "/api/datasources", {"uid": "b", "name": "B", "type": "prometheus",
                                                      "accessPolicyId": policy_b["id"]})
        assert await envs_seen(env, token_a, "alice") == {"dev"}
        assert await envs_seen(env, token_b, "alice") == {"dev", "prod"}
