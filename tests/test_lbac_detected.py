"""``detected_labels`` under several selectors: computed from the visible streams as Loki computes it.

Loki drops a label whose values all look like IDs (numbers, UUIDs), keeps one or two "0"/"1" values as
booleans, and counts each value once (pkg/querier/querier.go). Per selector those rules can decide
differently from the union, so the gateway asks for the visible streams once (``series`` with one
``match[]`` per selector) and applies them itself; tests/fake_loki.py applies them for the truth.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from gateway.proxy.detected import detected_labels, should_reject
from tests.fake_loki import FakeLoki, Stream, enforce_gateway, stack_realm
from tests.test_proxy import Env, basic

BASE = 1_700_000_000 * 10**9
SEC = 10**9
POLICIES = ('{team="a"}', '{env="dev"}')
STREAMS = [  # (labels, visible under POLICIES)
    ({"app": "x", "team": "a", "build": "0", "ver": "123", "pod": "7"}, True),
    ({"app": "y", "env": "dev", "build": "5", "ver": "abc", "id": "0b7e5c3c-59a4-4c6d-9a52-3b0a5d1f1f00"}, True),
    ({"app": "y", "team": "a", "env": "dev", "build": "0", "ver": "abc"}, True),  # seen under both
    ({"app": "z", "team": "b", "env": "prod", "zone": "eu", "ver": "zzz"}, False),
]


def fake(visible_only: bool) -> FakeLoki:
    return FakeLoki([Stream(labels, ((BASE + i * SEC, "line"),)) for i, (labels, vis) in enumerate(STREAMS)
                     if vis or not visible_only], now_ns=BASE + 60 * SEC)


@pytest.fixture
async def env(db_dsn: str, aiohttp_client: Any, aiohttp_server: Any) -> AsyncIterator[tuple[Env, FakeLoki]]:
    loki = fake(False)
    server = await aiohttp_server(loki.app())
    async with enforce_gateway(db_dsn, aiohttp_client, aiohttp_server, f"http://127.0.0.1:{server.port}") as e:
        yield e, loki


async def test_detected_labels_equal_the_visible_only_tenant(env: tuple[Env, FakeLoki]) -> None:
    gw, loki = env
    tok = await gw.token(["logs:read"], stack_realm(POLICIES))
    truth = fake(True)
    for query in (None, '{app=~"x|y"}', '{app="y"}'):
        p = {"start": str(BASE), "end": str(BASE + 60 * SEC), **({"query": query} if query else {})}
        n = len(loki.seen)
        r = await gw.gw.client.get("/loki/api/v1/detected_labels", params=p, headers=basic("100", tok))
        assert r.status == 200, await r.text()
        got = (await r.json())["detectedLabels"]
        assert got == truth.detected_labels(p)["detectedLabels"], query
        assert [path for path, _ in loki.seen[n:]] == ["/loki/api/v1/series"]  # one request for all selectors
    names = {d["label"]: d["cardinality"] for d in got}
    assert "zone" not in names  # only on the invisible stream
    # union of the three visible streams: build {0, 5} are all numbers (dropped, though "0" alone is a boolean),
    # ver {123, abc} is kept with both values, pod is static
    p = {"start": str(BASE), "end": str(BASE + 60 * SEC)}
    r = await gw.gw.client.get("/loki/api/v1/detected_labels", params=p, headers=basic("100", tok))
    names = {d["label"]: d["cardinality"] for d in (await r.json())["detectedLabels"]}
    assert names == {"app": 2, "env": 1, "team": 1, "ver": 2, "pod": 1}, names


def test_rules() -> None:
    assert should_reject(set()) and should_reject({"12", "3.5"}) and should_reject({"0b7e5c3c59a44c6d9a523b0a5d1f1f00"})
    assert should_reject({"{0b7e5c3c-59a4-4c6d-9a52-3b0a5d1f1f00}", "1e3", "0x1p4", "NaN"})
    assert not should_reject({"0", "1"}) and not should_reject({"1"}) and should_reject({"0", "1", "2"})
    assert not should_reject({"12", "abc"}) and not should_reject({"1e400"})  # out of float64 range: not a number
    assert detected_labels([{"pod": "1", "a": ""}, {"pod": "2"}]) == [{"label": "pod", "cardinality": 2}]
