"""A real Prometheus agent remote-writes through the gateway into a real Prometheus, and reads back."""

from __future__ import annotations

import asyncio
import base64
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

from tests.conftest import bootstrap_token, make_config
from tests.e2e.prom import PrometheusProcess, require_prometheus


def _basic(user: str, token: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{token}".encode()).decode()}


async def _token(client: Any, admin: str, name: str, scopes: list[str]) -> str:
    h = {"Authorization": f"Bearer {admin}"}
    r = await client.post("/api/v1/accesspolicies", headers=h, json={
        "name": name, "scopes": scopes, "realms": [{"type": "stack", "identifier": "100"}]})
    policy = await r.json()
    r = await client.post("/api/v1/tokens", headers=h, json={"accessPolicyId": policy["id"], "name": name})
    return str((await r.json())["token"])


async def test_remote_write_and_read_back_through_the_gateway(db_dsn: str, aiohttp_server: Any,
                                                              aiohttp_client: Any) -> None:
    require_prometheus()
    from gateway.app import build_app, close_state, open_state

    with tempfile.TemporaryDirectory() as tsdb, \
            PrometheusProcess(Path(tsdb), remote_write_receiver=True, route_prefix="/prometheus") as receiver:
        base = receiver.url.removesuffix("/prometheus")
        state = await open_state(make_config(db_dsn, upstreams={"metrics": {"url": base, "lbac": "enforce"}}))
        try:
            server = await aiohttp_server(build_app(state))
            client = await aiohttp_client(server)
            admin = await bootstrap_token(state)
            writer = await _token(client, admin, "agent", ["metrics:write"])
            reader = await _token(client, admin, "grafana", ["metrics:read"])
            gw = f"http://127.0.0.1:{server.port}"
            agent_cfg = (
                "global: {scrape_interval: 1s}\n"
                "scrape_configs:\n"
                "  - job_name: agent\n"  # the agent scrapes the receiver: any real target will do
                "    metrics_path: /prometheus/metrics\n"
                f"    static_configs: [{{targets: ['127.0.0.1:{receiver.port}']}}]\n"
                "remote_write:\n"
                f"  - url: {gw}/prometheus/api/v1/write\n"
                "    basic_auth: {username: '100', password: '" + writer + "'}\n"
                "    queue_config: {batch_send_deadline: 1s}\n"
                "  - url: " + gw + "/prometheus/api/v1/write\n"
                "    basic_auth: {username: '100', password: '" + reader + "'}\n"
                "    write_relabel_configs: [{target_label: via, replacement: reader}]\n"
            )
            with tempfile.TemporaryDirectory() as agent_tsdb:
                with PrometheusProcess(Path(agent_tsdb), config_yaml=agent_cfg):
                    found: list[Any] = []
                    deadline = time.monotonic() + 40
                    while time.monotonic() < deadline and not found:
                        r = await client.get("/prometheus/api/v1/query", params={"query": 'up{job="agent"}'},
                                             headers=_basic("100", reader))
                        assert r.status == 200, await r.text()
                        found = (await r.json())["data"]["result"]
                        await asyncio.sleep(0.5)
                    assert found, "samples written through the gateway never arrived"
                    assert all(s["metric"].get("via") != "reader" for s in found), "a read token could write"
                    r = await client.get("/prometheus/api/v1/query", params={"query": "up"},
                                         headers=_basic("100", writer))
                    assert r.status == 403 and "metrics:read" in (await r.json())["error"]
                    r = await client.post("/prometheus/api/v1/write", data=b"x", headers=_basic("100", reader))
                    assert r.status == 403
                    async with aiohttp.ClientSession() as s, s.get(f"{gw}/metrics") as m:
                        text = await m.text()
                    assert 'code="403",scope="metrics:write"' in text  # the reader's remote_write was refused
        finally:
            await close_state(state)
