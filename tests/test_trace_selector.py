"""Trace selectors: parsing (Tempo's lexer rules), matching (Tempo's evaluation), the TraceQL condition,
which kind of selector applies to which signal, and trace-by-ID filtering of JSON and protobuf answers."""

from __future__ import annotations

import base64
import json

import pytest
from opentelemetry.proto.trace.v1 import trace_pb2

from gateway.lbac import traces
from gateway.policy.decision import Denied, for_signal
from gateway.policy.selector import LabelMatcher, Selector, SelectorError, parse_selector
from gateway.policy.trace_selector import (
    TraceSelector,
    parse_label_policy,
    parse_trace_selector,
    traceql_condition,
)
from tests.fake_tempo import _varint, attrs, resource_spans, span, to_proto

M = LabelMatcher

PARSED: list[tuple[str, list[tuple[str, str, str]], str]] = [
    ('{resource.env="dev"}', [("env", "=", "dev")], '{resource.env="dev"}'),
    ('{ resource.service.name=~"checkout|cart", resource.env!="prod" }',
     [("service.name", "=~", "checkout|cart"), ("env", "!=", "prod")],
     '{resource.service.name=~"checkout|cart", resource.env!="prod"}'),
    ('{resource.team !~ "a.*"}', [("team", "!~", "a.*")], '{resource.team!~"a.*"}'),
    ('{resource.k8s.io/name="x"}', [("k8s.io/name", "=", "x")], '{resource.k8s.io/name="x"}'),
    # quoted attribute names (parseQuotedAtrribute: only \" and \\ escape) and Go string escapes
    ('{resource."a b"="x"}', [("a b", "=", "x")], '{resource."a b"="x"}'),
    ('{resource.svc."my \\"odd\\" name"="x"}', [('svc.my "odd" name', "=", "x")],
     '{resource."svc.my \\"odd\\" name"="x"}'),
    ('{resource.env="d\\u00e9v\\t\\x41\\101\\U0001F600"}', [("env", "=", "dév\tAA\U0001F600")],
     '{resource.env="dév\\tAA\U0001F600"}'),
]


@pytest.mark.parametrize(("text", "matchers", "canonical"), PARSED)
def test_parse(text: str, matchers: list[tuple[str, str, str]], canonical: str) -> None:
    sel = parse_trace_selector(text)
    assert [(m.name, m.op, m.value) for m in sel.matchers] == matchers
    assert str(sel) == canonical and sel.text == text
    assert parse_trace_selector(str(sel)) == sel  # the canonical form reads back as the same selector


REFUSED: list[tuple[str, str]] = [
    ("", "non-empty"),
    ("{}", "at least one matcher"),
    ('{span.env="dev"}', "scope 'span.' is not supported"),
    ('{.env="dev"}', "scope '.' is not supported"),
    ('{env="dev"}', "resource attributes only"),
    ('{resource.env=dev}', "double-quoted strings"),
    ('{resource.env=`dev`}', "double-quoted strings"),
    ('{resource.port=80}', "double-quoted strings"),
    ('{resource.env>"a"}', "operators"),
    ('{resource.env="dev" && resource.team="a"}', "write '&&' as ','"),
    ('{resource.env="dev" || resource.team="a"}', "selector of its own"),
    ('{resource.env="dev"', "expected ',' or '}'"),
    ('{resource.env="dev"} {resource.x="y"}', "unexpected text"),
    ('{resource. env="dev"}', "attribute name must follow"),
    ('{resource.env="de\nv"}', "newline"),
    ('{resource.env="\\q"}', "invalid escape"),
    ('{resource.env="\\xff"}', "byte escapes"),
    ('{resource.env="\\ud800"}', "invalid Unicode"),
    ('{resource.env="dev}', "unterminated string"),
    ('{resource.env=~"("}', "invalid regular expression"),
    ('{resource.env=~"(?=x)"}', "not supported by Tempo"),
    ('{resource.env=~".*"}', "restrict something"),
    ('{' + ", ".join(f'resource.a{i}="x"' for i in range(65)) + '}', "at most 64 matchers"),
    ('{resource.env="' + "x" * 5000 + '"}', "at most 4096 characters"),
]


# Ground truth from Go (1.27): regexp/syntax.Parse(p, Perl|DotNL), then regexp.Compile("^(?s:" + parsed + ")$"), as
# Prometheus' FastRegexMatcher does for Tempo (pkg/regexp); None: Go refuses the pattern. Python's `re` disagrees
# on every one above the blank line (matches, or refuses what Go takes, or takes what Go refuses).
GO_REGEXES: list[tuple[str, str, bool | None]] = [
    (r"\d", "\u0663", False), (r"[\d]", "\u0663", False), (r"\D", "\u0663", True), (r"\w+", "\u00e9", False),
    (r"\W", "\u00e9", True), (r"\s", "\v", False), (r"\s", "\x1c", False), (r"\S", "\v", True), (r"\B", "", True),
    (r"[[:alpha:]]+", "abc", True), (r"[[:^alpha:]]", "1", True), (r"[[:word:]]", "_", True), (r"a{,3}", "aa", False),
    (r"a{,3}", "a{,3}", True), (r"dev$\n", "dev\n", False), ("(?i)\u0130", "i", False), (r"(?<n>a)", "a", True),
    (r"\Qa.b\E", "a.b", True), (r"(?U)a+", "aa", True), (r"\pL+", "abc", True), (r"\p{Greek}", "\u03b1", True),
    (r"\x{41}", "A", True), (r"\z", "", True), (r"(?P<n>a)(?P<n>b)", "ab", True), (r"\Z", "", None),
    (r"\u00e9", "\u00e9", None), (r"(a{1000}){1000}", "a", None), (r"\C", "a", None), (r"a*+", "a", None),
    (r"(?>a)", "a", None), (r"(?x) a", "a", None), (r"(?#c)a", "a", None), (r"(?=a)a", "a", None),
    (r"(a)\1", "aa", None),

    (r"(?i)k", "\u212a", True), ("(?i)\u017f", "s", True), (r"\bdev", "dev", True), (r"(?-s:.)", "\n", False),
    (r"[a-b-c]", "-", True), (r"[]a]", "]", True), (r"\012", "\n", True), (r"\xff", "\u00ff", True), (r"\e", "", None),
]


@pytest.mark.parametrize(("pattern", "value", "go"), GO_REGEXES)
def test_regexes_mean_what_they_mean_to_tempo(pattern: str, value: str, go: bool | None) -> None:
    """What the gateway accepts, Tempo accepts and matches alike (the trace-by-ID filter and a TraceQL rewrite
    must agree); the rest is refused."""
    for op, expect in (("=~", go), ("!~", None if go is None else not go)):
        text = f"{{resource.env{op}{json.dumps(pattern, ensure_ascii=False)}}}"
        if expect is None:
            with pytest.raises(SelectorError, match="not supported by Tempo"):
                parse_trace_selector(text)
        else:
            assert parse_trace_selector(text).matches({"env": value}) is expect, text


def test_regexes_run_in_linear_time() -> None:
    """The regexes run on span attributes and alert labels (anyone's writes) and may come from a client's
    X-Prom-Label-Policy (any read token): patterns Python's backtracking `re` takes exponential time on (minutes
    for 18 characters, the event loop stalled) answer at once, in label selectors too, with Go's meaning."""
    assert not parse_trace_selector('{resource.env=~"(a*)*b"}').matches({"env": "a" * 64})
    assert not parse_selector('{alertname=~"(.*.*)*#"}').matches({"alertname": "HighRequestLatency" * 4})
    assert not parse_selector('{env=~"\\\\d"}').matches({"env": "\u0663"})  # RE2's \d is ASCII
    with pytest.raises(SelectorError, match="regex"):
        parse_selector('{env=~"a(?=b)"}')


@pytest.mark.parametrize(("text", "error"), REFUSED)
def test_refused(text: str, error: str) -> None:
    with pytest.raises(SelectorError, match=None) as info:
        parse_trace_selector(text)
    assert error in str(info.value), str(info.value)


# Tempo evaluates `resource.x <op> "v"` as false on a span without x, or with a non-string x
# (ast_execute.go: operands of different types compare false), for != and !~ too.
MATCHES: list[tuple[str, dict[str, str], bool]] = [
    ('{resource.env="dev"}', {"env": "dev"}, True),
    ('{resource.env="dev"}', {"env": "prod"}, False),
    ('{resource.env="dev"}', {}, False),
    ('{resource.env!="prod"}', {"env": "dev"}, True),
    ('{resource.env!="prod"}', {}, False),
    ('{resource.env!~"prod"}', {}, False),
    ('{resource.env=~"de"}', {"env": "dev"}, False),  # anchored, as Prometheus' FastRegexMatcher
    ('{resource.env=~"de.*"}', {"env": "dev"}, True),
    ('{resource.env=~"a.b"}', {"env": "a\nb"}, True),  # (?s): . matches a newline
    ('{resource.env!~"de.*"}', {"env": "dev"}, False),
    ('{resource.env="dev", resource.team="a"}', {"env": "dev", "team": "a"}, True),
    ('{resource.env="dev", resource.team="a"}', {"env": "dev"}, False),
]


@pytest.mark.parametrize(("text", "resource", "expected"), MATCHES)
def test_matches(text: str, resource: dict[str, str], expected: bool) -> None:
    assert parse_trace_selector(text).matches(resource) is expected


def test_condition_is_traceql_of_the_same_meaning() -> None:
    a = parse_trace_selector('{resource.env="dev", resource.team=~"a|b"}')
    b = parse_trace_selector('{resource."odd name"!="x\\"y"}')
    assert a.condition() == '(resource.env = "dev" && resource.team =~ "a|b")'
    assert b.condition() == '(resource."odd name" != "x\\"y")'
    assert traceql_condition([a]) == a.condition()
    assert traceql_condition([a, b]) == f"({a.condition()} || {b.condition()})"
    with pytest.raises(ValueError):
        traceql_condition([])


def test_trace_selectors_never_equal_label_selectors() -> None:
    t = parse_trace_selector('{resource.env="dev"}')
    p = Selector((M("env", "=", "dev"),))
    assert t != p and isinstance(parse_label_policy('{ resource.env="dev"}'), TraceSelector)
    assert not isinstance(parse_label_policy('{env="dev"}'), TraceSelector)


TRACE = parse_trace_selector('{resource.env="dev"}')
LABEL = parse_selector('{env="dev"}')


@pytest.mark.parametrize(("policies", "backend", "scope", "expected"), [
    ((), "traces", "traces:read", ()),  # unrestricted
    ((TRACE, LABEL), "traces", "traces:read", (TRACE,)),
    ((TRACE, LABEL), "metrics", "metrics:read", (LABEL,)),
    ((TRACE, LABEL), "logs", "logs:read", (LABEL,)),
    ((TRACE, LABEL), "profiles", "profiles:read", (LABEL,)),
    ((LABEL,), "traces", "traces:read", Denied),  # fail closed: nothing restricts traces
    ((TRACE,), "metrics", "metrics:read", Denied),
    ((TRACE,), "logs", "logs:read", Denied),
    ((TRACE,), "metrics", "rules:write", Denied),  # a rule's results would read metrics whole
    ((TRACE,), "metrics", "rules:read", Denied),
    ((LABEL,), "traces", "traces:write", ()),  # writes are not restricted
    ((TRACE,), "metrics", "metrics:write", ()),
])
def test_which_selectors_apply_to_which_signal(policies: tuple[Selector, ...], backend: str, scope: str,
                                               expected: object) -> None:
    if expected is Denied:
        with pytest.raises(Denied) as info:
            for_signal(policies, backend, scope)
        assert info.value.status == 403 and info.value.reason == "lbac_unfilterable"
        return
    assert for_signal(policies, backend, scope) == expected


# --------------------------------------------------------------------------- trace-by-ID filtering

TID = bytes.fromhex("2f3e0cee77ae5dc9c17ade3689eb2e54")
SECRET = {"http.url": "https://prod/secret", "db.statement": "SELECT secret"}


def _prod_span() -> dict[str, object]:
    return span(TID, b"\x02" * 8, "prod-op", b"\x01" * 8, attributes=attrs(**{"db__statement": "SELECT secret"}),
                events=[{"timeUnixNano": "1", "name": "exception", "attributes": attrs(msg="secret")}],
                links=[{"traceId": base64.b64encode(b"\x09" * 16).decode(), "spanId": base64.b64encode(b"\x09" * 8)
                        .decode()}], status={"code": "STATUS_CODE_ERROR", "message": "secret failure"},
                traceState="vendor=secret", droppedAttributesCount=3)


BATCHES = [
    resource_spans(attrs(env="dev", service__name="cart"), span(TID, b"\x01" * 8, "dev-op",
                                                                attributes=attrs(user="alice"))),
    resource_spans(attrs(env="prod", service__name="billing", secret="s3cr3t"), _prod_span(), scope="prodlib"),
    resource_spans(attrs(env=7), span(TID, b"\x03" * 8, "int-env")),  # a non-string env matches nothing
]


def test_json_v1_hidden_spans_keep_only_intrinsics() -> None:
    out = traces.filter_json(json.dumps({"batches": BATCHES}).encode(), [TRACE], v2=False)
    assert out is not None and list(out) == ["batches"]
    dev, prod, other = out["batches"]
    assert dev == BATCHES[0]  # visible: unchanged
    assert prod == {"resource": {}, "scopeSpans": [{"scope": {}, "spans": [{
        "traceId": base64.b64encode(TID).decode(), "spanId": base64.b64encode(b"\x02" * 8).decode(),
        "parentSpanId": base64.b64encode(b"\x01" * 8).decode(), "name": "prod-op", "kind": "SPAN_KIND_SERVER",
        "startTimeUnixNano": "1700000000000000000", "endTimeUnixNano": "1700000001000000000",
        "status": {"code": "STATUS_CODE_ERROR"}}]}]}
    assert other["resource"] == {} and other["scopeSpans"][0]["spans"][0]["name"] == "int-env"
    assert "secret" not in json.dumps(out) and "prodlib" not in json.dumps(out)


def test_json_v2_and_no_visible_span() -> None:
    doc = {"trace": {"resourceSpans": BATCHES}, "metrics": {"inspectedBytes": "10"}}
    out = traces.filter_json(json.dumps(doc).encode(), [TRACE], v2=True)
    assert out is not None and out["metrics"] == {"inspectedBytes": "10"}
    assert "secret" not in json.dumps(out)
    nobody = [parse_trace_selector('{resource.env="qa"}')]
    assert traces.filter_json(json.dumps(doc).encode(), nobody, v2=True) is None
    assert traces.filter_json(b'{"trace":{},"metrics":{}}', [TRACE], v2=True) is None  # empty trace


@pytest.mark.parametrize(("raw", "v2"), [
    (b"[]", False), (b'{"batches":[], "extra":1}', False), (b'{"batches":{}}', False), (b"not json", False),
    (b'{"trace":{"resourceSpans":[]},"unknown":1}', True), (b'{"trace":{"batches":[]}}', True),
    (b'{"batches":[{"resource":{"attributes":[{"value":1}]}}]}', False),
])
def test_json_shapes_it_does_not_know_are_refused(raw: bytes, v2: bool) -> None:
    with pytest.raises(ValueError):
        traces.filter_json(raw, [TRACE], v2)


def test_protobuf_v1_and_v2() -> None:
    raw = to_proto(BATCHES)
    out = traces.filter_trace_proto(raw, [TRACE])
    assert out is not None
    data = trace_pb2.TracesData.FromString(out)
    dev, prod, other = data.resource_spans
    assert dev == trace_pb2.TracesData.FromString(raw).resource_spans[0]
    assert len(prod.resource.attributes) == 0 and prod.scope_spans[0].scope.name == ""
    hidden = prod.scope_spans[0].spans[0]
    assert (hidden.name, hidden.span_id, hidden.parent_span_id, hidden.status.code) == (
        "prod-op", b"\x02" * 8, b"\x01" * 8, trace_pb2.Status.STATUS_CODE_ERROR)
    assert not hidden.attributes and not hidden.events and not hidden.links and not hidden.status.message
    assert not hidden.trace_state and not hidden.dropped_attributes_count
    assert b"secret" not in out and b"prodlib" not in out
    assert other.scope_spans[0].spans[0].name == "int-env" and not other.resource.attributes
    # v2: TraceByIDResponse{trace: 1, metrics: 2}; the metrics pass as they came
    metrics = b"\x12\x03\x08\xe8\x07"
    wrapped = b"\x0a" + _varint(len(raw)) + raw + metrics
    out2 = traces.filter_response_proto(wrapped, [TRACE])
    assert out2 is not None and out2.endswith(metrics) and b"secret" not in out2
    assert traces.filter_response_proto(wrapped, [parse_trace_selector('{resource.env="qa"}')]) is None


def test_protobuf_unknown_fields_of_hidden_spans_are_dropped() -> None:
    raw = to_proto([BATCHES[1]])
    # an unknown span field (number 99, a string) appended inside the span: a future Tempo's field
    data = trace_pb2.TracesData.FromString(raw)
    s = data.resource_spans[0].scope_spans[0].spans[0]
    s.MergeFromString(b"\x9a\x06\x06secret")
    raw = data.SerializeToString()
    assert b"secret" in raw
    out = traces.filter_trace_proto(raw, [parse_trace_selector('{resource.env="qa"}')])
    assert out is None  # no visible span at all
    out = traces.filter_trace_proto(to_proto([BATCHES[0]]) + raw, [TRACE])
    assert out is not None and b"secret" not in out


@pytest.mark.parametrize("raw", [b"\xff\xff", b"\x0a\x05ab", b"\x0b"])
def test_protobuf_that_does_not_decode_is_refused(raw: bytes) -> None:
    with pytest.raises(ValueError):
        traces.filter_response_proto(raw, [TRACE])
