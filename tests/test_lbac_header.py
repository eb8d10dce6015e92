"""X-Prom-Label-Policy encoding, read back by a parser written from Loki's pkg/labelaccess."""

from __future__ import annotations

import pytest

from gateway.errors import ProxyError
from gateway.lbac.restrict import headers_for, label_policy_header, parse_client_policies, path_escape
from gateway.policy.selector import parse_selector
from tests.loki_lbac import PolicyHeaderError, extract, path_unescape

# Go's url.PathEscape (encodePathSegment in net/url's shouldEscape): unreserved stays,
# "$&+:=@" stay, "/;,?" and everything else is %XX of the UTF-8 bytes, upper-case hex.
GO_PATH_ESCAPE = [
    ('{foo="bar", a="b"}', "%7Bfoo=%22bar%22%2C%20a=%22b%22%7D"),  # REFERENCE.md §6, tenant 18042
    ("azAZ09-_.~", "azAZ09-_.~"),
    ("$&+:=@", "$&+:=@"),
    ("/;,?", "%2F%3B%2C%3F"),
    ("!*'()", "%21%2A%27%28%29"),
    (" #%[]|^\\`", "%20%23%25%5B%5D%7C%5E%5C%60"),
    ("é€", "%C3%A9%E2%82%AC"),
]

SELECTORS = [
    '{env="dev"}',
    '{team="a", env!="prod"}',
    '{path=~"/api/v1/.*", q!~"a?b"}',
    '{job=~"x{1,3}", id=~"[0-9]{2,}"}',
    '{a=";", b=",", c=":", d="a:b:c"}',
    '{ns="é", "ü.label"="日本"}',
    '{msg="100% sure", plus="a+b", amp="x&y=z"}',
    '{q="\\"quoted\\" \\\\ back"}',
]


@pytest.mark.parametrize(("raw", "escaped"), GO_PATH_ESCAPE)
def test_path_escape_is_go_path_escape(raw: str, escaped: str) -> None:
    assert path_escape(raw) == escaped
    assert path_unescape(escaped) == raw


@pytest.mark.parametrize("text", SELECTORS)
def test_every_policy_reads_back_through_lokis_parser(text: str) -> None:
    sel = parse_selector(text)
    got = extract([label_policy_header("18042", sel)])
    assert list(got) == ["18042"]
    assert got["18042"] == [[(m.name, m.op, m.value) for m in sel.matchers]]
    assert "," not in label_policy_header("18042", sel)  # Loki splits on ',' before unescaping


def test_several_policies_one_header_line_each_for_exactly_the_tenant() -> None:
    pols = tuple(parse_selector(t) for t in SELECTORS)
    lines = headers_for("t-1", pols)
    assert len(lines) == len(pols)
    got = extract(list(lines))
    assert list(got) == ["t-1"]  # Loki fails open for a tenant no policy names: always exactly this one
    assert got["t-1"] == [[(m.name, m.op, m.value) for m in p.matchers] for p in pols]


@pytest.mark.parametrize("value", [
    "gateway-lbac-probe",  # no ':'
    "1:%7Ba=%22b%22%7D,",  # the empty piece after a trailing ','
    '1:{a="b", c="d"}',  # a raw ',': the old gateway encoding; Loki answered 400 to every read
    "1:%7Ba=%22b%22%zz",  # bad escape
    "1:up%20%2B%201",  # not a selector
])
def test_the_fake_rejects_what_loki_rejects(value: str) -> None:
    with pytest.raises(PolicyHeaderError, match="invalid label policy header value"):
        extract([value])


def test_the_fake_accepts_empty_matching_selectors_as_loki_does() -> None:
    # Prometheus' ParseMetricSelector (which Loki calls) skips the AST check, so `{}` and negative-only
    # selectors are valid policies there: `{}` matches everything, so the gateway must never send it.
    assert extract(["1:%7B%7D"]) == {"1": [[]]}
    assert extract(["1:%7Benv%21=%22dev%22%7D"]) == {"1": [[("env", "!=", "dev")]]}


def test_client_policies_are_capped_before_parsing() -> None:
    ok = [f"100:%7Bteam=%22t{i}%22%7D" for i in range(16)]
    assert len(parse_client_policies(ok, "100")) == 16
    with pytest.raises(ProxyError) as exc:
        parse_client_policies([*ok, "100:%7Bteam=%22t16%22%7D"], "100")
    assert exc.value.status == 400 and "more than 16" in exc.value.message
    with pytest.raises(ProxyError) as exc:
        parse_client_policies(["100:%7Ba=%22" + "x" * 17000 + "%22%7D"], "100")
    assert exc.value.status == 400 and "longer than" in exc.value.message
    # Grafana's own comma-joined form still parses, and our encoding too
    assert len(parse_client_policies(['100:{a="1"}, 100:{b="2"}', label_policy_header(
        "100", parse_selector('{c="3", d="4"}'))], "100")) == 3
