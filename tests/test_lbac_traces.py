"""Trace selectors through the real gateway: the admin API takes them, trace by ID is filtered against a fake
Tempo written from Tempo's code (tests/fake_tempo.py) in JSON and protobuf, v1 and v2, and a token whose
label policies cannot restrict a signal does not read it whole."""

from __future__ import annotations

import base64
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import pytest
from opentelemetry.proto.trace.v1 import trace_pb2

from tests.fake_tempo import PROTOBUF, FakeTempo, attrs, resource_spans, span
from tests.test_datasources import DS, datasource, reader_policy, rule, team
from tests.test_proxy import Env, _env, basic, expect_refusal

MIXED = "2f3e0cee77ae5dc9c17ade3689eb2e54"  # dev and prod spans
PROD_ONLY = "00000000000000000000000000000abc"
ABSENT = "0000000000000000000000000000dead"
DEV_SEL = '{resource.env="dev"}'


def _trace(tid_hex: str, *envs: str) -> list[dict[str, Any]]:
    tid = bytes.fromhex(tid_hex)
    return [resource_spans(attrs(env=env, service__name=f"{env}-svc", owner=f"{env}-secret-owner"),
                           span(tid, bytes([i + 1]) * 8, f"{env}-op", attributes=attrs(token=f"{env}-secret"),
                                status={"code": "STATUS_CODE_ERROR", "message": f"{env}-secret failure"}))
            for i, env in enumerate(envs)]


@dataclass
class World:
    env: Env
    tempo: FakeTempo
    dev: dict[str, str]  # {resource.env="dev"} on traces, {env="dev"} on metrics
    full: dict[str, str]
    traces_only: dict[str, str]  # trace selectors only
    labels_only: dict[str, str]  # {env="dev"} only


@pytest.fixture
async def world(db_dsn: str, aiohttp_client: Any, aiohttp_server: Any) -> AsyncIterator[World]:
    async with tempo_world(db_dsn, aiohttp_client, aiohttp_server) as w:
        yield w


@contextlib.asynccontextmanager
async def tempo_world(db_dsn: str, aiohttp_client: Any, aiohttp_server: Any) -> AsyncIterator[World]:
    """A gateway in front of a fake Tempo holding MIXED and PROD_ONLY, and its tokens (see World)."""
    tempo = FakeTempo({MIXED: _trace(MIXED, "dev", "prod"), PROD_ONLY: _trace(PROD_ONLY, "prod")})
    url = str((await aiohttp_server(tempo.app())).make_url("")).rstrip("/")
    ups = {"metrics": {"url": url, "lbac": "enforce"}, "logs": {"url": url, "lbac": "enforce"}, "traces": {"url": url}}
    async with _env(db_dsn, aiohttp_client, aiohttp_server, upstreams=ups) as e:
        yield World(e, tempo, *[basic("100", await e.token(["traces:read", "metrics:read"], realm)) for realm in (
            [_realm(DEV_SEL, '{env="dev"}')], None, [_realm(DEV_SEL)], [_realm('{env="dev"}')])])


def _realm(*selectors: str) -> dict[str, Any]:
    return {"type": "stack", "identifier": "100", "labelPolicies": [{"selector": s} for s in selectors]}


async def _get(w: World, path: str, headers: dict[str, str], accept: str = "") -> tuple[int, bytes, str]:
    h = {**headers, **({"Accept": accept} if accept else {})}
    r = await w.env.gw.client.get(path, headers=h)
    return r.status, await r.read(), r.headers.get("Content-Type", "")


def _names_json(body: bytes, v2: bool) -> dict[str, dict[str, Any]]:
    """span name -> the span, of a JSON answer."""
    doc = json.loads(body)
    batches = doc["trace"]["resourceSpans"] if v2 else doc["batches"]
    return {s["name"]: {**s, "_resource": rs["resource"]} for rs in batches for ss in rs["scopeSpans"]
            for s in ss["spans"]}


def _names_proto(body: bytes, v2: bool) -> dict[str, Any]:
    if v2:  # TraceByIDResponse: field 1 is the Trace
        assert body[0] == 0x0A
        n, i, shift = 0, 1, 0
        while True:
            b = body[i]
            n |= (b & 0x7F) << shift
            i, shift = i + 1, shift + 7
            if not b & 0x80:
                break
        body = body[i:i + n]
    data = trace_pb2.TracesData.FromString(body)
    return {s.name: (s, rs.resource) for rs in data.resource_spans for ss in rs.scope_spans for s in ss.spans}


async def test_trace_by_id_json_hides_what_the_selector_does_not_match(world: World) -> None:
    for v2, prefix in ((False, ""), (True, ""), (False, "/tempo"), (True, "/tempo")):
        await _json_case(world, v2, prefix)
    # a large answer (past INLINE_ANSWER) is filtered in the LBAC pool's process, the same way
    large = "0000000000000000000000000000beef"
    world.tempo.traces[large] = [
        resource_spans(attrs(env=env, owner=f"{env}-secret-owner"), *[
            span(bytes.fromhex(large), bytes([k, i + 1]) * 4, f"{env}-{i}", attributes=attrs(blob="x" * 200))
            for i in range(120)]) for k, env in enumerate(("dev", "prod"))]
    for accept in ("", PROTOBUF):
        status, body, _ = await _get(world, f"/api/traces/{large}", world.dev, accept)
        assert status == 200 and len(body) > 30_000 and b"prod-secret" not in body and b"dev-secret" in body


async def _json_case(world: World, v2: bool, prefix: str) -> None:
    path = f"{prefix}/api/{'v2/' if v2 else ''}traces/{MIXED}"
    status, body, ctype = await _get(world, path, world.dev)
    assert status == 200 and ctype.startswith("application/json"), body
    spans = _names_json(body, v2)
    assert set(spans) == {"dev-op", "prod-op"}
    assert b"dev-secret" in body  # the visible span keeps everything
    assert b"prod-secret" not in body and b"prod-svc" not in body
    prod = spans["prod-op"]
    assert prod["_resource"] == {} and set(prod) == {"traceId", "spanId", "name", "kind", "startTimeUnixNano",
                                                     "endTimeUnixNano", "status", "_resource"}
    assert prod["status"] == {"code": "STATUS_CODE_ERROR"}
    assert base64.b64decode(prod["traceId"]).hex() == MIXED
    sent = path.removeprefix("/tempo") + ("?span_pruning=false" if v2 else "")  # (Tempo may prune by default)
    assert world.tempo.seen[-1] == ("GET", sent, "application/json")
    if v2:
        assert json.loads(body)["metrics"] == {"inspectedBytes": "1002"}
    # unrestricted: Tempo's answer as it came
    status, whole, _ = await _get(world, path, world.full)
    assert status == 200 and b"prod-secret" in whole


async def test_trace_by_id_protobuf(world: World) -> None:
    for v2 in (False, True):
        await _protobuf_case(world, v2)


async def _protobuf_case(world: World, v2: bool) -> None:
    path = f"/api/{'v2/' if v2 else ''}traces/{MIXED}"
    status, body, ctype = await _get(world, path, world.dev, accept=f"{PROTOBUF}, application/json;q=0.5")
    assert status == 200 and ctype == PROTOBUF
    assert world.tempo.seen[-1][2] == PROTOBUF
    spans = _names_proto(body, v2)
    prod, prod_resource = spans["prod-op"]
    dev, dev_resource = spans["dev-op"]
    assert not prod_resource.attributes and not prod.attributes and not prod.status.message
    assert prod.status.code == trace_pb2.Status.STATUS_CODE_ERROR and prod.span_id == b"\x02" * 8
    assert len(dev_resource.attributes) == 3 and dev.attributes[0].value.string_value == "dev-secret"
    assert b"prod-secret" not in body and b"prod-svc" not in body
    status, whole, _ = await _get(world, path, world.full, accept=PROTOBUF)
    assert status == 200 and b"prod-secret" in whole


async def test_a_trace_with_no_visible_span_is_a_404_like_a_missing_one(world: World) -> None:
    for v2, accept in ((False, ""), (True, ""), (False, PROTOBUF), (True, PROTOBUF)):
        base = f"/api/{'v2/' if v2 else ''}traces/"
        hidden = await _get(world, base + PROD_ONLY, world.dev, accept)
        missing = await _get(world, base + ABSENT, world.dev, accept)
        assert hidden[0] == missing[0] == 404 and hidden[1] == missing[1] == b"", (v2, accept, hidden)
        assert (await _get(world, base + PROD_ONLY, world.full, accept))[0] == 200


async def test_the_signal_a_policy_cannot_restrict_is_refused(world: World) -> None:
    c = world.env.gw.client
    n = len(world.tempo.seen)
    await expect_refusal(await c.get(f"/api/traces/{MIXED}", headers=world.labels_only), 403,
                         "only label selectors")
    await expect_refusal(await c.get("/api/search?q={}", headers=world.labels_only), 403, "only label selectors")
    await expect_refusal(await c.get("/prometheus/api/v1/query?query=up", headers=world.traces_only), 403,
                         "only trace selectors")
    assert len(world.tempo.seen) == n  # nothing reached an upstream
    status, body, _ = await _get(world, f"/api/traces/{MIXED}", world.traces_only)
    assert status == 200 and b"prod-secret" not in body


async def test_parameters_that_judge_hidden_spans_are_refused(world: World) -> None:
    c = world.env.gw.client
    n = len(world.tempo.seen)
    for q in ('q={resource.owner="prod-secret-owner"}', "span_pruning=true", "keep_hierarchy=true"):
        r = await c.get(f"/api/v2/traces/{MIXED}?{q}", headers=world.dev)
        await expect_refusal(r, 403, "cannot be used under trace selectors")
    assert len(world.tempo.seen) == n
    status, _, _ = await _get(world, f"/api/v2/traces/{MIXED}?start=1&end=2", world.dev)
    assert status == 200 and world.tempo.seen[-1][1].endswith("?start=1&end=2&span_pruning=false")


async def test_an_answer_it_cannot_read_is_a_502_never_passed_through(world: World) -> None:
    world.tempo.traces[MIXED] = [{"resource": {"attributes": "not a list"}, "scopeSpans": []}]
    r = await world.env.gw.client.get(f"/api/traces/{MIXED}", headers=world.dev)
    body = await r.json()
    assert r.status == 502 and body["status"] == "error" and "could not be filtered" in body["error"]


async def test_client_and_team_rules_for_tempo(world: World) -> None:
    """Grafana's team LBAC for Tempo: the rule is a trace selector, as the gateway holds it for a tempo data
    source or as a client sends it in X-Prom-Label-Policy (<tenant>:<PathEscape(selector)>)."""
    gw = world.env.gw
    p = await reader_policy(gw, ["traces:read"])
    tok = basic("100", str((await gw.token(p["id"], "grafana-tempo"))["token"]))
    path = f"/api/traces/{MIXED}"
    sent = {**tok, "X-Prom-Label-Policy": "100:" + quote('{ resource.env="dev" }', safe="")}
    status, body, _ = await _get(world, path, sent)
    assert status == 200 and b"dev-secret" in body and b"prod-secret" not in body
    # a label selector sent for traces cannot restrict them: refused, not read whole
    await expect_refusal(await gw.client.get(path, headers={**tok, "X-Prom-Label-Policy": '100:{env="dev"}'}),
                         403, "only label selectors")
    # rules the gateway holds for a Tempo data source
    await datasource(gw, "tempo-a", p["id"], "tempo")
    one = await team(gw, "tracers", ["alice"])
    await gw.api("PUT", f"{DS}/tempo-a/lbac/teams", {"teamId": one["id"], "rules": [rule(f"100:{DEV_SEL}")]})
    status, body, _ = await _get(world, path, {**tok, "X-Grafana-User": "alice"})
    assert status == 200 and b"dev-secret" in body and b"prod-secret" not in body
    status, body, _ = await _get(world, path, {**tok, "X-Grafana-User": "bob"})  # in no team: the token's access
    assert status == 200 and b"prod-secret" in body
    # a Tempo data source takes trace selectors, the others label selectors
    for uid, type_, bad in (("tempo-a", "tempo", '100:{env="dev"}'), ("prom-a", "prometheus", f"100:{DEV_SEL}")):
        if type_ == "prometheus":
            await datasource(gw, uid, (await reader_policy(gw))["id"], type_)
        r = await gw.client.put(f"{DS}/{uid}/lbac/teams", json={"teamId": one["id"], "rules": [rule(bad)]},
                                headers=gw.auth())
        assert r.status == 400 and "data source takes" in (await r.json())["message"]


ADMIN_CASES = [
    ('{resource.env="dev"}', 200, ""),
    ('{ resource.service.name=~"a|b", resource.env!="prod" }', 200, ""),
    ('{resource.env=dev}', 409, "double-quoted"),  # 409: the API's answer to every selector error
    ('{resource.env=~".*"}', 409, "restrict something"),
    ('{span.env="dev"}', 409, "does not parse"),  # not a trace selector, nor a label selector
]


async def test_admin_api_takes_trace_selectors(world: World) -> None:
    gw = world.env.gw
    for i, (selector, status, text) in enumerate(ADMIN_CASES):
        r = await gw.client.post("/api/v1/accesspolicies", headers=gw.auth(), json={
            "name": f"t-{i}", "scopes": ["traces:read"], "realms": [_realm(selector)]})
        body = await r.json()
        assert r.status == status, body
        if status == 200:
            assert body["realms"][0]["labelPolicies"] == [{"selector": selector}]  # read back as written
            got = await gw.api("GET", f"/api/v1/accesspolicies/{body['id']}")
            assert got["realms"][0]["labelPolicies"] == [{"selector": selector}]
        else:
            assert body["field"] == "realms[0].labelPolicies[0].selector" and text in body["message"], body
