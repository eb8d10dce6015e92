"""Trace by ID under trace selectors: spans outside the policy keep only their intrinsic fields.

Tempo applies no label policies, so the gateway filters its answer to ``/api/traces/{id}`` (a
``tempopb.Trace``) and ``/api/v2/traces/{id}`` (a ``tempopb.TraceByIDResponse`` wrapping one), in JSON
(gogo ``jsonpb``, lowerCamelCase names, IDs in base64; v1 names the list ``batches``: Tempo's
``tempopb.MarshalToJSONV1``) or protobuf. Trace selectors match resource attributes, so visibility is
decided per ``ResourceSpans``: a visible one passes unchanged; a hidden one loses its resource attributes,
schema URL and instrumentation scopes, and each of its spans keeps only an allowlist of intrinsic fields
(trace, span and parent IDs, name, kind, start and end time, the status *code*; the status message is
free text and goes with the attributes, events and links). A trace with no visible span is answered
like one Tempo does not have (404, empty body, Tempo's own answer when its redactor hides a trace).

Everything is an allowlist: a field this module does not know (a future Tempo's, a deprecated OTLP one)
is dropped from hidden spans, and an answer whose shape it does not know raises ``ValueError``
(the caller answers 502, never the unfiltered answer).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Final

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import DecodeError
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.resource.v1 import resource_pb2
from opentelemetry.proto.trace.v1 import trace_pb2

from gateway.policy.trace_selector import TraceSelector, visible

#: Span fields a hidden span keeps (OTLP JSON names, as jsonpb writes them).
INTRINSIC_JSON: Final = ("traceId", "spanId", "parentSpanId", "name", "kind", "startTimeUnixNano",
                         "endTimeUnixNano")
#: The same fields by their proto names (opentelemetry-proto ``Span``; tempopb's is the same message).
INTRINSIC_PROTO: Final = ("trace_id", "span_id", "parent_span_id", "name", "kind", "start_time_unix_nano",
                          "end_time_unix_nano")
#: Top-level keys of Tempo's JSON answers: v1 is a Trace, v2 a TraceByIDResponse.
_V1_KEYS: Final = frozenset({"batches", "resourceSpans"})
_V2_KEYS: Final = frozenset({"trace", "metrics", "status", "message"})


def resource_strings(attributes: Any) -> dict[str, str]:
    """The string-valued resource attributes (all a trace selector can match, as in Tempo); a key given
    twice with different values is dropped, so no selector can match it (fail closed)."""
    return _unambiguous(_json_pairs(attributes))


def _json_pairs(attributes: Any) -> Iterator[tuple[str, str | None]]:
    for kv in attributes or ():
        key = kv.get("key", "") if isinstance(kv, dict) else None  # (jsonpb leaves out an empty key)
        value = kv.get("value") if isinstance(kv, dict) else None  # (and a value that is not set)
        if not isinstance(key, str) or not isinstance(value, dict | None):
            raise ValueError("a resource attribute is not a key-value object")
        s = value.get("stringValue") if value is not None else None
        yield key, s if isinstance(s, str) else None


def _unambiguous(pairs: Iterable[tuple[str, str | None]]) -> dict[str, str]:
    """Keys with one string value; a key given without one, or twice with different ones, is dropped."""
    out: dict[str, str] = {}
    ambiguous: set[str] = set()
    for key, s in pairs:
        if s is None or (key in out and out[key] != s):
            ambiguous.add(key)
            continue
        out[key] = s
    for key in ambiguous:
        out.pop(key, None)
    return out


def _hidden_span_json(span: Any) -> dict[str, Any]:
    if not isinstance(span, dict):
        raise ValueError("a span is not an object")
    kept = {k: span[k] for k in INTRINSIC_JSON if k in span}
    status = span.get("status")
    if isinstance(status, dict) and "code" in status:
        kept["status"] = {"code": status["code"]}
    return kept


def _filter_batches(batches: Any, selectors: Sequence[TraceSelector]) -> tuple[list[Any], bool]:
    """The ResourceSpans list filtered, and whether any span stayed visible."""
    if not isinstance(batches, list):
        raise ValueError("resourceSpans is not a list")
    out: list[Any] = []
    seen = False
    for rs in batches:
        if not isinstance(rs, dict):
            raise ValueError("a resourceSpans entry is not an object")
        resource = rs.get("resource") or {}
        if not isinstance(resource, dict):
            raise ValueError("a resource is not an object")
        scope_spans = rs.get("scopeSpans") or []
        if not isinstance(scope_spans, list):
            raise ValueError("scopeSpans is not a list")
        if visible(selectors, resource_strings(resource.get("attributes"))):
            seen = seen or any(isinstance(ss, dict) and ss.get("spans") for ss in scope_spans)
            out.append(rs)
            continue
        hidden = []
        for ss in scope_spans:
            if not isinstance(ss, dict) or not isinstance(ss.get("spans", []), list):
                raise ValueError("a scopeSpans entry is not an object with a span list")
            hidden.append({"scope": {}, "spans": [_hidden_span_json(s) for s in ss.get("spans", [])]})
        out.append({"resource": {}, "scopeSpans": hidden})
    return out, seen


def filter_json(raw: bytes, selectors: Sequence[TraceSelector], v2: bool) -> dict[str, Any] | None:
    """Tempo's JSON trace-by-ID answer filtered; None when no span is visible (answer 404)."""
    doc = json.loads(raw)
    if not isinstance(doc, dict):
        raise ValueError("the answer is not a JSON object")
    if v2:
        if not set(doc) <= _V2_KEYS:
            raise ValueError(f"unknown fields in a TraceByIDResponse: {sorted(set(doc) - _V2_KEYS)[:5]}")
        trace = doc.get("trace") or {}
        if not isinstance(trace, dict) or not set(trace) <= {"resourceSpans"}:
            raise ValueError("the trace is not a Trace object")
        batches, seen = _filter_batches(trace.get("resourceSpans", []), selectors)
        if not seen:
            return None
        return {**doc, "trace": {"resourceSpans": batches}}
    if not set(doc) <= _V1_KEYS or len(doc) > 1:
        raise ValueError("the answer is not a Trace object")
    key = next(iter(doc), "batches")
    batches, seen = _filter_batches(doc.get(key, []), selectors)
    return {key: batches} if seen else None


def _raw_classes() -> tuple[Any, Any]:
    """OTLP's ``TracesData`` and ``Span`` with every ``string`` field read as ``bytes`` (the same wire format).

    Tempo (gogo protobuf) never checks that strings are UTF-8, so whoever writes spans may store any bytes
    in a name or an attribute; upb refuses such a message whole, which would make every trace holding one
    unreadable to a restricted token. Bytes fields are read as they came; only the resource attributes a
    selector compares are decoded (invalid UTF-8 matches nothing)."""
    pool = descriptor_pool.DescriptorPool()  # (a pool of its own: the real OTLP types keep their names)

    def as_bytes(messages: Any) -> None:
        for m in messages:
            for f in m.field:
                if f.type == f.TYPE_STRING:
                    f.type = f.TYPE_BYTES
            as_bytes(m.nested_type)

    for module in (common_pb2, resource_pb2, trace_pb2):
        fdp = descriptor_pb2.FileDescriptorProto()
        module.DESCRIPTOR.CopyToProto(fdp)
        as_bytes(fdp.message_type)
        pool.Add(fdp)
    return tuple(message_factory.GetMessageClass(pool.FindMessageTypeByName(f"opentelemetry.proto.trace.v1.{name}"))
                 for name in ("TracesData", "Span"))


_TracesData, _Span = _raw_classes()


def _hidden_span_proto(span: Any) -> Any:
    """A new span with only the intrinsic fields (so no unknown field of the original survives)."""
    kept = _Span(**{f: getattr(span, f) for f in INTRINSIC_PROTO})
    if span.HasField("status"):
        kept.status.code = span.status.code
    return kept


def filter_trace_proto(raw: bytes, selectors: Sequence[TraceSelector]) -> bytes | None:
    """A protobuf ``tempopb.Trace`` (wire-compatible with OTLP ``TracesData``: field 1, repeated
    ``ResourceSpans``; Tempo generates tempopb from opentelemetry-proto with the package renamed)
    filtered; None when no span is visible."""
    try:
        data = _TracesData.FromString(raw)
    except DecodeError as exc:
        raise ValueError(f"the trace does not decode: {exc}") from None
    out = _TracesData()  # built anew: no unknown field of the answer's top level survives
    seen = False
    for rs in data.resource_spans:
        if visible(selectors, _proto_strings(rs)):
            seen = seen or any(ss.spans for ss in rs.scope_spans)
            out.resource_spans.append(rs)
            continue
        hidden = out.resource_spans.add()
        hidden.resource.SetInParent()
        for ss in rs.scope_spans:
            hs = hidden.scope_spans.add()
            hs.scope.SetInParent()
            hs.spans.extend(_hidden_span_proto(s) for s in ss.spans)
    return out.SerializeToString() if seen else None


def _utf8(raw: bytes) -> str | None:
    try:
        return raw.decode()
    except UnicodeDecodeError:
        return None


def _proto_strings(rs: Any) -> dict[str, str]:
    """:func:`resource_strings` of a protobuf resource (a key or value that is not UTF-8 matches nothing)."""
    return _unambiguous((key, _utf8(kv.value.string_value) if kv.value.WhichOneof("value") == "string_value"
                         else None) for kv in rs.resource.attributes if (key := _utf8(kv.key)) is not None)


def filter_response_proto(raw: bytes, selectors: Sequence[TraceSelector]) -> bytes | None:
    """A protobuf ``tempopb.TraceByIDResponse`` (1: trace, 2: metrics, 3: status, 4: message) with its
    trace filtered; the other fields are copied as they came. None when no span is visible."""
    fields = _wire_fields(raw)
    traces = [v for n, _, v in fields if n == 1]
    unknown = sorted({n for n, _, _ in fields} - {1, 2, 3, 4})
    if unknown:
        raise ValueError(f"unknown fields in a TraceByIDResponse: {unknown[:5]}")
    filtered = filter_trace_proto(b"".join(traces), selectors)  # (repeated embedded messages merge)
    if filtered is None:
        return None
    out = bytearray(_key(1, 2) + _varint(len(filtered)) + filtered)
    for n, chunk, _ in fields:
        if n != 1:
            out += chunk
    return bytes(out)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _key(number: int, wire: int) -> bytes:
    return _varint(number << 3 | wire)


def _read_varint(raw: bytes, i: int) -> tuple[int, int]:
    n = shift = 0
    while True:
        if i >= len(raw) or shift > 63:
            raise ValueError("truncated or overlong varint")
        b = raw[i]
        i += 1
        n |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return n, i


def _wire_fields(raw: bytes) -> list[tuple[int, bytes, bytes]]:
    """(field number, the field's bytes as they came, its payload) of a message's top-level fields."""
    out: list[tuple[int, bytes, bytes]] = []
    i = 0
    while i < len(raw):
        start = i
        key, i = _read_varint(raw, i)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise ValueError("field number 0")
        if wire == 0:
            _, i = _read_varint(raw, i)
            payload = b""
        elif wire == 2:
            length, i = _read_varint(raw, i)
            if i + length > len(raw):
                raise ValueError("truncated field")
            payload, i = raw[i:i + length], i + length
        elif wire in (1, 5):
            i += 8 if wire == 1 else 4
            if i > len(raw):
                raise ValueError("truncated field")
            payload = b""
        else:
            raise ValueError(f"unsupported wire type {wire}")
        out.append((number, raw[start:i], payload))
    return out


def filter_answer(raw: bytes, selectors: Sequence[TraceSelector], v2: bool, protobuf: bool) -> bytes | None:
    """The filtered body in the answer's own encoding; None for a trace with no visible span."""
    if protobuf:
        return filter_response_proto(raw, selectors) if v2 else filter_trace_proto(raw, selectors)
    doc = filter_json(raw, selectors, v2)
    return None if doc is None else json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode()

