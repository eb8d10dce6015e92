"""A fake Mimir/Loki ruler and Mimir Alertmanager, in the shapes the real ones answer.

Written from the real formats: the ruler's configuration API answers YAML ``map[namespace][]RuleGroup``
(Mimir pkg/ruler/api.go ``ListRules``/``GetRuleGroup``, 404 for an unknown namespace or group, Loki the
same through its ruler); rule state is Prometheus's ``/api/v1/rules`` and ``/api/v1/alerts`` JSON
(``{"status":"success","data":{"groups":[{"name","file","rules":[{"name","query","type",...}]}]}}``,
``{"data":{"alerts":[{"labels","annotations","state","activeAt","value"}]}}``). The Alertmanager is API v2
(prometheus/alertmanager api/v2/openapi.yaml): ``gettableAlerts``, ``alertGroups`` (``labels``,
``receiver``, ``alerts``), ``gettableSilences`` (``id``, ``matchers`` of ``name``/``value``/``isRegex``/
``isEqual``, ``status.state``...), ``GET|DELETE /silence/{id}`` (404 when unknown), ``POST /silences``
answering ``{"silenceID": ...}``, ``POST /alerts`` answering 200 empty. ``seen`` records each request.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any

import yaml
from aiohttp import web


@dataclass
class FakeRuler:
    #: namespace -> groups, each ``{"name", "rules": [{"alert"|"record", "expr", "labels"?}]}``
    namespaces: dict[str, list[dict[str, Any]]]
    alerts: list[dict[str, Any]] = field(default_factory=list)  # label sets of firing alerts
    silences: dict[str, dict[str, Any]] = field(default_factory=dict)
    seen: list[tuple[str, str, bytes]] = field(default_factory=list)

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._record])
        r = app.router
        for prefix in ("/prometheus/config/v1/rules", "/loki/api/v1/rules", "/api/prom/rules"):
            r.add_get(prefix, self.config_all)
            r.add_get(prefix + "/{ns}", self.config_ns)
            r.add_get(prefix + "/{ns}/{group}", self.config_group)
        r.add_get("/prometheus/api/v1/rules", self.rule_state)
        r.add_get("/prometheus/api/v1/alerts", self.alert_state)
        am = "/alertmanager/api/v2"
        r.add_get(am + "/alerts", self.am_alerts)
        r.add_post(am + "/alerts", self.am_post_alerts)
        r.add_get(am + "/alerts/groups", self.am_groups)
        r.add_get(am + "/silences", self.am_silences)
        r.add_post(am + "/silences", self.am_post_silence)
        r.add_get(am + "/silence/{id}", self.am_silence)
        r.add_delete(am + "/silence/{id}", self.am_delete_silence)
        r.add_get(am + "/status", self.am_status)
        return app

    @web.middleware
    async def _record(self, request: web.Request, handler: Any) -> web.StreamResponse:
        self.seen.append((request.method, request.path_qs, await request.read()))
        return await handler(request)

    # ------------------------------------------------------------------ ruler

    @staticmethod
    def _yaml(doc: Any) -> web.Response:
        return web.Response(text=yaml.safe_dump(doc, sort_keys=False), content_type="application/yaml")

    async def config_all(self, _: web.Request) -> web.Response:
        return self._yaml(self.namespaces)

    async def config_ns(self, request: web.Request) -> web.Response:
        ns = request.match_info["ns"]
        if ns not in self.namespaces:
            raise web.HTTPNotFound(text="no rule groups found")
        return self._yaml({ns: self.namespaces[ns]})

    async def config_group(self, request: web.Request) -> web.Response:
        for g in self.namespaces.get(request.match_info["ns"], []):
            if g["name"] == request.match_info["group"]:
                return self._yaml(g)
        raise web.HTTPNotFound(text="group does not exist")

    def _firing(self, alertname: str) -> list[dict[str, Any]]:
        return [{"labels": a, "annotations": {}, "state": "firing", "activeAt": "2026-01-01T00:00:00Z",
                 "value": "1e+00"} for a in self.alerts if a.get("alertname") == alertname]

    async def rule_state(self, _: web.Request) -> web.Response:
        groups = []
        for ns, gs in self.namespaces.items():
            for g in gs:
                rules = []
                for rule in g["rules"]:
                    if "alert" in rule:
                        rules.append({"state": "firing", "name": rule["alert"], "query": rule["expr"],
                                      "duration": 0, "labels": rule.get("labels", {}), "annotations": {},
                                      "alerts": self._firing(rule["alert"]), "health": "ok", "type": "alerting"})
                    else:
                        rules.append({"name": rule["record"], "query": rule["expr"], "health": "ok",
                                      "type": "recording"})
                groups.append({"name": g["name"], "file": ns, "rules": rules, "interval": 60,
                               "lastEvaluation": "2026-01-01T00:00:00Z", "evaluationTime": 0.001})
        return web.json_response({"status": "success", "data": {"groups": groups}})

    async def alert_state(self, _: web.Request) -> web.Response:
        alerts = [x for a in {a.get("alertname", "") for a in self.alerts} for x in self._firing(a)]
        return web.json_response({"status": "success", "data": {"alerts": alerts}})

    # ------------------------------------------------------------------ Alertmanager v2

    def _gettable(self, labels: dict[str, str]) -> dict[str, Any]:
        return {"labels": labels, "annotations": {}, "startsAt": "2026-01-01T00:00:00Z",
                "endsAt": "2026-01-01T01:00:00Z", "updatedAt": "2026-01-01T00:00:00Z",
                "fingerprint": uuid.uuid5(uuid.NAMESPACE_OID, json.dumps(labels, sort_keys=True)).hex[:16],
                "receivers": [{"name": "team"}], "status": {"state": "active", "silencedBy": [], "inhibitedBy": []}}

    async def am_alerts(self, _: web.Request) -> web.Response:
        return web.json_response([self._gettable(a) for a in self.alerts])

    async def am_post_alerts(self, request: web.Request) -> web.Response:
        for a in await request.json():
            self.alerts.append(a["labels"])
        return web.Response(status=200)

    async def am_groups(self, _: web.Request) -> web.Response:
        by: dict[str, list[dict[str, Any]]] = {}
        for a in self.alerts:  # grouped by alertname, as a route with group_by: [alertname]
            by.setdefault(a.get("alertname", ""), []).append(self._gettable(a))
        everything = {"labels": {}, "receiver": {"name": "all"}, "alerts": [self._gettable(a) for a in self.alerts]}
        return web.json_response([{"labels": {"alertname": k}, "receiver": {"name": "team"}, "alerts": v}
                                  for k, v in by.items()] + [everything])

    async def am_silences(self, _: web.Request) -> web.Response:
        return web.json_response(list(self.silences.values()))

    async def am_silence(self, request: web.Request) -> web.Response:
        s = self.silences.get(request.match_info["id"])
        if s is None:
            return web.Response(status=404, text=f"silence {request.match_info['id']} not found")
        return web.json_response(s)

    async def am_delete_silence(self, request: web.Request) -> web.Response:
        s = self.silences.get(request.match_info["id"])
        if s is None:
            return web.Response(status=404, text="silence not found")
        s["status"] = {"state": "expired"}
        return web.Response(status=200)

    async def am_post_silence(self, request: web.Request) -> web.Response:
        body = await request.json()
        old = body.get("id")
        if old:
            if old not in self.silences:
                return web.Response(status=404, text=f"silence {old} not found")
            self.silences[old]["status"] = {"state": "expired"}
        sid = str(uuid.uuid4())
        self.silences[sid] = {**body, "id": sid, "status": {"state": "active"},
                              "updatedAt": "2026-01-01T00:00:00Z"}
        return web.json_response({"silenceID": sid})

    async def am_status(self, _: web.Request) -> web.Response:
        return web.json_response({"config": {"original": "route:\n  receiver: team\n"}, "cluster": {}})


def silence(*matchers: tuple[str, str, bool, bool], sid: str | None = None) -> dict[str, Any]:
    """A gettable silence from ``(name, value, isRegex, isEqual)`` matchers."""
    return {"id": sid or str(uuid.uuid4()), "status": {"state": "active"}, "updatedAt": "2026-01-01T00:00:00Z",
            "matchers": [{"name": n, "value": v, "isRegex": r, "isEqual": e} for n, v, r, e in matchers],
            "startsAt": "2026-01-01T00:00:00Z", "endsAt": "2026-01-02T00:00:00Z", "createdBy": "t", "comment": "c"}
