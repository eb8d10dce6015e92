"""LogQL rewriting for label policies: exact rewrites, refusals, and a generated property.

Every rewrite is asserted exactly, so a selector that escapes restriction, a string or
comment that gets rewritten, or a changed union shape all fail a case.
"""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.lbac import RewriteError
from gateway.lbac.logql import (
    MAX_QUERY_LEN,
    parse_stream_selector,
    restrict_logql,
    restrict_logql_matchers,
    stream_selectors,
)
from gateway.policy.selector import OPS, LabelMatcher, MatchOpStr, Selector, parse_selector


def pols(*texts: str) -> tuple[Selector, ...]:
    return tuple(parse_selector(t) for t in texts)


ONE = pols('{env="dev"}')
SAME = pols('{env="dev"}', '{env="prod"}')
TWO = pols('{env="dev"}', '{team="a"}')

REWRITES: list[tuple[str, tuple[Selector, ...], str]] = [
    # --- one policy: every selector gets the matchers, the rest is copied verbatim
    ('{app="x"}', ONE, '{app="x", env="dev"}'),
    ('{ app = "x" ,pod!~"a.*" }|="err"', ONE, '{app="x", pod!~"a.*", env="dev"}|="err"'),
    ('{\n\tapp="x"\n}\n|= "a"', ONE, '{app="x", env="dev"}\n|= "a"'),
    ('{app="x"}|json|level="error"', ONE, '{app="x", env="dev"}|json|level="error"'),
    (
        '{app="x"} |= "{app=\\"y\\"}" | line_format "{{.msg}} {x}"',
        ONE,
        '{app="x", env="dev"} |= "{app=\\"y\\"}" | line_format "{{.msg}} {x}"',
    ),
    ('{app=`x\\d`} |~ `{"a":` != `}`', ONE, '{app="x\\\\d", env="dev"} |~ `{"a":` != `}`'),
    ('{app="x"} # {app="y"} "\n|= "a" # `{`', ONE, '{app="x", env="dev"} # {app="y"} "\n|= "a" # `{`'),
    ('{app="x"} | pattern "<_> {x} <_>"', ONE, '{app="x", env="dev"} | pattern "<_> {x} <_>"'),
    ('{app="x"} | label_format env="prod"', ONE, '{app="x", env="dev"} | label_format env="prod"'),
    ('{app="x"} | label_format env=app', ONE, '{app="x", env="dev"} | label_format env=app'),
    ('{env="prod"}', ONE, '{env="prod", env="dev"}'),
    ('{env="dev", app="x"}', ONE, '{env="dev", app="x"}'),
    ('{env!="dev", app="x"}', ONE, '{env!="dev", app="x", env="dev"}'),
    ('{app="a\\"b\\\\c\\u00e9\\x41\\101\\t"}', ONE, '{app="a\\"b\\\\céAA\\t", env="dev"}'),
    (
        'sum(rate({app="a"}[5m])) / sum(rate({app="b"}[5m]))',
        ONE,
        'sum(rate({app="a", env="dev"}[5m])) / sum(rate({app="b", env="dev"}[5m]))',
    ),
    (
        'sum without (pod) (count_over_time({app="x"}[1m]))',
        ONE,
        'sum without (pod) (count_over_time({app="x", env="dev"}[1m]))',
    ),
    ('count_over_time({app="x"}[5m] offset 1h)', ONE, 'count_over_time({app="x", env="dev"}[5m] offset 1h)'),
    (
        'sum_over_time({app="x"} | logfmt | unwrap bytes(size) | __error__="" [5m])',
        ONE,
        'sum_over_time({app="x", env="dev"} | logfmt | unwrap bytes(size) | __error__="" [5m])',
    ),
    (
        'topk(3, sum by (level) (rate({app="x"} | json [1m])))',
        ONE,
        'topk(3, sum by (level) (rate({app="x", env="dev"} | json [1m])))',
    ),
    (
        'vector(0) or label_replace(rate({app="x"}[1m]), "d", "$1", "s", "{(.*)}")',
        ONE,
        'vector(0) or label_replace(rate({app="x", env="dev"}[1m]), "d", "$1", "s", "{(.*)}")',
    ),
    ('{app="x"}', pols('{env="d\\"v\\n"}'), '{app="x", env="d\\"v\\n"}'),
    # --- several policies that merge exactly into one selector
    ('{app="x"} |= "err"', SAME, '{app="x", env=~"dev|prod"} |= "err"'),
    ('{app="x"}', pols('{env="a.b"}', '{env=~"c|d"}'), '{app="x", env=~"a\\\\.b|(?:c|d)"}'),
    ('{app="x"}', pols('{team="a"}', '{team="a", env="dev"}'), '{app="x", team="a"}'),
    ('{app="x"}', pols('{team="a"}', '{team="a"}'), '{app="x", team="a"}'),
    (
        '{app="x"}',
        pols('{team="a", env="dev"}', '{team="a", env="prod"}'),
        '{app="x", team="a", env=~"dev|prod"}',
    ),
    # --- several policies on metric queries: union of each range aggregation
    (
        'sum by (level) (rate({app="x"} | json [5m]))',
        TWO,
        'sum by (level) ((rate({app="x", env="dev"} | json [5m]) or rate({app="x", team="a"} | json [5m])))',
    ),
    (
        'count_over_time({app="x"}[5m] offset 1h)',
        TWO,
        '(count_over_time({app="x", env="dev"}[5m] offset 1h) or count_over_time({app="x", team="a"}[5m] offset 1h))',
    ),
    (
        'sum(rate({app="a"}[5m])) / sum(rate({app="b"}[5m]))',
        TWO,
        'sum((rate({app="a", env="dev"}[5m]) or rate({app="a", team="a"}[5m]))) / '
        'sum((rate({app="b", env="dev"}[5m]) or rate({app="b", team="a"}[5m])))',
    ),
    (
        'topk(5, sum without (pod) (rate({app="x"}|logfmt|unwrap dur [1m])))',
        TWO,
        'topk(5, sum without (pod) ((rate({app="x", env="dev"}|logfmt|unwrap dur [1m]) or '
        'rate({app="x", team="a"}|logfmt|unwrap dur [1m]))))',
    ),
    (
        'vector(0) or sum(rate({app="x"}[1m]))',
        TWO,
        'vector(0) or sum((rate({app="x", env="dev"}[1m]) or rate({app="x", team="a"}[1m])))',
    ),
    (
        'label_replace(rate({app="x"}[1m]), "d", "$1", "s", "(.*)")',
        TWO,
        'label_replace((rate({app="x", env="dev"}[1m]) or rate({app="x", team="a"}[1m])), "d", "$1", "s", "(.*)")',
    ),
    (
        '((sum(rate(({app="x"})[5m]))))',
        TWO,
        '((sum((rate(({app="x", env="dev"})[5m]) or rate(({app="x", team="a"})[5m])))))',
    ),
    (
        'SUM(RATE({app="x"} |= ")" # ) {\n[1m]))',
        TWO,
        'SUM((RATE({app="x", env="dev"} |= ")" # ) {\n[1m]) or RATE({app="x", team="a"} |= ")" # ) {\n[1m])))',
    ),
    (
        'quantile_over_time(0.99, {app="x"} | unwrap latency [5m]) by (env, team, pod)',
        TWO,
        '(quantile_over_time(0.99, {app="x", env="dev"} | unwrap latency [5m]) by (env, team, pod) or '
        'quantile_over_time(0.99, {app="x", team="a"} | unwrap latency [5m]) by (env, team, pod))',
    ),
    (
        'sum by (level) (count_over_time({app="x"} | drop __error__, pod [1m]))',
        TWO,
        'sum by (level) ((count_over_time({app="x", env="dev"} | drop __error__, pod [1m]) or '
        'count_over_time({app="x", team="a"} | drop __error__, pod [1m])))',
    ),
    (
        'rate({app="x"} | keep env, team, app [1m])',
        TWO,
        '(rate({app="x", env="dev"} | keep env, team, app [1m]) or '
        'rate({app="x", team="a"} | keep env, team, app [1m]))',
    ),
    ("vector(1)", TWO, "vector(1)"),
]


@pytest.mark.parametrize(("query", "policies", "expected"), REWRITES)
def test_rewrite_exact(query: str, policies: tuple[Selector, ...], expected: str) -> None:
    assert restrict_logql(query, policies) == expected


def test_label_format_cannot_widen_the_stream_selector() -> None:
    out = restrict_logql('{app="x"} | label_format env="prod" | env="prod"', ONE)
    spans = stream_selectors(out)
    assert len(spans) == 1
    sel = parse_stream_selector(out[spans[0][0] : spans[0][1]])
    assert LabelMatcher("env", "=", "dev") in sel.matchers
    # what follows the selector is a pipeline stage, not a second selector
    assert out[spans[0][1] :] == ' | label_format env="prod" | env="prod"'


REFUSED: list[tuple[str, tuple[Selector, ...]]] = [
    ("", ONE),
    ("  \n ", ONE),
    ('{app="x"', ONE),
    ('{app="x"}}', ONE),
    ('} {app="x"}', ONE),
    ("{}", ONE),
    ("rate({ }[1m])", ONE),
    ("{app}", ONE),
    ("{app=x}", ONE),
    ('{app=="x"}', ONE),
    ('{app= ~"x"}', ONE),
    ('{app|="x"}', ONE),
    ('{app="x",}', ONE),
    ('{app="x" pod="y"}', ONE),
    ('{"app"="x"}', ONE),
    ('{app="x", {pod="y"}}', ONE),
    ('{a-b="x"}', ONE),
    ('{1a="x"}', ONE),
    ('{é="x"}', ONE),
    ("{app='x'}", ONE),
    ("sum by ('\"') (count_over_time({a=\"b\"}[1m])) by ('\"')", ONE),
    ('{app="x"} |= "unterminated', ONE),
    ("{app=`x}", ONE),
    ('{app="x"} |= "a\nb"', ONE),
    ('{app="x\\q"}', ONE),
    ('{app="x\\\'"}', ONE),
    ('{app="\\xff"}', ONE),
    ('{app="\\400"}', ONE),
    ('{app="\\ud800"}', ONE),
    ("{app=`a\rb`}", ONE),
    ('{app="x"} /* " */ {secret="1"} /* " */', ONE),
    ('{app="x"} // {secret="1"}', ONE),
    ('rate({app="x"}[5x])', ONE),
    ('rate({app="x"}["5m"])', ONE),
    ('rate({app="x"}[5m)', ONE),
    ('rate({app="x"}5m])', ONE),
    ('{app="x"}\x00', ONE),
    ('{app="x"}\u00a0|= "a"', ONE),
    ('{app="x"} @ 1', ONE),
    ('{app="x"} |= "\ud800"', ONE),
    ('{app="x"} |= "' + "a" * MAX_QUERY_LEN + '"', ONE),
    ('{app="x"}', ()),
    # several policies that cannot be expressed exactly
    ('{app="x"} |= "a"', TWO),
    ('{app="x"}', pols('{team="a", env!="dev"}', '{team="a", env!="prod"}')),
    ('absent_over_time({app="x"}[5m])', TWO),
    ('sum(rate({app="x"}[1m])) or {app="y"}', TWO),
    ('rate({app="x"} | label_format env=app [1m])', TWO),
    ('rate({app="x"} | label_format app=team [1m])', TWO),
    ('rate({app="x"} | drop env [1m])', TWO),
    ('rate({app="x"} | drop team="a" [1m])', TWO),
    ('rate({app="x"} | keep app, env [1m])', TWO),
    ('rate({app="x"} | keep app, env, team="a" [1m])', TWO),
    ('rate({app="x"} | unpack [1m])', TWO),
    ('sum_over_time({app="x"} | unwrap env [1m])', TWO),
    ('sum_over_time({app="x"} | unwrap n [1m]) by (env)', TWO),
    ('sum_over_time({app="x"} | unwrap n [1m]) without (team)', TWO),
    ('variants(count_over_time({app="x"}[1m])) of ({app="x"}[1m])', TWO),
    ('rate({app="x"}[1m]', TWO),
]


@pytest.mark.parametrize(("query", "policies"), REFUSED)
def test_refused(query: str, policies: tuple[Selector, ...]) -> None:
    with pytest.raises(RewriteError):
        restrict_logql(query, policies)


def test_refusal_says_why_and_is_cached() -> None:
    for _ in range(2):
        with pytest.raises(RewriteError, match="log queries cannot be restricted by several"):
            restrict_logql('{app="x"} |= "why"', TWO)


def test_rewrite_is_cached() -> None:
    q = 'sum(rate({app="cache"}[1m]))'
    assert restrict_logql(q, ONE) is restrict_logql(q, ONE)


def test_stream_selector_spans() -> None:
    q = '{a="}"} |= "{b=\\"c\\"}" # {d="e"}\nor {f=`{`}'
    assert stream_selectors(q) == [(0, 7), (36, 43)]
    assert [q[s:e] for s, e in stream_selectors(q)] == ['{a="}"}', "{f=`{`}"]


def test_restrict_logql_matchers() -> None:
    assert restrict_logql_matchers(['{app="x"}', "{ns=~`a|b`}"], TWO) == [
        '{app="x", env="dev"}',
        '{app="x", team="a"}',
        '{ns=~"a|b", env="dev"}',
        '{ns=~"a|b", team="a"}',
    ]
    assert restrict_logql_matchers([], TWO) == ['{env="dev"}', '{team="a"}']
    assert restrict_logql_matchers(['{env="dev"}'], ONE) == ['{env="dev"}']


@pytest.mark.parametrize(
    "match",
    ["", '{app="x"} |= "a"', 'rate({app="x"}[1m])', '{a="b"} {c="d"}', '{a="b"} or {c="d"}', "{}", "app"],
)
def test_restrict_logql_matchers_refuses(match: str) -> None:
    with pytest.raises(RewriteError):
        restrict_logql_matchers([match], ONE)


def test_restrict_logql_matchers_needs_policies() -> None:
    with pytest.raises(RewriteError):
        restrict_logql_matchers([], ())


# ---------------------------------------------------------------- generated queries

_NAMES = st.sampled_from(["app", "pod", "env", "team", "level", "_x9"])
_OPS: st.SearchStrategy[MatchOpStr] = st.sampled_from(OPS)
_TRICKY = st.text(alphabet='ab{}()[]"\\`#|=~\n ,', max_size=8)


@st.composite
def _string(draw: st.DrawFn) -> str:
    value = draw(_TRICKY)
    if "`" not in value and draw(st.booleans()):
        return f"`{value}`"
    return json.dumps(value)


@st.composite
def _selector(draw: st.DrawFn) -> tuple[str, tuple[LabelMatcher, ...]]:
    parts: list[str] = []
    matchers: list[LabelMatcher] = []
    for _ in range(draw(st.integers(1, 3))):
        name, op, lit = draw(_NAMES), draw(_OPS), draw(_string())
        value = lit[1:-1] if lit[0] == "`" else json.loads(lit)
        matchers.append(LabelMatcher(name, op, value))
        ws = draw(st.sampled_from(["", " ", "\n\t"]))
        parts.append(f"{ws}{name}{ws}{op}{ws}{lit}{ws}")
    return "{" + ",".join(parts) + "}", tuple(matchers)


@st.composite
def _stage(draw: st.DrawFn) -> str:
    kind = draw(st.integers(0, 7))
    if kind == 0:
        return f"|= {draw(_string())}"
    if kind == 1:
        return f"!~ {draw(_string())}"
    if kind == 2:
        return "| json"
    if kind == 3:
        return "|logfmt"
    if kind == 4:
        return f"| line_format {draw(_string())}"
    if kind == 5:
        return f"| pattern {draw(_string())}"
    if kind == 6:
        return f"| level={draw(_string())}"
    return "| decolorize"


@st.composite
def _comment(draw: st.DrawFn) -> str:
    if draw(st.booleans()):
        return " "
    return " #" + draw(st.text(alphabet='{}"`()x ', max_size=6)) + "\n"


@st.composite
def _log(draw: st.DrawFn) -> tuple[str, list[tuple[LabelMatcher, ...]]]:
    sel, ms = draw(_selector())
    stages = draw(st.lists(_stage(), max_size=3))
    return sel + "".join(draw(_comment()) + s for s in stages), [ms]


@st.composite
def _metric(draw: st.DrawFn, depth: int = 0) -> tuple[str, list[tuple[LabelMatcher, ...]]]:
    kind = draw(st.integers(0, 4 if depth < 2 else 0))
    if kind == 0:
        body, sels = draw(_log())
        op = draw(st.sampled_from(["rate", "count_over_time", "bytes_rate", "COUNT_OVER_TIME"]))
        off = draw(st.sampled_from(["", " offset 5m"]))
        return f"{op}({body}{draw(_comment())}[5m]{off})", sels
    if kind == 1:
        inner, sels = draw(_metric(depth + 1))
        agg = draw(st.sampled_from(["sum", "max", "count"]))
        grp = draw(st.sampled_from(["", " by (level)", " without (pod)"]))
        return f"{agg}{grp} ({inner})", sels
    if kind == 2:
        (lhs, ls), (rhs, rs) = draw(_metric(depth + 1)), draw(_metric(depth + 1))
        op = draw(st.sampled_from([" / ", " or ", " and ", "+", " > bool "]))
        return f"{lhs}{op}{rhs}", ls + rs
    if kind == 3:
        inner, sels = draw(_metric(depth + 1))
        return f"topk(2, {inner}) or vector(0)", sels
    inner, sels = draw(_metric(depth + 1))
    return f'label_replace({inner}, "d", "$1", "s", "{{(.*)}}")', sels


_POLICY_SETS = [ONE, SAME, TWO, pols('{env=~"d.*", team!="b"}')]


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_generated_queries_restrict_every_selector(data: st.DataObject) -> None:
    policies = data.draw(st.sampled_from(_POLICY_SETS))
    if policies is TWO or data.draw(st.booleans()):
        query, user = data.draw(_metric())
    else:
        query, user = data.draw(_log())
    out = restrict_logql(query, policies)
    found = [parse_stream_selector(out[s:e]).matchers for s, e in stream_selectors(out)]
    if policies is TWO:
        # each range aggregation became (copy under policy 1 or copy under policy 2)
        assert len(found) == 2 * len(user)
        for i, ms in enumerate(user):
            for j, policy in enumerate(policies):
                got = found[2 * i + j]
                assert got[: len(ms)] == ms
                assert set(policy.matchers) <= set(got)
        return
    assert len(found) == len(user)
    expected_extra = (LabelMatcher("env", "=~", "dev|prod"),) if policies is SAME else policies[0].matchers
    for ms, got in zip(user, found, strict=True):
        assert got[: len(ms)] == ms
        assert set(expected_extra) <= set(got)
    # outside the selectors nothing changed: strings and comments are copied verbatim
    assert _skeleton(out) == _skeleton(query)


def _skeleton(query: str) -> str:
    parts, pos = [], 0
    for s, e in stream_selectors(query):
        parts.append(query[pos:s])
        pos = e
    parts.append(query[pos:])
    return "\x1f".join(parts)
