"""Remote read (``POST /api/v1/read``, snappy-compressed protobuf ``ReadRequest``) under label policies.

A ``ReadRequest`` holds queries, each a list of label matchers AND-ed together, and the
response types the client accepts. Enforce mode appends the policy matchers to every
query and re-encodes the request; the upstream then sees only what was parsed and checked.

Decisions, each tied to what Prometheus and its clients actually do:

* **One policy selector only (after exact simplification).** Matchers of one query are
  AND-ed, so an OR of selectors would need one query per selector. Prometheus answers
  ``Results[i]`` per query (samples) or frames tagged ``query_index`` (streamed), and the
  gateway streams that answer back unchanged, so the client would receive more results
  than it asked for: Prometheus's own remote-read client fails with ``responses: want 1,
  got 2`` (``storage/remote/client.go``), Thanos's Prometheus store reads only
  ``Results[0]`` (silently losing the other selectors' series) and, in streamed mode,
  concatenates frames whose series are no longer sorted and may repeat (a series visible
  under two selectors comes twice). None of that is the visible-only answer, so several
  selectors are refused with :class:`RewriteError` unless they simplify exactly into one:
  duplicates and selectors implied by another are dropped, and one-equality selectors on
  the same label merge into one anchored regex (``env="dev"`` OR ``env="prod"`` is
  ``env=~"dev|prod"``), as ``gateway.lbac.promql.effective_policies`` does for PromQL.
* **Both response types are kept.** With one query in, one query out, query indexes and
  ``accepted_response_types`` stay valid for ``SAMPLES`` and ``STREAMED_XOR_CHUNKS``
  alike. Types this module does not know are removed from the list (Prometheus picks the
  first type it supports, so the client gets another type it accepts); a request accepting
  only unknown types is refused, since their response shape cannot be vouched for.
* **Equality policy matchers are sent as anchored regexes.** Prometheus's read handler
  (``filterExtLabelsFromMatchers``) turns an ``EQ`` matcher whose name and value equal one
  of its external labels into ``name=""``: on a Prometheus with ``external_labels:
  {cluster: eu}``, a policy ``{cluster="eu"}`` would select every series *without* a
  stored ``cluster`` label, which PromQL under the same policy never shows. ``=~`` with
  the value regex-escaped selects exactly the same stored series and is left alone.
* **Fail closed on anything not understood**: bad snappy, a declared size above
  :data:`MAX_DECOMPRESSED`, bad protobuf, an unknown matcher type, or unknown fields
  (a future field could carry selection semantics this rewrite would not restrict).

The message classes are built at import time from a ``FileDescriptorProto`` written here
(field numbers from Prometheus's ``prompb/remote.proto`` and ``types.proto``), so no
``protoc`` step and no generated code are needed. The response messages are included for
tests and tools that decode answers.
"""

from __future__ import annotations

import re
from typing import Any, Final

import cramjam
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import DecodeError

from gateway.lbac import RewriteError
from gateway.policy.selector import LabelMatcher, Selector

#: Largest compressed body the handler reads for a restricted remote read.
MAX_READ_BODY: Final = 4 * 1024 * 1024
#: Largest decompressed ReadRequest accepted, checked from the snappy header before decompressing.
MAX_DECOMPRESSED: Final = 16 * 1024 * 1024

_RE_META: Final = re.compile(r"([\\.+*?()|\[\]{}^$])")

# --------------------------------------------------------------------------- message classes

_F = descriptor_pb2.FieldDescriptorProto
_OPTIONAL, _REPEATED = _F.LABEL_OPTIONAL, _F.LABEL_REPEATED
_SCALAR: Final[dict[str, int]] = {"int64": _F.TYPE_INT64, "string": _F.TYPE_STRING, "bool": _F.TYPE_BOOL,
                                  "double": _F.TYPE_DOUBLE, "bytes": _F.TYPE_BYTES, "uint64": _F.TYPE_UINT64,
                                  "sint64": _F.TYPE_SINT64, "uint32": _F.TYPE_UINT32, "float": _F.TYPE_FLOAT}
_PKG: Final = "prometheus"

# name -> [(field name, number, type, repeated)]; a type that is not a scalar is a message or enum
# of this package (an enum is written "enum:<Name>").
_MESSAGES: Final[dict[str, list[tuple[str, int, str, bool]]]] = {
    "LabelMatcher": [("type", 1, "enum:LabelMatcher.Type", False), ("name", 2, "string", False),
                     ("value", 3, "string", False)],
    "ReadHints": [("step_ms", 1, "int64", False), ("func", 2, "string", False), ("start_ms", 3, "int64", False),
                  ("end_ms", 4, "int64", False), ("grouping", 5, "string", True), ("by", 6, "bool", False),
                  ("range_ms", 7, "int64", False)],
    "Query": [("start_timestamp_ms", 1, "int64", False), ("end_timestamp_ms", 2, "int64", False),
              ("matchers", 3, "LabelMatcher", True), ("hints", 4, "ReadHints", False)],
    "ReadRequest": [("queries", 1, "Query", True),
                    ("accepted_response_types", 2, "enum:ReadRequest.ResponseType", True)],
    # Responses (decoded by tests and tools, never by the proxy path).
    "Label": [("name", 1, "string", False), ("value", 2, "string", False)],
    "Sample": [("value", 1, "double", False), ("timestamp", 2, "int64", False)],
    "TimeSeries": [("labels", 1, "Label", True), ("samples", 2, "Sample", True)],
    "QueryResult": [("timeseries", 1, "TimeSeries", True)],
    "ReadResponse": [("results", 1, "QueryResult", True)],
    "Chunk": [("min_time_ms", 1, "int64", False), ("max_time_ms", 2, "int64", False),
              ("type", 3, "enum:Chunk.Encoding", False), ("data", 4, "bytes", False)],
    "ChunkedSeries": [("labels", 1, "Label", True), ("chunks", 2, "Chunk", True)],
    "ChunkedReadResponse": [("chunked_series", 1, "ChunkedSeries", True), ("query_index", 2, "int64", False)],
}
_ENUMS: Final[dict[str, list[tuple[str, int]]]] = {
    "LabelMatcher": [("EQ", 0), ("NEQ", 1), ("RE", 2), ("NRE", 3)],
    "ReadRequest": [("SAMPLES", 0), ("STREAMED_XOR_CHUNKS", 1)],
    "Chunk": [("UNKNOWN", 0), ("XOR", 1), ("HISTOGRAM", 2), ("FLOAT_HISTOGRAM", 3)],
}
_ENUM_NAMES: Final = {"LabelMatcher": "Type", "ReadRequest": "ResponseType", "Chunk": "Encoding"}


def _build() -> dict[str, Any]:
    """Message classes for the prompb subset above, from a hand-written FileDescriptorProto."""
    fdp = descriptor_pb2.FileDescriptorProto(name="gateway_prompb_remote.proto", package=_PKG, syntax="proto3")
    for name, fields in _MESSAGES.items():
        msg = fdp.message_type.add(name=name)
        if name in _ENUMS:
            enum = msg.enum_type.add(name=_ENUM_NAMES[name])
            for value_name, number in _ENUMS[name]:
                enum.value.add(name=value_name, number=number)
        for fname, number, ftype, repeated in fields:
            f = msg.field.add(name=fname, number=number, label=_REPEATED if repeated else _OPTIONAL)
            if ftype in _SCALAR:
                f.type = _SCALAR[ftype]
            elif ftype.startswith("enum:"):
                f.type, f.type_name = _F.TYPE_ENUM, f".{_PKG}.{ftype[5:]}"
            else:
                f.type, f.type_name = _F.TYPE_MESSAGE, f".{_PKG}.{ftype}"
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    return {name: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{_PKG}.{name}"))
            for name in _MESSAGES}


_CLASSES: Final = _build()
LabelMatcherPB: Final = _CLASSES["LabelMatcher"]
ReadHints: Final = _CLASSES["ReadHints"]
Query: Final = _CLASSES["Query"]
ReadRequest: Final = _CLASSES["ReadRequest"]
Label: Final = _CLASSES["Label"]
Sample: Final = _CLASSES["Sample"]
TimeSeries: Final = _CLASSES["TimeSeries"]
QueryResult: Final = _CLASSES["QueryResult"]
ReadResponse: Final = _CLASSES["ReadResponse"]
ChunkedReadResponse: Final = _CLASSES["ChunkedReadResponse"]

EQ, NEQ, RE, NRE = 0, 1, 2, 3
SAMPLES, STREAMED_XOR_CHUNKS = 0, 1
_KNOWN_RESPONSE_TYPES: Final = (SAMPLES, STREAMED_XOR_CHUNKS)
_OP_TO_PB: Final[dict[str, int]] = {"=": EQ, "!=": NEQ, "=~": RE, "!~": NRE}

# --------------------------------------------------------------------------- snappy


def _uvarint(data: bytes) -> tuple[int, int]:
    """Decode the snappy preamble (uncompressed length, a little-endian base-128 varint)."""
    value = shift = 0
    for i, byte in enumerate(data[:10]):
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, i + 1
        shift += 7
    raise RewriteError("remote read body is not snappy block-compressed (bad length preamble)")


def snappy_decode(body: bytes, limit: int = MAX_DECOMPRESSED) -> bytes:
    """Decompress a snappy block, refusing (before allocating) a declared length above ``limit``."""
    size, _ = _uvarint(body)
    if size > limit:
        raise RewriteError(f"remote read request decompresses to {size} bytes, more than {limit}")
    try:
        out = bytes(cramjam.snappy.decompress_raw(body))
    except Exception as exc:  # cramjam raises its own DecompressionError (a plain Exception)
        raise RewriteError(f"remote read body is not valid snappy: {exc}") from None
    if len(out) != size:  # pragma: no cover - the decoder checks this itself
        raise RewriteError("remote read body is not valid snappy (length mismatch)")
    return out


def snappy_encode(data: bytes) -> bytes:
    """Snappy block format (not framed), as remote read and write use."""
    return bytes(cramjam.snappy.compress_raw(data))


# --------------------------------------------------------------------------- policies


def _re_escape(value: str) -> str:
    """Escape RE2 metacharacters; RE2 reads ``\\<punctuation>`` as the character itself."""
    return _RE_META.sub(r"\\\1", value)


def read_policy(policies: tuple[Selector, ...]) -> Selector:
    """The one selector equivalent to the OR of ``policies``, or RewriteError (see the module docstring).

    Exact steps only: drop duplicates and selectors whose matchers include all of another's
    (it is implied), then merge one-equality selectors on one label into an anchored regex.
    """
    if not policies:
        raise RewriteError("no label policies given")
    sets = [frozenset(p.matchers) for p in dict.fromkeys(policies)]
    kept = [p for i, p in enumerate(dict.fromkeys(policies))
            if not any(j != i and (o < sets[i] or (o == sets[i] and j < i)) for j, o in enumerate(sets))]
    if len(kept) == 1:
        return kept[0]
    if all(len(p.matchers) == 1 and p.matchers[0].op == "=" for p in kept):
        names = {p.matchers[0].name for p in kept}
        if len(names) == 1:
            regex = "|".join(_re_escape(p.matchers[0].value) for p in kept)
            return Selector((LabelMatcher(names.pop(), "=~", regex),))
    raise RewriteError(
        f"remote read cannot be restricted by {len(kept)} label policies: each query's matchers are AND-ed, "
        "and splitting a query into one per policy makes the server answer more results than the client "
        "asked for (Prometheus's client fails on that, Thanos reads only the first); use the query API")


def _policy_matchers(policy: Selector) -> list[tuple[int, str, str]]:
    out: list[tuple[int, str, str]] = []
    for m in policy.matchers:
        if m.op == "=":
            # Not EQ: Prometheus rewrites EQ matchers equal to an external label into `name=""`.
            out.append((RE, m.name, _re_escape(m.value)))
        else:
            out.append((_OP_TO_PB[m.op], m.name, m.value))
    return out


# --------------------------------------------------------------------------- the rewrite


def decode_read_request(body: bytes) -> Any:
    """Parse a snappy-compressed ReadRequest, failing closed on anything not understood."""
    raw = snappy_decode(body)
    req = ReadRequest()
    try:
        req.ParseFromString(raw)
    except DecodeError as exc:
        raise RewriteError(f"remote read body is not a valid ReadRequest: {exc}") from None
    size = req.ByteSize()
    req.DiscardUnknownFields()
    if req.ByteSize() != size:
        raise RewriteError("remote read request carries fields this gateway does not know; refusing rather than "
                           "forwarding what it cannot restrict")
    for qi, q in enumerate(req.queries):
        for m in q.matchers:
            if m.type not in (EQ, NEQ, RE, NRE):
                raise RewriteError(f"query {qi} has a label matcher of unknown type {m.type}")
    return req


def restrict_read_request(body: bytes, policies: tuple[Selector, ...]) -> bytes:
    """Return a snappy-compressed ReadRequest whose every query carries the policy matchers.

    ``body`` is the client's snappy-compressed ``prometheus.ReadRequest``. Raises
    :class:`RewriteError` (a 400) for malformed input and for policy sets that cannot be
    expressed as one query per client query (see the module docstring).
    """
    req = decode_read_request(body)
    extra = _policy_matchers(read_policy(policies))
    for q in req.queries:
        for kind, name, value in extra:
            q.matchers.add(type=kind, name=name, value=value)
    if len(req.accepted_response_types):
        known = [t for t in req.accepted_response_types if t in _KNOWN_RESPONSE_TYPES]
        if not known:
            raise RewriteError("remote read accepts only response types this gateway does not know: "
                               f"{list(req.accepted_response_types)}")
        del req.accepted_response_types[:]
        req.accepted_response_types.extend(known)
    return snappy_encode(req.SerializeToString())


# --------------------------------------------------------------------------- fan-out (several selectors)

#: Content types of the two answers (Prometheus ``storage/remote/codec.go``).
SAMPLES_CONTENT_TYPE: Final = "application/x-protobuf"
STREAMED_CONTENT_TYPE: Final = "application/x-streamed-protobuf; proto=prometheus.ChunkedReadResponse"


def prefer_samples(body: bytes) -> bytes:
    """The restricted request asking for SAMPLES only, when the client accepts them.

    A fan-out merges whole answers, and a SAMPLES answer is one message per leg; STREAMED answers
    are merged too, but only when the client accepts nothing else.
    """
    req = decode_read_request(body)
    types = list(req.accepted_response_types)
    if types and SAMPLES not in types:
        return body
    del req.accepted_response_types[:]
    req.accepted_response_types.append(SAMPLES)
    return snappy_encode(req.SerializeToString())


def _label_key(labels: Any) -> tuple[tuple[str, str], ...]:
    return tuple(sorted((lb.name, lb.value) for lb in labels))


def _strict(msg: Any, what: str) -> None:
    size = msg.ByteSize()
    msg.DiscardUnknownFields()
    if msg.ByteSize() != size:  # e.g. native histograms: merging would drop them silently
        raise RewriteError(f"the upstream's {what} carries fields this gateway cannot merge")


def merge_samples(bodies: list[bytes]) -> bytes:
    """Merge snappy ``ReadResponse`` answers: per query, series by label set, samples by timestamp."""
    merged: list[dict[tuple[tuple[str, str], ...], dict[int, float]]] = []
    for body in bodies:
        resp = ReadResponse()
        try:
            resp.ParseFromString(snappy_decode(body, limit=1 << 31))
        except DecodeError as exc:
            raise RewriteError(f"the upstream's remote read answer does not decode: {exc}") from None
        _strict(resp, "remote read answer")
        if merged and len(resp.results) != len(merged):
            raise RewriteError("the upstream answered a different number of queries per selector")
        if not merged:
            merged = [{} for _ in resp.results]
        for qi, result in enumerate(resp.results):
            for ts in result.timeseries:
                samples = merged[qi].setdefault(_label_key(ts.labels), {})
                for s in ts.samples:
                    samples.setdefault(s.timestamp, s.value)
    out = ReadResponse()
    for series in merged:
        result = out.results.add()
        for key in sorted(series):
            ts = result.timeseries.add()
            for name, value in key:
                ts.labels.add(name=name, value=value)
            for t in sorted(series[key]):
                ts.samples.add(timestamp=t, value=series[key][t])
    return snappy_encode(out.SerializeToString())


def _crc32c_table() -> tuple[int, ...]:
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return tuple(table)


_CRC32C: Final = _crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli), the checksum of Prometheus's chunked read frames."""
    crc = 0xFFFFFFFF
    table = _CRC32C
    for b in data:
        crc = table[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def read_frames(body: bytes) -> list[bytes]:
    """Split a streamed answer into its messages (uvarint length, big-endian CRC-32C, message)."""
    out: list[bytes] = []
    pos = 0
    while pos < len(body):
        size, n = _uvarint(body[pos:])
        start = pos + n + 4
        msg = body[start : start + size]
        if len(msg) != size or int.from_bytes(body[pos + n : start], "big") != crc32c(msg):
            raise RewriteError("the upstream's streamed remote read answer is truncated or corrupt")
        out.append(msg)
        pos = start + size
    return out


def frame(msg: bytes) -> bytes:
    size = len(msg)
    head = bytearray()
    while size >= 0x80:
        head.append(size & 0x7F | 0x80)
        size >>= 7
    head.append(size)
    return bytes(head) + crc32c(msg).to_bytes(4, "big") + msg


def merge_streamed(bodies: list[bytes]) -> bytes:
    """Merge streamed answers: per query index, series by label set, chunks deduplicated, sorted."""
    by_query: dict[int, dict[tuple[tuple[str, str], ...], dict[tuple[int, int, int, bytes], Any]]] = {}
    for body in bodies:
        for raw in read_frames(body):
            msg = ChunkedReadResponse()
            try:
                msg.ParseFromString(raw)
            except DecodeError as exc:
                raise RewriteError(f"the upstream's streamed answer does not decode: {exc}") from None
            _strict(msg, "streamed remote read answer")
            series = by_query.setdefault(msg.query_index, {})
            for cs in msg.chunked_series:
                chunks = series.setdefault(_label_key(cs.labels), {})
                for c in cs.chunks:
                    chunks.setdefault((c.min_time_ms, c.max_time_ms, c.type, c.data), c)
    out = bytearray()
    for qi in sorted(by_query):
        for key in sorted(by_query[qi]):
            msg = ChunkedReadResponse(query_index=qi)
            cs = msg.chunked_series.add()
            for name, value in key:
                cs.labels.add(name=name, value=value)
            for ck in sorted(by_query[qi][key], key=lambda k: (k[0], k[1])):
                cs.chunks.add().CopyFrom(by_query[qi][key][ck])
            out += frame(msg.SerializeToString())
    return bytes(out)
