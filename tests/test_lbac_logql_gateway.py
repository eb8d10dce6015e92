"""LogQL through the gateway in enforce mode, against a recording upstream: the exact ``query`` Loki receives.

The table holds queries that trip naive rewriters: braces and quotes inside strings and backtick
strings, ``#`` comments, ``label_format``/``pattern`` renaming the policy label, binary metric
queries, ``by``/``without`` groupings and the ``or`` operator. Each is sent to every LogQL endpoint
(GET and form POST where Loki takes both) under three policy sets:

* ``one``: ``{ns="allowed"}`` - plain insertion;
* ``merge``: ``{env="dev"}`` OR ``{env="prod"}`` - merged into one ``env=~"dev|prod"`` matcher;
* ``union``: ``{ns="a"}`` OR ``{team="b"}`` - metric queries become a union of restricted range
  aggregations; log queries are fanned out: one upstream request per selector, each exactly the
  single-selector rewrite (the merged answers are checked against a fake Loki in
  tests/test_lbac_fanout.py); what no fan-out answers exactly is refused (400, nothing sent upstream).
  The counting endpoints (``index/stats``, volumes) send one request per inclusion-exclusion term,
  the intersection ``{ns="a", team="b"}`` too (tests/test_lbac_fanout_counts.py checks the sums);
  a volume request also names the query's labels as ``targetLabels``, so Loki groups as asked.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import parse_qsl

import pytest

from gateway.policy.selector import SelectorError, parse_selector
from tests.test_proxy import Env, _env, basic, expect_refusal

SETS: dict[str, tuple[str, ...]] = {
    "one": ('{ns="allowed"}',),
    "merge": ('{env="dev"}', '{env="prod"}'),
    "union": ('{ns="a"}', '{team="b"}'),
}
NO_UNION = None  # the `union` set cannot rewrite log queries into one: fanned out (see FANNED) or refused

# (query, {set: expected query upstream, or None when refused})
TABLE: list[tuple[str, dict[str, str | None]]] = [
    ('{app="x"}', {
        "one": '{app="x", ns="allowed"}',
        "merge": '{app="x", env=~"dev|prod"}',
        "union": NO_UNION}),
    ('{ app = "x" , env != "q" }', {
        "one": '{app="x", env!="q", ns="allowed"}',
        "merge": '{app="x", env!="q", env=~"dev|prod"}',
        "union": NO_UNION}),
    ('{app=`x`}', {
        "one": '{app="x", ns="allowed"}',
        "merge": '{app="x", env=~"dev|prod"}',
        "union": NO_UNION}),
    ('{app="x", ns!="allowed"}', {
        "one": '{app="x", ns!="allowed", ns="allowed"}',
        "merge": '{app="x", ns!="allowed", env=~"dev|prod"}',
        "union": NO_UNION}),
    ('{app="x", ns=~".*"}', {
        "one": '{app="x", ns=~".*", ns="allowed"}',
        "merge": '{app="x", ns=~".*", env=~"dev|prod"}',
        "union": NO_UNION}),
    # braces and quotes inside strings are not selectors
    ('{app="x"} |= "{secret=\\"y\\"}"', {
        "one": '{app="x", ns="allowed"} |= "{secret=\\"y\\"}"',
        "merge": '{app="x", env=~"dev|prod"} |= "{secret=\\"y\\"}"',
        "union": NO_UNION}),
    ('{app="x"} |= `{ns="other"}`', {
        "one": '{app="x", ns="allowed"} |= `{ns="other"}`',
        "merge": '{app="x", env=~"dev|prod"} |= `{ns="other"}`',
        "union": NO_UNION}),
    ('{app="x"} |~ `\\d+ {`', {
        "one": '{app="x", ns="allowed"} |~ `\\d+ {`',
        "merge": '{app="x", env=~"dev|prod"} |~ `\\d+ {`',
        "union": NO_UNION}),
    ('{app="x"} | json | line_format "{{.ns}} {ns=\\"x\\"}"', {
        "one": '{app="x", ns="allowed"} | json | line_format "{{.ns}} {ns=\\"x\\"}"',
        "merge": '{app="x", env=~"dev|prod"} | json | line_format "{{.ns}} {ns=\\"x\\"}"',
        "union": NO_UNION}),
    ('{app="x"} # {ns="other"}\n|= "y"', {
        "one": '{app="x", ns="allowed"} # {ns="other"}\n|= "y"',
        "merge": '{app="x", env=~"dev|prod"} # {ns="other"}\n|= "y"',
        "union": NO_UNION}),
    # renaming the policy label after the stream selector changes nothing: the selector is restricted
    ('{app="x"} | label_format ns=app', {
        "one": '{app="x", ns="allowed"} | label_format ns=app',
        "merge": '{app="x", env=~"dev|prod"} | label_format ns=app',
        "union": NO_UNION}),
    ('{app="x"} | pattern `<_> {<ns>}` | ns="other"', {
        "one": '{app="x", ns="allowed"} | pattern `<_> {<ns>}` | ns="other"',
        "merge": '{app="x", env=~"dev|prod"} | pattern `<_> {<ns>}` | ns="other"',
        "union": NO_UNION}),
    # metric queries: by/without, binary operators, or, unwrap
    ('sum by (ns) (rate({app="x"}[5m]))', {
        "one": 'sum by (ns) (rate({app="x", ns="allowed"}[5m]))',
        "merge": 'sum by (ns) (rate({app="x", env=~"dev|prod"}[5m]))',
        "union": 'sum by (ns) ((rate({app="x", ns="a"}[5m]) or rate({app="x", team="b"}[5m])))'}),
    ('sum without (ns) (count_over_time({app="x"} |= "e" [1m]))', {
        "one": 'sum without (ns) (count_over_time({app="x", ns="allowed"} |= "e" [1m]))',
        "merge": 'sum without (ns) (count_over_time({app="x", env=~"dev|prod"} |= "e" [1m]))',
        "union": 'sum without (ns) ((count_over_time({app="x", ns="a"} |= "e" [1m]) or '
                 'count_over_time({app="x", team="b"} |= "e" [1m])))'}),
    ('sum(rate({app="x"}[5m])) / sum(rate({app="y"}[5m]))', {
        "one": 'sum(rate({app="x", ns="allowed"}[5m])) / sum(rate({app="y", ns="allowed"}[5m]))',
        "merge": 'sum(rate({app="x", env=~"dev|prod"}[5m])) / sum(rate({app="y", env=~"dev|prod"}[5m]))',
        "union": 'sum((rate({app="x", ns="a"}[5m]) or rate({app="x", team="b"}[5m]))) / '
                 'sum((rate({app="y", ns="a"}[5m]) or rate({app="y", team="b"}[5m])))'}),
    ('rate({app="x"}[5m]) or rate({app="y", ns="other"}[5m])', {
        "one": 'rate({app="x", ns="allowed"}[5m]) or rate({app="y", ns="other", ns="allowed"}[5m])',
        "merge": 'rate({app="x", env=~"dev|prod"}[5m]) or rate({app="y", ns="other", env=~"dev|prod"}[5m])',
        "union": '(rate({app="x", ns="a"}[5m]) or rate({app="x", team="b"}[5m])) or '
                 '(rate({app="y", ns="other", ns="a"}[5m]) or rate({app="y", ns="other", team="b"}[5m]))'}),
    ('topk(3, sum by (app) (bytes_over_time({app=~"x|y"}[5m])))', {
        "one": 'topk(3, sum by (app) (bytes_over_time({app=~"x|y", ns="allowed"}[5m])))',
        "merge": 'topk(3, sum by (app) (bytes_over_time({app=~"x|y", env=~"dev|prod"}[5m])))',
        "union": 'topk(3, sum by (app) ((bytes_over_time({app=~"x|y", ns="a"}[5m]) or '
                 'bytes_over_time({app=~"x|y", team="b"}[5m]))))'}),
    # (with a parser stage, sums under several selectors are fanned out instead: test_lbac_metric_fanout.py)
    ('sum by (ns) (rate({app="x"} | unwrap latency [5m]))', {
        "one": 'sum by (ns) (rate({app="x", ns="allowed"} | unwrap latency [5m]))',
        "merge": 'sum by (ns) (rate({app="x", env=~"dev|prod"} | unwrap latency [5m]))',
        "union": 'sum by (ns) ((rate({app="x", ns="a"} | unwrap latency [5m]) or '
                 'rate({app="x", team="b"} | unwrap latency [5m])))'}),
    ('absent_over_time({app="x"}[5m])', {
        "one": 'absent_over_time({app="x", ns="allowed"}[5m])',
        "merge": 'absent_over_time({app="x", env=~"dev|prod"}[5m])',
        "union": NO_UNION}),
]
LOG_QUERIES = [(q, exp) for q, exp in TABLE if exp["union"] is None and not q.startswith("absent")]

# Endpoints that fan a log query out under `union`, with an (empty) answer of the shape the merge reads.
FANNED: dict[str, bytes] = {
    "/loki/api/v1/query": b'{"status":"success","data":{"resultType":"streams","result":[]}}',
    "/loki/api/v1/query_range": b'{"status":"success","data":{"resultType":"streams","result":[]}}',
    "/loki/api/v1/detected_fields": b'{"fields":[],"limit":1000}',
    "/loki/api/v1/detected_labels": b'{"detectedLabels":[]}',
    "/loki/api/v1/detected_field/level/values": b'{"values":[],"limit":1000}',
    "/loki/api/v1/index/stats": b'{"streams":0,"chunks":0,"bytes":0,"entries":0}',
}
VOLUMES = ("/loki/api/v1/index/volume", "/loki/api/v1/index/volume_range")
EMPTY_VOLUME = b'{"status":"success","data":{"resultType":"vector","result":[]}}'


def plain(query: str) -> list[str] | None:
    """The matcher names of a plain selector (what a volume groups by), or None."""
    try:
        return list(dict.fromkeys(m.name for m in parse_selector(query).matchers)) if query.startswith("{") else None
    except SelectorError:
        return None


def per_selector(one: str) -> list[str]:
    """The single-selector rewrites for `union` ({ns="a"}, {team="b"}), from the `one` column."""
    return [one.replace(', ns="allowed"}', ', ns="a"}'), one.replace(', ns="allowed"}', ', team="b"}')]


# Loki endpoints whose `query` is LogQL, with the methods Loki takes there.
QUERY_PATHS = [
    ("/loki/api/v1/query", ("GET", "POST")),
    ("/loki/api/v1/query_range", ("GET", "POST")),
    ("/loki/api/v1/index/stats", ("GET", "POST")),
    ("/loki/api/v1/index/volume", ("GET", "POST")),
    ("/loki/api/v1/index/volume_range", ("GET",)),
    ("/loki/api/v1/patterns", ("GET", "POST")),
    ("/loki/api/v1/detected_fields", ("GET", "POST")),
    ("/loki/api/v1/detected_labels", ("GET",)),
    ("/loki/api/v1/detected_field/level/values", ("GET",)),
    ("/api/prom/query", ("GET",)),
]


@pytest.fixture
async def env(db_dsn: str, aiohttp_client: Any, aiohttp_server: Any) -> AsyncIterator[Env]:
    async with _env(db_dsn, aiohttp_client, aiohttp_server, lbac="enforce") as e:
        yield e


async def tokens(env: Env) -> dict[str, dict[str, str]]:
    """Basic-auth headers per policy set, for tenant 100."""
    out = {}
    for name, selectors in SETS.items():
        tok = await env.token(["logs:read", "logs:delete"], [
            {"type": "stack", "identifier": "100", "labelPolicies": [{"selector": s} for s in selectors]}])
        out[name] = basic("100", tok)
    return out


def sent(env: Env) -> list[tuple[str, str]]:
    """Every parameter the upstream received, URL and form body together."""
    seen = env.rec.last
    return seen.query + (parse_qsl(seen.body.decode(), keep_blank_values=True) if seen.body else [])


async def send(env: Env, method: str, path: str, params: list[tuple[str, str]], headers: dict[str, str]) -> Any:
    if method == "GET":
        return await env.gw.client.get(path, params=params, headers=headers)
    return await env.gw.client.post(path, data=params, headers=headers)


@pytest.mark.parametrize(("path", "methods"), QUERY_PATHS, ids=[p for p, _ in QUERY_PATHS])
async def test_query_endpoints_receive_the_exact_rewrite(env: Env, path: str, methods: tuple[str, ...]) -> None:
    auth = await tokens(env)
    env.rec.reply = EMPTY_VOLUME if path in VOLUMES else FANNED.get(path, env.rec.reply)
    for query, expected in TABLE:
        for name, want in expected.items():
            for method in methods:
                n = len(env.rec.seen)
                r = await send(env, method, path, [("query", query), ("limit", "10")], auth[name])
                case = (path, method, name, query)
                if query.startswith("absent"):
                    continue  # labelled from the client's selector, merged as numbers: test_lbac_metric_fanout.py
                if path.endswith("/detected_labels") and name == "union" and (
                        "|" in query or not query.startswith("{")):  # Loki's ParseMatchers: selectors only
                    await expect_refusal(r, 400, "exactly one stream selector")
                    continue
                names = plain(query) if path in VOLUMES else None
                if (want is None and path in FANNED) or (names is not None and name == "union"):
                    assert r.status == 200, (case, await r.text())
                    legs = env.rec.seen[n:]
                    if path.endswith("/detected_labels"):  # one series request, a match[] per selector
                        assert [s.path for s in legs] == ["/loki/api/v1/series"], case
                        got = sorted(v for k, v in legs[0].query if k == "match[]")
                        assert got == sorted(per_selector(expected["one"] or "")), case
                        continue
                    params = [dict(s.query + (parse_qsl(s.body.decode()) if s.body else [])) for s in legs]
                    one = expected["one"] or ""
                    terms = per_selector(one)
                    if path in VOLUMES or path.endswith("/index/stats"):  # inclusion-exclusion: the overlap too
                        terms.append(one.replace(', ns="allowed"}', ', ns="a", team="b"}'))
                    if path.endswith(("/query", "/query_range")):  # log lines: disjoint legs, each stream once
                        terms[1] = one.replace(', ns="allowed"}', ', team="b", ns!="a"}')
                    assert sorted(leg["query"] for leg in params) == sorted(terms), case
                    if names is not None:
                        assert all(leg["targetLabels"] == ",".join(names) and leg["limit"] == "1000"
                                   for leg in params), case
                    assert all(s.path == path and "X-Prom-Label-Policy" not in s.headers for s in legs)
                    continue
                if names is not None and want is not None:  # one leg, grouped by the query's own labels
                    assert r.status == 200, (case, await r.text())
                    assert sent(env) == [("limit", "10"), ("targetLabels", ",".join(names)), ("query", want)], case
                    continue
                if want is None:
                    await expect_refusal(r, 400, "label-based access control")
                    assert len(env.rec.seen) == n, case
                    continue
                assert r.status == 200, (case, await r.text())
                assert sent(env) == [("limit", "10"), ("query", want)], case
                assert env.rec.last.path == path and "X-Prom-Label-Policy" not in env.rec.last.headers
                if method == "POST":  # re-encoded into the body, nothing left in the URL
                    assert env.rec.last.query == [], case


async def test_series_merges_match_and_match_brackets(env: Env) -> None:
    auth = await tokens(env)
    params = [("match", '{app="x"}'), ("match[]", '{app=`y`, ns!="allowed"}'), ("start", "1")]
    expected = {
        "one": ['{app="x", ns="allowed"}', '{app="y", ns!="allowed", ns="allowed"}'],
        # the series API ORs its selectors, so several policies need no merging: one per (match, policy)
        "merge": ['{app="x", env="dev"}', '{app="x", env="prod"}', '{app="y", ns!="allowed", env="dev"}',
                  '{app="y", ns!="allowed", env="prod"}'],
        "union": ['{app="x", ns="a"}', '{app="x", team="b"}', '{app="y", ns!="allowed", ns="a"}',
                  '{app="y", ns!="allowed", team="b"}'],
    }
    for path in ("/loki/api/v1/series", "/api/prom/series"):
        for name, want in expected.items():
            for method in ("GET", "POST"):
                r = await send(env, method, path, params, auth[name])
                assert r.status == 200, await r.text()
                assert sent(env) == [("start", "1")] + [("match[]", m) for m in want], (path, method, name)
    # without any selector: one per policy, so the backend never lists every stream
    r = await env.gw.client.get("/loki/api/v1/series", headers=auth["union"])
    assert r.status == 200 and sent(env) == [("match[]", '{ns="a"}'), ("match[]", '{team="b"}')]
    for bad in ('{app="x"', '{app="x"} |= "y"', "up", ""):
        n = len(env.rec.seen)
        await expect_refusal(await env.gw.client.get("/loki/api/v1/series", params={"match[]": bad},
                                                     headers=auth["one"]), 400, "label-based access control")
        assert len(env.rec.seen) == n, bad


@pytest.mark.parametrize("path", ["/loki/api/v1/labels", "/loki/api/v1/label", "/loki/api/v1/label/app/values",
                                  "/api/prom/label", "/api/prom/label/app/values"])
async def test_labels_and_values_with_and_without_query(env: Env, path: str) -> None:
    auth = await tokens(env)
    methods = ("GET", "POST")
    for method in methods:
        # without `query`: the policy itself becomes the query; several policies are merged when that is
        # exact (`merge`), fanned out otherwise (`union`: one request per selector), never sent unrestricted
        r = await send(env, method, path, [("start", "1")], auth["one"])
        assert r.status == 200 and sent(env) == [("start", "1"), ("query", '{ns="allowed"}')]
        r = await send(env, method, path, [], auth["merge"])
        assert r.status == 200 and sent(env) == [("query", '{env=~"dev|prod"}')]
        n = len(env.rec.seen)
        env.rec.reply = b'{"status":"success","data":["x"]}'
        r = await send(env, method, path, [("start", "1")], auth["union"])
        assert r.status == 200 and await r.json() == {"status": "success", "data": ["x"]}
        legs = env.rec.seen[n:]
        assert sorted(dict(s.query + (parse_qsl(s.body.decode()) if s.body else []))["query"] for s in legs) == [
            '{ns="a"}', '{team="b"}']
        # with `query`: rewritten like any log query
        for query, expected in LOG_QUERIES[:4]:
            r = await send(env, method, path, [("query", query)], auth["one"])
            assert r.status == 200 and sent(env) == [("query", expected["one"])], (path, method, query)


async def test_tail_over_websocket_is_rewritten(env: Env) -> None:
    auth = await tokens(env)
    for query, expected in TABLE[:12]:
        for name, want in expected.items():
            if want is None:
                continue
            url = "/loki/api/v1/tail"
            async with env.gw.client.ws_connect(url, params={"query": query, "limit": "5"}, headers=auth[name]) as ws:
                assert "hello" in await ws.receive_str(timeout=5)
            seen = env.rec.seen[-1]
            assert seen.method == "WS" and seen.query == [("limit", "5"), ("query", want)], (name, query)
    # several selectors: one upstream socket per disjoint piece, frames passed as they come
    n = len(env.rec.seen)
    async with env.gw.client.ws_connect("/loki/api/v1/tail", params={"query": '{app="x"}'},
                                        headers=auth["union"]) as ws:
        # each socket's entry, as sent (the recorder answers every query alike; Loki's disjoint legs would not)
        assert "hello" in await ws.receive_str(timeout=5) and "hello" in await ws.receive_str(timeout=5)
        await ws.send_str("ping")
        echoes = {await ws.receive_str(timeout=5), await ws.receive_str(timeout=5)}
        assert echoes == {"echo:ping"}  # each upstream echoes; frames without entries pass as they are
    assert sorted(dict(s.query)["query"] for s in env.rec.seen[n:]) == ['{app="x", ns="a"}',
                                                                       '{app="x", team="b", ns!="a"}']


async def test_delete_request_query_in_url_is_rewritten(env: Env) -> None:
    auth = await tokens(env)
    for query, expected in TABLE:
        for name, want in expected.items():
            if query.startswith(("sum", "rate", "topk", "absent")):
                continue  # delete takes a log query; metric queries are for the other endpoints
            n = len(env.rec.seen)
            r = await env.gw.client.post("/loki/api/v1/delete", params={"query": query, "start": "1"},
                                         headers=auth[name])
            if want is None:
                await expect_refusal(r, 400, "label-based access control")
                assert len(env.rec.seen) == n
                continue
            assert r.status == 200, await r.text()
            # Loki's delete handler reads only the URL: the rewrite stays there, the body stays empty
            assert env.rec.last.query == [("start", "1"), ("query", want)], (name, query)
            assert env.rec.last.body == b""
    # PUT keeps the parameters in the URL
    r = await env.gw.client.put("/loki/api/v1/delete", params={"query": '{app="x"}'}, headers=auth["one"])
    assert r.status == 200 and env.rec.last.method == "PUT"
    assert env.rec.last.query == [("query", '{app="x", ns="allowed"}')]
