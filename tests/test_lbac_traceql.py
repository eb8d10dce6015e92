"""The TraceQL rewrite (gateway.lbac.traceql): every spanset filter carries the policy, or the query is refused.

Hand-written cases with exact outputs, the structural checks every output passes (it re-reads under the same
tokenizer with the condition in every filter and no pipeline left without a filter), refusals with their
reasons, bounds, the tag endpoints' ``q``, the search answer filter and the request-level rewrite
(gateway.lbac.tracereads). Tempo's own corpus (pkg/traceql/test_examples.yaml, not ours to commit) is run by
``python -m tests.tempo_corpus PATH``; its counts are in docs/LBAC.md.
"""

from __future__ import annotations

import time
from urllib.parse import parse_qsl

import pytest

from gateway.errors import ProxyError
from gateway.lbac import RewriteError
from gateway.lbac.fanout import Merge, Plan
from gateway.lbac.trace_search import filter_answer
from gateway.lbac.traceql import COMMENT, LBRACE, MAX_QUERY, restrict, tags_query, tokenize, verify
from gateway.lbac.tracereads import merge_tag_values, merge_tags, restrict_url
from gateway.policy.selector import parse_selector
from gateway.policy.trace_selector import parse_trace_selector, traceql_condition
from gateway.routes import Kind

C = '(resource.env = "dev")'
DEV = (parse_trace_selector('{resource.env="dev"}'),)

CASES = [
    ("{}", '{ (resource.env = "dev") }'),
    ("{ }", '{ (resource.env = "dev") }'),
    ("{ .a = 1 }", '{ (.a = 1) && (resource.env = "dev") }'),
    ('{ span.http.method = "GET" || status = error }',
     '{ (span.http.method = "GET" || status = error) && (resource.env = "dev") }'),
    # structural and spanset operators: both sides restricted
    ('{ .a } >> { .b }', '{ (.a) && (resource.env = "dev") } >> { (.b) && (resource.env = "dev") }'),
    ('{ .a } !< {}', '{ (.a) && (resource.env = "dev") } !< { (resource.env = "dev") }'),
    ('{ .a } &>> { .b } || {.c}~{.d}',
     '{ (.a) && (resource.env = "dev") } &>> { (.b) && (resource.env = "dev") } || '
     '{ (.c) && (resource.env = "dev") }~{ (.d) && (resource.env = "dev") }'),
    # pipelines, scalar filters, grouping, select
    ('{ .a } | count() > 2 | by(.b) | select(span.c)',
     '{ (.a) && (resource.env = "dev") } | count() > 2 | by(.b) | select(span.c)'),
    ("({ .a } | count() > 1) && { .b }",
     '({ (.a) && (resource.env = "dev") } | count() > 1) && { (.b) && (resource.env = "dev") }'),
    # metrics, second stage, math, compare's filter argument, hints
    ("{ } | rate() by (resource.service.name) | topk(5)",
     '{ (resource.env = "dev") } | rate() by (resource.service.name) | topk(5)'),
    ("{ status = error } | quantile_over_time(duration, .9, .99) with(sample=true)",
     '{ (status = error) && (resource.env = "dev") } | quantile_over_time(duration, .9, .99) with(sample=true)'),
    ("({} | rate()) / ({ status = error } | rate())",
     '({ (resource.env = "dev") } | rate()) / ({ (status = error) && (resource.env = "dev") } | rate())'),
    ("{} | compare({ status = error }, 10)",
     '{ (resource.env = "dev") } | compare({ (status = error) && (resource.env = "dev") }, 10)'),
    # a pipeline without a leading filter starts from every span in Tempo: the policy is put in front
    ("count() > 1", '{ (resource.env = "dev") } | count() > 1'),
    ("by(.a) | { true }", '{ (resource.env = "dev") } | by(.a) | { (true) && (resource.env = "dev") }'),
    ("({ .a } | count() > 1) && (max(duration) > 2s)",
     '({ (.a) && (resource.env = "dev") } | count() > 1) && ({ (resource.env = "dev") } | max(duration) > 2s)'),
    ("{ .a } | (count() + 1) > 2", '{ (.a) && (resource.env = "dev") } | (count() + 1) > 2'),
    # braces, pipes and comments inside strings, raw strings and quoted attribute names are not structure
    ('{ .a = "}|{" }', '{ (.a = "}|{") && (resource.env = "dev") }'),
    ("{ .a =~ `x}{` }", '{ (.a =~ `x}{`) && (resource.env = "dev") }'),
    ('{ ."x}" = 1 && resource."a b{" != "//" }',
     '{ (."x}" = 1 && resource."a b{" != "//") && (resource.env = "dev") }'),
    ('{ .a/b//c = 1 }', '{ (.a/b//c = 1) && (resource.env = "dev") }'),  # `/` is an attribute rune
    # comments are dropped: a // comment inside a filter would otherwise swallow the condition
    ("{ .a // } }\n }", '{ (.a) && (resource.env = "dev") }'),
    ("{ .a /* } */ } /* { */ | count() > 1", '{ (.a) && (resource.env = "dev") }   | count() > 1'),
    ("// leading\n{ .a }", ' \n{ (.a) && (resource.env = "dev") }'),
    # event, link and instrumentation attributes are per span: conjoined like any other
    ('{ event.name = "x" && link:traceID != nil }',
     '{ (event.name = "x" && link:traceID != nil) && (resource.env = "dev") }'),
]


@pytest.mark.parametrize(("query", "expected"), CASES)
def test_restrict(query: str, expected: str) -> None:
    out = restrict(query, C)
    assert out == expected
    verify(out, C)  # re-read: every filter carries the condition, every pipeline starts with a filter
    filters = sum(1 for t in tokenize(out) if t.kind == LBRACE)
    assert out.count(C) == filters >= 1
    assert not any(t.kind == COMMENT for t in tokenize(out))


def test_several_selectors_are_one_or_ed_condition() -> None:
    sels = (parse_trace_selector('{resource.env="dev", resource.team=~"a|b"}'),
            parse_trace_selector('{resource.service.name="checkout"}'))
    cond = traceql_condition(sels)
    assert restrict("{ .a }", cond) == f"{{ (.a) && {cond} }}"
    assert cond == ('((resource.env = "dev" && resource.team =~ "a|b") || (resource.service.name = "checkout"))')


REFUSED = [
    ("{ parent.resource.env = \"prod\" }", "parent. attributes"),
    ("{ .a } | by(parent.span.b)", "parent. attributes"),
    ('{ rootServiceName = "a" }', "rootServiceName"),
    ('{ trace:rootService = "a" }', "trace:rootService"),
    ("{ } | select(rootServiceName)", "rootServiceName"),
    ("{ .a = 'x' }", "single quotes"),
    ("{ .a = 1", "unterminated spanset filter"),
    ("{ .a } }", "unbalanced '}'"),
    ("{ { .a } }", "cannot hold another"),
    ("({ .a }", "unbalanced '('"),
    ("{ .a } )", "unbalanced ')'"),
    ('{ .a = "x }', "unterminated or invalid string"),
    ('{ .a = "\\q" }', "unterminated or invalid string"),
    ("{ .a = \"\\'\" }", "unterminated or invalid string"),  # text/scanner: only \\" escapes the quote
    ("{ .a /* }", "unterminated comment"),
    ("{ .a = `x }", "unterminated raw string"),
    ('{ ."a }', "unterminated quoted attribute"),
    ('{ ."a\\n" = 1 }', "invalid escape sequence"),
    ("{ .a = 1 } ; {}", "unexpected character"),
    ("{ .a\x0b= 1 }", "unexpected character"),
    ("", "empty"),
    ("  // only a comment", "empty"),
]


@pytest.mark.parametrize(("query", "reason"), REFUSED)
def test_refused(query: str, reason: str) -> None:
    with pytest.raises(RewriteError) as err:
        restrict(query, C)
    assert reason in str(err.value)


def test_bounds_are_checked_fast_before_anything_parses() -> None:
    started = time.perf_counter()
    for q in ("{ .a }" * (MAX_QUERY // 6 + 1), "(" * 100_000 + "{}" + ")" * 100_000, "(" * 65 + "{}" + ")" * 65):
        with pytest.raises(RewriteError, match="longer than|nests deeper"):
            restrict(q, C)
    with pytest.raises(RewriteError, match="more than 256 spanset filters"):
        restrict("{}&&" * 300 + "{}", C)
    # the largest accepted queries are rewritten (a loose bound on time: no timing flake)
    for unit in ("{ .a = 1 && .b = 2 } && ", '{ .a = "' + "x" * 50 + '" } && '):
        big = unit * ((MAX_QUERY - 2) // len(unit)) + "{}"
        if big.count("{") <= 256:
            assert restrict(big, C).count(C) == big.count("{")
    assert time.perf_counter() - started < 10


def test_condition_must_be_a_plain_expression() -> None:
    for bad in ("{}", "(a) | count()", "(a", "a)"):
        with pytest.raises(RewriteError, match="condition"):
            restrict("{}", bad)


def _q(raw: str | Plan) -> dict[str, str]:
    assert isinstance(raw, str)
    return dict(parse_qsl(raw, keep_blank_values=True))


TAGS = [
    (None, '{ (resource.env = "dev") }'),
    ("", '{ (resource.env = "dev") }'),
    ("{ }", '{ (resource.env = "dev") }'),
    ("{ true }", '{ (resource.env = "dev") }'),
    ('{ span.http.method = "GET" }', '{ span.http.method = "GET" && (resource.env = "dev") }'),
    ('{ .a = "x" && status = error && span:kind = server && duration > 1s && resource.b =~ "c|d" && .n >= 2 }',
     '{ .a = "x" && status = error && span:kind = server && duration > 1s && resource.b =~ "c|d" && .n >= 2 && '
     '(resource.env = "dev") }'),
]


@pytest.mark.parametrize(("q", "expected"), TAGS)
def test_tags_query(q: str | None, expected: str) -> None:
    assert tags_query(q, C) == expected


@pytest.mark.parametrize("q", ['{ .a = "x" || .b = "y" }', "{ .a }", "{ .a } | count() > 1", "{ .a } && { .b }",
                               '{ (.a = "x") }', '{ !(.a = "x") }', "{ .a = .b }", '{ parent.resource.a = "x" }',
                               '{ .a = "x" } // c', "x", "{ .a =~ 1 }", "{ status = 1 }", '{ duration > "x" }',
                               "{ name = error }", "{ kind =~ server }", '{ span:childCount = 1 }', "{ .a = nil }"])
def test_tags_query_refuses_what_tempo_would_not_extract_exactly(q: str) -> None:
    with pytest.raises(RewriteError):
        tags_query(q, C)


def test_tag_look_ups_under_several_selectors_are_one_request_each_merged() -> None:
    qa = parse_trace_selector('{resource.env="qa"}')
    with pytest.raises(RewriteError, match="one trace selector"):  # Tempo before 3.0 would widen an OR
        tags_query(None, traceql_condition((DEV[0], qa)))
    plan = restrict_url(Kind.TRACE_TAGS, "/api/v2/search/tag/span.x/values", "q=%7B.a%3D1%7D&limit=2", (DEV[0], qa))
    assert isinstance(plan, Plan) and plan.merge is Merge.TEMPO_TAG_VALUES and plan.limit == 2
    assert [_q(leg.query) for leg in plan.legs] == [
        {"q": '{ .a=1 && (resource.env = "dev") }', "limit": "2"}, {"q": '{ .a=1 && (resource.env = "qa") }',
                                                                    "limit": "2"}]
    docs = [{"tagValues": [{"type": "string", "value": "a"}, {"type": "string", "value": "b"}], "metrics": {}},
            {"tagValues": [{"type": "string", "value": "b"}, {"type": "int", "value": "1"}]}]
    assert merge_tag_values(docs, plan)["tagValues"] == [{"type": "string", "value": "a"},
                                                         {"type": "string", "value": "b"}]
    tags = restrict_url(Kind.TRACE_TAGS, "/api/v2/search/tags", "scope=span", (DEV[0], qa))
    assert isinstance(tags, Plan) and tags.merge is Merge.TEMPO_TAGS and len(tags.legs) == 2
    docs = [{"scopes": [{"name": "span", "tags": ["b", "a"]}]}, {"scopes": [{"name": "span", "tags": ["c", "a"]},
                                                                           {"name": "resource", "tags": ["x"]}]}]
    assert merge_tags(docs, tags)["scopes"] == [{"name": "span", "tags": ["a", "b", "c"]},
                                                {"name": "resource", "tags": ["x"]}]
    limited = restrict_url(Kind.TRACE_TAGS, "/api/v2/search/tags", "limit=2", (DEV[0], qa))
    assert isinstance(limited, Plan) and merge_tags(docs, limited)["scopes"][0] == {"name": "span", "tags": ["a", "b"]}
    with pytest.raises(ValueError):
        merge_tags([{"scopes": [{"name": "span", "tags": [1]}]}], tags)




def test_request_rewrites_read_the_url_as_tempo_does() -> None:
    out = _q(restrict_url(Kind.TRACEQL, "/api/search", "q=%7B.a%7D&limit=20&spss=3&start=1&end=2", DEV))
    assert out == {"q": '{ (.a) && (resource.env = "dev") }', "limit": "20", "spss": "3", "start": "1", "end": "2"}
    assert _q(restrict_url(Kind.TRACEQL, "/api/search", "limit=5&q=", DEV))["q"] == '{ (resource.env = "dev") }'
    # metrics: Tempo takes q over query; one restricted q is sent
    out = _q(restrict_url(Kind.TRACEQL, "/api/metrics/query_range", "query=%7B%7D|rate()&q=%7B.b%7D|rate()&step=5",
                          DEV))
    assert out == {"q": '{ (.b) && (resource.env = "dev") }|rate()', "step": "5"}
    out = _q(restrict_url(Kind.TRACEQL, "/api/metrics/query", "query=%7B%7D|rate()", DEV))
    assert out == {"q": '{ (resource.env = "dev") }|rate()'}
    out = _q(restrict_url(Kind.TRACE_TAGS, "/api/v2/search/tags", "scope=resource", DEV))
    assert out == {"scope": "resource", "q": '{ (resource.env = "dev") }'}
    out = _q(restrict_url(Kind.TRACE_TAGS, "/api/v2/search/tag/span.x/values", "q=%7B.a%3D1%7D&limit=9", DEV))
    assert out == {"q": '{ .a=1 && (resource.env = "dev") }', "limit": "9"}


@pytest.mark.parametrize(("kind", "path", "query", "status", "text"), [
    (Kind.TRACEQL, "/api/search", "tags=service.name%3Dx&minDuration=1s", 400, "search by tags"),
    (Kind.TRACEQL, "/api/search", "q=%7B%7D&q=%7B%7D", 400, "more than once"),
    (Kind.TRACEQL, "/api/search", "q=%7B%7D&dc=%5B%5D", 400, "'dc' cannot be used"),
    (Kind.TRACEQL, "/api/metrics/query_range", "step=5", 400, "needs q"),
    (Kind.TRACEQL, "/api/metrics/query_range", "q=%7Bparent.a%3D1%7D", 400, "parent."),
    (Kind.TRACE_TAGS, "/api/v2/search/tags", "q=%7B.a%7D", 400, "one spanset filter"),
    (Kind.TRACE_TAGS, "/api/v2/search/tag/parent.resource.env/values", "", 400, "parent. attributes"),
    (Kind.TRACE_TAGS, "/api/v2/search/tag/rootServiceName/values", "", 400, "rootServiceName"),
    (Kind.TRACE_TAGS, "/api/v2/search/tag/trace%253ArootService/values", "", 400, "trace:rootService"),
    (Kind.TRACE_UNFILTERABLE, "/api/search/tags", "", 403, "use the v2 form"),
    (Kind.TRACE_UNFILTERABLE, "/api/metrics/summary", "q=%7B%7D", 403, "query_range"),
])
def test_request_refusals(kind: Kind, path: str, query: str, status: int, text: str) -> None:
    with pytest.raises(ProxyError) as err:
        restrict_url(kind, path, query, DEV)
    assert err.value.status == status and text in err.value.message, err.value.message


def test_a_trace_read_under_other_label_policies_fails_closed() -> None:
    with pytest.raises(ProxyError) as err:
        restrict_url(Kind.TRACEQL, "/api/search", "q=%7B%7D", (parse_selector('{env="dev"}'),))
    assert err.value.status == 403


def test_search_answer_keeps_root_service_only_when_provably_visible() -> None:
    doc = {"traces": [
        {"traceID": "1", "rootServiceName": "checkout", "rootTraceName": "GET /", "durationMs": 5,
         "serviceStats": {"checkout": {"spanCount": 2}, "payments": {"spanCount": 1, "errorCount": 1}},
         "spanSets": [{"spans": [{"spanID": "a"}], "matched": 1}]},
        {"traceID": "2", "rootServiceName": "payments", "rootTraceName": "POST /pay",
         "serviceStats": {"payments": {"spanCount": 3}}},
    ], "metrics": {"inspectedTraces": 2, "inspectedBytes": "100", "completedJobs": 1}}
    by_service = (parse_trace_selector('{resource.service.name=~"check.*"}'),)
    out = filter_answer(doc, by_service)
    assert out["traces"][0]["rootServiceName"] == "checkout"
    assert out["traces"][0]["serviceStats"] == {"checkout": {"spanCount": 2}}
    assert "rootServiceName" not in out["traces"][1] and "serviceStats" not in out["traces"][1]
    assert out["traces"][1]["rootTraceName"] == "POST /pay"  # an intrinsic: kept, as trace by ID keeps it
    assert out["metrics"] == {"completedJobs": 1}  # the scan's totals count hidden spans: removed
    # a selector on another attribute proves nothing about the root span
    doc2 = {"traces": [{"traceID": "1", "rootServiceName": "checkout", "serviceStats": {"checkout": {}}}]}
    assert filter_answer(doc2, DEV) == {"traces": [{"traceID": "1"}]}
    with pytest.raises(ValueError):
        filter_answer([], DEV)
