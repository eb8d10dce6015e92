"""Parameters read as the backend reads them: one row per endpoint x parameter x spelling, in both modes.

Each row is sent through the real gateway to a recording upstream; what the upstream received is then
read the way Go's ``ParseForm`` and the endpoint's handler read it (tests/goform.py, written from net/url,
net/http, Loki's pkg/loghttp and Prometheus' web/api/v1/api.go, not from the gateway), and the selector
the backend will evaluate must be the one the policy allows: in enforce mode the rewritten one; in header
mode the client's own, with exactly the tenant's X-Prom-Label-Policy, and the policy itself as the query
where Loki's LBAC does not filter a read without one (``detected_labels``, ``detected_field/.../values``).
Where the gateway cannot read a request as the backend would, it refuses it (400 JSON) and forwards nothing.

Then finding 8 of issue 22 against the fake Loki (Loki's own parameter reading and, in header mode, its
LBAC): an empty ``query=`` is no query, so Logs Drilldown's start-up reads see exactly the visible streams.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from urllib.parse import quote, urlencode

import pytest

from gateway.lbac import params
from gateway.proxy.errors import ProxyError
from gateway.routes import Kind, match
from tests.fake_loki import FakeLoki, Stream, enforce_gateway, stack_realm
from tests.goform import Form, parse_query
from tests.test_proxy import Env, _env, basic

POLICY = '{ns="allowed"}'
HEADER_100 = "100:%7Bns=%22allowed%22%7D"
FORM = "application/x-www-form-urlencoded"
Q = '{app="x"}'
Q_R = '{app="x", ns="allowed"}'  # Q under the policy
Q_Y = '{app="y"}'
ABSENT = None  # the backend sees no value: Form.Get is "" (one value) or r.Form[name] is empty (a list)

# ------------------------------------------------------------------ how each backend reads the selector


def loki_query(f: Form) -> str | None:
    """Every Loki handler: ``query(r)`` is ``r.Form.Get("query")``; "" is no query (pkg/loghttp/params.go)."""
    return f.get("query") or None


def loki_series(f: Form) -> list[str] | None:
    """``ParseSeriesQuery``: union of ``match`` and ``match[]``; a lone ``{}`` (spaces removed) is none."""
    distinct = sorted(set(f.list("match") + f.list("match[]")))
    if len(distinct) == 1 and distinct[0].replace(" ", "") == "{}":
        distinct = []
    return distinct or None


def prom_query(f: Form) -> str | None:
    """Prometheus ``r.FormValue("query")``."""
    return f.get("query") or None


def prom_match(f: Form) -> list[str] | None:
    """Prometheus ``r.Form["match[]"]`` (an empty value is a value: it does not parse, 400)."""
    return f.list("match[]") or None


Reader = Callable[[Form], Any]

# ------------------------------------------------------------------ spellings
# (name, method, raw query, form body); {v} is the value, percent-encoded


def spellings(name: str, value: str, rest: str = "start=1") -> list[tuple[str, str, str, str | None]]:
    """(spelling, method, raw query, form body): ``name`` given as ``value`` every way a client can; ``rest``
    (other parameters, already encoded) rides along."""
    v = quote(value, safe="")
    n = quote(name, safe="")
    return [
        ("absent", "GET", rest, None),
        ("empty", "GET", f"{n}=&{rest}", None),
        ("bare", "GET", f"{n}&{rest}", None),
        ("empty in body", "POST", rest, f"{n}="),
        ("url", "GET", f"{n}={v}&{rest}", None),
        ("body", "POST", "", f"{rest}&{n}={v}"),
        ("url of a post", "POST", f"{n}={v}", rest),
        ("encoded name", "GET", f"%{ord(name[0]):02X}{n[1:]}={v}&{rest}", None),
        ("url and body", "POST", f"{n}={v}", f"{n}={v}&{rest}"),
        ("twice in url", "GET", f"{n}={v}&{n}={v}&{rest}", None),
        ("empty then given", "GET", f"{n}=&{n}={v}&{rest}", None),
    ]


REPEATED = {"url and body", "twice in url", "empty then given"}
EMPTY = {"empty", "bare", "empty in body"}

# ------------------------------------------------------------------ the table
# (path, reader, parameter, value, restricted value, what an absent selector becomes in enforce / header)
# absent-enforce: the rewritten selector, or an int status; absent-header: what Loki is sent

LOKI_OPTIONAL = ("/loki/api/v1/label/app/values", "/api/prom/label/app/values")
#: Reads Loki's LBAC does not filter without a query: the policy is the query in header mode too
LOKI_QUERY_OPTIONAL = ("/loki/api/v1/detected_labels", "/loki/api/v1/detected_field/level/values")
#: Label names: Loki reads them from its index with the query's matchers only, so header mode restricts both
LOKI_NAMES = ("/loki/api/v1/labels", "/loki/api/v1/label", "/api/prom/label")
LOKI_REQUIRED = ("/loki/api/v1/query", "/loki/api/v1/query_range", "/api/prom/query", "/loki/api/v1/index/stats",
                 "/loki/api/v1/index/volume", "/loki/api/v1/index/volume_range", "/loki/api/v1/patterns",
                 "/loki/api/v1/detected_fields")
PROM_REQUIRED = ("/prometheus/api/v1/query", "/prometheus/api/v1/query_range", "/prometheus/api/v1/query_exemplars",
                 "/api/prom/api/v1/query")
PROM_MATCH = ("/prometheus/api/v1/series", "/prometheus/api/v1/labels", "/api/prom/api/v1/labels",
              "/prometheus/api/v1/label/app/values", "/prometheus/federate", "/federate")

_GET_ONLY = ("/tail", "/federate", "/prometheus/api/v1/label/{name}/values", "/prometheus/api/v1/label/app/values")
Row = tuple[str, str, str, str, str | None, Reader, Any, Any]  # id, method, path, raw, body, reader, enforce, header


def _rows() -> list[Row]:
    rows: list[Row] = []

    def add(path: str, reader: Reader, name: str, value: str, restricted: Any, absent_enforce: Any,
            absent_header: Any, given_header: Any) -> None:
        lists = isinstance(restricted, list)
        for spelling, method, raw, body in spellings(name, value):
            if method == "POST" and path.endswith(_GET_ONLY):
                continue
            enforce: Any
            header: Any
            if spelling == "absent" or (spelling in EMPTY and not lists):  # Form.Get: empty is absent
                enforce, header = absent_enforce, absent_header
            elif spelling in EMPTY:  # r.Form[name]: an empty value is a value, and it does not parse
                enforce, header = 400, [""]
            elif spelling in REPEATED and not lists:  # which copy the backend takes is not ours to guess
                enforce, header = 400, 400
            elif spelling == "empty then given":
                enforce, header = 400, ["", *given_header]
            elif spelling in REPEATED:
                enforce, header = restricted * 2, given_header * 2
            else:
                enforce, header = restricted, given_header
            rows.append((f"{method} {path} {name} {spelling}", method, path, raw, body, reader, enforce, header))

    for path in LOKI_OPTIONAL:
        add(path, loki_query, "query", Q, Q_R, POLICY, ABSENT, Q)
    for path in LOKI_QUERY_OPTIONAL:
        add(path, loki_query, "query", Q, Q_R, POLICY, POLICY, Q)
    for path in LOKI_NAMES:
        add(path, loki_query, "query", Q, Q_R, POLICY, POLICY, Q_R)
    for path in LOKI_REQUIRED:
        add(path, loki_query, "query", Q, Q_R, 400, ABSENT, Q)
    for path in PROM_REQUIRED:
        add(path, prom_query, "query", "up", 'up{ns="allowed"}', 400, ABSENT, "up")
    for path in PROM_MATCH:  # (series: Prometheus needs a match[]; restricted, the policy is one)
        add(path, prom_match, "match[]", "up", ['up{ns="allowed"}'], [POLICY], ABSENT, ["up"])
    for path in ("/loki/api/v1/series", "/api/prom/series"):
        for name in ("match", "match[]"):
            add(path, loki_series, name, Q, [Q_R], [POLICY], ABSENT, [Q])
    # Spellings that mean something of their own to one backend
    series = "/loki/api/v1/series"
    rows += [
        ("loki series lone {}", "GET", series, "match=%7B%7D", None, loki_series, [POLICY], ABSENT),
        ("loki series lone { } twice", "GET", series, "match=%7B+%7D&match%5B%5D=%7B+%7D", None, loki_series,
         [POLICY], ABSENT),
        ("loki series empty match", "GET", series, "match=", None, loki_series, 400, [""]),
        ("loki series both lists", "GET", series, f"match={quote(Q)}&match%5B%5D={quote(Q_Y)}", None,
         loki_series, [Q_R, '{app="y", ns="allowed"}'], [Q, Q_Y]),
        ("prom empty match[]", "GET", "/prometheus/api/v1/labels", "match%5B%5D=", None, prom_match, 400, [""]),
        ("prom match[] twice", "GET", "/prometheus/api/v1/series", "match%5B%5D=up&match%5B%5D=x", None, prom_match,
         ['up{ns="allowed"}', 'x{ns="allowed"}'], ["up", "x"]),
        ("prom label values absent", "GET", "/prometheus/api/v1/label/app/values", "", None, prom_match, [POLICY],
         ABSENT),
        ("loki semicolon", "GET", "/loki/api/v1/detected_labels", f"query={quote(Q)};x=1", None, loki_query, 400,
         Q + ";x=1"),
        # (no stream selector: nothing to restrict, and Loki answers its parse error)
        ("loki bad escape", "GET", "/loki/api/v1/label/app/values", "query=%zz", None, loki_query, "%zz", "%zz"),
        ("loki plus is a space", "GET", "/loki/api/v1/label/app/values", "query={app=+%22x%22}", None, loki_query,
         '{app="x", ns="allowed"}', '{app= "x"}'),
        ("loki other params repeated", "GET", "/loki/api/v1/labels", "start=1&start=2", None, loki_query, 400, 400),
        ("loki series shards repeated", "GET", series, "shards=0_of_2&shards=1_of_2", None, loki_series, [POLICY],
         ABSENT),
        ("loki delete empty query", "POST", "/loki/api/v1/delete", "query=&start=1", None, loki_query, 400, 400),
        ("loki tail empty query", "GET", "/loki/api/v1/tail", "query=", None, loki_query, 400, ABSENT),
        ("prom query in a get body", "GET", "/prometheus/api/v1/query", "", "query=up", prom_query,
         'up{ns="allowed"}', "up"),
    ]
    return rows + _other_param_rows()


_SELECTOR_GIVEN = {Kind.LOGQL: f"query={quote(Q)}", Kind.LOGQL_OPTIONAL: f"query={quote(Q)}",
                   Kind.LOGQL_TAIL: f"query={quote(Q)}", Kind.LOGQL_SERIES: f"match={quote(Q)}",
                   Kind.PROMQL: "query=up", Kind.MATCH: "match%5B%5D=up"}


def _other_param_rows() -> list[Row]:
    """Every other parameter of every endpoint in gateway.lbac.params (none selects data): the backend reads
    what the client sent, an empty one as absent, a list's every value; a repeated single value is a 400."""
    rows: list[Row] = []
    for e in params.ENDPOINTS:
        if e.kind not in _SELECTOR_GIVEN:
            continue  # metadata (a plan of its own) and delete (tested in test_lbac_bypass)
        path = e.paths[0].replace("{name}", "app")
        get_only = e.paths[0].endswith(_GET_ONLY)
        for prm in e.params:
            if prm.role is params.Role.SELECTOR:
                continue
            lists = prm.reads is params.Reads.LIST
            def reader(f: Form, name: str = prm.name, lists: bool = lists) -> Any:
                return f.list(name) if lists else f.get(name)
            for spelling, method, raw, body in spellings(prm.name, "5", _SELECTOR_GIVEN[e.kind]):
                if (method == "POST" and get_only) or spelling in ("absent", "encoded name"):
                    continue
                want: Any
                enforce: Any = None
                if spelling in EMPTY and prm.name == "targetLabels":
                    # none: Loki groups by the query's label names, so the gateway names them (the policy's
                    # matchers must not change the grouping: gateway.lbac.counts.volume_params)
                    want, enforce = "", "app"
                elif spelling in EMPTY:
                    want = [""] if lists else ""
                elif spelling in REPEATED:
                    want = (["", "5"] if spelling == "empty then given" else ["5", "5"]) if lists else 400
                else:
                    want = ["5"] if lists else "5"
                rows.append((f"{method} {path} {prm.name} {spelling}", method, path, raw, body, reader,
                             want if enforce is None else enforce, want))
    return rows


ROWS = _rows()


def _effective(seen: Any, reader: Reader) -> Any:
    form = Form(seen.method, seen.headers.get("Content-Type", ""), seen.raw_query, seen.body)
    assert form.error is None, (form.error, seen.raw_query, seen.body)  # a canonical re-encoding always parses
    return reader(form)


async def _send(env: Env, h: dict[str, str], method: str, path: str, raw: str, body: str | None) -> Any:
    url = path + (f"?{raw}" if raw else "")
    headers = {**h, **({"Content-Type": FORM} if body is not None else {})}
    return await env.gw.client.request(method, url, data=body.encode() if body is not None else None,
                                       headers=headers)


async def _check_rows(env: Env, mode: str) -> list[str]:
    tok = await env.token(["metrics:read", "logs:read", "logs:delete"], stack_realm((POLICY,)))
    h = basic("100", tok)
    problems: list[str] = []
    for rid, method, path, raw, body, reader, enforce, header in ROWS:
        want = enforce if mode == "enforce" else header
        n = len(env.rec.seen)
        r = await _send(env, h, method, path, raw, body)
        text = await r.text()
        if isinstance(want, int):
            if r.status != want or len(env.rec.seen) != n or '"status":"error"' not in text.replace(" ", ""):
                problems.append(f"{mode} {rid}: expected a {want} refusal with nothing forwarded, got {r.status} "
                                f"{text[:200]} ({len(env.rec.seen) - n} forwarded)")
            continue
        if r.status != 200 or len(env.rec.seen) != n + 1:
            problems.append(f"{mode} {rid}: {r.status} {text[:200]} ({len(env.rec.seen) - n} forwarded)")
            continue
        seen = env.rec.seen[-1]
        got = _effective(seen, reader)
        if isinstance(got, list) and isinstance(want, list):
            got = sorted(got)
            want = sorted(set(want) if reader is loki_series else want)  # (Loki's union)
        if got != want:
            problems.append(f"{mode} {rid}: the backend evaluates {got!r}, the policy allows {want!r} "
                            f"(sent {seen.method} ?{seen.raw_query} {seen.body!r})")
        policy_headers = seen.headers.getall("X-Prom-Label-Policy", [])
        if policy_headers != ([] if mode == "enforce" else [HEADER_100]):
            problems.append(f"{mode} {rid}: X-Prom-Label-Policy {policy_headers}")
    return problems


@pytest.mark.parametrize("mode", ["enforce", "header"])
async def test_every_spelling_is_read_as_the_backend_reads_it(db_dsn: str, aiohttp_client: Any, aiohttp_server: Any,
                                                              mode: str) -> None:
    async with _env(db_dsn, aiohttp_client, aiohttp_server, lbac=mode) as env:
        problems = await _check_rows(env, mode)
    assert not problems, f"{len(problems)} of {len(ROWS)} rows:\n" + "\n".join(problems)


# ------------------------------------------------------------------ the table itself


#: Rules, alerts and Alertmanager reads: the whole answer is filtered by what it holds, whatever their parameters.
_ANSWER_FILTERED = frozenset({Kind.RULE_STATE, Kind.ALERT_STATE, Kind.RULE_CONFIG, Kind.ALERTMANAGER})


def test_the_table_covers_every_restricted_read_and_names_real_routes() -> None:
    """Every route of a restricted kind (but remote read's protobuf body and the unfilterable ones) has its
    parameters in gateway.lbac.params, and every path there is a route of the kind it says."""
    from gateway.routes import loki, mimir

    listed = {p: e.kind for e in params.ENDPOINTS for p in e.paths}
    for path, kind in listed.items():
        kinds = {m.route.kind for method in ("GET", "POST") if (m := match(method, path.replace("{name}", "app")))}
        assert kind in kinds, (path, kind, kinds)
    for route in loki.ROUTES + mimir.ROUTES:
        if route.kind in _ANSWER_FILTERED:  # their answers are filtered (gateway/proxy/filtered.py): no selector
            continue
        if route.kind in (Kind.NONE, Kind.REMOTE_READ) or (route.kind is Kind.TENANT_WIDE
                                                           and not route.pattern.endswith("/metadata")):
            continue
        upstream = route.upstream_path or route.pattern
        if route.kind is Kind.TENANT_WIDE and route.pattern.startswith("/api/prom"):
            continue
        assert upstream in listed or route.pattern in listed, route
    assert params.LISTS == {"match[]", "match", "shards"}
    assert params.SELECTORS[Kind.LOGQL_SERIES] == ("match", "match[]")
    assert params.SELECTORS[Kind.MATCH] == ("match[]",)


CORPUS = [
    "query=a", "query=", "query", "query=a&query=b", "%71uery=a", "query=a+b%20c", "query=%zz", "query=a;b",
    "a=1&&b=2", "=x", "query=a=b", "match%5B%5D=x&match[]=y", "q%00=1", "query=%C3%A9", "query=%ff",
    "start=&start=1", "match[]=&match[]=a", "&", "query=%2", "x=%41%4a",
]


@pytest.mark.parametrize("raw", CORPUS)
@pytest.mark.parametrize("where", ["url", "body"])
def test_the_reader_agrees_with_go_parse_form(raw: str, where: str) -> None:
    """Whatever the gateway accepts, it reads as Go's ParseForm does (the first value; "" as absent), and its
    re-encoding reads back the same; what it cannot read so (a repeated single value) it refuses."""
    url, body = (raw, None) if where == "url" else ("", raw.encode())
    go = Form("POST", FORM, url, body or b"")
    try:
        ours = params.pairs(url, body)
    except ProxyError as exc:
        assert exc.status == 400
        names = [k for k, _ in parse_query(raw)[0]]
        assert any(names.count(k) > 1 and k not in params.LISTS for k in names) or go.error, raw
        return
    assert params.urlencode(ours) == urlencode(ours)  # (the rewrite's encoder: urllib's, byte for byte)
    back = Form("GET", "", params.urlencode(ours), b"")
    assert back.error is None
    for name in {k for k, _ in go.pairs} | {k for k, _ in ours}:
        if name in params.LISTS:
            assert back.list(name) == [v for k, v in ours if k == name]
            if go.error is None:
                assert back.list(name) == go.list(name), (raw, name)
        else:
            assert back.get(name) == (params.one(ours, name, required=False) or "")
            if go.error is None:
                assert back.get(name) == go.get(name), (raw, name)


def test_the_rewrite_encodes_as_urllib_does() -> None:
    """params.urlencode (a byte table) writes what urllib.parse.urlencode writes, for every character class:
    unreserved, space, reserved, controls, non-ASCII, astral."""
    import random
    rnd = random.Random(24)
    chars = [chr(i) for i in range(0x250)] + ["\u20ac", "\U0001f600", " ", "%", "+", "&", "=", "~"]
    for _ in range(2000):
        ps = [("".join(rnd.choices(chars, k=rnd.randrange(8))), "".join(rnd.choices(chars, k=rnd.randrange(40))))
              for _ in range(rnd.randrange(4))]
        assert params.urlencode(ps) == urlencode(ps), ps


def test_pairs_gives_each_caller_its_own_list() -> None:
    """A query read again (weighed, then rewritten) gives the same pairs, in a list the caller may change."""
    first = params.pairs("query=up&time=1", None)
    first.append(("x", "y"))
    assert params.pairs("query=up&time=1", None) == [("query", "up"), ("time", "1")]
    assert params.pairs("query=up", b"time=2") == [("time", "2"), ("query", "up")]


def test_more_than_a_thousand_parameters_is_a_400_not_a_500() -> None:
    with pytest.raises(ProxyError) as exc:
        params.pairs("&".join(f"p{i}=1" for i in range(1001)), None)
    assert exc.value.status == 400


# ------------------------------------------------------------------ finding 8: Logs Drilldown's start-up reads

BASE = 1_700_000_000 * 10**9
SEC = 10**9
STREAMS = [
    {"app": "x", "ns": "allowed", "level": "info"},
    {"app": "y", "ns": "allowed", "team": "a"},
    {"app": "z", "ns": "other", "secret_label": "s1"},
    {"app": "w", "ns": "other", "secret_label": "s2"},
]
DRILLDOWN = [  # what Logs Drilldown sends at start-up: the query given, but empty
    ("GET", "/loki/api/v1/detected_labels", f"query=&start={BASE}&end={BASE + 60 * SEC}", None),
    ("POST", "/loki/api/v1/detected_labels", "", f"query=&start={BASE}&end={BASE + 60 * SEC}"),
    ("GET", "/loki/api/v1/labels", f"query=&start={BASE}&end={BASE + 60 * SEC}", None),
    ("GET", "/loki/api/v1/label/ns/values", f"query&start={BASE}&end={BASE + 60 * SEC}", None),
    ("GET", "/loki/api/v1/series", f"match=%7B%7D&start={BASE}&end={BASE + 60 * SEC}", None),
]


def _loki(lbac: bool, visible_only: bool = False) -> FakeLoki:
    keep = [ls for ls in STREAMS if ls["ns"] == "allowed" or not visible_only]
    return FakeLoki([Stream(ls, ((BASE + i * SEC, "line"),)) for i, ls in enumerate(keep)], now_ns=BASE + 60 * SEC,
                    lbac=lbac)


async def _drilldown(env: Env, truth: FakeLoki) -> list[str]:
    tok = await env.token(["logs:read"], stack_realm((POLICY,)))
    problems = []
    for method, path, raw, body in DRILLDOWN:
        r = await _send(env, basic("100", tok), method, path, raw, body)
        got = await r.json()
        form = Form(method, FORM, raw, (body or "").encode())
        p = {k: form.get(k) for k, _ in form.pairs}
        if path.endswith("detected_labels"):
            want = truth.detected_labels(p)
        elif path.endswith("series"):
            want = truth.series(form.list("match"), p)
        else:
            want = truth.labels(p, "ns" if "/label/" in path else None)
        if r.status != 200 or got != want:
            problems.append(f"{method} {path}?{raw} {body}: {r.status} {got} expected {want}")
    return problems


async def test_finding_8_enforce_mode_answers_empty_parameters_with_the_visible_data(
        db_dsn: str, aiohttp_client: Any, aiohttp_server: Any) -> None:
    server = await aiohttp_server(_loki(False).app())
    async with enforce_gateway(db_dsn, aiohttp_client, aiohttp_server, f"http://127.0.0.1:{server.port}") as env:
        problems = await _drilldown(env, _loki(False, visible_only=True))
    assert not problems, "\n".join(problems)


async def test_finding_8_header_mode_never_sends_an_empty_query_loki_does_not_filter(
        db_dsn: str, aiohttp_client: Any, aiohttp_server: Any) -> None:
    loki = _loki(True)
    server = await aiohttp_server(loki.app())
    url = f"http://127.0.0.1:{server.port}"
    ups = {"metrics": {"url": url, "lbac": "header"}, "logs": {"url": url, "lbac": "header"},
           "traces": {"url": url, "write_url": url}}
    async with _env(db_dsn, aiohttp_client, aiohttp_server, lbac="header", upstreams=ups) as env:
        problems = await _drilldown(env, _loki(False, visible_only=True))
    assert not problems, "\n".join(problems)


async def test_the_fake_loki_reads_parameters_as_go_does(aiohttp_client: Any) -> None:
    """Body first, then URL, the first value wins; a form that does not parse is a 400 (tests/goform.py)."""
    loki = _loki(False)
    client = await aiohttp_client(loki.app())
    r = await client.post(f"/loki/api/v1/label/app/values?query={quote('{app=%22z%22}')}",
                          data="query=%7Bapp%3D%22x%22%7D", headers={"Content-Type": FORM})
    assert (await r.json())["data"] == ["x"]
    r = await client.get("/loki/api/v1/label/app/values?query=%7Bapp%3D%22x%22%7D&query=%7Bapp%3D%22z%22%7D")
    assert (await r.json())["data"] == ["x"]
    r = await client.get("/loki/api/v1/label/app/values?query=")
    assert (await r.json())["data"] == ["w", "x", "y", "z"]
    r = await client.get("/loki/api/v1/labels?query=%zz")
    assert r.status == 400
