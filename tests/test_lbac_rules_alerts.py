"""Rules, alerts and silences under label policies, through the gateway, against a fake ruler and Alertmanager
written from Mimir's, Loki's and Alertmanager's formats (tests/fake_ruler.py).

A token limited to ``{env="dev"}`` must see only the rule groups whose every selector implies the policy,
only alerts whose labels match it, only silences whose matchers imply it, and may only write such silences
(an update or expiry of another team's silence is refused, and never reaches the Alertmanager). An
unrestricted token sees everything as the upstream answered. Real Prometheus's own answers are checked in
tests/e2e/test_rules_alerts_prometheus.py.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest
import yaml

from gateway.lbac.visibility import covered, query_visible, silence_visible
from gateway.policy.selector import LabelMatcher, parse_selector
from tests.fake_ruler import FakeRuler, silence
from tests.test_proxy import Env, _env, basic, expect_refusal

DEV = (parse_selector('{env="dev"}'),)

PROMQL_GROUPS = {
    "ns1": [
        {"name": "dev", "rules": [{"record": "dev:up", "expr": 'sum(up{env="dev"})'},
                                  {"alert": "DevDown", "expr": 'up{env="dev", job="api"} == 0'}]},
        {"name": "prod", "rules": [{"alert": "ProdDown", "expr": 'up{env="prod"} == 0'}]},
        {"name": "mixed", "rules": [{"record": "a", "expr": 'up{env="dev"}'}, {"record": "b", "expr": "up"}]},
    ],
    "ns2": [
        {"name": "regex-dev", "rules": [{"record": "c", "expr": 'rate(x_total{env=~"dev"}[5m])'}]},
        {"name": "regex-both", "rules": [{"record": "d", "expr": 'rate(x_total{env=~"dev|prod"}[5m])'}]},
        {"name": "constant", "rules": [{"alert": "Always", "expr": "vector(1)"}]},
    ],
    "ns3": [{"name": "broken", "rules": [{"record": "e", "expr": 'up{env="dev"'}]}],
}
LOGQL_GROUPS = {
    "logs": [
        {"name": "dev-errors", "rules": [
            {"alert": "DevErrors", "expr": 'sum(count_over_time({env="dev", app="api"} |= "error" [5m])) > 0'}]},
        {"name": "app-errors", "rules": [{"alert": "AppErrors", "expr": 'count_over_time({app="api"}[5m]) > 0'}]},
    ],
}
ALERTS = [{"alertname": "DevDown", "env": "dev", "job": "api"}, {"alertname": "ProdDown", "env": "prod"},
          {"alertname": "Always"}]
VISIBLE_GROUPS = {"dev", "regex-dev", "constant"}


@dataclass
class World:
    env: Env
    metrics: FakeRuler
    logs: FakeRuler
    dev: dict[str, str]
    dev_logs: dict[str, str]
    full: dict[str, str]
    silences: dict[str, str]  # name -> id


@pytest.fixture
async def world(db_dsn: str, aiohttp_client: Any, aiohttp_server: Any) -> AsyncIterator[World]:
    metrics = FakeRuler(json.loads(json.dumps(PROMQL_GROUPS)), alerts=[dict(a) for a in ALERTS])
    logs = FakeRuler(json.loads(json.dumps(LOGQL_GROUPS)), alerts=[{"alertname": "DevErrors", "env": "dev"}])
    sils = {"dev": silence(("env", "dev", False, True), ("alertname", "DevDown", False, True)),
            "prod": silence(("env", "prod", False, True)),
            "name-only": silence(("alertname", "DevDown", False, True)),
            "regex-dev": silence(("env", "dev", True, True)),
            "not-prod": silence(("env", "prod", False, False))}
    metrics.silences = {s["id"]: s for s in sils.values()}
    m_url = str((await aiohttp_server(metrics.app())).make_url("")).rstrip("/")
    l_url = str((await aiohttp_server(logs.app())).make_url("")).rstrip("/")
    ups = {"metrics": {"url": m_url, "lbac": "enforce"}, "logs": {"url": l_url, "lbac": "enforce"}}
    async with _env(db_dsn, aiohttp_client, aiohttp_server, upstreams=ups) as e:
        realm = [{"type": "stack", "identifier": "100", "labelPolicies": [{"selector": '{env="dev"}'}]}]
        scopes = ["rules:read", "alerts:read", "alerts:write"]
        dev = basic("100", await e.token(scopes, realm))
        dev_logs = basic("100", await e.token(["rules:read"], realm))
        full = basic("100", await e.token(scopes))
        metrics.seen.clear()
        yield World(e, metrics, logs, dev, dev_logs, full, {k: v["id"] for k, v in sils.items()})


def group_names(doc: Any) -> set[str]:
    return {g["name"] for g in doc["data"]["groups"]}


async def get_json(w: World, path: str, headers: dict[str, str], status: int = 200) -> Any:
    r = await w.env.gw.client.get(path, headers=headers)
    assert r.status == status, (path, r.status, await r.text())
    return await r.json()


# --------------------------------------------------------------------------- the visibility rule itself


def test_covered_is_implication_of_a_policy_selector() -> None:
    pol = (parse_selector('{env="dev", team=~"a|b"}'), parse_selector('{cluster!="x"}'))
    m = LabelMatcher
    assert covered([m("env", "=", "dev"), m("team", "=", "a")], pol)
    assert covered([m("env", "=~", "dev"), m("team", "=~", "a|b")], pol)
    assert covered([m("cluster", "=", "y")], pol)  # y != x
    assert covered([m("cluster", "=", "")], pol)  # an absent cluster reads as "", which is not "x"
    assert not covered([m("env", "=", "dev")], pol)  # team unconstrained
    assert not covered([m("env", "=", "dev"), m("team", "=~", "a|c")], pol)
    assert not covered([m("env", "=", "dev"), m("team", "=~", "a.*")], pol)  # not a literal alternation
    assert not covered([m("env", "!=", "prod")], (parse_selector('{env="dev"}'),))


def test_query_visibility_by_language() -> None:
    assert query_visible('sum by (job) (rate(x{env="dev"}[5m])) / on(job) count(y{env="dev"})', "promql", DEV)
    assert query_visible("vector(1)", "promql", DEV)  # reads no data
    assert not query_visible('x{env="dev"} / y', "promql", DEV)
    assert not query_visible('up{env="dev"', "promql", DEV)  # does not parse: hidden
    assert query_visible('sum(rate({env="dev"} |= "x" [1m]))', "logql", DEV)
    assert not query_visible('rate({env="dev"}[1m]) / rate({app="a"}[1m])', "logql", DEV)
    assert not query_visible(None, "promql", DEV)


def test_silence_visibility_needs_matchers_that_imply_a_policy() -> None:
    assert silence_visible(silence(("env", "dev", False, True), ("x", "y", True, False)), DEV)
    assert not silence_visible(silence(("env", "dev|prod", True, True)), DEV)
    assert not silence_visible({"matchers": []}, DEV)
    assert not silence_visible({"matchers": [{"name": "env", "value": "dev", "isRegex": "no"}]}, DEV)


# --------------------------------------------------------------------------- the ruler


@pytest.mark.parametrize("prefix", ["/prometheus", "/api/prom", "/mimir/prometheus"])
async def test_rule_state_keeps_only_groups_whose_every_selector_is_covered(world: World, prefix: str) -> None:
    doc = await get_json(world, f"{prefix}/api/v1/rules", world.dev)
    assert group_names(doc) == VISIBLE_GROUPS
    dev = next(g for g in doc["data"]["groups"] if g["name"] == "dev")
    assert [a["labels"]["alertname"] for r in dev["rules"] for a in r.get("alerts", [])] == ["DevDown"]
    full = await get_json(world, f"{prefix}/api/v1/rules", world.full)
    assert group_names(full) == {g["name"] for gs in PROMQL_GROUPS.values() for g in gs}


async def test_alert_state_keeps_alerts_whose_labels_match(world: World) -> None:
    doc = await get_json(world, "/prometheus/api/v1/alerts", world.dev)
    assert [a["labels"] for a in doc["data"]["alerts"]] == [ALERTS[0]]
    full = await get_json(world, "/prometheus/api/v1/alerts", world.full)
    assert len(full["data"]["alerts"]) == 3


async def test_rule_configuration_is_filtered_and_hidden_groups_are_404(world: World) -> None:
    c = world.env.gw.client
    for path in ("/prometheus/config/v1/rules", "/api/prom/config/v1/rules", "/prometheus/rules"):
        r = await c.get(path, headers=world.dev)
        assert r.status == 200 and r.content_type == "application/yaml"
        got = yaml.safe_load(await r.text())
        assert {ns: [g["name"] for g in gs] for ns, gs in got.items()} == {"ns1": ["dev"],
                                                                           "ns2": ["regex-dev", "constant"]}
    r = await c.get("/prometheus/config/v1/rules/ns1/dev", headers=world.dev)
    assert r.status == 200 and yaml.safe_load(await r.text()) == PROMQL_GROUPS["ns1"][0]
    await expect_refusal(await c.get("/prometheus/config/v1/rules/ns1/prod", headers=world.dev), 404, "not visible")
    await expect_refusal(await c.get("/prometheus/config/v1/rules/ns3", headers=world.dev), 404, "not visible")
    r = await c.get("/prometheus/config/v1/rules/ns1/prod", headers=world.full)
    assert r.status == 200


async def test_loki_rules_are_judged_by_their_logql_selectors(world: World) -> None:
    doc = await get_json(world, "/loki/prometheus/api/v1/rules", world.dev_logs)
    assert group_names(doc) == {"dev-errors"}
    r = await world.env.gw.client.get("/loki/api/v1/rules", headers=world.dev_logs)
    assert r.status == 200
    assert [g["name"] for g in yaml.safe_load(await r.text())["logs"]] == ["dev-errors"]


async def test_rule_writes_stay_refused_for_restricted_tokens(world: World) -> None:
    # (unchanged behaviour, kept next to the reads: a recording rule's output would bypass the policies)
    w = basic("100", await world.env.token(["rules:write"], [
        {"type": "stack", "identifier": "100", "labelPolicies": [{"selector": '{env="dev"}'}]}]))
    r = await world.env.gw.client.post("/prometheus/config/v1/rules/ns1", headers=w, data=b"name: g\nrules: []\n")
    await expect_refusal(r, 403, "cannot write rules")


# --------------------------------------------------------------------------- the Alertmanager


async def test_alertmanager_alerts_and_groups_keep_visible_alerts(world: World) -> None:
    alerts = await get_json(world, "/alertmanager/api/v2/alerts?active=true", world.dev)
    assert [a["labels"] for a in alerts] == [ALERTS[0]]
    groups = await get_json(world, "/alertmanager/api/v2/alerts/groups", world.dev)
    assert [(g["labels"], [a["labels"]["alertname"] for a in g["alerts"]]) for g in groups] == [
        ({"alertname": "DevDown"}, ["DevDown"]), ({}, ["DevDown"])]
    assert world.metrics.seen[0][1] == "/alertmanager/api/v2/alerts?active=true"  # parameters kept
    assert len(await get_json(world, "/alertmanager/api/v2/alerts", world.full)) == 3


async def test_alertmanager_silences_are_listed_and_read_by_their_matchers(world: World) -> None:
    got = await get_json(world, "/alertmanager/api/v2/silences", world.dev)
    assert {s["id"] for s in got} == {world.silences["dev"], world.silences["regex-dev"]}
    await get_json(world, f"/alertmanager/api/v2/silence/{world.silences['dev']}", world.dev)
    r = await world.env.gw.client.get(f"/alertmanager/api/v2/silence/{world.silences['prod']}", headers=world.dev)
    await expect_refusal(r, 403, "outside your label policies")
    assert len(await get_json(world, "/alertmanager/api/v2/silences", world.full)) == 5


async def test_silence_writes_outside_the_policy_never_reach_the_alertmanager(world: World) -> None:
    c, m = world.env.gw.client, world.metrics
    new = {"matchers": [{"name": "env", "value": "dev", "isRegex": False, "isEqual": True}],
           "startsAt": "2026-01-01T00:00:00Z", "endsAt": "2026-01-02T00:00:00Z", "createdBy": "a", "comment": "b"}
    r = await c.post("/alertmanager/api/v2/silences", headers=world.dev, json=new)
    assert r.status == 200, await r.text()
    assert (await r.json())["silenceID"] in m.silences
    before = len(m.silences)
    wide = {**new, "matchers": [{"name": "env", "value": "dev|prod", "isRegex": True, "isEqual": True}]}
    await expect_refusal(await c.post("/alertmanager/api/v2/silences", headers=world.dev, json=wide), 403,
                         "could match alerts outside")
    # an update names the silence it replaces (and expires): another team's one is refused
    hijack = {**new, "id": world.silences["prod"]}
    await expect_refusal(await c.post("/alertmanager/api/v2/silences", headers=world.dev, json=hijack), 403,
                         "the silence this update replaces")
    r = await c.delete(f"/alertmanager/api/v2/silence/{world.silences['prod']}", headers=world.dev)
    await expect_refusal(r, 403, "outside your label policies")
    assert len(m.silences) == before and m.silences[world.silences["prod"]]["status"]["state"] == "active"
    assert not [s for s in m.seen if s[0] in ("POST", "DELETE") and world.silences["prod"] in (s[1] + s[2].decode())]
    r = await c.delete(f"/alertmanager/api/v2/silence/{world.silences['dev']}", headers=world.dev)
    assert r.status == 200 and m.silences[world.silences["dev"]]["status"]["state"] == "expired"
    await expect_refusal(await c.post("/alertmanager/api/v2/silences", headers=world.dev, data=b"{"), 400, "JSON")


async def test_posted_alerts_and_everything_else_of_the_alertmanager(world: World) -> None:
    c = world.env.gw.client
    r = await c.post("/alertmanager/api/v2/alerts", headers=world.dev,
                     json=[{"labels": {"alertname": "X", "env": "dev"}}])
    assert r.status == 200
    r = await c.post("/alertmanager/api/v2/alerts", headers=world.dev, json=[{"labels": {"alertname": "X"}}])
    await expect_refusal(r, 403, "outside your label policies")
    for path in ("/alertmanager/api/v2/status", "/alertmanager", "/alertmanager/api/v2/receivers", "/api/v1/alerts"):
        await expect_refusal(await c.get(path, headers=world.dev), 403, "cannot be filtered")
    assert (await c.get("/alertmanager/api/v2/status", headers=world.full)).status == 200


async def test_a_large_answer_is_filtered_off_the_event_loop_alike(world: World) -> None:
    big = [{"name": f"big-{i}", "rules": [{"record": f"r{i}", "expr": f'sum(x{{env="{env}", n="{i}"}})'}]}
           for i in range(600) for env in (("dev",) if i % 2 else ("prod",))]
    world.metrics.namespaces["big"] = big
    r = await world.env.gw.client.get("/prometheus/api/v1/rules", headers=world.full)
    assert len(await r.read()) > 64 * 1024  # past INLINE_ANSWER: the LBAC pool's process filters it
    doc = await get_json(world, "/prometheus/api/v1/rules", world.dev)
    assert group_names(doc) == VISIBLE_GROUPS | {f"big-{i}" for i in range(1, 600, 2)}


async def test_the_protocol_data_path_filters_cached_decisions_too(db_dsn: str, aiohttp_client: Any,
                                                                   aiohttp_server: Any) -> None:
    """On the production data path a repeated request takes the callback fast path (a cached decision):
    it must decline rule reads, so the second answer is filtered like the first, HEAD included."""
    from tests.test_dataplane import _dp

    fake = FakeRuler(json.loads(json.dumps(PROMQL_GROUPS)), alerts=[dict(a) for a in ALERTS])
    async with _dp(db_dsn, aiohttp_client, aiohttp_server, upstream=fake.app()) as dp:
        realm = [{"type": "stack", "identifier": "100", "labelPolicies": [{"selector": '{env="dev"}'}]}]
        p = await dp.gw.policy("dev-rules", ["rules:read"], realm)
        dev = basic("100", str((await dp.gw.token(p["id"], "dev-rules"))["token"]))
        for _ in range(3):
            r = await dp.gw.client.get("/prometheus/api/v1/rules", headers=dev)
            assert r.status == 200 and group_names(await r.json()) == VISIBLE_GROUPS
        r = await dp.gw.client.head("/prometheus/api/v1/alerts", headers=dev)
        assert r.status == 200 and await r.read() == b""


async def test_forward_auth_refuses_rule_and_alert_reads_under_label_policies(
        db_dsn: str, aiohttp_client: Any, aiohttp_server: Any) -> None:
    """Another proxy forwards the ruler's answer whole: only the data path can filter it, so forward-auth
    refuses a restricted token there (and still admits an unrestricted one)."""
    from tests.test_forward_auth import fa_env

    async with fa_env(db_dsn, aiohttp_client, aiohttp_server) as env:
        realm = [{"type": "stack", "identifier": "100", "labelPolicies": [{"selector": '{env="dev"}'}]}]
        scopes = ["rules:read", "alerts:read"]
        dev, full = await env.token(scopes, realm), await env.token(scopes)
        for uri in ("/prometheus/api/v1/rules", "/prometheus/api/v1/alerts", "/prometheus/config/v1/rules",
                    "/alertmanager/api/v2/silences"):
            h = {"X-Original-Method": "GET", "X-Original-URI": uri}
            r = await env.gw.client.get("/forward-auth/nginx", headers={**h, **basic("100", dev)})
            assert r.status == 403 and "gateway's own data path" in (await r.json())["error"], uri
            r = await env.gw.client.get("/forward-auth/nginx", headers={**h, **basic("100", full)})
            assert r.status == 200 and r.headers["X-Scope-OrgID"] == "100", uri
