"""The bypass table: every LBAC trap of REFERENCE.md section 6 (and those other proxies shipped) as a test
that fails if the trap opens.

Each test runs the real gateway against a recording upstream, in enforce mode, header mode or both,
and asserts the status, the JSON error, and what the upstream did or did not receive. A token's
label policy is ``{ns="allowed"}`` unless a test says otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import parse_qsl

import aiohttp
import pytest
from yarl import URL

from gateway.lbac.promql import restrict_promql
from gateway.lbac.remote_read import (
    EQ,
    NRE,
    RE,
    STREAMED_XOR_CHUNKS,
    ReadRequest,
    decode_read_request,
    snappy_encode,
)
from gateway.policy.selector import parse_selector
from tests.conftest import bootstrap_token, make_config
from tests.recorder import start_recorder
from tests.test_proxy import Env, _env, basic, expect_refusal

POLICY = '{ns="allowed"}'
POLICIES = (parse_selector(POLICY),)
HEADER_100 = "100:%7Bns=%22allowed%22%7D"
REFUSED = "label-based access control"
FORM = "application/x-www-form-urlencoded"
MODES = ("enforce", "header")


def lbac_env(db_dsn: str, aiohttp_client: Any, aiohttp_server: Any, mode: str, **cfg: Any
             ) -> contextlib.AbstractAsyncContextManager[Env]:
    """tests.test_proxy._env with metrics and logs upstreams in ``mode``."""
    return _env(db_dsn, aiohttp_client, aiohttp_server, lbac=mode, **cfg)


@pytest.fixture(params=MODES)
async def env(request: pytest.FixtureRequest, db_dsn: str, aiohttp_client: Any, aiohttp_server: Any
              ) -> AsyncIterator[Env]:
    async with lbac_env(db_dsn, aiohttp_client, aiohttp_server, request.param) as e:
        yield e


@pytest.fixture
async def enforce(db_dsn: str, aiohttp_client: Any, aiohttp_server: Any) -> AsyncIterator[Env]:
    async with lbac_env(db_dsn, aiohttp_client, aiohttp_server, "enforce") as e:
        yield e


@pytest.fixture
async def header(db_dsn: str, aiohttp_client: Any, aiohttp_server: Any) -> AsyncIterator[Env]:
    async with lbac_env(db_dsn, aiohttp_client, aiohttp_server, "header") as e:
        yield e


def mode_of(env: Env) -> str:
    return env.gw.state.config.upstreams["metrics"].lbac  # type: ignore[no-any-return]


async def restricted(env: Env, scopes: tuple[str, ...] = ("metrics:read", "logs:read"),
                     selectors: tuple[str, ...] = (POLICY,)) -> dict[str, str]:
    tok = await env.token(list(scopes), [{"type": "stack", "identifier": "100",
                                          "labelPolicies": [{"selector": s} for s in selectors]}])
    return basic("100", tok)


def form(seen: Any) -> list[tuple[str, str]]:
    return parse_qsl(seen.body.decode(), keep_blank_values=True)


async def refused(env: Env, r: aiohttp.ClientResponse, status: int, text: str) -> None:
    """The refusal is in the Prometheus error shape, and nothing at all reached the upstream."""
    await expect_refusal(r, status, text)
    assert env.rec.seen == [], [(s.method, s.path, s.query) for s in env.rec.seen]


# --------------------------------------------------------------------------- where the query travels


async def test_query_in_url_is_enforced(enforce: Env) -> None:
    h = await restricted(enforce)
    r = await enforce.gw.client.get("/prometheus/api/v1/query?query=up&time=1", headers=h)
    assert r.status == 200
    assert enforce.rec.last.query == [("time", "1"), ("query", 'up{ns="allowed"}')]
    assert "X-Prom-Label-Policy" not in enforce.rec.last.headers


async def test_query_in_form_body_is_enforced(enforce: Env) -> None:
    h = await restricted(enforce)
    r = await enforce.gw.client.post("/prometheus/api/v1/query", data={"query": "up", "time": "1"}, headers=h)
    assert r.status == 200
    seen = enforce.rec.last
    assert seen.query == [] and seen.headers["Content-Type"] == FORM
    assert form(seen) == [("time", "1"), ("query", 'up{ns="allowed"}')]
    assert int(seen.headers["Content-Length"]) == seen.body_len


async def test_query_in_url_of_a_post_is_moved_into_the_enforced_body(enforce: Env) -> None:
    """Prometheus merges URL and body: a POST's URL query must not travel unrewritten."""
    h = await restricted(enforce)
    r = await enforce.gw.client.post("/prometheus/api/v1/query_range?query=up", data={"step": "60"}, headers=h)
    assert r.status == 200
    assert enforce.rec.last.query == []
    assert form(enforce.rec.last) == [("step", "60"), ("query", 'up{ns="allowed"}')]


@pytest.mark.parametrize(("url", "body"), [
    ("/prometheus/api/v1/query?query=up", {"query": 'secret{ns="other"}'}),
    ("/prometheus/api/v1/query?query=up&query=secret", None),
    ("/prometheus/api/v1/query?query=up&%71uery=secret", None),  # %71 = q: decoded names count too
])
async def test_duplicate_query_parameters_are_refused(enforce: Env, url: str, body: dict[str, str] | None) -> None:
    """Go's FormValue takes the body's copy first, then the URL's first: the gateway must not pick another one."""
    h = await restricted(enforce)
    r = await (enforce.gw.client.post(url, data=body, headers=h) if body else enforce.gw.client.get(url, headers=h))
    await refused(enforce, r, 400, "given more than once")


async def test_repeated_match_brackets_are_each_restricted(enforce: Env) -> None:
    """Control: `match[]` is meant to repeat (the API ORs them), so every copy is restricted instead."""
    h = await restricted(enforce)
    r = await enforce.gw.client.get("/prometheus/api/v1/series?match[]=up&match[]=x", headers=h)
    assert r.status == 200
    assert enforce.rec.last.query == [("match[]", 'up{ns="allowed"}'), ("match[]", 'x{ns="allowed"}')]


async def test_get_with_a_form_body_is_enforced_and_the_body_dropped(enforce: Env) -> None:
    h = await restricted(enforce)
    r = await enforce.gw.client.request("GET", "/prometheus/api/v1/query", data="query=secret",
                                        headers={**h, "Content-Type": FORM})
    assert r.status == 200
    assert enforce.rec.last.query == [("query", 'secret{ns="allowed"}')]
    assert enforce.rec.last.body == b""


async def test_head_is_enforced_like_get(enforce: Env) -> None:
    h = await restricted(enforce)
    r = await enforce.gw.client.head("/prometheus/api/v1/query?query=secret", headers=h)
    assert r.status == 200
    assert enforce.rec.last.method == "HEAD" and enforce.rec.last.query == [("query", 'secret{ns="allowed"}')]


async def test_multipart_body_is_refused(enforce: Env) -> None:
    """Go's FormValue parses multipart bodies too: a parameter could hide in one."""
    h = await restricted(enforce)
    data = aiohttp.FormData()
    data.add_field("query", "secret")
    data.add_field("file", b"x", filename="x.txt", content_type="text/plain")
    r = await enforce.gw.client.post("/prometheus/api/v1/query?query=up", data=data, headers=h)
    await refused(enforce, r, 415, "application/x-www-form-urlencoded")


@pytest.mark.parametrize("ctype", ["", "text/plain", "application/json", "multipart/form-data; boundary=x"])
async def test_bodies_that_are_not_plain_forms_are_refused(enforce: Env, ctype: str) -> None:
    h = await restricted(enforce)
    headers = {**h, "Content-Type": ctype} if ctype else h
    r = await enforce.gw.client.post("/prometheus/api/v1/query", data=b"query=secret", headers=headers,
                                     skip_auto_headers=["Content-Type"])
    await refused(enforce, r, 415, "must send parameters in the URL or as")


async def test_oversize_form_body_is_413(enforce: Env) -> None:
    h = await restricted(enforce)
    big = b"query=up&pad=" + b"x" * (1024 * 1024)
    r = await enforce.gw.client.post("/prometheus/api/v1/query", data=big, headers={**h, "Content-Type": FORM})
    await refused(enforce, r, 413, "exceeds 1048576 bytes")


async def _slow_chunks(*parts: bytes) -> AsyncIterator[bytes]:
    """A chunked body (no Content-Length) whose parts arrive apart, as over a real network."""
    for part in parts:
        yield part
        await asyncio.sleep(0.05)



async def test_chunked_oversize_form_body_is_413(enforce: Env) -> None:
    h = await restricted(enforce)
    body = _slow_chunks(b"query=up&pad=", *[b"x" * 65536] * 20)
    r = await enforce.gw.client.post("/prometheus/api/v1/query", data=body, headers={**h, "Content-Type": FORM})
    await refused(enforce, r, 413, "exceeds 1048576 bytes")


async def test_chunked_form_body_is_read_whole(enforce: Env) -> None:
    """Today only `query=sum(up` is seen (a 400), and with `query=up&` + `query=secret` the second copy is dropped
    unseen: never a leak, since only the re-encoded prefix is forwarded, but the request is not the one sent."""
    h = await restricted(enforce)
    r = await enforce.gw.client.post("/prometheus/api/v1/query", data=_slow_chunks(b"query=sum(up", b")&time=1"),
                                     headers={**h, "Content-Type": FORM})
    assert r.status == 200, await r.text()
    assert form(enforce.rec.last) == [("time", "1"), ("query", 'sum(up{ns="allowed"})')]


async def test_chunked_remote_read_body_is_read_whole(enforce: Env) -> None:
    h = await restricted(enforce)
    body = read_request([(EQ, "__name__", "up")])
    r = await enforce.gw.client.post("/prometheus/api/v1/read", data=_slow_chunks(body[:5], body[5:]),
                                     headers={**h, **RR})
    assert r.status == 200, await r.text()
    assert len(decode_read_request(enforce.rec.last.body).queries) == 1


# --------------------------------------------------------------------------- parameter aliases


async def test_loki_series_match_and_match_brackets_are_both_restricted(enforce: Env) -> None:
    h = await restricted(enforce)
    r = await enforce.gw.client.get('/loki/api/v1/series?match={app="a"}&match[]={app="b"}&start=1', headers=h)
    assert r.status == 200
    assert enforce.rec.last.query == [("start", "1"), ("match[]", '{app="a", ns="allowed"}'),
                                      ("match[]", '{app="b", ns="allowed"}')]
    r = await enforce.gw.client.post("/loki/api/v1/series", data=[("match", '{app="c"}')], headers=h)
    assert r.status == 200 and form(enforce.rec.last) == [("match[]", '{app="c", ns="allowed"}')]
    r = await enforce.gw.client.get("/loki/api/v1/series", headers=h)  # no selector: one per policy
    assert r.status == 200 and enforce.rec.last.query == [("match[]", '{ns="allowed"}')]


@pytest.mark.parametrize("path", [
    "/prometheus/api/v1/cardinality/label_names?selector={ns=\"other\"}",
    "/prometheus/api/v1/cardinality/label_values?label_names[]=ns&selector={ns=\"other\"}",
    "/prometheus/api/v1/cardinality/active_series?selector={ns=\"other\"}",
    "/prometheus/api/v1/cardinality/active_native_histogram_metrics?selector={ns=\"other\"}",
])
async def test_mimir_cardinality_selector_is_tenant_wide_and_refused(env: Env, path: str) -> None:
    h = await restricted(env)
    await refused(env, await env.gw.client.get(path, headers=h), 403, "cannot be filtered")
    await refused(env, await env.gw.client.post(path, headers=h), 403, "cannot be filtered")


@pytest.mark.parametrize(("path", "expect"), [
    ("/api/prom/api/v1/query?query=up", ("/prometheus/api/v1/query", [("query", 'up{ns="allowed"}')])),
    ("/api/prom/api/v1/series?match[]=up", ("/prometheus/api/v1/series", [("match[]", 'up{ns="allowed"}')])),
    ("/federate?match[]=up", ("/prometheus/federate", [("match[]", 'up{ns="allowed"}')])),
    ("/api/prom/query?query={app=\"x\"}", ("/api/prom/query", [("query", '{app="x", ns="allowed"}')])),
    ("/api/prom/series?match={app=\"x\"}", ("/api/prom/series", [("match[]", '{app="x", ns="allowed"}')])),
    ("/api/prom/label", ("/api/prom/label", [("query", '{ns="allowed"}')])),
    ("/api/prom/label/app/values", ("/api/prom/label/app/values", [("query", '{ns="allowed"}')])),
    ("/loki/api/v1/label", ("/loki/api/v1/label", [("query", '{ns="allowed"}')])),
])
async def test_alias_paths_are_restricted_too(enforce: Env, path: str, expect: tuple[str, list[Any]]) -> None:
    h = await restricted(enforce)
    r = await enforce.gw.client.get(path, headers=h)
    assert r.status == 200, await r.text()
    assert (enforce.rec.last.path, enforce.rec.last.query) == expect


# --------------------------------------------------------------------------- what the rewrite must get right


@pytest.mark.parametrize(("query", "expect"), [
    ('up{ns!="allowed"}', 'up{ns!="allowed",ns="allowed"}'),
    ('up{ns=~"allowed|other"}', 'up{ns="allowed",ns=~"allowed|other"}'),
    ('up{ns=~".*"}', 'up{ns="allowed",ns=~".*"}'),
    ('{__name__="up", ns="allowed"}', '{__name__="up",ns="allowed",ns="allowed"}'),
    ("sum by (ns) (rate(x[5m]))", 'sum by (ns) (rate(x{ns="allowed"}[5m]))'),
])
async def test_matcher_operators_are_compared_not_just_values(enforce: Env, query: str, expect: str) -> None:
    """A proxy that skips injection when the query "already names" ns=allowed opens `ns!="allowed"`."""
    h = await restricted(enforce)
    r = await enforce.gw.client.get("/prometheus/api/v1/query", params={"query": query}, headers=h)
    assert r.status == 200
    got = dict(enforce.rec.last.query)["query"]
    assert got.replace(" ", "") == expect.replace(" ", "")
    assert got == restrict_promql(query, POLICIES)


@pytest.mark.parametrize(("path", "query", "text"), [
    ("/prometheus/api/v1/query", "up{", "does not parse"),
    ("/prometheus/api/v1/query", "sum(", "does not parse"),
    ("/prometheus/api/v1/query_range", "up[5m", "does not parse"),
    ("/prometheus/api/v1/query", " ", "the query is empty"),  # (empty is absent: tests/test_lbac_params.py)
    ("/prometheus/api/v1/query", "nosuchfunction(up)", "unknown function"),
    ("/prometheus/api/v1/query", 'up{ns="allowed" or ns="other"}', "'or' inside a selector"),
    ("/prometheus/api/v1/query", "info(up)", "info()"),
    ("/prometheus/api/v1/query", 'info(up, {ns="other"})', "info()"),
    ("/prometheus/api/v1/query_exemplars", "up{", "does not parse"),
    ("/loki/api/v1/query", '{app="x"', ""),
    ("/loki/api/v1/query", '{app="x"} /* } */', ""),
    ("/loki/api/v1/query_range", '{app=~"x} |= "y"', ""),
])
async def test_parse_errors_and_unknown_syntax_fail_closed(enforce: Env, path: str, query: str, text: str) -> None:
    h = await restricted(enforce)
    r = await enforce.gw.client.get(path, params={"query": query}, headers=h)
    await refused(enforce, r, 400, text or REFUSED)
    body = await r.json()
    assert REFUSED in body["error"]


async def test_missing_query_fails_closed(enforce: Env) -> None:
    h = await restricted(enforce)
    await refused(enforce, await enforce.gw.client.get("/prometheus/api/v1/query", headers=h), 400,
                  "parameter 'query' is required")
    await refused(enforce, await enforce.gw.client.get("/loki/api/v1/query_range", headers=h), 400,
                  "parameter 'query' is required")


async def test_loki_label_format_cannot_rename_around_the_policy(enforce: Env) -> None:
    """The policy label goes into the stream selector, before any pipeline stage can rename labels."""
    h = await restricted(enforce)
    q = '{app="x"} | label_format ns=app | ns="allowed"'
    r = await enforce.gw.client.get("/loki/api/v1/query_range", params={"query": q}, headers=h)
    assert r.status == 200
    assert dict(enforce.rec.last.query)["query"] == '{app="x", ns="allowed"} | label_format ns=app | ns="allowed"'


async def test_several_policies_that_cannot_be_unioned_are_refused_not_approximated(enforce: Env) -> None:
    """What neither one rewrite nor a fan-out over the selectors answers exactly (tests/test_lbac_fanout.py
    covers what a fan-out answers)."""
    h = await restricted(enforce, selectors=('{ns="a"}', '{team="b"}'), scopes=("metrics:read", "logs:read",
                                                                               "logs:delete"))
    r = await enforce.gw.client.get("/loki/api/v1/query", headers=h,  # not a sum: no exact fan-out
                                    params={"query": 'avg_over_time({app="x"} | unwrap n [5m]) by (ns)'})
    await refused(enforce, r, 400, REFUSED)
    # Loki prunes each request's patterns: per-selector answers cannot be added up (tests/test_lbac_fanout_counts.py)
    r = await enforce.gw.client.get("/loki/api/v1/patterns", params={"query": '{app="x"}'}, headers=h)
    await refused(enforce, r, 400, "patterns cannot be restricted by several label policies")
    r = await enforce.gw.client.post("/loki/api/v1/delete", params={"query": '{app="x"}'}, headers=h)
    await refused(enforce, r, 400, REFUSED)
    r = await enforce.gw.client.get("/loki/api/v1/query_range", params={"query": '{app="x"} |= "y" '}, headers=h)
    assert r.status != 400  # control: a log query is fanned out now
    for path in ("/loki/api/v1/index/stats", "/loki/api/v1/index/volume", "/loki/api/v1/index/volume_range"):
        r = await enforce.gw.client.get(path, params={"query": '{app="x"}'}, headers=h)
        assert r.status != 400  # control: counted by inclusion-exclusion now


# --------------------------------------------------------------------------- endpoints that cannot be filtered


@pytest.mark.parametrize(("method", "path"), [
    ("GET", "/prometheus/api/v1/cardinality/label_names"),
    ("POST", "/prometheus/api/v1/cardinality/label_values"),
    ("GET", "/prometheus/api/v1/cardinality/active_series"),
    ("GET", "/api/v1/user_stats"),
    ("GET", "/api/v1/user_limits"),
    ("GET", "/loki/api/v1/delete"),
    ("DELETE", "/loki/api/v1/delete?request_id=abc"),
])
async def test_unfilterable_endpoints_are_refused_in_both_modes(env: Env, method: str, path: str) -> None:
    h = await restricted(env, scopes=("metrics:read", "logs:read", "logs:delete"))
    await refused(env, await env.gw.client.request(method, path, headers=h), 403, "cannot be filtered")


@pytest.mark.parametrize("path", [
    "/prometheus/api/v1/status/tsdb", "/prometheus/api/v1/status/config", "/prometheus/api/v1/status/flags",
    "/prometheus/api/v1/status/runtimeinfo", "/prometheus/api/v1/targets", "/prometheus/api/v1/targets/metadata",
    "/prometheus/api/v1/admin/tsdb/snapshot", "/loki/api/v1/status/config", "/loki/api/v1/stats",
])
async def test_status_and_admin_endpoints_are_not_routed_at_all(enforce: Env, path: str) -> None:
    """Routing does not depend on the mode: checked once."""
    h = await restricted(enforce)
    await refused(enforce, await enforce.gw.client.get(path, headers=h), 404, "no such endpoint")


async def test_buildinfo_stays_open_and_carries_no_tenant_data(env: Env) -> None:
    """Grafana probes it; it has no series, so restricted tokens may call it (documented exception)."""
    h = await restricted(env)
    r = await env.gw.client.get("/prometheus/api/v1/status/buildinfo", headers=h)
    assert r.status == 200 and env.rec.last.path == "/prometheus/api/v1/status/buildinfo"


# --------------------------------------------------------------------------- X-Prom-Label-Policy sent by clients


async def test_client_label_policy_for_another_tenant_is_400(env: Env) -> None:
    tok = await env.token(["metrics:read"])  # no label policies: client headers would be honoured
    h = {**basic("100", tok), "X-Prom-Label-Policy": "200:%7Bns=%22allowed%22%7D"}
    await refused(env, await env.gw.client.get("/prometheus/api/v1/query?query=up", headers=h), 400,
                  "names tenant '200', but the query is for '100'")
    h["X-Prom-Label-Policy"] = f"{HEADER_100}, 200:%7Bns=%22x%22%7D"  # hidden in a comma-separated list
    await refused(env, await env.gw.client.get("/prometheus/api/v1/query?query=up", headers=h), 400,
                  "names tenant '200'")
    h["X-Prom-Label-Policy"] = "100:%7Bns"
    await refused(env, await env.gw.client.get("/prometheus/api/v1/query?query=up", headers=h), 400,
                  "X-Prom-Label-Policy selector")


async def test_client_label_policy_narrows_an_unrestricted_token(env: Env) -> None:
    tok = await env.token(["metrics:read"])
    r = await env.gw.client.get("/prometheus/api/v1/query?query=up",
                                headers={**basic("100", tok), "X-Prom-Label-Policy": HEADER_100})
    assert r.status == 200
    if mode_of(env) == "enforce":
        assert env.rec.last.query == [("query", 'up{ns="allowed"}')]
        assert "X-Prom-Label-Policy" not in env.rec.last.headers
    else:
        assert env.rec.last.query == [("query", "up")]
        assert env.rec.last.headers.getall("X-Prom-Label-Policy") == [HEADER_100]


async def test_client_label_policy_is_dropped_when_the_token_has_its_own(env: Env) -> None:
    h = await restricted(env)
    wide = "100:%7Bns=~%22.%2A%22%7D"  # {ns=~".*"}: would widen, were it honoured
    r = await env.gw.client.get("/prometheus/api/v1/query?query=up", headers={**h, "X-Prom-Label-Policy": wide})
    assert r.status == 200
    if mode_of(env) == "enforce":
        assert env.rec.last.query == [("query", 'up{ns="allowed"}')]
        assert "X-Prom-Label-Policy" not in env.rec.last.headers
    else:
        assert env.rec.last.headers.getall("X-Prom-Label-Policy") == [HEADER_100]


# --------------------------------------------------------------------------- header mode: never without the header

# Every restricted read kind, as (method, path, params); the tail is checked separately (WebSocket).
READS = [
    ("GET", "/prometheus/api/v1/query", {"query": "up"}),
    ("POST", "/prometheus/api/v1/query_range", {"query": "up"}),
    ("GET", "/prometheus/api/v1/query_exemplars", {"query": "up"}),
    ("GET", "/prometheus/api/v1/series", {"match[]": "up"}),
    ("POST", "/prometheus/api/v1/labels", {}),
    ("GET", "/prometheus/api/v1/label/ns/values", {}),
    ("GET", "/prometheus/federate", {"match[]": "up"}),
    ("GET", "/api/prom/api/v1/query", {"query": "up"}),
    ("GET", "/loki/api/v1/query", {"query": '{app="x"}'}),
    ("POST", "/loki/api/v1/query_range", {"query": '{app="x"}'}),
    ("GET", "/loki/api/v1/series", {"match": '{app="x"}'}),
    # (label names get the policy as their query in header mode too: tests/test_lbac_params.py)
    ("GET", "/loki/api/v1/label/app/values", {}),
    ("GET", "/loki/api/v1/index/stats", {"query": '{app="x"}'}),
    ("GET", "/loki/api/v1/index/volume", {"query": '{app="x"}'}),
    ("GET", "/loki/api/v1/index/volume_range", {"query": '{app="x"}'}),
    ("GET", "/loki/api/v1/patterns", {"query": '{app="x"}'}),
    ("GET", "/loki/api/v1/detected_labels", {"query": '{app="x"}'}),
    ("GET", "/loki/api/v1/detected_fields", {"query": '{app="x"}'}),
    ("GET", "/loki/api/v1/detected_field/level/values", {"query": '{app="x"}'}),
    ("GET", "/api/prom/query", {"query": '{app="x"}'}),
    ("GET", "/api/prom/series", {"match": '{app="x"}'}),
]


@pytest.mark.parametrize(("method", "path", "params"), READS, ids=[f"{m} {p}" for m, p, _ in READS])
async def test_header_mode_never_forwards_a_restricted_read_without_the_exact_tenant_policy(
        header: Env, method: str, path: str, params: dict[str, str]) -> None:
    """Basic tenant 100, and Bearer + X-Scope-OrgID for stack 101 (metrics 101, logs l101): each read carries
    the policy of exactly the tenant queried, never the other stack's, never none."""
    policy = await header.gw.policy("multi", ["metrics:read", "logs:read"], [
        {"type": "stack", "identifier": "100", "labelPolicies": [{"selector": POLICY}]},
        {"type": "stack", "identifier": "101", "labelPolicies": [{"selector": '{ns="dev"}'}]}])
    tok = (await header.gw.token(policy["id"], "multi"))["token"]
    logs = path.startswith(("/loki", "/api/prom/query", "/api/prom/series"))
    cases = [(basic("100", tok), "100", HEADER_100),
             ({"Authorization": f"Bearer {tok}", "X-Scope-OrgID": "l101" if logs else "101"},
              "l101" if logs else "101", f"{'l101' if logs else '101'}:%7Bns=%22dev%22%7D")]
    for headers, tenant, expected in cases:
        if method == "GET":
            r = await header.gw.client.get(path, params=params, headers=headers)
        else:
            r = await header.gw.client.post(path, data=params, headers=headers)
        assert r.status == 200, await r.text()
        seen = header.rec.last
        assert seen.headers.getall("X-Scope-OrgID") == [tenant]
        assert seen.headers.getall("X-Prom-Label-Policy") == [expected]
        sent = seen.query + (form(seen) if seen.body else [])
        assert sorted(sent) == sorted(params.items())  # header mode leaves the request itself alone


async def test_header_mode_remote_read_and_tail_carry_the_policy(header: Env) -> None:
    h = await restricted(header)
    body = read_request([(EQ, "__name__", "up")])
    r = await header.gw.client.post("/prometheus/api/v1/read", data=body, headers={**h, **RR})
    assert r.status == 200
    assert header.rec.last.headers.getall("X-Prom-Label-Policy") == [HEADER_100]
    assert header.rec.last.body == body and header.rec.last.headers["Content-Encoding"] == "snappy"
    async with header.gw.client.ws_connect('/loki/api/v1/tail?query={app="x"}', headers=h) as ws:
        assert "hello" in await ws.receive_str(timeout=5)
    seen = header.rec.seen[-1]
    assert seen.method == "WS" and seen.headers.getall("X-Prom-Label-Policy") == [HEADER_100]
    assert seen.query == [("query", '{app="x"}')]


async def test_enforce_mode_tail_is_rewritten(enforce: Env) -> None:
    h = await restricted(enforce)
    async with enforce.gw.client.ws_connect('/loki/api/v1/tail?query={app="x"}&limit=5', headers=h) as ws:
        assert "hello" in await ws.receive_str(timeout=5)
    seen = enforce.rec.seen[-1]
    assert seen.method == "WS" and seen.query == [("limit", "5"), ("query", '{app="x", ns="allowed"}')]
    assert "X-Prom-Label-Policy" not in seen.headers


async def test_delete_requests_are_rewritten_in_both_modes(env: Env) -> None:
    """Loki's delete API does not read X-Prom-Label-Policy: the gateway rewrites its LogQL in header mode too."""
    h = await restricted(env, scopes=("logs:delete",))
    r = await env.gw.client.post('/loki/api/v1/delete?query={app="x"}&start=1', headers=h)
    assert r.status == 200
    # Loki's delete handler reads only the URL (r.URL.Query()): the rewrite must stay there
    assert env.rec.last.query == [("start", "1"), ("query", '{app="x", ns="allowed"}')]
    assert env.rec.last.body == b""
    await expect_refusal(await env.gw.client.post("/loki/api/v1/delete?start=1", headers=h), 400,
                         "parameter 'query' is required")


# --------------------------------------------------------------------------- remote read (enforce)

RR = {"Content-Type": "application/x-protobuf", "Content-Encoding": "snappy",
      "X-Prometheus-Remote-Read-Version": "0.1.0"}


def read_request(matchers: list[tuple[int, str, str]], types: tuple[int, ...] = ()) -> bytes:
    req = ReadRequest()
    q = req.queries.add(start_timestamp_ms=1000, end_timestamp_ms=2000)
    for kind, name, value in matchers:
        q.matchers.add(type=kind, name=name, value=value)
    q.hints.step_ms = 15000
    req.accepted_response_types.extend(types)
    return snappy_encode(req.SerializeToString())


async def test_remote_read_is_restricted_in_enforce_mode(enforce: Env) -> None:
    h = await restricted(enforce)
    r = await enforce.gw.client.post("/prometheus/api/v1/read", headers={**h, **RR},
                                     data=read_request([(EQ, "__name__", "up"), (EQ, "ns", "other")],
                                                       (STREAMED_XOR_CHUNKS,)))
    assert r.status == 200
    seen = enforce.rec.last
    assert seen.headers["Content-Encoding"] == "snappy" and seen.headers["Content-Type"] == "application/x-protobuf"
    assert "X-Prom-Label-Policy" not in seen.headers
    req = decode_read_request(seen.body)
    assert len(req.queries) == 1 and list(req.accepted_response_types) == [STREAMED_XOR_CHUNKS]
    assert [(m.type, m.name, m.value) for m in req.queries[0].matchers] == [
        (EQ, "__name__", "up"), (EQ, "ns", "other"), (RE, "ns", "allowed")]
    assert req.queries[0].hints.step_ms == 15000


@pytest.mark.parametrize(("body", "selectors", "text"), [
    (b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01", (POLICY,), "not snappy"),
    (b"\x10garbage", (POLICY,), "not valid snappy"),
    (snappy_encode(b"\x0a\x03\xff\xff\xff"), (POLICY,), "not a valid ReadRequest"),
    (snappy_encode(b"\x0a\x04\x1a\x02\x08\x07"), (POLICY,), "unknown type 7"),
    (snappy_encode(b"\x0a\x02\x38\x01"), (POLICY,), "fields this gateway does not know"),
    (b"\xff\xff\xff\x7f", (POLICY,), "decompresses to"),
    (read_request([(NRE, "ns", "x")], (7,)), (POLICY,), "only response types this gateway does not know"),
])
async def test_remote_read_fails_closed(enforce: Env, body: bytes, selectors: tuple[str, ...], text: str) -> None:
    h = await restricted(enforce, selectors=selectors)
    r = await enforce.gw.client.post("/prometheus/api/v1/read", data=body, headers={**h, **RR})
    await refused(enforce, r, 400, text)


# --------------------------------------------------------------------------- tenancy, paths, methods


async def test_tenant_federation_never_reaches_the_upstream(env: Env) -> None:
    h = await restricted(env)
    r = await env.gw.client.get("/prometheus/api/v1/query?query=up", headers={**h, "X-Scope-OrgID": "100|200"})
    assert r.status == 200 and env.rec.last.headers.getall("X-Scope-OrgID") == ["100"]
    policy = await env.gw.policy("org", ["metrics:read"], [
        {"type": "org", "identifier": "1", "labelPolicies": [{"selector": POLICY}]}])
    tok = (await env.gw.token(policy["id"], "org"))["token"]
    n = len(env.rec.seen)
    for org in ("100|101", "100,101", " 100|101 "):
        r = await env.gw.client.get("/prometheus/api/v1/query?query=up",
                                    headers={"Authorization": f"Bearer {tok}", "X-Scope-OrgID": org})
        await expect_refusal(r, 403, "is not a metrics tenant")
    assert len(env.rec.seen) == n


@pytest.mark.parametrize("path", [
    "/prometheus/api/v1/%71uery?query=up",
    "/prometheus/api/v1/query%2F?query=up",
    "/prometheus%2Fapi/v1/query?query=up",
    "/prometheus/api/v1/./query?query=up",
    "/prometheus/api/v1/x/../query?query=up",
    "/prometheus/api/v1/%2E%2E/v1/query?query=up",
    "/prometheus//api/v1/query?query=up",
    "/prometheus/api/v1/query/?query=up",
    "/prometheus/api/v1/query;x?query=up",
    "/PROMETHEUS/api/v1/query?query=up",
    "/prometheus/api/v1/label/%2E%2E%2Fseries/values",
    "/prometheus/api/v1/label/..%252Fseries/values",
    "/loki/api/v1/%74ail?query={app=\"x\"}",
    "/prometheus/api/v1/metadat%61",
])
async def test_percent_encoded_path_tricks_are_404(enforce: Env, path: str) -> None:
    """Sent byte for byte (the test client would otherwise normalize the path before it leaves); routing does not
    depend on the mode, so this runs once."""
    h = await restricted(enforce)
    url = URL(f"http://127.0.0.1:{enforce.gw.client.port}{path}", encoded=True)
    async with enforce.gw.client.session.get(url, headers=h, allow_redirects=False) as r:
        await refused(enforce, r, 404, "no such endpoint")


OVERRIDES = ("X-HTTP-Method-Override", "X-HTTP-Method", "X-Method-Override")


@pytest.mark.parametrize("name", OVERRIDES)
async def test_method_override_does_not_change_the_scope_at_the_gateway(env: Env, name: str) -> None:
    """The gateway authorizes the real method: an override never buys a write scope or skips LBAC."""
    rules_read = await env.token(["rules:read"], [{"type": "stack", "identifier": "100",
                                                   "labelPolicies": [{"selector": POLICY}]}])
    # A POST (rules:write) dressed as a GET is still a write: refused for a rules:read token.
    r = await env.gw.client.post("/prometheus/config/v1/rules/ns", data=b"name: g\nrules: []\n",
                                 headers={**basic("100", rules_read), name: "GET"})
    await refused(env, r, 403, "rules:write")
    # A cardinality read (unfilterable) dressed as a query is still refused.
    h = await restricted(env)
    await refused(env, await env.gw.client.get("/prometheus/api/v1/cardinality/label_names",
                                               headers={**h, name: "POST"}), 403, "cannot be filtered")
    # A restricted query dressed as something else is still rewritten (enforce) / still gets its header.
    r = await env.gw.client.post("/prometheus/api/v1/query", data={"query": "up"}, headers={**h, name: "PUT"})
    assert r.status == 200
    if mode_of(env) == "enforce":
        assert form(env.rec.last) == [("query", 'up{ns="allowed"}')]
    else:
        assert env.rec.last.headers.getall("X-Prom-Label-Policy") == [HEADER_100]


@pytest.mark.parametrize("name", OVERRIDES)
async def test_method_override_headers_never_reach_the_upstream(env: Env, name: str) -> None:
    rules_read = await env.token(["rules:read"])
    r = await env.gw.client.get("/prometheus/config/v1/rules/ns", headers={**basic("100", rules_read), name: "POST"})
    assert r.status == 200
    assert name not in env.rec.last.headers, f"{name} reached the upstream: a GET authorized as rules:read " \
        "would become a rule write there"


async def test_unrestricted_tokens_are_untouched(enforce: Env) -> None:
    """Control: without label policies nothing is rewritten, refused or added."""
    tok = await enforce.token(["metrics:read"])
    r = await enforce.gw.client.get("/prometheus/api/v1/metadata", headers=basic("100", tok))
    assert r.status == 200
    r = await enforce.gw.client.get("/prometheus/api/v1/query?query=info(up)", headers=basic("100", tok))
    assert r.status == 200 and enforce.rec.last.query == [("query", "info(up)")]
    assert "X-Prom-Label-Policy" not in enforce.rec.last.headers



# --------------------------------------------------------------------------- found along the way


async def test_gzip_write_bodies_are_forwarded_byte_for_byte(db_dsn: str, aiohttp_server: Any) -> None:
    """Through the real server (gateway.server.run): what the gateway checks and forwards are the client's bytes."""
    import gzip

    from gateway.app import close_state, open_state
    from gateway.server import run
    from tests.conftest import free_port

    rec, url = await start_recorder(aiohttp_server)
    port = free_port()
    cfg = make_config(db_dsn, upstreams={"logs": {"url": url, "lbac": "enforce"}}, listen=f"127.0.0.1:{port}",
                      shutdown={"delay": 0, "drain_timeout": 1})
    st = await open_state(cfg)
    admin = {"Authorization": f"Bearer {await bootstrap_token(st)}"}
    await close_state(st)
    stop = asyncio.Event()
    task = asyncio.create_task(run(cfg, stop=stop))
    base = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession(auto_decompress=False) as s:
            for _ in range(100):
                with contextlib.suppress(aiohttp.ClientError):
                    async with s.get(f"{base}/ready") as r:
                        if r.status == 200:
                            break
                await asyncio.sleep(0.05)
            async with s.post(f"{base}/api/v1/accesspolicies", headers=admin, json={
                    "name": "w", "scopes": ["logs:write"], "realms": [{"type": "stack", "identifier": "100"}]}) as r:
                pid = (await r.json())["id"]
            async with s.post(f"{base}/api/v1/tokens", headers=admin, json={"accessPolicyId": pid, "name": "w"}) as r:
                tok = (await r.json())["token"]
            plain = b'{"streams":[{"stream":{"app":"x"},"values":[["1","hello"]]}]}'
            async with s.post(f"{base}/loki/api/v1/push", data=gzip.compress(plain), headers={
                    **basic("100", tok), "Content-Type": "application/json", "Content-Encoding": "gzip"}) as r:
                assert r.status == 200, (r.status, await r.text())
            assert rec.last.body == plain  # the recorder (aiohttp too) inflates what it receives
            # A compressed form from a label-restricted token: refused, never parsed inflated and forwarded
            # plain under the client's `Content-Encoding: gzip`.
            async with s.post(f"{base}/api/v1/accesspolicies", headers=admin, json={
                    "name": "r", "scopes": ["logs:read"], "realms": [{"type": "stack", "identifier": "100",
                                                                       "labelPolicies": [{"selector": POLICY}]}]}) as r:
                pid = (await r.json())["id"]
            async with s.post(f"{base}/api/v1/tokens", headers=admin, json={"accessPolicyId": pid, "name": "r"}) as r:
                reader = (await r.json())["token"]
            n = len(rec.seen)
            async with s.post(f"{base}/loki/api/v1/query", data=gzip.compress(b'query={app="x"}'), headers={
                    **basic("100", reader), "Content-Type": FORM, "Content-Encoding": "gzip"}) as r:
                await expect_refusal(r, 400, "not valid UTF-8 form data")
            assert len(rec.seen) == n
    finally:
        stop.set()
        await task
