"""Slowloris-style clients against a real `gateway serve` (issue 12, item 4): a head trickled one line
at a time and a body that stalls are closed by the read deadlines; a client that is slow but keeps
sending is not; a worker holds at most `limits.max_connections` connections."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.conftest import bootstrap_token, make_config
from tests.e2e.gateway_proc import GatewayProcess

HEAD_TIMEOUT = 1.5
BODY_IDLE = 1.0


async def _read_until_closed(reader: asyncio.StreamReader, limit: float) -> tuple[bytes, float]:
    """Everything the server sends until it closes (or ``limit`` seconds pass), and when it closed."""
    started = time.monotonic()
    got = b""
    try:
        async with asyncio.timeout(limit):
            while chunk := await reader.read(65536):
                got += chunk
    except TimeoutError:
        return got, float("inf")
    except ConnectionResetError:
        pass
    return got, time.monotonic() - started


@pytest.fixture
async def guarded(tmp_path: Path, db_dsn: str) -> AsyncIterator[tuple[GatewayProcess, str]]:
    from gateway.app import close_state, open_state
    state = await open_state(make_config(db_dsn))
    admin = await bootstrap_token(state)
    await close_state(state)
    gw = GatewayProcess(tmp_path, db_dsn, "edge", limits={"head_timeout": HEAD_TIMEOUT,
                                                          "body_idle_timeout": BODY_IDLE})
    await asyncio.to_thread(gw.start)
    yield gw, admin
    assert gw.stop() == 0


async def test_a_trickled_head_is_closed_with_408(guarded: tuple[GatewayProcess, str]) -> None:
    gw, _ = guarded
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\n")

    async def trickle() -> None:
        for i in range(40):  # one header line every 0.4 s: forever, as far as the deadline is concerned
            await asyncio.sleep(0.4)
            writer.write(f"X-Slow-{i}: y\r\n".encode())
    feeding = asyncio.create_task(trickle())
    try:
        got, closed_after = await _read_until_closed(reader, HEAD_TIMEOUT + 10)
    finally:
        feeding.cancel()
        writer.close()
    assert closed_after < HEAD_TIMEOUT + 10, "a trickled request head kept its connection open"
    head, _, body = got.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408 ") and b"Content-Type: application/json" in head
    assert "request head not received" in json.loads(body)["error"]


async def test_a_silent_connection_is_closed_too(guarded: tuple[GatewayProcess, str]) -> None:
    gw, _ = guarded
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    got, closed_after = await _read_until_closed(reader, HEAD_TIMEOUT + 10)
    writer.close()
    assert closed_after < HEAD_TIMEOUT + 10 and got.startswith(b"HTTP/1.1 408 ")


def _post(admin: str, length: int) -> bytes:
    return (f"POST /api/v1/accesspolicies HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {admin}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {length}\r\n\r\n").encode()


async def test_a_stalled_body_is_closed(guarded: tuple[GatewayProcess, str]) -> None:
    gw, admin = guarded
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    writer.write(_post(admin, 100) + b'{"name": ')  # then nothing more
    got, closed_after = await _read_until_closed(reader, BODY_IDLE + 10)
    writer.close()
    assert closed_after < BODY_IDLE + 10, "a stalled request body kept its connection open"
    assert b"200 OK" not in got


async def test_a_slow_but_steady_body_is_served(guarded: tuple[GatewayProcess, str]) -> None:
    """The body deadline is between chunks, not for the whole body."""
    gw, admin = guarded
    body = json.dumps({"name": "steady", "scopes": ["metrics:read"],
                       "realms": [{"type": "org", "identifier": "1"}]}).encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    writer.write(_post(admin, len(body)))
    step = max(1, len(body) // 8)
    for i in range(0, len(body), step):  # ~9 chunks, BODY_IDLE / 3 apart: longer than BODY_IDLE in all
        await asyncio.sleep(BODY_IDLE / 3)
        writer.write(body[i:i + step])
    status = await asyncio.wait_for(reader.readline(), 10)
    writer.close()
    assert status.startswith(b"HTTP/1.1 200 "), status


async def test_a_worker_holds_at_most_max_connections(tmp_path: Path, db_dsn: str) -> None:
    gw = GatewayProcess(tmp_path, db_dsn, "cap", limits={"max_connections": 3})
    await asyncio.to_thread(gw.start)
    held: list[asyncio.StreamWriter] = []
    try:
        for _ in range(3):
            _, w = await asyncio.open_connection("127.0.0.1", gw.port)
            held.append(w)
        await asyncio.sleep(0.2)
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        got, closed_after = await _read_until_closed(reader, 10)
        writer.close()
        head, _, body = got.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 503 ") and b"Retry-After: 1" in head, got
        assert "too many connections" in json.loads(body)["error"]
        held.pop().close()  # one goes away: a new connection is served again
        await asyncio.sleep(0.3)
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        got, _ = await _read_until_closed(reader, 10)
        writer.close()
        assert got.startswith(b"HTTP/1.1 200 "), got
    finally:
        for w in held:
            w.close()
        assert gw.stop() == 0
