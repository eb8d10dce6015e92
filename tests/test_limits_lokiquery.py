"""A policy's lokiQueryPolicy on Loki reads (issue 28, item 1): sent to Loki as X-Loki-Query-Limits, and the
checks Loki makes from the request alone made by the gateway too, with Loki's status and text, against a
fake Loki that applies the same header the way Loki does (tests/fake_loki_limits.py)."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlencode

import aiohttp
import pytest

from gateway.errors import ProxyError
from gateway.limits.lokiquery import (
    apply,
    go_duration,
    model_duration,
    parse,
    parse_duration_ms,
    size_bytes,
    valid_bytes,
)
from tests.fake_loki_limits import FakeLokiLimits
from tests.test_limits import policy_token
from tests.test_proxy import Env, _env, basic

POLICY = {"maxEntriesLimitPerQuery": 100, "maxQueryLookback": "7d", "maxQueryLength": "24h",
          "maxQueryBytesRead": "1GB", "queryTimeout": "30s", "requiredLabels": ["namespace"],
          "minimumLabelsNumber": 2, "maxQueryInterval": "12h", "maxQueryTime": "1m"}
LOG = '{namespace="a", app="b"}'
NS = 10**9


def test_durations_are_formatted_like_go() -> None:
    assert [go_duration(ms) for ms in (721 * 3600_000, 90_000, 1500, 250, 0, 48 * 3600_000)] == [
        "721h0m0s", "1m30s", "1.5s", "250ms", "0s", "48h0m0s"]
    assert [model_duration(parse_duration_ms(d) or 0) for d in ("30d", "84d", "90d", "1h30m", "24h", "1y")] == [
        "30d", "12w", "90d", "1h30m", "1d", "1y"]
    assert parse_duration_ms("1.5h") is None and parse_duration_ms("") is None and parse_duration_ms("0") == 0
    p = parse(POLICY)
    assert p is not None and json.loads(p.header)["maxQueryTime"] == "30s" == json.loads(p.header)["queryTimeout"]
    assert parse({"maxQueryLength": "bogus"}) is None and parse({}) is None


def test_values_and_ranges_are_read_as_loki_reads_them() -> None:
    """Loki drops the whole header when one value fails to parse (a real Loki shows it:
    tests/e2e/test_real_loki.py), so only sizes and durations Loki reads are sent; a range is Loki's
    (``since``, a default ``limit`` of 100), and an instant query is left to Loki."""
    assert [valid_bytes(v) for v in ("500MB", "1 gb", "2kilobytes", "1024", "1GiB", "1.5GB", "9999999999EB")] == [
        True, True, True, True, False, False, False]
    assert [size_bytes(v) for v in ("1KB", "1 gb", "7")] == [1024, 2**30, 7]
    sent = [json.loads(p.header)["maxQueryBytesRead"] for p in (
        parse({"maxQueryBytesRead": v}) for v in ("500MB", "1GiB", "1.5 GB", "512 KiB")) if p is not None]
    assert sent == ["500MB", str(2**30), str(3 * 2**29), str(2**19)]  # legacy forms as a byte count
    assert parse({"maxQueryBytesRead": "0"}) is None and parse_duration_ms("999999y") is None
    lp = parse({"maxEntriesLimitPerQuery": 50, "maxQueryLength": "1h"})
    assert lp is not None
    with pytest.raises(ProxyError, match=r"\(100 > 50\)"):
        apply(lp, "/loki/api/v1/query_range", urlencode({"query": LOG}))
    with pytest.raises(ProxyError, match=r"query length: 2h0m0s, limit: 1h"):
        apply(lp, "/loki/api/v1/query_range", urlencode({"query": "sum(rate(" + LOG + "[1m]))", "since": "2h"}))
    raw = urlencode({"query": LOG, "limit": "500"})
    assert apply(lp, "/loki/api/v1/query", raw) == (raw, None)  # Loki: no instant log queries at all
    for path in ("/loki/api/v1/labels", "/loki/api/v1/label/app/values", "/loki/api/v1/series"):  # (no limit)
        with pytest.raises(ProxyError, match=r"query length: 2h0m0s, limit: 1h"):
            apply(lp, path, urlencode({"match[]": LOG, "since": "2h", "limit": "500"}))
    back = parse({"maxQueryLookback": "1h"})
    assert back is not None
    assert apply(back, "/loki/api/v1/labels", "start=1&end=2") == ("start=1&end=2", {"status": "success"})
    assert apply(back, "/loki/api/v1/detected_labels", "start=1&end=2") == ("start=1&end=2", None)


@pytest.fixture
async def loki(db_dsn: str, aiohttp_client: Any, aiohttp_server: Any) -> AsyncIterator[tuple[Env, FakeLokiLimits,
                                                                                          str]]:
    fake = FakeLokiLimits()
    server = await aiohttp_server(fake.app())
    url = f"http://127.0.0.1:{server.port}"
    ups = {"metrics": {"url": url}, "logs": {"url": url}, "traces": {"url": url}}
    async with _env(db_dsn, aiohttp_client, aiohttp_server, upstreams=ups) as env:
        yield env, fake, url


async def _both(env: Env, fake: FakeLokiLimits, url: str, tok: str, params: dict[str, str]
                ) -> tuple[aiohttp.ClientResponse, str, int, str]:
    """The gateway's answer and its error text; and the fake Loki's own answer to the same request with the
    policy's header (what Loki would say were the gateway not checking)."""
    path = "/loki/api/v1/query_range?" + urlencode(params)
    r = await env.gw.client.get(path, headers=basic("100", tok))
    text = (await r.json()).get("error", "") if r.status != 200 else ""
    if r.status != 200:  # Grafana's Loki data source shows `message` (a plain-text body whole, as Loki's)
        assert (await r.json())["message"] == text
    p = parse(POLICY)
    assert p is not None
    async with aiohttp.ClientSession() as s, s.get(url + path, headers={
            "X-Loki-Query-Limits": p.header, "X-Scope-OrgID": "100"}) as direct:
        return r, text, direct.status, await direct.text()


async def test_each_field(loki: tuple[Env, FakeLokiLimits, str]) -> None:
    env, fake, url = loki
    _, tok = await policy_token(env, ["logs:read"], {"lokiQueryPolicy": POLICY})
    now = time.time()

    # maxEntriesLimitPerQuery: refused with Loki's status and text, before Loki is asked
    r, text, d_status, d_text = await _both(env, fake, url, tok, {"query": LOG, "limit": "500"})
    assert (r.status, text) == (d_status, d_text) == (400, "max entries limit per query exceeded, limit > "
                                                      "max_entries_limit_per_query (500 > 100)")
    assert len([s for s in fake.seen if s["tenant"] == "100"]) == 1  # only the direct request

    # ... for log queries only; the header reaches Loki with every field, the client's own one dropped
    fake.seen.clear()
    r = await env.gw.client.get("/loki/api/v1/query_range?" + urlencode(
        {"query": f"sum(rate({LOG}[5m]))", "limit": "500"}), headers={
        **basic("100", tok), "X-Loki-Query-Limits": '{"maxQueryLength":"999d"}'})
    assert r.status == 200
    sent = json.loads(fake.seen[-1]["limits"])
    assert sent == {**POLICY, "queryTimeout": "30s", "maxQueryTime": "30s"}

    # maxQueryLookback: the start is clamped where Loki clamps it
    start, end = now - 8 * 86400, now - 7 * 86400 + 3600
    r = await env.gw.client.get("/loki/api/v1/query_range?" + urlencode(
        {"query": LOG, "start": f"{start:.3f}", "end": str(int(end * NS))}), headers=basic("100", tok))
    assert r.status == 200
    sent_start = int(dict(fake.seen[-1]["query"])["start"])
    assert abs(sent_start / NS - (now - 7 * 86400)) < 60
    assert 0 <= fake.seen[-1]["effective_start"] - sent_start < NS  # (Loki's own clamp, a moment later)

    # ... and a range wholly before it gets Loki's empty answer, without asking Loki
    fake.seen.clear()
    r, _, d_status, d_text = await _both(env, fake, url, tok, {"query": LOG, "start": str(int(now - 9 * 86400)),
                                                                  "end": str(int(now - 8 * 86400))})
    assert r.status == d_status == 200 and await r.json() == json.loads(d_text)
    assert (await r.json())["data"] == {"resultType": "streams", "result": [], "stats": {}}
    assert len(fake.seen) == 1  # the direct one

    # maxQueryLength: refused with Loki's text (Go's durations)
    r, text, d_status, d_text = await _both(env, fake, url, tok, {"query": LOG, "start": str(int(now - 2 * 86400)),
                                                                     "end": str(int(now))})
    assert (r.status, text) == (d_status, d_text) == (
        400, "the query time range exceeds the limit (query length: 48h0m0s, limit: 1d)")

    # another backend's reads and a policy without the attribute are untouched
    fake.seen.clear()
    _, free = await policy_token(env, ["logs:read", "metrics:read"])
    r = await env.gw.client.get("/loki/api/v1/query_range?" + urlencode({"query": LOG, "limit": "500"}),
                                headers=basic("100", free))
    assert r.status == 200 and fake.seen[-1]["limits"] is None
    r = await env.gw.client.get("/prometheus/api/v1/query?query=up", headers=basic("100", tok))
    assert r.status == 403  # (no metrics scope; nothing limits-related)


async def test_the_api_refuses_what_loki_could_not_read(loki: tuple[Env, FakeLokiLimits, str]) -> None:
    env, _, _ = loki
    for bad, field in (({"maxQueryLength": "7 days"}, "maxQueryLength"), ({"maxQueryBytesRead": "lots"},
                                                                          "maxQueryBytesRead"),
                       ({"maxQueryBytesRead": "1GiB"}, "maxQueryBytesRead")):
        body = {"name": "bad", "scopes": ["logs:read"], "realms": [{"type": "org", "identifier": "1"}],
                "attributes": {"lokiQueryPolicy": bad}}
        err = await env.gw.api("POST", "/api/v1/accesspolicies", body, expect=409)
        assert err["field"] == f"attributes.lokiQueryPolicy.{field}", err
    body = {"name": "bad", "scopes": ["logs:read"], "realms": [{"type": "org", "identifier": "1"}],
            "attributes": {"gatewayLimits": {"requestsPerSecond": -1}}}
    assert (await env.gw.api("POST", "/api/v1/accesspolicies", body, expect=409))["field"] == \
        "attributes.gatewayLimits.requestsPerSecond"
