"""The gateway against a real Tempo (grafana/tempo main, single binary), opt-in.

Runs only when ``GATEWAY_TEMPO_BIN`` names a Tempo binary; otherwise the tests are deselected
(``tests/conftest.py``). Build one from the repository's vendor directory::

    GOFLAGS=-mod=vendor GOPROXY=off CGO_ENABLED=0 go build -o /tmp/tempo ./cmd/tempo
    GATEWAY_TEMPO_BIN=/tmp/tempo .venv/bin/pytest -q tests/e2e/test_real_tempo.py

One Tempo (``target: all``, ``multitenancy_enabled``, local storage in a temporary directory)
receives OTLP/HTTP JSON spans: tenant ``t-all`` every span (services in ``env=dev``, ``env=prod`` and
one without ``env``), and for each policy (``{resource.env="dev"}``; that or
``{resource.service.name="batch"}``) a tenant with only the spans it shows (``t-dev``, ``t-two``), with
the same trace and span IDs. That tenant is the ground truth for a token whose realm carries the
policy: through the gateway (stack 100, traces tenant ``t-all``) TraceQL search, trace by ID (v1 and
v2, JSON and protobuf), tag names and values and TraceQL metrics must answer what Tempo answers for it
(trace by ID: a mixed trace's other spans kept with their intrinsic fields only; a trace with no
visible span 404). The first tests ask Tempo alone, proving the ground truth; an unrestricted token
must see ``t-all`` whole.

Where such a tenant cannot judge, the test says so: no visible span descends from a visible one
through a hidden one (the tenant lacks the link); Tempo gives a trace without its root no structure,
so structural queries (``>>``, ``>``) on a trace whose root is hidden are compared with Tempo's own
answer to the query conjoined with the policy by hand on t-all (the first test shows this is the only
difference); the policy's attributes, which Tempo returns with the spans of a query that names them,
are left out of span-set comparisons; trace-level fields of a search answer (root service, start,
duration) are not compared, since the tenant lacks the root of a mixed trace: they are checked for
leaks instead.
Tempo's configuration: only its HTTP, gRPC and OTLP/HTTP listeners on 127.0.0.1 (rings in memory),
the live store cutting traces and blocks within seconds and ``query_end_cutoff: 1s``, so every pushed
span is searchable, fetchable and counted by metrics within a few seconds of the push.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.json_format import MessageToDict

from tests.conftest import TEST_CONFIG, free_port
from tests.e2e.gateway_proc import GatewayProcess

pytestmark = pytest.mark.real_tempo

TEMPO_BIN = os.environ.get("GATEWAY_TEMPO_BIN", "")
ROOT = Path(__file__).resolve().parents[2]
ALL = "t-all"
STACK = "100"

# ---------------------------------------------------------------------------------------------- data

# service -> resource attributes; `batch` has no env (so `resource.env="dev"` does not match it).
SERVICES: dict[str, dict[str, str]] = {
    "dev-api": {"env": "dev", "team": "a"},
    "dev-db": {"env": "dev", "team": "b"},
    "prod-web": {"env": "prod", "team": "a", "prod.secret": "s3cr3t"},
    "prod-api": {"env": "prod", "team": "b"},
    "batch": {"team": "c"},
}


@dataclass(frozen=True)
class Policy:
    """A realm's trace selectors and the tenant holding exactly the spans they show (the ground truth)."""

    name: str
    tenant: str
    selectors: tuple[str, ...]
    services: frozenset[str]  # whose spans the selectors show (the test's own reading of them)
    attrs: tuple[str, ...]  # the attributes the selectors name, as Tempo returns them with matching spans
    hidden_values: tuple[str, ...]  # strings only hidden spans and resources carry
    hidden_tags: tuple[str, ...]  # attribute names only hidden spans and resources carry

    @property
    def condition(self) -> str:
        """The selectors as one TraceQL condition, as the gateway conjoins it (OR-ed when several)."""
        parts = [f"({sel.strip()[1:-1]})" for sel in self.selectors]
        return parts[0] if len(parts) == 1 else f"({' || '.join(parts)})"


_PROD_VALUES = ("prod-web", "prod-api", "s3cr3t", "x4242", "x1111", "acme-pay", "prod-queue")
_PROD_TAGS = ("prod.secret", "card.last4", "payment.provider", "queue")
POLICIES = {
    "dev": Policy("dev", "t-dev", ('{resource.env="dev"}',), frozenset({"dev-api", "dev-db"}), ("env",),
                  (*_PROD_VALUES, "batch", "job started"), (*_PROD_TAGS, "job.id")),
    # Two selectors OR-ed: batch has no env, so only the second shows it.
    "two": Policy("two", "t-two", ('{resource.env="dev"}', '{resource.service.name="batch"}'),
                  frozenset({"dev-api", "dev-db", "batch"}), ("env", "service.name"), _PROD_VALUES, _PROD_TAGS),
}


@dataclass(frozen=True)
class SpanDef:
    key: str
    parent: str | None
    service: str
    name: str
    kind: int  # OTLP SpanKind
    offset_ms: int
    duration_ms: int
    attrs: dict[str, Any] = field(default_factory=dict)
    event: str | None = None
    link_to: str | None = None  # a trace key
    error: bool = False


# trace key -> spans (root first). Under either policy no visible span descends from a visible one through a
# hidden one.
TRACES: dict[str, list[SpanDef]] = {
    "dev-only": [
        SpanDef("a", None, "dev-api", "GET /orders", 2, 0, 120, {"http.route": "/orders", "http.status_code": 200},
                event="cache miss"),
        SpanDef("b", "a", "dev-db", "SELECT orders", 3, 10, 80, {"db.system": "postgresql"}),
        SpanDef("c", "a", "dev-db", "SELECT items", 3, 95, 20, {"db.system": "postgresql"}),
    ],
    "prod-only": [
        SpanDef("a", None, "prod-web", "GET /checkout", 2, 0, 300, {"http.route": "/checkout", "card.last4": "x4242"},
                event="payment"),
        SpanDef("b", "a", "prod-api", "charge", 3, 20, 200, {"payment.provider": "acme-pay"}),
    ],
    "mixed-prod-root": [
        SpanDef("a", None, "prod-web", "GET /cart", 2, 0, 400, {"http.route": "/cart", "card.last4": "x1111"},
                event="prod event", link_to="prod-only"),
        SpanDef("b", "a", "dev-api", "GET /cart/items", 3, 30, 200, {"http.route": "/cart/items"}),
        SpanDef("c", "b", "dev-db", "SELECT cart", 3, 40, 100, {"db.system": "postgresql"}, event="slow query"),
        SpanDef("d", "a", "prod-api", "price", 3, 250, 100, {"payment.provider": "acme-pay"}, error=True),
    ],
    "mixed-dev-root": [
        SpanDef("a", None, "dev-api", "POST /jobs", 2, 0, 500, {"http.route": "/jobs"}, link_to="dev-only"),
        SpanDef("b", "a", "prod-api", "enqueue", 4, 50, 30, {"queue": "prod-queue"}),
        SpanDef("c", "a", "batch", "run job", 5, 100, 300, {"job.id": "42"}, event="job started"),
        SpanDef("d", "a", "dev-db", "INSERT job", 3, 20, 15, {"db.system": "postgresql"}),
    ],
    "dev-single": [
        SpanDef("a", None, "dev-db", "VACUUM", 1, 0, 900, {"db.system": "postgresql"}),
    ],
}
TRACE_IDS: dict[str, str] = {key: os.urandom(16).hex() for key in TRACES}
SPAN_IDS: dict[tuple[str, str], str] = {(t, s.key): os.urandom(8).hex() for t, spans in TRACES.items()
                                        for s in spans}
BASE_NS = (time.time_ns() // 10**9 - 30) * 10**9  # whole seconds: metrics buckets line up


def visible(span: SpanDef, policy: Policy | None) -> bool:
    return policy is None or span.service in policy.services


def rootless(policy: Policy) -> set[str]:
    """Traces with visible spans whose root is hidden: Tempo gives them no structure in the policy's tenant
    (vparquet's nested set model starts at a root span)."""
    return {TRACE_IDS[k] for k, spans in TRACES.items()
            if not visible(spans[0], policy) and any(visible(s, policy) for s in spans)}


def _value(v: Any) -> dict[str, Any]:
    if isinstance(v, bool):
        return {"boolValue": v}
    if isinstance(v, int):
        return {"intValue": str(v)}
    return {"stringValue": str(v)}


def _attrs(d: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"key": k, "value": _value(v)} for k, v in d.items()]


def otlp_body(policy: Policy | None) -> dict[str, Any]:
    """ExportTraceServiceRequest in OTLP/JSON (hex IDs, as the OTLP/JSON spec has them): every span, or
    those the policy shows."""
    by_service: dict[str, list[dict[str, Any]]] = {}
    for tkey, spans in TRACES.items():
        start = BASE_NS + list(TRACES).index(tkey) * 10**9
        for s in spans:
            if not visible(s, policy):
                continue
            span: dict[str, Any] = {
                "traceId": TRACE_IDS[tkey], "spanId": SPAN_IDS[(tkey, s.key)],
                "parentSpanId": SPAN_IDS[(tkey, s.parent)] if s.parent else "",
                "name": s.name, "kind": s.kind,
                "startTimeUnixNano": str(start + s.offset_ms * 10**6),
                "endTimeUnixNano": str(start + (s.offset_ms + s.duration_ms) * 10**6),
                "attributes": _attrs(s.attrs),
                "status": {"code": 2, "message": "declined"} if s.error else {"code": 1},
            }
            if s.event:
                span["events"] = [{"timeUnixNano": str(start + (s.offset_ms + 1) * 10**6), "name": s.event,
                                   "attributes": _attrs({"event.detail": s.event + " detail"})}]
            if s.link_to:
                span["links"] = [{"traceId": TRACE_IDS[s.link_to], "spanId": SPAN_IDS[(s.link_to, "a")],
                                  "attributes": _attrs({"link.reason": "follows " + s.link_to})}]
            by_service.setdefault(s.service, []).append(span)
    return {"resourceSpans": [
        {"resource": {"attributes": _attrs({"service.name": svc, **SERVICES[svc]})},
         "scopeSpans": [{"scope": {"name": "gateway-test", "version": "1"}, "spans": spans}]}
        for svc, spans in by_service.items()]}


# ---------------------------------------------------------------------------------------------- HTTP


def http(method: str, url: str, headers: dict[str, str] | None = None, body: Any = None,
         timeout: float = 30) -> tuple[int, Any, dict[str, str]]:
    data = json.dumps(body).encode() if body is not None else None
    hdrs = {"Content-Type": "application/json", **(headers or {})} if data is not None else dict(headers or {})
    req = urllib.request.Request(url, data=data, headers=hdrs, method=method)  # noqa: S310
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:  # noqa: S310
            status, raw, rh = r.status, r.read(), dict(r.headers)
    except urllib.error.HTTPError as e:
        status, raw, rh = e.code, e.read(), dict(e.headers)
    if "protobuf" in rh.get("Content-Type", "") and status == 200:
        return status, raw, rh
    try:
        return status, json.loads(raw) if raw else None, rh
    except ValueError:
        return status, raw.decode(errors="replace"), rh


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


# ---------------------------------------------------------------------------------------------- protobuf

_F = descriptor_pb2.FieldDescriptorProto
_SCALAR = {"string": _F.TYPE_STRING, "bytes": _F.TYPE_BYTES, "bool": _F.TYPE_BOOL, "int64": _F.TYPE_INT64,
           "int32": _F.TYPE_INT32, "uint32": _F.TYPE_UINT32, "uint64": _F.TYPE_UINT64, "double": _F.TYPE_DOUBLE,
           "fixed64": _F.TYPE_FIXED64, "fixed32": _F.TYPE_FIXED32}
# OTLP trace.proto / common.proto / resource.proto and tempopb's Trace and TraceByIDResponse (tempo.proto):
# name -> [(field, number, type, repeated)]. Enums (kind, status code, partial status) read as int32.
_PB: dict[str, list[tuple[str, int, str, bool]]] = {
    "AnyValue": [("string_value", 1, "string", False), ("bool_value", 2, "bool", False),
                 ("int_value", 3, "int64", False), ("double_value", 4, "double", False),
                 ("array_value", 5, "ArrayValue", False), ("kvlist_value", 6, "KeyValueList", False),
                 ("bytes_value", 7, "bytes", False)],
    "ArrayValue": [("values", 1, "AnyValue", True)],
    "KeyValueList": [("values", 1, "KeyValue", True)],
    "KeyValue": [("key", 1, "string", False), ("value", 2, "AnyValue", False)],
    "Resource": [("attributes", 1, "KeyValue", True), ("dropped_attributes_count", 2, "uint32", False)],
    "InstrumentationScope": [("name", 1, "string", False), ("version", 2, "string", False),
                             ("attributes", 3, "KeyValue", True)],
    "Event": [("time_unix_nano", 1, "fixed64", False), ("name", 2, "string", False),
              ("attributes", 3, "KeyValue", True), ("dropped_attributes_count", 4, "uint32", False)],
    "Link": [("trace_id", 1, "bytes", False), ("span_id", 2, "bytes", False), ("trace_state", 3, "string", False),
             ("attributes", 4, "KeyValue", True), ("dropped_attributes_count", 5, "uint32", False),
             ("flags", 6, "fixed32", False)],
    "Status": [("message", 2, "string", False), ("code", 3, "int32", False)],
    "Span": [("trace_id", 1, "bytes", False), ("span_id", 2, "bytes", False), ("trace_state", 3, "string", False),
             ("parent_span_id", 4, "bytes", False), ("name", 5, "string", False), ("kind", 6, "int32", False),
             ("start_time_unix_nano", 7, "fixed64", False), ("end_time_unix_nano", 8, "fixed64", False),
             ("attributes", 9, "KeyValue", True), ("dropped_attributes_count", 10, "uint32", False),
             ("events", 11, "Event", True), ("dropped_events_count", 12, "uint32", False),
             ("links", 13, "Link", True), ("dropped_links_count", 14, "uint32", False),
             ("status", 15, "Status", False), ("flags", 16, "fixed32", False)],
    "ScopeSpans": [("scope", 1, "InstrumentationScope", False), ("spans", 2, "Span", True),
                   ("schema_url", 3, "string", False)],
    "ResourceSpans": [("resource", 1, "Resource", False), ("scope_spans", 2, "ScopeSpans", True),
                      ("schema_url", 3, "string", False)],
    "Trace": [("resource_spans", 1, "ResourceSpans", True)],
    "TraceByIDResponse": [("trace", 1, "Trace", False), ("status", 3, "int32", False),
                          ("message", 4, "string", False)],
}


def _pb_classes() -> dict[str, Any]:
    fdp = descriptor_pb2.FileDescriptorProto(name="gateway_test_tempo.proto", package="gwtest", syntax="proto3")
    for name, fields in _PB.items():
        msg = fdp.message_type.add(name=name)
        for fname, number, ftype, repeated in fields:
            f = msg.field.add(name=fname, number=number,
                              label=_F.LABEL_REPEATED if repeated else _F.LABEL_OPTIONAL)
            if ftype in _SCALAR:
                f.type = _SCALAR[ftype]
            else:
                f.type, f.type_name = _F.TYPE_MESSAGE, f".gwtest.{ftype}"
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    return {n: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"gwtest.{n}")) for n in _PB}


PB = _pb_classes()

# ---------------------------------------------------------------------------------------------- normalizing

_KINDS = {"SPAN_KIND_UNSPECIFIED": 0, "SPAN_KIND_INTERNAL": 1, "SPAN_KIND_SERVER": 2, "SPAN_KIND_CLIENT": 3,
          "SPAN_KIND_PRODUCER": 4, "SPAN_KIND_CONSUMER": 5}
_CODES = {"STATUS_CODE_UNSET": 0, "STATUS_CODE_OK": 1, "STATUS_CODE_ERROR": 2}


def _id(v: Any) -> str:
    """Trace and span IDs: hex in OTLP/JSON, base64 in protobuf's JSON mapping (and older Tempo answers)."""
    s = str(v or "")
    if s and all(c in "0123456789abcdefABCDEF" for c in s) and len(s) in (16, 32):
        return s.lower()
    return base64.b64decode(s).hex() if s else ""


def _any(v: dict[str, Any]) -> Any:
    (kind, val), = v.items() if v else (("none", None),)
    return (kind, str(val))


def _kv(items: list[dict[str, Any]] | None) -> tuple[tuple[str, Any], ...]:
    return tuple(sorted((a["key"], _any(a.get("value") or {})) for a in items or []))


def _enum(v: Any, table: dict[str, int]) -> int:
    return table[v] if isinstance(v, str) else int(v or 0)


@dataclass(frozen=True)
class SpanView:
    """One span of a trace-by-ID answer, as comparable values."""

    span_id: str
    intrinsic: tuple[Any, ...]  # trace ID, parent, name, kind, start, end, status code
    resource: tuple[tuple[str, Any], ...]
    attributes: tuple[tuple[str, Any], ...]
    events: tuple[Any, ...]
    links: tuple[Any, ...]


def trace_spans(answer: dict[str, Any]) -> dict[str, SpanView]:
    """Spans of a trace in the JSON form of tempopb.Trace (v1: ``batches``; v2: ``trace.resourceSpans``)."""
    trace = answer.get("trace", answer)
    batches = trace.get("batches") or trace.get("resourceSpans") or []
    out: dict[str, SpanView] = {}
    for rs in batches:
        resource = _kv((rs.get("resource") or {}).get("attributes"))
        for ss in rs.get("scopeSpans") or rs.get("instrumentationLibrarySpans") or []:
            for s in ss.get("spans") or []:
                sid = _id(s.get("spanId"))
                assert sid not in out, f"span {sid} twice in one answer"
                status = s.get("status") or {}
                out[sid] = SpanView(
                    sid,
                    (_id(s.get("traceId")), _id(s.get("parentSpanId")), s.get("name", ""),
                     _enum(s.get("kind"), _KINDS), int(s.get("startTimeUnixNano") or 0),
                     int(s.get("endTimeUnixNano") or 0), _enum(status.get("code"), _CODES)),
                    resource, _kv(s.get("attributes")),
                    tuple(sorted((int(e.get("timeUnixNano") or 0), e.get("name", ""), _kv(e.get("attributes")))
                                 for e in s.get("events") or [])),
                    tuple(sorted((_id(k.get("traceId")), _id(k.get("spanId")), _kv(k.get("attributes")))
                                 for k in s.get("links") or [])))
    return out


def decode_trace(raw: bytes, v2: bool) -> dict[str, Any]:
    """A protobuf trace-by-ID answer (v1: tempopb.Trace; v2: TraceByIDResponse) in the JSON mapping."""
    msg = PB["TraceByIDResponse" if v2 else "Trace"].FromString(raw)
    return MessageToDict(msg)


# ---------------------------------------------------------------------------------------------- Tempo


class TempoProcess:
    """A single-binary Tempo (`target: all`) on free 127.0.0.1 ports, local storage under ``tmp``."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.port, self.grpc, self.otlp, self.gossip = free_port(), free_port(), free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        d = tmp / "data"
        ring = {"instance_addr": "127.0.0.1", "kvstore": {"store": "inmemory"}}
        cfg = {
            "target": "all",
            "multitenancy_enabled": True,
            "server": {"http_listen_address": "127.0.0.1", "http_listen_port": self.port,
                       "grpc_listen_address": "127.0.0.1", "grpc_listen_port": self.grpc, "log_level": "warn"},
            "distributor": {"receivers": {"otlp": {"protocols": {"http": {"endpoint": f"127.0.0.1:{self.otlp}"}}}},
                            "ring": ring},
            "memberlist": {"bind_addr": ["127.0.0.1"], "bind_port": self.gossip, "advertise_addr": "127.0.0.1",
                           "advertise_port": self.gossip},
            # Recent data is served by the live store: cut traces to its head block within about a second.
            "live_store": {"wal": {"path": str(d / "live-store" / "traces")},
                           "shutdown_marker_dir": str(d / "live-store" / "shutdown-marker"),
                           "ring": ring, "partition_ring": {"kvstore": {"store": "inmemory"}},
                           "flush_check_period": "1s", "max_trace_idle": "1s", "max_trace_live": "2s",
                           "max_block_duration": "2s"},
            # Metrics read data at once (the default leaves out the last 30 s as possibly incomplete).
            "query_frontend": {"query_end_cutoff": "1s"},
            "metrics_generator": {"ring": ring, "storage": {"path": str(d / "generator" / "wal")}},
            "backend_scheduler": {"local_work_path": str(d / "work")},
            "backend_worker": {"ring": ring},
            "storage": {"trace": {"backend": "local", "wal": {"path": str(d / "wal")},
                                  "local": {"path": str(d / "blocks")}}},
            "usage_report": {"reporting_enabled": False},
        }
        self.config_path = tmp / "tempo.yaml"
        self.config_path.write_text(yaml.safe_dump(cfg))
        self.log_path = tmp / "tempo.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60) -> TempoProcess:
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen([TEMPO_BIN, f"-config.file={self.config_path}"], stdout=log, stderr=log,
                                     cwd=self.tmp)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"tempo exited with {self.proc.returncode}: {self.log_path.read_text()[-3000:]}")
            if self._listening(self.port) and http("GET", f"{self.url}/ready", timeout=2)[0] == 200:
                return self
            time.sleep(0.3)
        raise RuntimeError(f"tempo not ready in {timeout}s: {self.log_path.read_text()[-3000:]}")

    @staticmethod
    def _listening(port: int) -> bool:
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", port)) == 0

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 5 s: a graceful stop waits about 20 s for the backend worker's job
        timeout, and the data is thrown away."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def push(self, tenant: str, body: dict[str, Any]) -> None:
        status, answer, _ = http("POST", f"http://127.0.0.1:{self.otlp}/v1/traces", {"X-Scope-OrgID": tenant}, body)
        assert status == 200, (tenant, status, answer)

    def get(self, tenant: str, path: str, params: dict[str, str] | None = None,
            headers: dict[str, str] | None = None) -> tuple[int, Any, dict[str, str]]:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        return http("GET", f"{self.url}{path}{query}", {"X-Scope-OrgID": tenant, **(headers or {})})


def search_ids(answer: Any) -> set[str]:
    return {_id(t["traceID"].rjust(32, "0")) for t in answer.get("traces") or []}


def _wait_readable(tempo: TempoProcess) -> None:
    """Every pushed trace found by search, and every span counted by TraceQL metrics, in every tenant (the
    live store cuts traces after ``max_trace_idle`` and blocks after ``max_block_duration``)."""
    want = {policy.tenant if policy else ALL: (
        {TRACE_IDS[k] for k, spans in TRACES.items() if any(visible(s, policy) for s in spans)},
        sum(visible(s, policy) for spans in TRACES.values() for s in spans))
        for policy in (None, *POLICIES.values())}
    deadline = time.monotonic() + 30
    seen: dict[str, tuple[set[str], float]] = {}
    while time.monotonic() < deadline:
        for tenant in want:
            status, ans, _ = tempo.get(tenant, "/api/search", {"q": "{}", "limit": "100", **window()})
            mstatus, mans, _ = tempo.get(tenant, "/api/metrics/query_range", metrics_params("{ } | count_over_time()"))
            seen[tenant] = (search_ids(ans) if status == 200 else set(),
                            sum(v for _, samples in series(mans) for _, v in samples) if mstatus == 200 else -1)
        if seen == want:
            return
        time.sleep(0.5)
    raise AssertionError(f"pushed spans not readable: seen {seen} want {want}")


def window() -> dict[str, str]:
    """A search or metrics window around the pushed spans (seconds)."""
    return {"start": str(BASE_NS // 10**9 - 60), "end": str(int(time.time()) + 60)}


@pytest.fixture(scope="module")
def tempo() -> Iterator[TempoProcess]:
    if not TEMPO_BIN or not os.access(TEMPO_BIN, os.X_OK):
        pytest.fail(f"GATEWAY_TEMPO_BIN={TEMPO_BIN!r} is not an executable Tempo binary")
    tmp = Path(tempfile.mkdtemp(prefix="gateway-real-tempo-"))
    t = TempoProcess(tmp).start()
    try:
        t.push(ALL, otlp_body(None))
        for policy in POLICIES.values():
            t.push(policy.tenant, otlp_body(policy))
        _wait_readable(t)
        yield t
    finally:
        t.stop()
        shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------------------------------------- reads compared

# (query, the same with every spanset filter conjoined by hand with the policy's condition at `@`, structural?)
SEARCHES = (
    ("{}", "{@}", False),
    ('{resource.service.name="dev-db"}', '{(resource.service.name="dev-db") && @}', False),
    ('{resource.service.name="prod-api"}', '{(resource.service.name="prod-api") && @}', False),
    ('{span.http.route=~"/cart.*"}', '{(span.http.route=~"/cart.*") && @}', False),
    ("{ } >> { }", "{@} >> {@}", True),
    ('{resource.service.name="dev-api"} > {kind=client}',
     '{(resource.service.name="dev-api") && @} > {(kind=client) && @}', True),
    ("{ } | count() > 1", "{@} | count() > 1", False),
    ('{span.db.system="postgresql"} && {kind=server}', '{(span.db.system="postgresql") && @} && {(kind=server) && @}',
     False),
    ('{name="charge"} || {name="VACUUM"}', '{(name="charge") && @} || {(name="VACUUM") && @}', False),
    ("{ } | select(span.db.system)", "{@} | select(span.db.system)", False),
    ("{status=error}", "{(status=error) && @}", False),
)


def conjoined(template: str, policy: Policy) -> str:
    return template.replace("@", policy.condition)


TAGS: tuple[tuple[str, dict[str, str]], ...] = (
    ("/api/v2/search/tags", {}),
    ("/api/v2/search/tags", {"scope": "resource"}),
    ("/api/v2/search/tags", {"scope": "span"}),
    ("/api/v2/search/tags", {"scope": "event"}),
    ("/api/v2/search/tags", {"scope": "link"}),
    ("/api/v2/search/tag/resource.service.name/values", {}),
    ("/api/v2/search/tag/span.http.route/values", {}),
    ("/api/v2/search/tag/event.event.detail/values", {}),
    ("/api/v2/search/tag/span.job.id/values", {}),
    ("/api/v2/search/tag/resource.service.name/values", {"q": '{resource.team="a"}'}),
)
# The v1 forms take no query filter in Tempo: answered as t-dev's, or refused (403) with the reason.
TAGS_V1: tuple[tuple[str, dict[str, str]], ...] = (("/api/search/tags", {}),
                                                   ("/api/search/tag/service.name/values", {}))
METRICS = (
    "{ } | count_over_time()",
    "{ } | count_over_time() by (resource.service.name)",
    '{span.db.system="postgresql"} | rate()',
    "{ } | max_over_time(duration) by (name)",
    "{ } | quantile_over_time(duration, .5)",
)


def spansets(answer: Any, drop: tuple[str, ...]) -> dict[str, Any]:
    """trace ID -> its span sets, each (matched, attributes, spans) with every span's fields. A span's
    ``drop`` attributes (the policy's) are left out: the conjoined query names them, so Tempo returns them
    with every span (the span's own, visible attributes; t-dev's answer to a query without them lacks them)."""
    out: dict[str, Any] = {}
    for t in answer.get("traces") or []:
        sets = t.get("spanSets") or ([t["spanSet"]] if t.get("spanSet") else [])
        out[_id(t["traceID"].rjust(32, "0"))] = sorted(
            (s.get("matched", 0), _kv(s.get("attributes")),
             tuple(sorted((x["spanID"].rjust(16, "0"), x.get("name", ""), x.get("startTimeUnixNano"),
                           x.get("durationNanos"), tuple(a for a in _kv(x.get("attributes")) if a[0] not in drop))
                          for x in s.get("spans") or [])))
            for s in sets)
    return out


def tags(answer: Any) -> Any:
    if "scopes" in answer:
        return sorted((s["name"], tuple(sorted(s.get("tags") or []))) for s in answer["scopes"])
    if "tagNames" in answer:
        return sorted(answer["tagNames"] or [])
    values = answer.get("tagValues") or []
    return sorted(json.dumps(v, sort_keys=True) if isinstance(v, dict) else v for v in values)


def series(answer: Any) -> Any:
    """Series as (labels, non-zero samples): how many empty buckets trail depends on when it is asked. An
    instant query's series (one ``value``) as one sample at 0."""
    out = []
    for s in answer.get("series") or []:
        points = s.get("samples") or ([{"timestampMs": 0, "value": s["value"]}] if "value" in s else [])
        out.append((_kv(s.get("labels")),
                     tuple((int(p["timestampMs"]), round(float(p["value"]), 9)) for p in points if p.get("value"))))
    return sorted(out)


def metrics_params(q: str) -> dict[str, str]:
    return {"q": q, "step": "5s", "start": str(BASE_NS // 10**9 - 20), "end": str(BASE_NS // 10**9 + 40)}


def search_params(q: str) -> dict[str, str]:
    return {"q": q, "limit": "100", "spss": "100", **window()}


# ---------------------------------------------------------------------------------------------- Tempo alone

EACH = pytest.mark.parametrize("policy", list(POLICIES.values()), ids=list(POLICIES))


@EACH
def test_tempo_search_ground_truth(tempo: TempoProcess, policy: Policy) -> None:
    """Tempo's own answers make the policy's tenant the ground truth: it holds exactly the traces with a
    visible span, and each query conjoined with the policy by hand finds on t-all the traces and spans the
    query finds there, but for structural queries on a trace whose root is hidden (see rootless)."""
    drop = policy.attrs
    status, all_, _ = tempo.get(ALL, "/api/search", search_params("{}"))
    assert status == 200 and search_ids(all_) == set(TRACE_IDS.values()), all_
    status, vis, _ = tempo.get(policy.tenant, "/api/search", search_params("{}"))
    assert status == 200 and search_ids(vis) == set(TRACE_IDS.values()) - {TRACE_IDS["prod-only"]}, vis
    visible_ids = {SPAN_IDS[(t, s.key)] for t, spans in TRACES.items() for s in spans if visible(s, policy)}
    assert {x[0] for sets in spansets(vis, drop).values() for _, _, spans in sets for x in spans} == visible_ids
    problems = []
    for q, template, structural in SEARCHES:
        status, vis, _ = tempo.get(policy.tenant, "/api/search", search_params(q))
        cstatus, filtered, _ = tempo.get(ALL, "/api/search", search_params(conjoined(template, policy)))
        assert status == cstatus == 200, (q, vis, filtered)
        got, want = spansets(filtered, drop), spansets(vis, drop)
        if structural:
            assert rootless(policy) & set(got) and not rootless(policy) & set(want), (q, got, want)  # why
            got = {t: v for t, v in got.items() if t not in rootless(policy)}
        if got != want:
            problems.append(f"{q}: conjoined on t-all {got}\n    on {policy.tenant} {want}")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
def test_tempo_trace_by_id_ground_truth(tempo: TempoProcess, v2: bool) -> None:
    """Each tenant holds what was pushed to it; the protobuf answer decodes to the JSON one (the decoder
    the gateway assertions use is right)."""
    path = "/api/v2/traces/" if v2 else "/api/traces/"
    for key, spans in TRACES.items():
        tid = TRACE_IDS[key]
        for policy in (None, *POLICIES.values()):
            tenant, want = policy.tenant if policy else ALL, [s for s in spans if visible(s, policy)]
            status, ans, _ = tempo.get(tenant, path + tid)
            if not want:  # v2 answers a trace it does not hold with an empty one (combiner/trace_by_id_v2.go)
                assert (status, ans) == ((200, {"trace": {}, "metrics": {}}) if v2 else (404, None)), (
                    tenant, key, status, ans)
                continue
            assert status == 200, (tenant, key, status, ans)
            got = trace_spans(ans)
            assert set(got) == {SPAN_IDS[(key, s.key)] for s in want}, (tenant, key, ans)
            status, raw, h = tempo.get(tenant, path + tid, headers={"Accept": "application/protobuf"})
            assert status == 200 and "protobuf" in h.get("Content-Type", ""), (status, h)
            assert trace_spans(decode_trace(raw, v2)) == got, (tenant, key)
    status, ans, _ = tempo.get(ALL, path + TRACE_IDS["mixed-dev-root"])
    dev_span = trace_spans(ans)[SPAN_IDS[("mixed-dev-root", "a")]]
    assert ("env", ("stringValue", "dev")) in dev_span.resource and dev_span.links and dev_span.attributes


@EACH
def test_tempo_tags_ground_truth(tempo: TempoProcess, policy: Policy) -> None:
    status, all_, _ = tempo.get(ALL, "/api/v2/search/tag/resource.service.name/values", window())
    assert status == 200 and {v["value"] for v in all_["tagValues"]} == set(SERVICES), all_
    status, vis, _ = tempo.get(policy.tenant, "/api/v2/search/tag/resource.service.name/values", window())
    assert status == 200 and {v["value"] for v in vis["tagValues"]} == policy.services, vis
    status, vis_tags, _ = tempo.get(policy.tenant, "/api/v2/search/tags", window())
    assert status == 200 and not any(n in json.dumps(vis_tags) for n in policy.hidden_tags), vis_tags
    status, all_tags, _ = tempo.get(ALL, "/api/v2/search/tags", window())
    assert status == 200 and all(n in json.dumps(all_tags) for n in policy.hidden_tags), all_tags


@EACH
def test_tempo_metrics_ground_truth(tempo: TempoProcess, policy: Policy) -> None:
    q = metrics_params("{ } | count_over_time() by (resource.service.name)")
    status, all_, _ = tempo.get(ALL, "/api/metrics/query_range", q)
    assert status == 200, all_
    names = {dict(labels).get("resource.service.name") for labels, _ in series(all_)}
    assert names == {("stringValue", s) for s in SERVICES}, all_
    status, vis, _ = tempo.get(policy.tenant, "/api/metrics/query_range", q)
    assert status == 200 and {dict(labels).get("resource.service.name") for labels, _ in series(vis)} == {
        ("stringValue", s) for s in policy.services}, vis
    total = sum(v for _, samples in series(vis) for _, v in samples)
    assert total == sum(visible(s, policy) for spans in TRACES.values() for s in spans), vis


# ---------------------------------------------------------------------------------------------- gateway


class Gw:
    """A `gateway serve` process in front of Tempo (stack 100's traces tenant is t-all)."""

    def __init__(self, proc: GatewayProcess, tokens: dict[str, str], refused: dict[str, Any]):
        self.proc, self.tokens, self.refused = proc, tokens, refused

    def get(self, who: str, path: str, params: dict[str, str] | None = None,
            headers: dict[str, str] | None = None) -> tuple[int, Any, dict[str, str]]:
        if who not in self.tokens:
            pytest.fail(f"the gateway refused the access policy {who!r}: {self.refused.get(who)}")
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        return http("GET", f"{self.proc.url}/tempo{path}{query}", {**basic(ALL, self.tokens[who]), **(headers or {})})


@contextmanager
def _database(pg_dsn: str) -> Iterator[str]:
    """A migrated database of its own (as tests/conftest.py's db_dsn makes them)."""
    import asyncio
    import uuid

    import asyncpg

    from tests.conftest import _with_db

    name = f"t_{uuid.uuid4().hex[:12]}"

    async def run(sql: str) -> None:
        conn = await asyncpg.connect(pg_dsn)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()
    asyncio.run(run(f'CREATE DATABASE "{name}" TEMPLATE gw_template'))
    try:
        yield _with_db(pg_dsn, name)
    finally:
        asyncio.run(run(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@contextmanager
def _gateway(tempo: TempoProcess, pg_dsn: str, lbac: str | None = None) -> Iterator[Gw]:
    """A gateway in front of Tempo (``lbac`` of the traces upstream: the default, or the mode named) with a
    token per policy, created through the admin API, and one without label policies."""
    tmp = Path(tempfile.mkdtemp(prefix="gateway-real-tempo-gw-"))
    orgs = [{"id": 1, "name": "acme", "stacks": [
        {"id": int(STACK), "name": "acme-prod", "tenants": {"metrics": "100", "logs": "100", "traces": ALL}}]}]
    traces = {"url": tempo.url, **({"lbac": lbac} if lbac else {})}
    with _database(pg_dsn) as dsn:
        proc = GatewayProcess(tmp, dsn, data_dir=str(tmp / "data"), orgs=orgs,
                              upstreams={**TEST_CONFIG["upstreams"], "traces": traces})
        r = subprocess.run([sys.executable, "-m", "gateway", "token", "bootstrap", "-c", str(proc.config_path),
                            "--org", "1"], capture_output=True, text=True, timeout=60, cwd=ROOT,
                           env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert r.returncode == 0, r.stderr
        admin = {"Authorization": f"Bearer {r.stdout.strip()}"}
        proc.start(timeout=30)
        try:
            tokens: dict[str, str] = {}
            refused: dict[str, Any] = {}
            for who, selectors in (("all", ()), *((p.name, p.selectors) for p in POLICIES.values())):
                realm = {"type": "stack", "identifier": STACK,
                         "labelPolicies": [{"selector": s} for s in selectors]}
                status, pol, _ = http("POST", f"{proc.url}/api/v1/accesspolicies", admin,
                                      {"name": f"traces-{who}", "scopes": ["traces:read"], "realms": [realm]})
                if status != 200:
                    refused[who] = (status, pol)
                    continue
                status, tok, _ = http("POST", f"{proc.url}/api/v1/tokens", admin,
                                      {"accessPolicyId": pol["id"], "name": f"tok-{who}"})
                assert status == 200, tok
                tokens[who] = tok["token"]
            assert "all" in tokens, refused
            yield Gw(proc, tokens, refused)
        finally:
            proc.stop()
            shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def gw(tempo: TempoProcess, pg_dsn: str) -> Iterator[Gw]:
    with _gateway(tempo, pg_dsn) as g:
        yield g


def test_unrestricted_token_sees_everything(tempo: TempoProcess, gw: Gw) -> None:
    """Sanity: the comparisons below can fail, since the same reads without a policy show t-all whole."""
    status, got, _ = gw.get("all", "/api/search", search_params("{}"))
    _, want, _ = tempo.get(ALL, "/api/search", search_params("{}"))
    assert status == 200 and spansets(got, ()) == spansets(want, ()) and len(spansets(got, ())) == len(TRACES), got
    status, got, _ = gw.get("all", "/api/v2/traces/" + TRACE_IDS["prod-only"])
    _, want, _ = tempo.get(ALL, "/api/v2/traces/" + TRACE_IDS["prod-only"])
    assert status == 200 and trace_spans(got) == trace_spans(want), got
    status, got, _ = gw.get("all", "/api/v2/search/tag/resource.service.name/values", window())
    assert status == 200 and {v["value"] for v in got["tagValues"]} == set(SERVICES), got


@EACH
def test_restricted_search_equals_the_policy_tenant(tempo: TempoProcess, gw: Gw, policy: Policy) -> None:
    """Trace IDs and every span set's spans (ID, name, start, duration, attributes, matched count and the
    set's own attributes such as `count()`) as the policy's tenant answers; structural queries on a
    hidden-root trace as Tempo answers the conjoined query on t-all."""
    problems = []
    for q, template, structural in SEARCHES:
        status, got, _ = gw.get(policy.name, "/api/search", search_params(q))
        estatus, expected, _ = tempo.get(policy.tenant, "/api/search", search_params(q))
        assert estatus == 200, (q, expected)
        want = spansets(expected, policy.attrs)
        if structural:
            _, conj, _ = tempo.get(ALL, "/api/search", search_params(conjoined(template, policy)))
            want.update({t: v for t, v in spansets(conj, policy.attrs).items() if t in rootless(policy)})
        if status != 200:
            problems.append(f"{q}: {status} {str(got)[:300]}")
        elif spansets(got, policy.attrs) != want:
            problems.append(f"{q}: got {spansets(got, policy.attrs)}\n    expected {want}")
    assert not problems, "\n".join(problems)


@EACH
def test_restricted_search_leaks_no_hidden_service(gw: Gw, policy: Policy) -> None:
    """Trace-level fields of a search answer (root service, service stats) come from every span of a trace:
    none may name a hidden service or carry a hidden span's attribute values (span names are intrinsic, as
    in trace by ID, so a hidden root's name may stay)."""
    leaks = []
    for q, _, _ in SEARCHES:
        status, got, _ = gw.get(policy.name, "/api/search", search_params(q))
        text = json.dumps(got)
        found = sorted(n for n in policy.hidden_values if n in text)
        if status != 200 or found:
            leaks.append(f"{q}: {status} {found} {text[:400]}")
    assert not leaks, "\n".join(leaks)


@EACH
@pytest.mark.parametrize("fmt", ["json", "protobuf"])
@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
def test_restricted_trace_by_id(tempo: TempoProcess, gw: Gw, v2: bool, fmt: str, policy: Policy) -> None:
    """Visible spans whole, as the policy's tenant holds them; other spans of a mixed trace with only their
    intrinsic fields (IDs, parent, name, kind, start, end, status code); a trace with no visible span 404
    (v2: or Tempo's own answer for a trace it does not hold, 200 with an empty trace)."""
    path = "/api/v2/traces/" if v2 else "/api/traces/"
    headers = {"Accept": "application/protobuf"} if fmt == "protobuf" else {}
    problems = []
    for key, spans in TRACES.items():
        tid = TRACE_IDS[key]
        status, got, h = gw.get(policy.name, path + tid, headers=headers)
        if not any(visible(s, policy) for s in spans):
            empty = status == 200 and v2 and not trace_spans(decode_trace(got, v2) if fmt == "protobuf" else got)
            if status != 404 and not empty:
                problems.append(f"{key}: {status}, not 404: {str(got)[:300]}")
            continue
        if status != 200:
            problems.append(f"{key}: {status} {str(got)[:300]}")
            continue
        if fmt == "protobuf":
            assert "protobuf" in h.get("Content-Type", ""), h
            got = decode_trace(got, v2)
        got_spans = trace_spans(got)
        whole = trace_spans(tempo.get(ALL, path + tid)[1])
        vis = trace_spans(tempo.get(policy.tenant, path + tid)[1])
        if set(got_spans) != set(whole):
            problems.append(f"{key}: spans {sorted(got_spans)} expected {sorted(whole)}")
            continue
        for sid, span in got_spans.items():
            if sid in vis:
                if span != vis[sid]:
                    problems.append(f"{key}: visible span {sid} {span} expected {vis[sid]}")
            elif span != SpanView(sid, whole[sid].intrinsic, (), (), (), ()):
                problems.append(f"{key}: hidden span {sid} keeps more than its intrinsic fields: {span}")
    assert not problems, "\n".join(problems)


@EACH
def test_restricted_tags_equal_the_policy_tenant(tempo: TempoProcess, gw: Gw, policy: Policy) -> None:
    problems = []
    for path, params in (*TAGS, *TAGS_V1):
        p = {**params, **window()}
        status, got, _ = gw.get(policy.name, path, p)
        estatus, expected, _ = tempo.get(policy.tenant, path, p)
        assert estatus == 200, (path, expected)
        if any(n in json.dumps(got) for n in (*policy.hidden_tags, *policy.hidden_values, "/checkout")):
            problems.append(f"{path} {params}: names a hidden service or attribute: {got}")
        elif (path, params) in TAGS_V1 and status == 403 and "cannot be restricted" in str(got):
            continue
        elif status != 200:
            problems.append(f"{path} {params}: {status} {str(got)[:300]}")
        elif tags(got) != tags(expected):
            problems.append(f"{path} {params}: got {tags(got)}\n    expected {tags(expected)}")
    assert not problems, "\n".join(problems)


@EACH
def test_restricted_metrics_equal_the_policy_tenant(tempo: TempoProcess, gw: Gw, policy: Policy) -> None:
    """TraceQL metrics, range and instant, as the policy's tenant answers them."""
    problems = []
    for path in ("/api/metrics/query_range", "/api/metrics/query"):
        for q in METRICS:
            params = metrics_params(q)
            if path == "/api/metrics/query":
                del params["step"]
            status, got, _ = gw.get(policy.name, path, params)
            estatus, expected, _ = tempo.get(policy.tenant, path, params)
            assert estatus == 200 and series(expected), (path, q, expected)
            if status != 200:
                problems.append(f"{path} {q}: {status} {str(got)[:300]}")
            elif series(got) != series(expected):
                problems.append(f"{path} {q}: got {series(got)}\n    expected {series(expected)}")
    assert not problems, "\n".join(problems)


@EACH
def test_restricted_search_by_tags_is_filtered_or_refused(tempo: TempoProcess, gw: Gw, policy: Policy) -> None:
    """The pre-TraceQL search (``tags=``, logfmt) cannot carry the policy as sent: answered as the policy's
    tenant answers it (trace IDs), or refused with a 4xx that says why; never t-all's traces."""
    for tags_param in ("service.name=prod-api", "http.route=/cart/items", "team=a"):
        params = {"tags": tags_param, "limit": "100", **window()}
        status, got, _ = gw.get(policy.name, "/api/search", params)
        estatus, expected, _ = tempo.get(policy.tenant, "/api/search", params)
        assert estatus == 200, expected
        if status == 200:
            assert search_ids(got) == search_ids(expected), (tags_param, got, expected)
        else:
            assert 400 <= status < 500 and got.get("errorType") and got.get("error"), (tags_param, status, got)


def test_auto_mode_enforces_and_header_mode_refuses(tempo: TempoProcess, pg_dsn: str) -> None:
    """No probe can show that a Tempo applies label policies (it has none): ``lbac: auto`` on the traces
    upstream restricts as enforce does; ``lbac: header`` refuses restricted TraceQL and tag reads (503), and
    trace by ID is refused too or filtered by the gateway as in enforce mode (never passed whole); the
    unrestricted token is served."""
    policy = POLICIES["dev"]
    params = search_params("{ } | count() > 1")
    _, expected, _ = tempo.get(policy.tenant, "/api/search", params)
    mixed = TRACE_IDS["mixed-prod-root"]
    hidden_root = SPAN_IDS[("mixed-prod-root", "a")]
    with _gateway(tempo, pg_dsn, "auto") as g:
        status, got, _ = g.get(policy.name, "/api/search", params)
        assert status == 200 and spansets(got, policy.attrs) == spansets(expected, policy.attrs), got
        status, got, _ = g.get(policy.name, "/api/v2/traces/" + mixed)
        assert status == 200 and set(trace_spans(got)) == {SPAN_IDS[("mixed-prod-root", k)] for k in "abcd"}, got
        assert not trace_spans(got)[hidden_root].resource, got
    with _gateway(tempo, pg_dsn, "header") as g:
        for path, p in (("/api/search", params), ("/api/metrics/query_range", metrics_params("{ } | rate()")),
                        ("/api/v2/search/tags", window()), ("/api/v2/search/tag/resource.service.name/values", {})):
            status, got, _ = g.get(policy.name, path, p)
            assert status == 503 and got["errorType"] == "unavailable", (path, status, got)
        status, got, _ = g.get(policy.name, "/api/v2/traces/" + mixed)
        if status != 503:
            assert status == 200 and trace_spans(got)[hidden_root] == SpanView(
                hidden_root, trace_spans(tempo.get(ALL, "/api/v2/traces/" + mixed)[1])[hidden_root].intrinsic,
                (), (), (), ()), (status, got)
        status, got, _ = g.get("all", "/api/search", search_params("{}"))
        assert status == 200 and len(spansets(got, ())) == len(TRACES), got
