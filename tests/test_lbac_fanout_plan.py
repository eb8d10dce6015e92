"""The fan-out planner and the merges as pure functions (no server): what is planned, what is refused."""

from __future__ import annotations

import itertools
import random
from urllib.parse import parse_qsl, urlencode

import pytest

from gateway.errors import ProxyError
from gateway.lbac import RewriteError
from gateway.lbac import remote_read as rr
from gateway.lbac.fanout import MAX_FANOUT, Merge, disjoint, plan, plan_header_mode, plan_remote_read
from gateway.lbac.logql import restrict_logql
from gateway.lbac.overlap import TooManyTerms, disjoint_pieces
from gateway.policy.selector import parse_selector
from gateway.proxy.fanout import merge_matrix, merge_metadata, merge_stats, merge_streams
from gateway.routes import Kind

ONE = (parse_selector('{env="dev"}'),)
TWO = (parse_selector('{env="dev"}'), parse_selector('{team="a", env!="prod"}'))
DISJOINT = (parse_selector('{env="dev"}'), parse_selector('{env="prod", team="a"}'))


def q(**params: str) -> str:
    return urlencode(params)


SINGLE_CASES = [
    (Kind.LOGQL, "/loki/api/v1/query_range", q(query='{app="a"}')),
    (Kind.LOGQL, "/loki/api/v1/index/stats", q(query='{app="a"}')),
    (Kind.LOGQL, "/loki/api/v1/detected_labels", q(query='{app="a"}')),
    (Kind.LOGQL_OPTIONAL, "/loki/api/v1/labels", ""),
    (Kind.LOGQL_TAIL, "/loki/api/v1/tail", q(query='{app="a"}')),
    (Kind.PROMQL, "/prometheus/api/v1/query", q(query="up[5m]")),
    (Kind.MATCH, "/prometheus/api/v1/series", q(**{"match[]": "up"})),
]


@pytest.mark.parametrize(("kind", "path", "raw"), SINGLE_CASES)
def test_single_selector_policies_are_never_fanned_out(kind: Kind, path: str, raw: str) -> None:
    assert plan(kind, path, "GET", raw, None, ONE) is None


@pytest.mark.parametrize("path", ["/loki/api/v1/detected_labels", "/loki/api/v1/detected_field/level/values"])
def test_grafana_probes_without_query_get_the_policy_as_query(path: str) -> None:
    p = plan(Kind.LOGQL, path, "GET", q(start="1"), None, ONE)
    assert p is not None and p.merge is Merge.SINGLE
    assert parse_qsl(p.legs[0].query) == [("start", "1"), ("query", '{env="dev"}')]
    p = plan(Kind.LOGQL, path, "POST", "", b"start=1", TWO)
    if path.endswith("detected_labels"):  # several selectors: the visible streams, once (one series request)
        assert p is not None and p.merge is Merge.DETECTED_FROM_SERIES and len(p.legs) == 1
        assert p.legs[0].path == "/loki/api/v1/series" and p.legs[0].method == "GET"
        assert parse_qsl(p.legs[0].query) == [("start", "1"), *(("match[]", str(s)) for s in TWO)]
        return
    assert p is not None and len(p.legs) == 2 and all(leg.method == "POST" for leg in p.legs)
    assert [dict(parse_qsl((leg.body or b"").decode()))["query"] for leg in p.legs] == [str(s) for s in TWO]


def test_log_query_legs_are_todays_single_rewrites_with_the_same_parameters() -> None:
    raw = q(query='{app="a"} |= "x"', limit="7", direction="forward", start="1", end="2")
    p = plan(Kind.LOGQL, "/loki/api/v1/query_range", "GET", raw, None, TWO)
    assert p is not None and p.merge is Merge.STREAMS and p.limit == 7 and p.forward
    assert [parse_qsl(leg.query) for leg in p.legs] == [
        [("limit", "7"), ("direction", "forward"), ("start", "1"), ("end", "2"), ("query", want)]
        for want in ('{app="a", env="dev"} |= "x"', '{app="a", team="a", env!="prod", env!="dev"} |= "x"')]


def test_metric_queries_keep_the_union_rewrite_or_its_refusal() -> None:
    assert plan(Kind.LOGQL, "/loki/api/v1/query_range", "GET", q(query='rate({app="a"}[5m])'), None, TWO) is None
    avg = 'avg_over_time({a="b"} | unwrap n [5m]) by (level)'  # grouping drops the policy label, not a sum
    assert plan(Kind.LOGQL, "/loki/api/v1/query_range", "GET", q(query=avg), None, TWO) is None  # enforce says why
    # absent_over_time and sums over streams are fanned out: tests/test_lbac_metric_fanout.py


def test_what_cannot_be_exact_is_refused() -> None:
    for pols in (TWO, DISJOINT):  # Loki prunes each request's patterns: no sum is exact
        with pytest.raises(ProxyError, match="patterns cannot be restricted"):
            plan(Kind.LOGQL, "/loki/api/v1/patterns", "GET", q(query='{app="a"}'), None, pols)
    assert plan(Kind.LOGQL, "/loki/api/v1/patterns", "GET", q(query='{app="a"}'), None, ONE) is None
    overlapping = tuple(parse_selector(f'{{l{i}="x"}}') for i in range(5))  # 31 terms
    with pytest.raises(ProxyError, match="more than 15 upstream requests"):
        plan(Kind.LOGQL, "/loki/api/v1/index/stats", "GET", q(query='{app="a"}'), None, overlapping)
    many = tuple(parse_selector(f'{{l{i}="x"}}') for i in range(MAX_FANOUT + 1))
    with pytest.raises(ProxyError, match=f"at most {MAX_FANOUT}"):
        plan(Kind.LOGQL, "/loki/api/v1/query_range", "GET", q(query='{app="a"}'), None, many)


def test_counting_legs_are_the_inclusion_exclusion_terms() -> None:
    p = plan(Kind.LOGQL, "/loki/api/v1/index/stats", "GET", q(query='{app="a"}', start="1"), None, TWO)
    assert p is not None and p.merge is Merge.INDEX_STATS and p.counts is not None
    assert p.counts.signs == (1, 1, -1)
    assert [dict(parse_qsl(leg.query))["query"] for leg in p.legs] == [
        '{app="a", env="dev"}', '{app="a", team="a", env!="prod"}', '{app="a", env="dev", team="a", env!="prod"}']
    p = plan(Kind.LOGQL, "/loki/api/v1/index/stats", "GET", q(query='{app="a"}'), None, DISJOINT)
    assert p is not None and p.counts is not None and p.counts.signs == (1, 1)
    raw = q(query='{app="a", env!="x"}', limit="7", aggregateBy="series")
    p = plan(Kind.LOGQL, "/loki/api/v1/index/volume", "GET", raw, None, TWO)
    assert p is not None and p.merge is Merge.VOLUME and p.counts is not None
    assert (p.counts.signs, p.counts.limit, p.counts.leg_limit, p.counts.by_labels) == ((1, 1, -1), 7, 1000, False)
    assert dict(parse_qsl(p.legs[2].query)) == {"aggregateBy": "series", "limit": "1000", "targetLabels": "app,env",
                                                "query": '{app="a", env!="x", env="dev", team="a", env!="prod"}'}
    # targets the query does not name get Loki's own `t=~".+"` first; one selector: one leg, limit untouched
    p = plan(Kind.LOGQL, "/loki/api/v1/index/volume_range", "POST", "", q(query='{app="a"}', targetLabels="team")
             .encode(), ONE)
    assert p is not None and p.merge is Merge.SINGLE and p.legs[0].method == "POST"
    assert dict(parse_qsl((p.legs[0].body or b"").decode())) == {
        "targetLabels": "team", "query": '{app="a", team=~".+", env="dev"}'}
    with pytest.raises(ProxyError, match="given more than once"):
        plan(Kind.LOGQL, "/loki/api/v1/index/volume", "POST", q(targetLabels="env"), q(
            query='{app="a"}', targetLabels="team").encode(), TWO)
    for raw in (q(query='{app="a"} |= "x"'), q(query="up"), q(query='{app="a"}', limit="-1"),
                q(query='{app="a"}', targetLabels=" env")):
        p = plan(Kind.LOGQL, "/loki/api/v1/index/volume", "GET", raw, None, TWO)  # Loki's own 400 through
        assert p is None or all(dict(parse_qsl(leg.query)).get("limit") in (None, "-1") for leg in p.legs)


def test_disjointness_is_sound() -> None:
    d = parse_selector
    assert disjoint(d('{env="dev"}'), d('{env="prod", a="1"}'))
    assert disjoint(d('{env="dev"}'), d('{env!="dev", a="1"}'))
    assert disjoint(d('{env="dev"}'), d('{env=~"prod|stage"}'))
    assert disjoint(d('{env="dev"}'), d('{env!~"dev|x", a="1"}'))
    assert not disjoint(d('{env="dev"}'), d('{team="a"}'))
    assert not disjoint(d('{env="dev"}'), d('{env=~"d.*"}'))  # a real regex: not claimed
    assert not disjoint(d('{env=~"dev|x"}'), d('{env=~"x"}'))


def test_promql_bare_range_only() -> None:
    p = plan(Kind.PROMQL, "/prometheus/api/v1/query", "GET", q(query="(up[5m] offset 1m)"), None, TWO)
    assert p is not None and p.merge is Merge.MATRIX
    assert [dict(parse_qsl(leg.query))["query"] for leg in p.legs] == [
        '(up{env="dev"}[5m] offset 1m)', '(up{env!="prod",team="a"}[5m] offset 1m)']
    assert plan(Kind.PROMQL, "/prometheus/api/v1/query", "GET", q(query="rate(up[5m])"), None, TWO) is None


def test_metadata_plan_and_merge() -> None:
    p = plan(Kind.TENANT_WIDE, "/prometheus/api/v1/metadata", "GET", q(metric="up", limit="1"), None, TWO)
    assert p is not None and p.merge is Merge.METADATA and p.limit == 1
    assert p.legs[0].path == "/prometheus/api/v1/label/__name__/values"
    assert parse_qsl(p.legs[0].query) == [("match[]", str(s)) for s in TWO]
    assert parse_qsl(p.legs[1].query) == [("metric", "up")]
    assert plan(Kind.TENANT_WIDE, "/prometheus/api/v1/cardinality/label_names", "GET", "", None, TWO) is None
    names = {"status": "success", "data": ["a", "c"]}
    meta = {"status": "success", "data": {"a": [1], "b": [2], "c": [3]}}
    assert merge_metadata(names, meta, -1)["data"] == {"a": [1], "c": [3]}
    assert merge_metadata(names, meta, 1)["data"] == {"a": [1]}


def test_streams_merge_keeps_every_entry_of_the_disjoint_legs_orders_and_cuts() -> None:
    def doc(*streams: tuple[dict[str, str], list[list[object]]]) -> dict[str, object]:
        return {"status": "success", "data": {"resultType": "streams", "encodingFlags": ["categorize-labels"],
                                              "result": [{"stream": s, "values": v} for s, v in streams],
                                              "stats": {"summary": {"execTime": 1.0, "totalLinesProcessed": 3}}}}
    a, b = {"app": "a"}, {"app": "b"}
    meta = {"structuredMetadata": {"trace": "1"}}
    one = doc((a, [["30", "x", meta], ["10", "y"]]), (b, [["30", "z"]]))
    two = doc((a, [["30", "x", meta], ["20", "w"]]))
    # The same line at the same time under the same labels in two legs: two streams (the legs are disjoint)
    # that the pipeline made alike, both kept as Loki keeps them.
    out = merge_streams([one, two], 3, forward=False)
    assert out["data"]["result"] == [{"stream": a, "values": [["30", "x", meta], ["30", "x", meta]]},
                                     {"stream": b, "values": [["30", "z"]]}]
    assert out["data"]["encodingFlags"] == ["categorize-labels"]
    assert out["data"]["stats"] == {"summary": {"execTime": 1.0, "totalLinesProcessed": 6}}
    out = merge_streams([one, two], 2, forward=True)
    assert out["data"]["result"] == [{"stream": a, "values": [["10", "y"], ["20", "w"]]}]
    assert merge_stats([{"x": {"bytesProcessedPerSecond": 5, "n": 1}}, {"x": {"bytesProcessedPerSecond": 7, "n": 2}}]
                       ) == {"x": {"bytesProcessedPerSecond": 7, "n": 3}}


def test_matrix_merge() -> None:
    docs = [{"status": "success", "data": {"resultType": "matrix", "result": [
        {"metric": {"a": "1"}, "values": [[1, "1"], [2, "2"]]}]}},
            {"status": "success", "data": {"resultType": "matrix", "result": [
                {"metric": {"a": "1"}, "values": [[2, "2"]]}, {"metric": {"a": "0"}, "values": [[1, "5"]]}]}}]
    assert merge_matrix(docs)["data"]["result"] == [{"metric": {"a": "0"}, "values": [[1, "5"]]},
                                                    {"metric": {"a": "1"}, "values": [[1, "1"], [2, "2"]]}]


def test_remote_read_plan_and_frames() -> None:
    assert rr.crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value
    msgs = [b"", b"a" * 200, bytes(range(256))]
    assert rr.read_frames(b"".join(rr.frame(m) for m in msgs)) == msgs
    with pytest.raises(RewriteError):
        rr.read_frames(rr.frame(b"abc")[:-1] + b"x")
    req = rr.ReadRequest()
    req.queries.add(start_timestamp_ms=0, end_timestamp_ms=1).matchers.add(type=rr.EQ, name="__name__", value="up")
    req.accepted_response_types.extend([rr.STREAMED_XOR_CHUNKS, rr.SAMPLES])
    body = rr.snappy_encode(req.SerializeToString())
    assert plan_remote_read(body, ONE) is None
    p = plan_remote_read(body, TWO)
    assert p is not None and len(p.legs) == 2
    for leg, pol in zip(p.legs, TWO, strict=True):
        got = rr.decode_read_request(leg.body or b"")
        assert list(got.accepted_response_types) == [rr.SAMPLES]
        assert len(got.queries[0].matchers) == 1 + len(pol.matchers)
    with pytest.raises(RewriteError):
        plan_remote_read(b"\x10garbage", TWO)


def test_header_mode_sends_the_policy_as_the_query_of_query_less_detected_endpoints() -> None:
    # Real Loki main with -lbac.enabled leaves detected_labels without a query unfiltered (tests/e2e/test_real_loki.py).
    path = "/loki/api/v1/detected_labels"
    p = plan_header_mode(Kind.LOGQL, path, "GET", q(start="1", end="2"), None, TWO)
    assert p is not None and p.merge is Merge.DETECTED_FROM_SERIES  # the policy selectors as series match[]
    assert [v for k, v in parse_qsl(p.legs[0].query) if k == "match[]"] == [str(s) for s in TWO]
    one = plan_header_mode(Kind.LOGQL, "/loki/api/v1/detected_field/app/values", "GET", q(), None, ONE)
    assert one is not None and one.merge is Merge.SINGLE and dict(parse_qsl(one.legs[0].query))["query"] == str(ONE[0])
    # A query of its own, another endpoint, or no policies: forwarded as sent (the backend filters).
    assert plan_header_mode(Kind.LOGQL, path, "GET", q(query='{app="a"}'), None, TWO) is None
    assert plan_header_mode(Kind.LOGQL_OPTIONAL, "/loki/api/v1/label/app/values", "GET", q(), None, TWO) is None
    # Label names come from Loki's index without the policy: the selectors are the query (values merged);
    # an empty query is none (tests/test_lbac_params.py)
    names = plan_header_mode(Kind.LOGQL_OPTIONAL, "/loki/api/v1/labels", "GET", q(query=""), None, TWO)
    assert names is not None and names.merge is Merge.VALUES
    assert [dict(parse_qsl(leg.query))["query"] for leg in names.legs] == [str(s) for s in TWO]
    # ... and a query of the client's own is restricted as in enforce mode
    own = plan_header_mode(Kind.LOGQL_OPTIONAL, "/loki/api/v1/labels", "GET", q(query='{a="b"}'), None, TWO)
    assert own is not None and own.merge is Merge.VALUES
    assert sorted(dict(parse_qsl(leg.query))["query"] for leg in own.legs) == sorted(
        restrict_logql('{a="b"}', (s,)) for s in TWO)
    assert plan_header_mode(Kind.LOGQL, path, "GET", q(), None, ()) is None


def test_disjoint_pieces_cover_the_policies_once() -> None:
    """Brute force over label sets: a label set matches exactly one piece when some policy matches it, else
    none; so a log query's legs read every visible stream once and nothing else."""
    rng = random.Random(6)
    values = ["", "a", "b", "dev", "prod"]
    ops = ["=", "!=", "=~", "!~"]
    label_sets = [{k: v for k, v in zip(("env", "team", "app"), combo, strict=True) if v}
                  for combo in itertools.product(values, repeat=3)]
    for _ in range(300):
        pols = tuple(parse_selector("{" + ", ".join(
            f'{rng.choice(["env", "team", "app"])}{rng.choice(ops)}"{rng.choice(["a", "b", "dev", "a|dev", ".+"])}"'
            for _ in range(rng.randint(1, 3))) + "}") for _ in range(rng.randint(2, 4)))
        try:
            pieces = disjoint_pieces(pols, disjoint, 64)
        except TooManyTerms:
            continue
        for labels in label_sets:
            hits = sum(p.matches(labels) for p in pieces)
            assert hits == (1 if any(p.matches(labels) for p in pols) else 0), (pols, pieces, labels)
    assert [str(p) for p in disjoint_pieces(TWO, disjoint, 16)] == [
        '{env="dev"}', '{team="a", env!="prod", env!="dev"}']
    assert disjoint_pieces(DISJOINT, disjoint, 16) == DISJOINT  # disjoint already: unchanged
    many = tuple(parse_selector(f'{{a{i}="x", b{i}="y"}}') for i in range(6))
    with pytest.raises(TooManyTerms):
        disjoint_pieces(many, disjoint, MAX_FANOUT)


def test_log_queries_under_too_overlapping_policies_are_refused() -> None:
    many = tuple(parse_selector(f'{{a{i}="x", b{i}="y"}}') for i in range(6))
    with pytest.raises(ProxyError) as exc:
        plan(Kind.LOGQL, "/loki/api/v1/query_range", "GET", q(query='{app="a"}'), None, many)
    assert exc.value.status == 400 and "overlap" in exc.value.message
