"""A fake Tempo query frontend, in the shapes the real one answers (grafana/tempo).

Written from Tempo's code: ``pkg/tempopb/tempo.proto`` (``Trace`` = repeated ``ResourceSpans`` as field 1;
``TraceByIDResponse`` = trace 1, metrics 2, status 3, message 4; ``SearchResponse``, ``SearchTagsResponse``,
``SearchTagsV2Response``, ``SearchTagValuesResponse``, ``SearchTagValuesV2Response``), the frontend's
combiners (``modules/frontend/combiner/trace_by_id.go``: v1 answers ``tempopb.MarshalToJSONV1``, i.e. gogo
``jsonpb`` with ``resourceSpans`` renamed ``batches``, or ``proto.Marshal`` for ``Accept:
application/protobuf``, and a trace it does not have is a 404 with no body; ``trace_by_id_v2.go`` and
``common.go``: the v2 ``TraceByIDResponse`` in jsonpb or protobuf, default fields omitted) and ``pkg/api``
(``Accept`` picks the format; parameter names). jsonpb writes OTLP field names in lowerCamelCase, IDs
in base64, 64-bit integers as strings and enums by name: the traces given to the fake are in that form
(``resourceSpans`` lists) and turned into protobuf with the OTLP messages (wire-identical to tempopb's).

Search, tags, tag values and metrics answer in their shapes without evaluating TraceQL: ``seen``
records every request (method, path and query string, ``Accept``) so tests can check what was sent.
"""

from __future__ import annotations

import base64
import copy
import gzip
import json
from dataclasses import dataclass, field
from typing import Any, Final

from aiohttp import web
from google.protobuf import json_format
from opentelemetry.proto.trace.v1 import trace_pb2

PROTOBUF = "application/protobuf"
#: ``metrics`` as jsonpb writes ``MetadataMetrics`` and ``SearchMetrics`` (64-bit counts as strings).
_SCANNED: Final = {"inspectedBytes": "14463", "totalBlockBytes": "90000", "completedJobs": 1, "totalJobs": 1}


def span(trace_id: bytes, span_id: bytes, name: str, parent: bytes = b"", **extra: Any) -> dict[str, Any]:
    """One span as jsonpb writes it (IDs base64, times as strings, the kind by name)."""
    out: dict[str, Any] = {"traceId": base64.b64encode(trace_id).decode(), "spanId": base64.b64encode(span_id).decode(),
                           "name": name, "kind": "SPAN_KIND_SERVER", "startTimeUnixNano": "1700000000000000000",
                           "endTimeUnixNano": "1700000001000000000"}
    if parent:
        out["parentSpanId"] = base64.b64encode(parent).decode()
    out.update(extra)
    return out


def attrs(**kv: str | int) -> list[dict[str, Any]]:
    """OTLP key-values (``int`` values as jsonpb writes ``intValue``: a string)."""
    return [{"key": k.replace("__", "."), "value": {"intValue": str(v)} if isinstance(v, int) else
             {"stringValue": v}} for k, v in kv.items()]


def resource_spans(resource: list[dict[str, Any]], *spans: dict[str, Any], scope: str = "lib") -> dict[str, Any]:
    return {"resource": {"attributes": resource}, "scopeSpans": [{"scope": {"name": scope, "version": "1.0"},
                                                                  "spans": list(spans)}]}


def to_proto(batches: list[dict[str, Any]]) -> bytes:
    """``proto.Marshal`` of a tempopb.Trace with these ResourceSpans."""
    return json_format.ParseDict({"resourceSpans": batches}, trace_pb2.TracesData()).SerializeToString()


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


@dataclass
class FakeTempo:
    #: trace ID (32 hex digits, lower case) -> its ResourceSpans in jsonpb form
    traces: dict[str, list[dict[str, Any]]]
    tag_names: dict[str, list[str]] = field(default_factory=lambda: {"resource": ["env", "service.name"],
                                                                      "span": ["http.method"]})
    tag_values: dict[str, list[str]] = field(default_factory=dict)
    seen: list[tuple[str, str, str]] = field(default_factory=list)  # (method, path?query, Accept)
    #: ``span_pruning_enabled_by_default`` (modules/frontend/config.go): v2 prunes unless ``span_pruning`` says false
    prune_by_default: bool = False
    gzip: bool = False  # answer gzip-compressed when the request accepts it (as a compressing proxy would)
    #: byte replacements in protobuf answers: Tempo (gogo) keeps whatever bytes a writer sent, UTF-8 or not
    proto_bytes: list[tuple[bytes, bytes]] = field(default_factory=list)

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._record])
        r = app.router
        r.add_get("/api/traces/{id}", self.trace_v1)
        r.add_get("/api/v2/traces/{id}", self.trace_v2)
        r.add_get("/api/search", self.search)
        r.add_get("/api/search/tags", self.tags_v1)
        r.add_get("/api/v2/search/tags", self.tags_v2)
        r.add_get("/api/search/tag/{name:.+}/values", self.values_v1)
        r.add_get("/api/v2/search/tag/{name:.+}/values", self.values_v2)
        r.add_get("/api/metrics/query_range", self.metrics)
        r.add_get("/api/metrics/query", self.metrics)
        r.add_get("/api/echo", self.echo)
        return app

    @web.middleware
    async def _record(self, request: web.Request, handler: Any) -> web.StreamResponse:
        self.seen.append((request.method, request.path_qs, request.headers.get("Accept", "")))
        resp = await handler(request)
        if self.gzip and "gzip" in request.headers.get("Accept-Encoding", "") and isinstance(resp, web.Response) \
                and resp.body:
            assert isinstance(resp.body, bytes)
            resp.body = gzip.compress(resp.body)
            resp.headers["Content-Encoding"] = "gzip"
        return resp

    def _proto(self, batches: list[dict[str, Any]]) -> bytes:
        raw = to_proto(batches)
        for old, new in self.proto_bytes:
            raw = raw.replace(old, new)
        return raw

    def _find(self, request: web.Request) -> list[dict[str, Any]] | None:
        tid = request.match_info["id"].lower().rjust(32, "0")
        return self.traces.get(tid)

    @staticmethod
    def _protobuf(request: web.Request) -> bool:
        return PROTOBUF in request.headers.get("Accept", "")  # pkg/api MarshalingFormatFromAcceptHeader

    async def trace_v1(self, request: web.Request) -> web.Response:
        found = self._find(request)
        if found is None:
            return web.Response(status=404)  # combiner: every job 404 -> 404, no body
        if self._protobuf(request):
            return web.Response(body=self._proto(found), headers={"Content-Type": PROTOBUF})
        return web.Response(body=json.dumps({"batches": found}).encode(), headers={"Content-Type": "application/json"})

    async def trace_v2(self, request: web.Request) -> web.Response:
        found = self._find(request)
        if found is None:
            return web.Response(status=404)
        if self.prune_by_default and request.query.get("span_pruning", "") not in _FALSE:
            found = _pruned(found)
        inspected = 1000 + len(found)
        if self._protobuf(request):
            trace = self._proto(found)
            metrics = b"\x08" + _varint(inspected)  # TraceByIDMetrics.inspectedBytes = 1
            body = b"\x0a" + _varint(len(trace)) + trace + b"\x12" + _varint(len(metrics)) + metrics
            return web.Response(body=body, headers={"Content-Type": PROTOBUF})
        doc = {"trace": {"resourceSpans": found}, "metrics": {"inspectedBytes": str(inspected)}}
        return web.Response(body=json.dumps(doc).encode(), headers={"Content-Type": "application/json"})

    async def search(self, request: web.Request) -> web.Response:
        traces = []
        for tid, batches in self.traces.items():
            first = batches[0]["scopeSpans"][0]["spans"][0]
            service = next((a["value"].get("stringValue", "") for a in batches[0]["resource"]["attributes"]
                            if a["key"] == "service.name"), "")
            traces.append({"traceID": tid, "rootServiceName": service, "rootTraceName": first["name"],
                           "startTimeUnixNano": first["startTimeUnixNano"], "durationMs": 1000,
                           "spanSets": [{"spans": [{"spanID": base64.b64decode(first["spanId"]).hex(),
                                                    "startTimeUnixNano": first["startTimeUnixNano"],
                                                    "durationNanos": "1000000000"}], "matched": 1}]})
        return web.json_response({"traces": traces, "metrics": {"inspectedTraces": len(traces),
                                                                "completedJobs": 1, "totalJobs": 1}})

    async def tags_v1(self, request: web.Request) -> web.Response:
        names = sorted({n for ns in self.tag_names.values() for n in ns})
        return web.json_response({"tagNames": names, "metrics": {"completedJobs": 1, "totalJobs": 1}})

    async def tags_v2(self, request: web.Request) -> web.Response:
        """``ParseSearchTagsRequest``: a scope ``AttributeScopeFromString`` knows or ``intrinsic``, else 400;
        the frontend lists the intrinsics for ``""``, ``none`` and ``intrinsic`` (``tag_handlers.go``)."""
        scope = request.query.get("scope", "")
        if scope not in ("", "none", "intrinsic", "trace", "resource", "span", "event", "link", "instrumentation"):
            return web.Response(status=400, text=f"invalid scope: {scope}")
        scopes = [{"name": s, "tags": t} for s, t in self.tag_names.items() if scope in ("", "none", s)]
        if scope in ("", "none", "intrinsic"):
            scopes.append({"name": "intrinsic", "tags": ["duration", "name", "status"]})
        return web.json_response({"scopes": scopes, "metrics": _SCANNED})

    async def values_v1(self, request: web.Request) -> web.Response:
        values = self.tag_values.get(request.match_info["name"], [])
        return web.json_response({"tagValues": values, "metrics": {"completedJobs": 1, "totalJobs": 1}})

    async def values_v2(self, request: web.Request) -> web.Response:
        values = self.tag_values.get(request.match_info["name"], [])
        return web.json_response({"tagValues": [{"type": "string", "value": v} for v in values],
                                  "metrics": _SCANNED})

    async def metrics(self, request: web.Request) -> web.Response:
        return web.json_response({"series": [], "metrics": {**_SCANNED, "inspectedTraces": 7, "inspectedSpans": "70"}})

    async def echo(self, request: web.Request) -> web.Response:
        return web.Response(text="echo")


_FALSE = frozenset({"0", "f", "F", "false", "FALSE", "False"})  # Go's strconv.ParseBool


def _pruned(batches: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Tempo's span pruning (pkg/spanpruning, the collector's spanpruningprocessor) in short: leaf spans of one
    trace with the same parent name, name, kind and status, whatever their resource, are replaced by one summary
    span put in the scope of the longest of them (its template), with its attributes and the group's statistics."""
    out = copy.deepcopy(batches)
    spans = [(s, ss) for rs in out for ss in rs["scopeSpans"] for s in ss["spans"]]
    by_id = {s["spanId"]: s for s, _ in spans}
    parents = {s.get("parentSpanId") for s, _ in spans}
    groups: dict[tuple[str, ...], list[tuple[dict[str, Any], dict[str, Any]]]] = {}
    for s, ss in spans:
        if s["spanId"] not in parents:
            parent = by_id.get(s.get("parentSpanId", ""), {}).get("name", "")
            key = (parent, s["name"], s.get("kind", ""), s.get("status", {}).get("code", ""))
            groups.setdefault(key, []).append((s, ss))
    for group in groups.values():
        if len(group) < 2:
            continue
        template, home = max(group, key=lambda g: int(g[0]["endTimeUnixNano"]) - int(g[0]["startTimeUnixNano"]))
        for s, ss in group:
            ss["spans"].remove(s)
        home["spans"].append({**template, "attributes": [*template.get("attributes", []), *attrs(
            aggregation__is_summary="true", aggregation__span_count=len(group))]})
    return out
