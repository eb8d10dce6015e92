"""Issue 22, item 4 on the data path: every request within a budget, every parser limit a 4xx.

* a read token's 16 client-sent selectors (X-Prom-Label-Policy) fan out within the worker's budget:
  at most LEG_CONCURRENCY legs in flight, answers charged to ``limits.fanout_memory`` (503 with
  Retry-After past it), big merges parsed in the merge process, never on the event loop;
* deep nesting is refused (400) before promql-parser or the LogQL lexer sees it, in every planner,
  and 12,000 levels no longer crash the process (checked in a subprocess: a SIGSEGV fails the test);
* 1,001 parameters are a 400 with a JSON error (``parse_qsl(max_num_fields=1000)`` was a 500);
* the tail's dedup keeps digests, not lines.

The gateway is the real server on real HTTP; the Loki stand-in answers ``query_range`` in Loki's
``streams`` shape (``pkg/loghttp``: ``{"status","data":{"resultType":"streams","result":[...]}}``).
"""

from __future__ import annotations

import asyncio
import gzip
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import promql_parser
import pytest
from aiohttp import web

from gateway.lbac import bounds, logql
from gateway.lbac import restrict as lbac
from gateway.policy.selector import parse_selector
from gateway.proxy import budget, fanout
from gateway.proxy.errors import ProxyError
from gateway.proxy.fanout import LEG_CONCURRENCY
from tests.test_lbac_bypass import restricted
from tests.test_proxy import Env, _env, basic, expect_refusal

ROOT = Path(__file__).resolve().parent.parent
BASE_NS = 1_700_000_000 * 10**9
#: 16 selectors no exact identity merges (each differs from the others in two labels): 16 legs.
SIXTEEN = tuple(f'{{app="a{i}", team="t{i}"}}' for i in range(16))


def policy_header(selectors: tuple[str, ...]) -> str:
    return ", ".join(lbac.label_policy_header("100", parse_selector(s)) for s in selectors)


class StreamsLoki:
    """``query_range`` answered with one stream per request (labelled from the leg's selector), ``lines``
    entries of ``line_bytes`` each; counts the requests in flight at once."""

    def __init__(self) -> None:
        self.lines, self.line_bytes = 3, 20
        self.in_flight = self.max_in_flight = self.requests = 0
        self.gate: asyncio.Event | None = None
        self.arrived, self.arrive_at = asyncio.Event(), 0  # set once ``arrive_at`` requests came in
        self.gzip = False  # answer gzip-encoded whatever the request asked (as a misconfigured proxy might)

    async def handle(self, request: web.Request) -> web.Response:
        self.requests += 1
        if self.requests >= self.arrive_at:
            self.arrived.set()
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.gate is not None:
                await self.gate.wait()
            await asyncio.sleep(0.01)  # let the other legs arrive: concurrency is what is counted
            query = (await request.post()).get("query") or request.query.get("query", "")
            sel = parse_selector(str(query)[: str(query).index("}") + 1]) if "{" in str(query) else None
            labels = {m.name: m.value for m in sel.matchers if m.op == "="} if sel else {}
            values = [[str(BASE_NS + i), f"{i:08d} " + "x" * self.line_bytes] for i in range(self.lines)]
            doc = {"status": "success", "data": {"resultType": "streams",
                                                 "result": [{"stream": labels, "values": values}]}}
            if self.gzip:
                return web.Response(body=gzip.compress(json.dumps(doc).encode()), content_type="application/json",
                                    headers={"Content-Encoding": "gzip"})
            return web.json_response(doc)
        finally:
            self.in_flight -= 1


@pytest.fixture
async def loki(aiohttp_server: Any) -> AsyncIterator[tuple[StreamsLoki, str]]:
    fake = StreamsLoki()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", fake.handle)
    server = await aiohttp_server(app)
    yield fake, f"http://127.0.0.1:{server.port}"


@pytest.fixture
async def enforce_small(db_dsn: str, aiohttp_client: Any, aiohttp_server: Any, loki: tuple[StreamsLoki, str]
                        ) -> AsyncIterator[Env]:
    """Enforce mode against the streams stand-in, with a 16 MiB fan-out budget per worker."""
    url = loki[1]
    ups = {"metrics": {"url": url, "lbac": "enforce"}, "logs": {"url": url, "lbac": "enforce"},
           "traces": {"url": url, "write_url": url}}
    async with _env(db_dsn, aiohttp_client, aiohttp_server, lbac="enforce", upstreams=ups,
                    limits={"fanout_memory": 16 * 1024 * 1024}) as e:
        yield e


async def _plain_read(env: Env) -> dict[str, str]:
    """A read token without label policies, narrowed by the 16 selectors a client sends."""
    tok = await env.token(["logs:read"])
    return {**basic("100", tok), "X-Prom-Label-Policy": policy_header(SIXTEEN)}


QR = "/loki/api/v1/query_range?" + urlencode({"query": '{job="x"}', "start": "1", "end": "2", "limit": "1000"})


# --------------------------------------------------------------------------- finding 3: 16 legs, one budget


async def test_sixteen_client_selectors_fan_out_within_the_budget(enforce_small: Env,
                                                                  loki: tuple[StreamsLoki, str]) -> None:
    fake = loki[0]
    h = await _plain_read(enforce_small)
    r = await enforce_small.gw.client.get(QR, headers=h)
    body = await r.json()
    assert r.status == 200, body
    assert len(body["data"]["result"]) == 16 and fake.requests == 16
    assert fake.max_in_flight <= LEG_CONCURRENCY, fake.max_in_flight  # on ae4b1b2: all 16 at once
    assert budget.BUDGET.held == 0


async def test_past_the_budget_a_fanout_gets_503_with_retry_after(enforce_small: Env,
                                                                  loki: tuple[StreamsLoki, str]) -> None:
    fake = loki[0]
    fake.lines, fake.line_bytes = 1000, 1024  # 16 legs of ~1 MiB, ~5.4 times that with merging: past 16 MiB
    h = await _plain_read(enforce_small)
    r = await enforce_small.gw.client.get(QR, headers=h)
    await expect_refusal(r, 503, "fan-out memory budget")
    assert r.headers["Retry-After"] == "1"
    assert budget.BUDGET.held == 0  # everything taken was given back
    fake.lines = 100  # 16 x ~100 KiB (~9 MB to hold and merge): within the budget, merged in the merge process
    r = await enforce_small.gw.client.get(QR, headers=h)
    assert r.status == 200 and len((await r.json())["data"]["result"]) == 16


async def test_concurrent_fanouts_share_one_budget(enforce_small: Env, loki: tuple[StreamsLoki, str]) -> None:
    """Two fan-outs that each fit alone do not fit together: the second one is refused, neither stalls."""
    fake = loki[0]
    # 16 legs of 140 lines of 1 KiB: ~2.4 MB of answers, ~12.7 MB with what merging them takes (merge_cost):
    # one fan-out fits the 16 MiB budget, two side by side do not
    fake.lines, fake.line_bytes = 140, 1024
    fake.gate, fake.arrive_at = asyncio.Event(), 2 * LEG_CONCURRENCY
    h = await _plain_read(enforce_small)
    first = asyncio.ensure_future(enforce_small.gw.client.get(QR, headers=h))
    second = asyncio.ensure_future(enforce_small.gw.client.get(QR, headers=h))
    await asyncio.wait_for(fake.arrived.wait(), 30)  # both fan-outs have their first legs waiting upstream
    fake.gate.set()
    statuses = sorted([(await first).status, (await second).status])
    assert statuses == [200, 503], statuses
    assert budget.BUDGET.held == 0


async def test_big_merges_are_not_parsed_on_the_event_loop(enforce_small: Env, loki: tuple[StreamsLoki, str],
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Past INLINE_MERGE bytes the merge runs in the merge process: this process never parses the answers."""
    fake = loki[0]
    fake.lines, fake.line_bytes = 100, 1024
    parsed: list[int] = []
    real = json.loads

    def spy(text: Any, *a: Any, **kw: Any) -> Any:
        parsed.append(len(text))
        return real(text, *a, **kw)

    monkeypatch.setattr(fanout.json, "loads", spy)
    h = await _plain_read(enforce_small)
    r = await enforce_small.gw.client.get(QR, headers=h)
    doc = await r.json(loads=real)
    assert r.status == 200 and len(doc["data"]["result"]) == 16
    assert sum(len(s["values"]) for s in doc["data"]["result"]) == 1000  # the query's limit, across the legs
    assert not [n for n in parsed if n > 64 * 1024], parsed  # on ae4b1b2: 16 answers of ~100 KiB parsed here
    left = [n for n in os.listdir(budget._SPOOL or tempfile.gettempdir()) if n.startswith("gateway-fanout-")]
    assert not left  # the answers handed to the merge process are removed


async def test_compressed_answers_are_inflated_within_the_budget(enforce_small: Env,
                                                                 loki: tuple[StreamsLoki, str]) -> None:
    fake = loki[0]
    fake.gzip = True
    h = await _plain_read(enforce_small)
    r = await enforce_small.gw.client.get(QR, headers=h)
    assert r.status == 200 and len((await r.json())["data"]["result"]) == 16
    fake.lines, fake.line_bytes = 2000, 4096  # 16 x 8 MiB of a repeated line: ~20 KiB each compressed
    r = await enforce_small.gw.client.get(QR, headers=h)
    await expect_refusal(r, 503, "fan-out memory budget")
    assert budget.BUDGET.held == 0


def test_newcomers_take_at_most_half_of_what_is_left() -> None:
    """A stream of new fan-outs cannot starve one under way (they would all end in 503s)."""
    b = budget.Budget()
    with b.hold(100) as first:
        first.take(60)
        with b.hold(100) as late:
            late.take(20)
            with pytest.raises(ProxyError) as info:
                late.take(1)
            assert info.value.status == 503 and info.value.headers == {"Retry-After": "1"}
        first.take(40)  # the request under way still gets the rest
        with pytest.raises(ProxyError):
            first.take(1)
    assert b.held == 0


def test_client_selectors_count_against_the_token_bounds() -> None:
    """Team rules x client selectors are bounded like a token's own (MAX_POLICIES)."""
    team = tuple(parse_selector(f'{{ns="n{i}"}}') for i in range(16))
    sent = tuple(parse_selector(s) for s in SIXTEEN)
    assert len(lbac.intersect(team, sent)) > bounds.MAX_POLICIES
    with pytest.raises(lbac.RewriteError):
        bounds.check_policies(len(lbac.intersect(team, sent)))


# --------------------------------------------------------------------------- finding 5: nesting before parsing


def _spy_parsers(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every text promql-parser or the LogQL lexer is asked to read (refusing deep text, as a crash would)."""
    seen: list[str] = []
    real_pp, real_lex = promql_parser.parse, logql._tokenize

    def pp(text: str) -> Any:
        seen.append(text)
        if bounds.nesting_exceeds(text):
            raise RuntimeError("promql-parser reached with deep nesting")
        return real_pp(text)

    def lex(text: str) -> Any:
        seen.append(text)
        if bounds.nesting_exceeds(text):
            raise RuntimeError("LogQL lexer reached with deep nesting")
        return real_lex(text)

    monkeypatch.setattr(promql_parser, "parse", pp)
    monkeypatch.setattr(logql, "_tokenize", lex)
    return seen


DEEP = 200
NESTED = [
    ("/prometheus/api/v1/query", "(" * DEEP + "up" + ")" * DEEP),
    ("/prometheus/api/v1/query", "(" * DEEP + "up[5m]" + ")" * DEEP),
    ("/prometheus/api/v1/series", "(" * DEEP + "up" + ")" * DEEP),
    ("/loki/api/v1/query_range", "(" * DEEP + '{job="x"}' + ")" * DEEP),
    ("/loki/api/v1/query_range", "sum(" * DEEP + 'count_over_time({job="x"}[1m])' + ")" * DEEP),
]


@pytest.mark.parametrize(("mode"), ["enforce", "header"])
async def test_deep_nesting_is_refused_before_any_parser_sees_it(db_dsn: str, aiohttp_client: Any,
                                                                 aiohttp_server: Any, mode: str,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    async with _env(db_dsn, aiohttp_client, aiohttp_server, lbac=mode) as env:
        seen = _spy_parsers(monkeypatch)
        two = ('{ns="a", app="x"}', '{ns="b", team="y"}')  # no exact identity merges them: the fan-out planner
        for selectors in (two, two[:1]):
            h = await restricted(env, selectors=selectors)
            for path, query in NESTED:
                param = "match[]" if path.endswith("series") else "query"
                for method in ("GET", "POST"):
                    q = urlencode({param: query})
                    r = await (env.gw.client.get(f"{path}?{q}", headers=h) if method == "GET" else
                               env.gw.client.post(path, data=q, headers={**h, "Content-Type": lbac.FORM}))
                    await expect_refusal(r, 400, f"nests deeper than {bounds.MAX_DEPTH} levels")
        assert env.rec.seen == []
        assert not [t for t in seen if bounds.nesting_exceeds(t)]  # on ae4b1b2 the fan-out planner parsed them


def test_twelve_thousand_levels_do_not_crash_the_planner() -> None:
    """The handler's steps for an enforce-mode read under two selectors, in a subprocess: on ae4b1b2 the
    fan-out planner handed the raw query to promql-parser, and 12,000 levels ended the process (SIGSEGV)."""
    code = """
import asyncio
import gzip
from gateway.lbac.pool import check_nesting, rewrite_inline, rewrite_off_loop
from gateway.policy.selector import parse_selector
from gateway.proxy.errors import ProxyError
from gateway.routes import Kind
pols = (parse_selector('{ns="a", app="x"}'), parse_selector('{ns="b", team="y"}'))
n = 12000
cases = [(Kind.PROMQL, "/api/v1/query", "query=" + "%28" * n + "up%5B5m%5D" + "%29" * n),
         (Kind.LOGQL, "/loki/api/v1/query_range", "query=" + "%28" * n + "%7Bjob%3D%22x%22%7D" + "%29" * n)]
async def main():
    for kind, path, q in cases:
        for fan_out in (True, False):  # the fan-out planner, then the rewrite alone
            args = (kind, path, "GET", q, None, pols, fan_out)
            try:
                rewrite_inline(args) or await rewrite_off_loop(args)
                print("passed")
            except ProxyError as exc:
                print(exc.status, "nests deeper" in exc.message)
        try:
            check_nesting(kind, q, None)
            print("passed")
        except ProxyError as exc:
            print(exc.status, "nests deeper" in exc.message)
asyncio.run(main())
"""
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, (p.returncode, p.stdout[-300:], p.stderr[-500:])
    assert p.stdout.split("\n")[:-1] == ["400 True"] * 6, p.stdout


def test_nesting_check_reads_brackets_outside_strings_only() -> None:
    assert not bounds.nesting_exceeds("(" * 64 + "up" + ")" * 64)
    assert bounds.nesting_exceeds("(" * 65 + "up" + ")" * 65)
    assert bounds.nesting_exceeds("sum(" * 40 + "rate({a=~" + "{" * 30 + "}[5m]" + ")" * 40)
    assert not bounds.nesting_exceeds('{a=~"' + "(" * 500 + '"}')  # inside a string: the regex engine's matter
    assert not bounds.nesting_exceeds("()" * 5000)


# --------------------------------------------------------------------------- finding 7: parameter count


@pytest.mark.parametrize("mode", ["enforce", "header"])
async def test_a_thousand_and_one_parameters_are_a_400(db_dsn: str, aiohttp_client: Any, aiohttp_server: Any,
                                                       mode: str) -> None:
    async with _env(db_dsn, aiohttp_client, aiohttp_server, lbac=mode) as env:
        h = await restricted(env)
        many = "query=up&" + "&".join(f"p{i}=1" for i in range(1000))
        r = await env.gw.client.get(f"/prometheus/api/v1/query?{many}", headers=h)
        await expect_refusal(r, 400, "more than 1000 parameters")
        half = "&".join(f"p{i}=1" for i in range(600))
        r = await env.gw.client.post(f"/loki/api/v1/query_range?query=%7Bjob%3D%22x%22%7D&{half}", data=half,
                                     headers={**h, "Content-Type": lbac.FORM})
        await expect_refusal(r, 400, "more than 1000 parameters")
        r = await env.gw.client.get("/prometheus/api/v1/query?query=up&" + "&".join(f"p{i}=1" for i in range(998)),
                                    headers=h)
        assert r.status == 200  # 999 parameters: within the bound
        assert len(env.rec.seen) == 1


# finding 4 (a tail under two selectors kept every line in its dedup): the tail's legs are now disjoint pieces of
# the policies (gateway/lbac/overlap.disjoint_pieces), so nothing is deduplicated and no line is remembered at all;
# tests/test_lbac_fanout.py proves the tail's frames equal the visible-only tenant's.
