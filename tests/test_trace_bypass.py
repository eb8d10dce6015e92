"""Adversarial checks of trace label policies through the real gateway and the fake Tempo (tests/fake_tempo.py):
a token limited to ``{resource.env="dev"}`` must see nothing of a prod span but its intrinsic fields, by any route,
and nothing it sends may crash the gateway. What held is kept here too, so it keeps holding."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import quote

import pytest
from yarl import URL

from tests import dbauth_client as dag
from tests.fake_tempo import PROTOBUF, attrs, resource_spans, span
from tests.test_forward_auth import _ask as dag_ask
from tests.test_forward_auth import fa_env
from tests.test_lbac_traces import DEV_SEL, MIXED, World, _get, _names_json, _names_proto, tempo_world
from tests.test_proxy import basic, expect_refusal

PRUNED = "000000000000000000000000000000aa"


@pytest.fixture
async def world(db_dsn: str, aiohttp_client: Any, aiohttp_server: Any) -> AsyncIterator[World]:
    async with tempo_world(db_dsn, aiohttp_client, aiohttp_server) as w:
        yield w


async def test_too_many_parameters_are_a_400_not_a_crash(world: World) -> None:
    n = len(world.tempo.seen)
    r = await world.env.gw.client.get(f"/api/traces/{MIXED}?" + "&".join(["start=1"] * 101), headers=world.dev)
    await expect_refusal(r, 400, "at most 100 parameters")
    assert len(world.tempo.seen) == n


async def test_v2_turns_off_the_span_pruning_tempo_may_do_by_default(world: World) -> None:
    """Tempo's span pruning (``span_pruning_enabled_by_default``) folds sibling leaf spans of *several*
    resources into one summary span in the longest one's scope: a visible span standing for hidden ones."""
    world.tempo.prune_by_default = True
    tid = bytes.fromhex(PRUNED)
    root, later = b"\x01" * 8, "1700000002000000000"
    world.tempo.traces[PRUNED] = [
        resource_spans(attrs(env="dev"), span(tid, root, "root"),
                       span(tid, b"\x02" * 8, "query", root, endTimeUnixNano=later)),
        resource_spans(attrs(env="prod"), span(tid, b"\x03" * 8, "query", root, attributes=attrs(db="prod-secret")))]
    for accept in ("", PROTOBUF):
        status, body, _ = await _get(world, f"/api/v2/traces/{PRUNED}", world.dev, accept)
        assert status == 200 and world.tempo.seen[-1][1].endswith("?span_pruning=false")
        assert b"aggregation" not in body and b"prod-secret" not in body
        names = _names_proto(body, True) if accept else _names_json(body, True)
        assert set(names) == {"root", "query"}  # (by name: one query span of each resource survives)
    # unrestricted: Tempo's own default (the fake prunes, as a Tempo configured so does)
    status, body, _ = await _get(world, f"/api/v2/traces/{PRUNED}", world.full)
    assert status == 200 and b"aggregation.span_count" in body


async def test_an_attribute_with_an_empty_key_does_not_make_the_trace_unreadable(world: World) -> None:
    """jsonpb leaves out a key that is the empty string: ``{"value": {...}}`` is a well-formed attribute."""
    for rs in world.tempo.traces[MIXED]:
        rs["resource"]["attributes"].append({"value": {"stringValue": "anything"}})
    for accept in ("", PROTOBUF):
        status, body, _ = await _get(world, f"/api/traces/{MIXED}", world.dev, accept)
        assert status == 200 and b"dev-secret" in body and b"prod-secret" not in body, body[:200]


async def test_bytes_that_are_not_utf8_do_not_make_the_trace_unreadable(world: World) -> None:
    """Tempo stores and answers whatever bytes were written (gogo protobuf never checks UTF-8); protobuf
    readers that do (upb) refuse the whole answer. A resource value that is not UTF-8 matches no selector (read
    leniently, ``dev\\xff\\xff\\xff\\xff`` would be "dev")."""
    tid = bytes.fromhex(MIXED)
    world.tempo.traces[MIXED].append(resource_spans(attrs(env="dev-BAD"), span(tid, b"\x09" * 8, "odd-op",
                                                                              attributes=attrs(token="odd-secret"))))
    world.tempo.proto_bytes = [(b"dev-secret", b"dev-secr\xfft"), (b"prod-secret-owner", b"prod-secr\xfft-owner"),
                               (b"dev-BAD", b"dev\xff\xff\xff\xff"), (b"odd-secret", b"odd-secr\xfft")]
    for v2 in (False, True):
        status, body, _ = await _get(world, f"/api/{'v2/' if v2 else ''}traces/{MIXED}", world.dev, PROTOBUF)
        assert status == 200 and b"dev-secr\xfft" in body, body[:200]  # the visible span as it came
        assert b"prod-secr" not in body and b"odd-secr" not in body and b"dev\xff" not in body
        assert b"odd-op" in body and b"prod-op" in body  # (hidden: intrinsic fields only)


async def test_what_held(world: World) -> None:
    """Accept variants, a gzip answer, HEAD, ID and path spellings, query-string tricks: filtered or refused."""
    c, tempo = world.env.gw.client, world.tempo
    tempo.gzip = True
    for accept in ("*/*", f"application/json, {PROTOBUF};q=0.1", "application/vnd.grafana.llm", "text/html"):
        for headers in ({"Accept": accept}, {"Accept": accept, "Accept-Encoding": "gzip, br"}):
            r = await c.get(f"/api/v2/traces/{MIXED}", headers={**world.dev, **headers})
            body = await r.read()
            assert r.status == 200 and b"dev-secret" in body and b"prod-secret" not in body, (headers, body[:200])
            assert "Content-Encoding" not in r.headers
    several = [*world.dev.items(), ("Accept", "application/json"), ("Accept", PROTOBUF)]
    r = await c.get(f"/api/traces/{MIXED}", headers=several)
    assert r.status == 200 and b"prod-secret" not in await r.read()
    r = await c.head(f"/api/traces/{MIXED}", headers=world.dev)
    assert r.status == 200 and await r.read() == b""
    status, body, _ = await _get(world, f"/api/traces/{MIXED.upper()}", world.dev)
    assert status == 200 and b"dev-secret" in body and b"prod-secret" not in body
    n = len(tempo.seen)
    for path in (f"/api/traces/{MIXED}/", f"/api/traces//{MIXED}", f"/api/v2/traces/{MIXED}/", "/api/traces/%2e%2e",
                 f"/api/traces/{MIXED}%2F", f"/api/traces/..%2F{MIXED}", f"/tempo/api/traces/{MIXED}/x",
                 f"/api/v2/traces/{MIXED}/../../traces/{MIXED}"):
        raw = URL(str(c.make_url("")).rstrip("/") + path, encoded=True)  # (sent as written, dots and all)
        assert (await c.session.get(raw, headers=world.dev)).status == 404, path
    assert len(tempo.seen) == n
    for query in ("st%61rt=1&%71=x", "q", "start=1&Q=x", "spss=1", "span_pruning=true", "start=1&start=2&q="):
        r = await c.get(f"/api/v2/traces/{MIXED}?{query}", headers=world.dev)
        assert r.status == 403, query
    assert len(tempo.seen) == n
    # the client's label policy header narrows, never widens, a restricted token
    status, body, _ = await _get(world, f"/api/traces/{MIXED}", {**world.dev, "X-Prom-Label-Policy":
                                                                  '100:{resource.env="prod"}'})
    assert status == 200 and b"prod-secret" not in body
    # one token, one keep-alive connection, two signals: each request gets its own signal's selectors
    await c.get("/prometheus/api/v1/query?query=up", headers=world.dev)  # (the fake answers it 404)
    assert tempo.seen[-1][1] == "/prometheus/api/v1/query?query=up%7Benv%3D%22dev%22%7D"
    status, body, _ = await _get(world, f"/api/traces/{MIXED}", world.dev)
    assert status == 200 and b"dev-secret" in body and b"prod-secret" not in body
    # a trace selector sent for a metrics read restricts nothing there: refused, not read whole
    n = len(tempo.seen)
    r = await c.get("/prometheus/api/v1/query?query=up", headers={**world.full, "X-Prom-Label-Policy": "100:" + quote(
        DEV_SEL, safe="")})
    await expect_refusal(r, 403, "only trace selectors")
    assert len(tempo.seen) == n


async def test_forward_auth_passes_no_restricted_trace_read(db_dsn: str, aiohttp_client: Any,
                                                            aiohttp_server: Any) -> None:
    """Another proxy forwards what forward-auth allows as it is, and Tempo applies no label policy: a token under
    trace selectors reads traces only through the gateway's data path (writes and the no-data probes pass)."""
    async with fa_env(db_dsn, aiohttp_client, aiohttp_server) as env:
        realm = [{"type": "stack", "identifier": "100", "labelPolicies": [{"selector": DEV_SEL}]}]
        tok = basic("100", await env.token(["traces:read", "traces:write"], realm))
        for uri in ("/api/search?q=%7B%7D", f"/api/traces/{MIXED}", f"/tempo/api/v2/traces/{MIXED}",
                    "/api/v2/search/tags", "/api/search/tag/env/values", "/tempo/api/metrics/query_range?q=%7B%7D",
                    "/api/metrics/summary"):
            r = await env.gw.client.get("/forward-auth/nginx", headers={
                **tok, "X-Original-Method": "GET", "X-Original-URI": uri})
            await expect_refusal(r, 403, "gateway's own data path")
        for name in ("Search", "SearchTagValuesV2", "MetricsQueryRange"):  # Tempo streaming, via db-auth-gateway
            with pytest.raises(dag.Forbidden):
                await dag_ask(env, "POST", f"/tempopb.StreamingQuerier/{name}", "traces:read", tok)
        for method, uri in (("GET", "/api/echo"), ("GET", "/tempo/api/status/buildinfo"), ("POST", "/v1/traces")):
            r = await env.gw.client.get("/forward-auth/nginx", headers={
                **tok, "X-Original-Method": method, "X-Original-URI": uri})
            assert r.status == 200 and "X-Prom-Label-Policy" not in r.headers, uri
