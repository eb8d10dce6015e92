"""Issue 22, item 3: the gateway's framing judged by nginx. Every entry of tests/e2e/framing_corpus.py (and a
last, well-formed request behind it) goes raw over a socket to Debian's nginx, a plain reverse proxy, and to
a real `gateway serve` on the protocol data path, both in front of the same recording upstream. For each
entry the gateway either forwards exactly what nginx forwards (method, target, body bytes, in order), or
forwards a prefix of it and refuses the next request with a 4xx; it never forwards a request nginx did not.

Then the split fuzzer: every entry with more than one request is sent to the gateway cut at every byte
offset, and cut at seeded random offsets several times over: the upstream receives the same requests and
the client reads the same answers, in the same order, every time.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import asyncpg
import pytest

from tests.conftest import _with_db, bootstrap_token, make_config, require
from tests.e2e.framing_corpus import AUTH, Entry, corpus, sentinel
from tests.e2e.framing_oracle import NGINX, Nginx, Outcome, Upstream, run, sources
from tests.e2e.gateway_proc import GatewayProcess
from tests.test_proxy import basic

PARALLEL = 16
FUZZ_END = b"GET /prometheus/api/v1/query HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n"
RANDOM_SPLITS = 12  # per multi-request entry, each cut at 2 to 6 random offsets
SEED = 22
# Entries any HTTP/1.1 server must take: the gateway forwards them exactly as nginx does (not a refusal).
MUST_FORWARD = {("content-length value", "b'5'"), ("content-length value", "b'5 '"),
                ("transfer-encoding value", "b'chunked'"), ("chunks", "two chunks"), ("chunks", "extension"),
                ("pipelining", "GET, GET"), ("pipelining", "POST, GET"), ("pipelining", "chunked POST, GET"),
                ("pipelining", "three in a row"), ("pipelining", "a padded length, GET"),
                ("versions", "HTTP/1.0 keep-alive, pipelined"), ("Expect", "100-continue with a body")}
# Entries that desync some server pair: the gateway forwards none of their own requests.
MUST_REFUSE = {("CL and TE", "CL.TE"), ("CL and TE", "TE.CL"), ("CL and TE", "CL.TE smuggling a request"),
               ("CL and TE", "TE.CL smuggling a request"), ("duplicate length", "b'5' then b'6'"),
               ("content-length value", "b'5, 5'"), ("content-length value", "b'\\t5'"),
               ("transfer-encoding value", "b'gzip, chunked'"), ("transfer-encoding value", "b'xchunked'"),
               ("chunks", "bare LF after data"), ("chunks", "size overflows 64 bits"),
               ("field syntax", "obs-fold continuing the length"), ("line ends", "bare LF everywhere"),
               ("NUL", "in a field name"), ("hosts", "two Hosts"), ("targets", "fragment in the query")}


@dataclass
class Oracle:
    upstream: Upstream
    nginx: Nginx
    gateway: GatewayProcess
    auth: bytes  # Basic, as Grafana and Prometheus send it
    bearer: bytes  # the same token, shorter: the split fuzzer cuts at every byte

    def bytes_of(self, entry: Entry) -> bytes:
        return (entry.data + sentinel()).replace(AUTH, self.auth)

    def fuzz_bytes_of(self, entry: Entry) -> bytes:
        """The entry with a closing request answered by the gateway itself (401): the fuzzer compares the
        gateway with itself, and the bytes after the entry only have to end the connection."""
        return entry.data.replace(AUTH, self.bearer) + FUZZ_END


async def _sql(pg_dsn: str, statement: str) -> None:
    conn = await asyncpg.connect(pg_dsn)
    try:
        await conn.execute(statement)
    finally:
        await conn.close()


async def _database(pg_dsn: str, name: str) -> tuple[str, str]:
    """A fresh database (as tests.conftest.db_dsn makes one) and an admin token in it."""
    await _sql(pg_dsn, f'CREATE DATABASE "{name}" TEMPLATE gw_template')
    dsn = _with_db(pg_dsn, name)
    from gateway.app import close_state, open_state
    state = await open_state(make_config(dsn))
    try:
        return dsn, await bootstrap_token(state)
    finally:
        await close_state(state)


def _api(gw: GatewayProcess, admin: str, path: str, body: dict[str, Any]) -> Any:
    request = urllib.request.Request(f"{gw.url}{path}", json.dumps(body).encode(), method="POST", headers={
        "Authorization": f"Bearer {admin}", "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as r:  # noqa: S310 (127.0.0.1)
        return json.loads(r.read())


@pytest.fixture(scope="module")
def oracle(pg_dsn: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Oracle]:
    require(os.path.exists(NGINX), "nginx")
    tmp: Path = tmp_path_factory.mktemp("framing-oracle")
    upstream = Upstream()
    url = f"http://127.0.0.1:{upstream.start()}"
    nginx = Nginx(tmp, upstream.port).start()
    database = f"t_{uuid.uuid4().hex[:12]}"
    dsn, admin = asyncio.run(_database(pg_dsn, database))
    gw = GatewayProcess(tmp, dsn, "oracle", log_level="warning", shutdown={"delay": 0},
                        upstreams={"metrics": {"url": url}, "logs": {"url": url}, "traces": {"url": url}})
    try:
        gw.start()
        policy = _api(gw, admin, "/api/v1/accesspolicies", {
            "name": "oracle", "scopes": ["metrics:read", "metrics:write"],
            "realms": [{"type": "stack", "identifier": "100"}]})
        token = _api(gw, admin, "/api/v1/tokens", {"accessPolicyId": policy["id"], "name": "oracle"})["token"]
        upstream.seen.clear()
        yield Oracle(upstream, nginx, gw, basic("100", token)["Authorization"].encode(), f"Bearer {token}".encode())
    finally:
        gw.stop()
        nginx.stop()
        upstream.stop()
        asyncio.run(_sql(pg_dsn, f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)'))


async def _runs(port: int, jobs: list[list[bytes]], upstream: Upstream, deadline: float = 3.0,
                settle: float = 0.0) -> list[Outcome]:
    """Run every job (the parts of one connection's bytes), ``PARALLEL`` at a time, each from its own address."""
    free: asyncio.Queue[str] = asyncio.Queue()
    for source in sources(PARALLEL):
        free.put_nowait(source)

    async def one(parts: list[bytes]) -> Outcome:
        source = await free.get()
        try:
            return await run(port, parts, source, upstream, deadline, settle)
        finally:
            free.put_nowait(source)
    return list(await asyncio.gather(*(one(parts) for parts in jobs)))


#: What a front answers itself when it refuses a request: a 4xx, or nginx's 501 (a transfer coding it does not
#: implement, RFC 9112 6.1) and 505 (an HTTP version it does not speak).
REFUSALS = frozenset({*range(400, 500), 501, 505})
LOCAL = ("/health", "/ready", "/metrics")  # answered by the gateway itself (nginx forwards them)


def _target(target: str) -> str:
    """A target as its receiver decodes it: the gateway re-encodes the raw bytes of a query that RFC 3986 does
    not allow (``{``, ``"``, ``|``, as yarl does) and drops an empty query's ``?``; the upstream reads the same."""
    return unquote(target[:-1] if target.endswith("?") else target)


def _same(a: Any, b: Any) -> bool:
    return a[0] == b[0] and _target(a[1]) == _target(b[1]) and a[2] == b[2]


def judge(nginx: Outcome, gateway: Outcome) -> str | None:
    """Why the gateway's outcome is wrong, or None. The two fronts' answers are walked in step (both read the
    same bytes: as long as they frame them alike, answer i is to the same request i): where the gateway
    relayed an upstream answer, nginx relayed one to the same request; where it answered itself, it refused
    (or served one of its own paths); once it stops answering, it forwards nothing more."""
    if len(gateway.forwarded) > len(nginx.forwarded):
        return "the gateway forwarded more requests than nginx"
    theirs, mine = iter(nginx.forwarded), iter(gateway.forwarded)
    answers = [s for s in gateway.statuses if abs(s) != 100]
    reference = [s for s in nginx.statuses if abs(s) != 100]
    for i, status in enumerate(answers):
        other = reference[i] if i < len(reference) else None
        forwarded = next(theirs, None) if other is not None and other > 0 else None
        if status > 0:  # relayed: the gateway forwarded request i
            if forwarded is None:
                return f"the gateway forwarded request {i}, which nginx did not"
            if not _same(next(mine), forwarded):
                return f"the gateway forwarded request {i} differently"
        elif -status in REFUSALS:
            continue
        elif forwarded is not None and forwarded[1].startswith(LOCAL) and -status < 400:
            continue  # its own path, served
        else:
            return f"the gateway answered request {i} itself with {-status or 'bytes that are not HTTP'}"
    if next(mine, None) is not None:
        return "the gateway forwarded a request it did not answer"
    if answers and (-answers[-1] in REFUSALS or len(answers) >= len(reference)):
        return None
    if gateway.hung and len(gateway.forwarded) == len([s for s in answers if s > 0]):
        return None  # still reading a body it has not forwarded (a chunk of 2^64-1 bytes is valid HTTP; nginx
        # refuses it for its own integer's sake): the body limit or the body deadline ends it
    return "the gateway stopped answering without a refusal"


async def test_the_gateway_refuses_or_frames_every_entry_as_nginx_does(oracle: Oracle) -> None:
    entries = corpus()
    assert len(entries) >= 200
    jobs = [[oracle.bytes_of(e)] for e in entries]
    theirs = await _runs(oracle.nginx.port, jobs, oracle.upstream, settle=0.05)
    mine = await _runs(oracle.gateway.port, jobs, oracle.upstream, settle=0.05)
    failures, same, both, refused = [], 0, 0, 0
    for entry, n, g in zip(entries, theirs, mine, strict=True):
        why = judge(n, g)
        key = (entry.family, entry.name)
        if why is None and key in MUST_FORWARD and (g.forwarded != n.forwarded or len(n.forwarded) < 2):
            why = "an ordinary request: the gateway must forward it as nginx does"
        if why is None and key in MUST_REFUSE and g.forwarded:
            why = "a request smuggling pattern: the gateway must refuse it"
        if why is not None:
            failures.append(f"{entry.family} / {entry.name}: {why}\n    nginx:   {n}\n    gateway: {g}")
        elif not n.forwarded:
            both += 1
        elif len(g.forwarded) == len(n.forwarded) and all(map(_same, g.forwarded, n.forwarded)):
            same += 1
        else:
            refused += 1
    assert not failures, f"{len(failures)} of {len(entries)} entries:\n" + "\n".join(failures)
    print(f"framing oracle: {len(entries)} entries: {same} forwarded as nginx forwards them, {both} refused by both, "
          f"{refused} refused (wholly or in part) by the gateway only")
    names = {(e.family, e.name) for e in entries}
    assert MUST_FORWARD <= names and MUST_REFUSE <= names  # (the comparison is not vacuous)


def _splits(data: bytes, rnd: random.Random) -> list[list[bytes]]:
    """``data`` cut at every offset, then at 2 to 6 random offsets ``RANDOM_SPLITS`` times."""
    jobs = [[data[:k], data[k:]] for k in range(1, len(data))]
    for _ in range(RANDOM_SPLITS):
        cuts = sorted(rnd.sample(range(1, len(data)), min(len(data) - 1, rnd.randint(2, 6))))
        jobs.append([data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)])
    return jobs


async def test_a_multi_request_entry_split_anywhere_is_served_the_same(oracle: Oracle) -> None:
    rnd = random.Random(SEED)
    entries = [e for e in corpus() if e.requests() > 1]
    assert len(entries) >= 20
    base = await _runs(oracle.gateway.port, [[oracle.fuzz_bytes_of(e)] for e in entries], oracle.upstream)
    failures, runs, fuzzed = [], 0, 0
    for entry, expected in zip(entries, base, strict=True):
        if expected.hung:
            continue  # (waits for bytes that never come: the same every time, but 3 s a run)
        fuzzed += 1
        jobs = _splits(oracle.fuzz_bytes_of(entry), rnd)
        runs += len(jobs)
        for parts, got in zip(jobs, await _runs(oracle.gateway.port, jobs, oracle.upstream, 5.0), strict=True):
            if got != expected:
                failures.append(f"{entry.family} / {entry.name} cut at {[len(p) for p in parts]}:\n"
                                f"    unsplit: {expected}\n    split:   {got}")
                break
    assert not failures, "\n".join(failures)
    print(f"split fuzzer: {fuzzed} entries, {runs} runs")
    assert fuzzed >= len(entries) - 3
