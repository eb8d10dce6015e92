"""A small Pyroscope for tests: what the gateway's profiles routes depend on, answered as Pyroscope does.

Written from grafana/pyroscope (main, 2026-08):

* tenancy: every route is wrapped in dskit's ``middleware.AuthenticateUser`` (HTTP) or the tenant
  interceptor (Connect, ``pkg/tenant/interceptor.go``): a request without ``X-Scope-OrgID`` is refused
  with 401 (``no org id``); each tenant's data is its own;
* ``POST /ingest`` and ``/pyroscope/ingest`` (``pkg/ingester/pyroscope/ingest_handler.go``): the series is
  the query parameter ``name``, ``app{k=v,...}`` (``labelset.Parse``: the app name becomes
  ``service_name``); a bad ``name`` is a 400; the profile is the body; the answer is 200 with no body;
* Connect unary procedures (``connectrpc.com/connect``, registered by ``querierv1connect`` and
  ``pushv1connect``): POST only (else 405 with ``Allow: POST``); the JSON codec for
  ``application/json`` (this fake speaks only it: anything else is 415, as Connect answers an
  unsupported codec); errors are ``{"code": "...", "message": "..."}`` with Connect's HTTP status;
* ``/push.v1.PusherService/Push``: ``{"series": [{"labels": [{"name", "value"}], "samples": [{"ID",
  "rawProfile"}]}]}``, answered ``{}``;
* ``/querier.v1.QuerierService/LabelNames`` and ``LabelValues`` (``types.v1.LabelNamesRequest``,
  ``LabelValuesRequest``: ``matchers``, ``name``): ``{"names": [...]}`` sorted, from the tenant's series
  (matchers here: ``{k="v"}`` equality only); ``ProfileTypes``: ``{"profileTypes": [{"ID", "name"}]}``;
* ``GET /pyroscope/label-values?label=...`` (``pkg/querier/http.go``): a JSON list; ``label`` missing
  is a 400 (``invalid_argument``).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

_LABELSET = re.compile(r"^([^{}]+)(?:\{(.*)\})?$")
_MATCHER = re.compile(r'\s*([A-Za-z_][A-Za-z0-9_.]*)\s*=\s*"([^"]*)"\s*')
_CONNECT_STATUS = {"invalid_argument": 400, "unauthenticated": 401, "unimplemented": 404, "internal": 500}
PROFILE_TYPE = "process_cpu:cpu:nanoseconds:cpu:nanoseconds"


@dataclass
class FakePyroscope:
    """Series per tenant (each a frozenset of label pairs), and every request's tenant header as seen."""

    series: dict[str, set[frozenset[tuple[str, str]]]] = field(default_factory=dict)
    tenants_seen: list[str | None] = field(default_factory=list)

    def app(self) -> web.Application:
        app = web.Application()
        for path in ("/ingest", "/pyroscope/ingest"):
            app.router.add_route("*", path, self.ingest)
        app.router.add_route("*", "/push.v1.PusherService/Push", self._connect(self.push))
        app.router.add_route("*", "/querier.v1.QuerierService/LabelNames", self._connect(self.label_names))
        app.router.add_route("*", "/querier.v1.QuerierService/LabelValues", self._connect(self.label_values))
        app.router.add_route("*", "/querier.v1.QuerierService/ProfileTypes", self._connect(self.profile_types))
        app.router.add_get("/pyroscope/label-values", self.http_label_values)
        return app

    def _tenant(self, request: web.Request) -> str | None:
        tenant = request.headers.get("X-Scope-OrgID")
        self.tenants_seen.append(tenant)
        return tenant

    async def ingest(self, request: web.Request) -> web.Response:
        if request.method != "POST":
            return web.Response(status=405, text="405 method not allowed\n")
        tenant = self._tenant(request)
        if not tenant:
            return web.Response(status=401, text="no org id\n")
        m = _LABELSET.match(request.query.get("name", ""))
        if m is None:
            return web.Response(status=400, text="failed to parse request metadata\n")
        labels = {"service_name": m.group(1).strip()}
        for pair in filter(None, (m.group(2) or "").split(",")):
            key, _, value = pair.partition("=")
            labels[key.strip()] = value.strip()
        await request.read()
        self.series.setdefault(tenant, set()).add(frozenset(labels.items()))
        return web.Response(status=200)

    def _connect(self, handler: Any) -> Any:
        async def serve(request: web.Request) -> web.Response:
            if request.method != "POST":
                return web.Response(status=405, headers={"Allow": "POST"})
            if request.content_type != "application/json":
                return web.Response(status=415, headers={"Accept-Post": "application/json, application/proto"})
            tenant = self._tenant(request)
            if not tenant:
                return _connect_error("unauthenticated", "no org id")
            try:
                body = json.loads(await request.read() or b"{}")
            except ValueError:
                return _connect_error("invalid_argument", "unmarshal into message: invalid JSON")
            return web.json_response(handler(tenant, body))
        return serve

    def push(self, tenant: str, body: dict[str, Any]) -> dict[str, Any]:
        for s in body.get("series", []):
            self.series.setdefault(tenant, set()).add(frozenset((p["name"], p["value"]) for p in s["labels"]))
        return {}

    def _matching(self, tenant: str, matchers: list[str]) -> list[dict[str, str]]:
        wanted = [dict(_MATCHER.findall(m.strip().strip("{}"))) for m in matchers if m.strip("{} ")]
        rows = [dict(s) for s in self.series.get(tenant, set())]
        return [r for r in rows if not wanted or any(all(r.get(k) == v for k, v in w.items()) for w in wanted)]

    def label_names(self, tenant: str, body: dict[str, Any]) -> dict[str, Any]:
        return {"names": sorted({k for r in self._matching(tenant, body.get("matchers", [])) for k in r})}

    def label_values(self, tenant: str, body: dict[str, Any]) -> dict[str, Any]:
        name = body.get("name", "")
        return {"names": sorted({r[name] for r in self._matching(tenant, body.get("matchers", [])) if name in r})}

    def profile_types(self, tenant: str, _body: dict[str, Any]) -> dict[str, Any]:
        return {"profileTypes": [{"ID": PROFILE_TYPE, "name": "process_cpu"}] if self.series.get(tenant) else []}

    async def http_label_values(self, request: web.Request) -> web.Response:
        tenant = self._tenant(request)
        if not tenant:
            return web.Response(status=401, text="no org id\n")
        label = request.query.get("label", "")
        if not label:
            return _connect_error("invalid_argument", "label parameter is required")
        return web.json_response(self.label_values(tenant, {"name": label})["names"])


def _connect_error(code: str, message: str) -> web.Response:
    return web.json_response({"code": code, "message": message}, status=_CONNECT_STATUS[code])
