"""Header mode against Mimir's own label-based access control (``-auth.label-access-control-enabled``).

The upstream is tests/fake_mimir_lbac.py, written from grafana/mimir ``pkg/labelaccess``: it parses
``X-Prom-Label-Policy`` and filters (queries, series, label names and values, exemplars) or refuses
(three cardinality endpoints) exactly as that code does, and leaves unfiltered what Mimir leaves
unfiltered (metadata, user stats, native-histogram cardinality). Through the gateway in header mode,
every read of a label-restricted token must equal the answer of a Mimir holding only the visible series,
and what Mimir would answer whole must never reach it. A Mimir whose query-frontend parses the header
while its queriers do not filter is not trusted.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import unquote

import pytest

from gateway.lbac.probe import probe_of
from tests.fake_mimir_lbac import FakeMimir, Series, selector_matchers
from tests.test_proxy import Env, _env, basic, expect_refusal

POLICIES = ('{env="dev"}', '{team="a", env!="prod"}')
P = "/prometheus/api/v1"


def dataset() -> list[Series]:
    out = []
    for i, (env, team) in enumerate([("dev", "a"), ("dev", "b"), ("prod", "a"), ("prod", "b"), ("staging", "a"),
                                      ("", "a"), ("", ""), ("staging", "b")]):
        labels = {k: v for k, v in (("env", env), ("team", team)) if v}
        out.append(Series({"__name__": "up", "job": f"j{i % 3}", **labels}, 1.0))
        out.append(Series({"__name__": "http_requests_total", "job": f"j{i % 3}", **labels}, float(i + 1),
                          exemplar_trace=f"t{i}" if i % 2 else ""))
    out.append(Series({"__name__": "secret_metric", "env": "prod", "team": "b"}, 7.0))
    return out


@asynccontextmanager
async def mimir_env(db_dsn: str, aiohttp_client: Any, aiohttp_server: Any, fake: FakeMimir, mode: str
                    ) -> AsyncIterator[Env]:
    url = f"http://127.0.0.1:{(await aiohttp_server(fake.app())).port}"
    ups = {"metrics": {"url": url, "lbac": mode}, "logs": {"url": url, "lbac": "enforce"},
           "traces": {"url": url, "write_url": url}}
    async with _env(db_dsn, aiohttp_client, aiohttp_server, mode, upstreams=ups) as env:
        fake.seen.clear()  # the start-up probe
        yield env


# (method, path and query, form body): every read Grafana's Prometheus data source makes that carries data
READS: list[tuple[str, str, dict[str, str] | None]] = [
    ("GET", f"{P}/query?query=up&time=1000", None),
    ("POST", f"{P}/query", {"query": 'http_requests_total{job=~"j0|j1"}', "time": "1000"}),
    ("POST", f"{P}/query_range", {"query": "http_requests_total", "start": "0", "end": "120", "step": "60"}),
    ("GET", f"{P}/series?match[]=up&match[]=%7Bjob%3D%22j2%22%7D", None),
    ("GET", f"{P}/labels", None),
    ("GET", f"{P}/labels?match[]=secret_metric", None),
    ("GET", f"{P}/label/env/values", None),
    ("GET", f"{P}/label/__name__/values", None),
    ("GET", f"{P}/query_exemplars?query=http_requests_total&start=0&end=2000", None),
    ("GET", f"{P}/metadata", None),  # Mimir leaves it whole: the gateway asks the visible names first
]


@pytest.mark.parametrize("selectors", [POLICIES, POLICIES[:1]], ids=["two_selectors", "one_selector"])
async def test_header_mode_answers_equal_the_visible_only_tenant(db_dsn: str, aiohttp_client: Any,
                                                                 aiohttp_server: Any,
                                                                 selectors: tuple[str, ...]) -> None:
    fake = FakeMimir(dataset())
    truth = fake.visible_only([selector_matchers(s) for s in selectors])
    assert 0 < len(truth.series) < len(fake.series)
    async with mimir_env(db_dsn, aiohttp_client, aiohttp_server, fake, "header") as env:
        verdict = probe_of(env.gw.state.extras).verdicts["metrics"]
        assert verdict.enforces is True and "Mimir" in verdict.detail and "emptied" in verdict.detail, verdict
        tok = await env.token(["metrics:read"], [{"type": "stack", "identifier": "100",
                                                  "labelPolicies": [{"selector": s} for s in selectors]}])
        h = basic("100", tok)
        for method, path, form in READS:
            n = len(fake.seen)
            r = await env.gw.client.request(method, path, data=form, headers=h)
            assert r.status == 200, (path, await r.text())
            got = (await r.json())["data"]
            base, _, query = path.partition("?")
            params = [tuple(kv.split("=", 1)) for kv in query.split("&") if kv] if query else []
            params = [(k, unquote(v)) for k, v in params] + list((form or {}).items())
            want = truth.answer(base.removeprefix(f"{P}/"), params, None)
            assert got == want, path
            for _path, headers, values in fake.seen[n:]:  # the tenant the policy names is the one queried
                assert headers["X-Scope-OrgID"] == "100" and values and all(v.startswith("100:") for v in values)
        # Endpoints Mimir refuses under a policy (400) or answers whole: refused by the gateway, never sent.
        n = len(fake.seen)
        for path in (f"{P}/cardinality/label_names", f"{P}/cardinality/label_values?label_names[]=env",
                     f"{P}/cardinality/active_series?selector=up", "/api/v1/user_stats",
                     f"{P}/cardinality/active_native_histogram_metrics?selector=up"):
            await expect_refusal(await env.gw.client.get(path, headers=h), 403, "cannot be filtered")
        assert fake.seen[n:] == []


async def test_the_fake_refuses_and_leaves_whole_what_mimir_does(aiohttp_client: Any) -> None:
    """The premises of the test above, on the fake itself (so on the code it is written from)."""
    fake = FakeMimir(dataset())
    c = await aiohttp_client(fake.app())
    policy = {"X-Scope-OrgID": "100", "X-Prom-Label-Policy": "100:%7Benv=%22dev%22%7D"}
    r = await c.get(f"{P}/cardinality/label_names", headers=policy)
    assert r.status == 400 and "doesn't support access policies" in await r.text()
    r = await c.get(f"{P}/labels", headers={"X-Scope-OrgID": "100", "X-Prom-Label-Policy": "gateway-lbac-probe"})
    assert r.status == 400 and r.content_type == "text/plain"
    assert await r.text() == "invalid label policy header value, unable to parse tenant and selector\n"
    whole = (await (await c.get(f"{P}/metadata", headers=policy)).json())["data"]
    assert "secret_metric" in whole  # metadata is not filtered by Mimir
    r = await c.get(f"{P}/cardinality/active_native_histogram_metrics", headers=policy)
    assert r.status == 200  # not one of the three refused suffixes
    # A policy naming another tenant filters nothing (instancePolicyMap[orgID] is missing).
    other = {"X-Scope-OrgID": "100", "X-Prom-Label-Policy": "200:%7Benv=%22dev%22%7D"}
    assert len((await (await c.get(f"{P}/series?match[]=up", headers=other)).json())["data"]) == 8
    assert len((await (await c.get(f"{P}/series?match[]=up", headers=policy)).json())["data"]) == 2


async def test_a_mimir_whose_queriers_do_not_filter_is_not_trusted(db_dsn: str, aiohttp_client: Any,
                                                                    aiohttp_server: Any) -> None:
    """The flag set on the query-frontend only: the malformed policy gets Mimir's 400, but no answer is
    filtered. Header mode refuses restricted reads (503, nothing sent); auto runs in enforce mode."""
    for mode in ("header", "auto"):
        fake = FakeMimir(dataset(), filters=False)
        async with mimir_env(db_dsn, aiohttp_client, aiohttp_server, fake, mode) as env:
            verdict = probe_of(env.gw.state.extras).verdicts["metrics"]
            assert verdict.enforces is False and "queriers do not filter" in verdict.detail, verdict
            tok = await env.token(["metrics:read"], [{"type": "stack", "identifier": "100",
                                                      "labelPolicies": [{"selector": POLICIES[0]}]}])
            r = await env.gw.client.get(f"{P}/series?match[]=up", headers=basic("100", tok))
            if mode == "header":
                await expect_refusal(r, 503, "does not (verifiably) enforce")
                assert fake.seen == []
                continue
            assert r.status == 200, await r.text()
            got = (await r.json())["data"]
            assert got == [s.labels for s in fake.series if s.labels["__name__"] == "up"
                           and s.labels.get("env") == "dev"]  # the gateway's own rewrite
            assert "X-Prom-Label-Policy" not in fake.seen[-1][1]
