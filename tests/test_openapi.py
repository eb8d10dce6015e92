"""The admin API against its own OpenAPI document, judged by a tool that is not ours: schemathesis runs
every operation of ``GET /api/openapi.json`` against the real running API (real PostgreSQL, a bootstrap
admin token), with generated valid and invalid inputs and the document's links (create, then read,
update and delete what was created): no 5xx, no status, content type or body outside the document."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import sys
from pathlib import Path

from tests.conftest import Gateway, require

#: Bounded: a fixed seed, this many cases per operation, the whole run within the time budget (a longer
#: exploration: GATEWAY_FUZZ_SEED, GATEWAY_FUZZ_EXAMPLES, GATEWAY_FUZZ_SECONDS).
MAX_EXAMPLES = 8
CHECKS = "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance"


#: Ids only from what the run itself created, through the document's links: ids learnt from any response
#: (a list holds the admin token's own policy) let it delete or narrow its own credentials, after which
#: the rest of the run tests nothing but 401s.
_CONFIG = """
[phases.stateful]
link-calibration = false
max-steps = 10

[phases.stateful.generation]
max-examples = 40

[phases.stateful.inference]
algorithms = []

[phases.examples.extra-data-sources]
responses = false

[phases.coverage.extra-data-sources]
responses = false

[phases.fuzzing.extra-data-sources]
responses = false
"""


def _schemathesis() -> str | None:
    exe = Path(sys.executable).with_name("schemathesis")
    return str(exe) if exe.exists() else shutil.which("schemathesis")


def _shape(path: str) -> str:
    return re.sub(r"\{[^}]*\}", "{}", path)


async def test_the_document_is_served_without_a_token(gw: Gateway) -> None:
    resp = await gw.client.get("/api/openapi.json")
    assert resp.status == 200 and resp.content_type == "application/json"
    doc = await resp.json()
    assert doc["openapi"].startswith("3.") and doc["servers"] == [{"url": "/api"}]
    app = gw.client.server.app  # type: ignore[union-attr]
    routes = {(r.method.lower(), _shape(r.resource.canonical)) for r in app.router.routes()
              if r.resource is not None and r.resource.canonical.startswith("/api/")}
    documented = {(m, _shape("/api" + p)) for p, ops in doc["paths"].items() for m in ops}
    undocumented = {(m, p) for m, p in routes if m not in ("head", "*") and p != "/api/openapi.json"} - documented
    assert not undocumented, undocumented  # every admin route is in the document


async def test_schemathesis_finds_no_5xx_and_nothing_outside_the_document(gw: Gateway, tmp_path: Path) -> None:
    exe = _schemathesis()
    require(exe is not None, "schemathesis (pip install schemathesis) not found on PATH")
    assert exe is not None
    url = str(gw.client.make_url("/api/openapi.json"))
    report = tmp_path / "junit.xml"
    config = tmp_path / "schemathesis.toml"
    config.write_text(_CONFIG)
    longer = ["--max-time", os.environ["GATEWAY_FUZZ_SECONDS"]] if os.environ.get("GATEWAY_FUZZ_SECONDS") else []
    proc = await asyncio.create_subprocess_exec(
        exe, "--config-file", str(config), "run", url, "--checks", CHECKS, "--max-examples",
        os.environ.get("GATEWAY_FUZZ_EXAMPLES", str(MAX_EXAMPLES)),
        "--seed", os.environ.get("GATEWAY_FUZZ_SEED", "20261205"), *longer,
        "--phases", "examples,coverage,fuzzing,stateful", "--workers", "1", "--no-shrink",
        "--header", f"Authorization: Bearer {gw.admin_token}", "--report", "junit",
        "--report-junit-path", str(report), "--suppress-health-check", "all", "--request-timeout", "10",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, "SCHEMATHESIS_HOOKS": "tests.schemathesis_hooks", "NO_COLOR": "1",  # see that module
             "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent.parent), os.environ.get("PYTHONPATH", "")])},
        cwd=tmp_path)
    out, _ = await proc.communicate()
    text = out.decode(errors="replace")
    assert proc.returncode == 0, text[-20000:]
    assert "API Operations" in text
    # the run tested the API, not its 401s: the admin token and its policy came through untouched
    policies = await gw.api("GET", "/api/v1/accesspolicies?name=bootstrap-admin")
    assert [p["status"] for p in policies["items"]] == ["active"], policies


async def test_what_the_fuzzer_found_is_a_4xx(gw: Gateway) -> None:
    p = await gw.policy("ds", ["metrics:read"])
    resp = await gw.client.post("/api/datasources", json={"name": "m", "type": {}, "accessPolicyId": p["id"]},
                                headers=gw.auth())
    assert resp.status == 400 and (await resp.json())["field"] == "type"  # was a 500: a dict is not hashable


async def test_other_methods_on_admin_paths_are_a_405_not_the_data_path(gw: Gateway) -> None:
    """Methods the document does not list (what schemathesis's unsupported-method probes send) answer the
    admin API's JSON 405 with ``Allow``; before, they fell through to the data path's catch-all 404."""
    for method, path, allow in (("PATCH", "/api/v1/accesspolicies/x", "DELETE,GET,HEAD,POST"),
                                ("PUT", "/v1/tokens", "GET,HEAD,POST"), ("OPTIONS", "/api/teams/1/members", None),
                                ("POST", "/api/v1/accesspolicies/config", "GET,HEAD")):
        resp = await gw.client.request(method, path, headers=gw.auth())
        body = await resp.json()
        assert resp.status == 405 and body["code"] == "method_not_allowed", (method, path, body)
        if allow:
            assert resp.headers["Allow"] == allow
    resp = await gw.client.post("/api/v1/push", headers=gw.auth())  # the data path's own routes are untouched
    assert resp.status != 405
