"""The pure domain: token format, selectors, the decision, client IP resolution."""

from __future__ import annotations

import base64
import dataclasses
import ipaddress
import json
from datetime import UTC, datetime, timedelta

import pytest

from gateway.clientip import client_ip
from gateway.policy import tokens
from gateway.policy.decision import Denied, authorize, identify, label_policies
from gateway.policy.model import AccessPolicy, Realm, Token
from gateway.policy.selector import SelectorError, parse_selector

NOW = datetime(2026, 1, 1, tzinfo=UTC)


class _Stack:
    def __init__(self, sid: str, org: str):
        self.id, self.org_id = sid, org


def _world(expires: datetime | None = None, subnets: tuple[str, ...] = (), realms: tuple[Realm, ...] = (),
           status: str = "active") -> tuple[str, dict[str, Token], dict[str, AccessPolicy]]:
    secret = tokens.new_secret()
    policy = AccessPolicy("p1", "1", "p", "p", frozenset({"metrics:read"}),
                          realms or (Realm("stack", "100"),),
                          tuple(ipaddress.ip_network(s) for s in subnets), status)  # type: ignore[arg-type]
    tok = Token("t1", "p1", "t", "t", tokens.hash_secret(secret), expires)
    return tokens.encode("1", "t1", secret, "local"), {"t1": tok}, {"p1": policy}


def test_token_round_trip_and_prefix() -> None:
    s = tokens.encode("1", "abc", "secret", "local")
    assert s.startswith("glc_")
    d = tokens.decode(s)
    assert (d.org_id, d.token_id) == ("1", "abc")
    assert d.secret_hash == tokens.hash_secret("secret")


@pytest.mark.parametrize("bad", ["", "glc_", "glc_!!!", "glc_" + base64.b64encode(b"[1]").decode(),
                                 "glc_" + base64.b64encode(json.dumps({"o": "1"}).encode()).decode(),
                                 "xyz_abc", "glc_" + "A" * 2000])
def test_malformed_tokens_are_refused(bad: str) -> None:
    with pytest.raises(tokens.TokenFormatError):
        tokens.decode(bad)


def _spell(claims: object, pad: bool = False, alphabet: str = "url") -> str:
    raw = json.dumps(claims, separators=(",", ":")).encode()
    text = (base64.urlsafe_b64encode(raw) if alphabet == "url" else base64.b64encode(raw)).decode()
    return "glc_" + (text if pad else text.rstrip("="))


_CLAIMS = {"o": "1", "i": "3f0c8c52-1f7e-4a57-9b3e-6f35f7b1c0de", "k": "a" * 41 + "_-?>", "m": {"r": "local"}}


@pytest.mark.parametrize("spelling", [
    _spell(_CLAIMS, pad=True),                                      # padding
    _spell(_CLAIMS, alphabet="std"),                                 # the other base64 alphabet (+ and /)
    _spell(_CLAIMS) + "!",                                           # junk characters
    _spell(_CLAIMS)[:10] + "\n" + _spell(_CLAIMS)[10:],
    _spell({**_CLAIMS, "x": 1}),                                     # an extra key
    _spell({**_CLAIMS, "m": {"r": "local", "x": "y"}}),             # an extra key in the metadata
    _spell({k: _CLAIMS[k] for k in ("i", "o", "k", "m")}),           # keys reordered
    _spell({k: v for k, v in _CLAIMS.items() if k != "m"}),          # a key missing
    "glc_" + base64.urlsafe_b64encode(json.dumps(_CLAIMS).encode()).decode().rstrip("="),  # spaces in the JSON
    _spell({**_CLAIMS, "o": 1}),                                     # wrong types
    _spell({**_CLAIMS, "k": ""}),
])
def test_only_the_canonical_spelling_is_a_token(spelling: str) -> None:
    canonical = tokens.encode("1", str(_CLAIMS["i"]), str(_CLAIMS["k"]), "local")
    assert canonical == _spell(_CLAIMS)  # what the gateway has always issued: unpadded, URL-safe, compact
    assert tokens.decode(canonical).token_id == _CLAIMS["i"] and spelling != canonical
    with pytest.raises(tokens.TokenFormatError, match="^malformed token$"):
        tokens.decode(spelling)


def test_non_canonical_trailing_bits_are_refused() -> None:
    canonical = tokens.encode("1", str(_CLAIMS["i"]), str(_CLAIMS["k"]), "local")
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    if len(canonical[4:]) % 4:  # the last character has unused low bits: another one decodes to the same bytes
        last = canonical[-1]
        twin = canonical[:-1] + alphabet[alphabet.index(last) | 1]
        if twin != canonical:
            with pytest.raises(tokens.TokenFormatError):
                tokens.decode(twin)


def test_identify_accepts_the_right_secret_only() -> None:
    presented, toks, pols = _world()
    assert identify(presented, toks, pols, NOW).token.id == "t1"
    forged = tokens.encode("1", "t1", "not-the-secret", "local")
    with pytest.raises(Denied) as e:
        identify(forged, toks, pols, NOW)
    assert e.value.status == 401 and e.value.reason == "unknown_token"


def test_identify_refuses_other_org_claim_and_expired() -> None:
    presented, toks, pols = _world(expires=NOW - timedelta(seconds=1))
    with pytest.raises(Denied) as e:
        identify(presented, toks, pols, NOW)
    assert e.value.reason == "expired_token"
    presented, toks, pols = _world()
    d = tokens.decode(presented)
    claim_other_org = json.loads(base64.urlsafe_b64decode(presented[4:] + "=="))
    claim_other_org["o"] = "2"
    other = tokens.encode("2", claim_other_org["i"], claim_other_org["k"], "local")
    assert tokens.decode(other).token_id == d.token_id
    with pytest.raises(Denied):
        identify(other, toks, pols, NOW)


def test_authorize_checks_scope_realm_ip_and_status() -> None:
    presented, toks, pols = _world(subnets=("10.0.0.0/8",))
    ident = identify(presented, toks, pols, NOW)
    assert authorize(ident, "metrics:read", _Stack("100", "1"), ipaddress.ip_address("10.1.2.3")) == ()
    cases = [("metrics:write", "100", "1", "10.1.2.3", "missing_scope"),
             ("metrics:read", "101", "1", "10.1.2.3", "wrong_realm"),
             ("metrics:read", "100", "2", "10.1.2.3", "wrong_realm"),
             ("metrics:read", "100", "1", "192.168.1.1", "ip_not_allowed")]
    for scope, sid, org, ip, reason in cases:
        with pytest.raises(Denied) as e:
            authorize(ident, scope, _Stack(sid, org), ipaddress.ip_address(ip))
        assert (e.value.status, e.value.reason) == (403, reason)
    with pytest.raises(Denied) as e:
        authorize(ident, "metrics:read", _Stack("100", "1"), None)
    assert e.value.reason == "ip_not_allowed"
    presented, toks, pols = _world(status="inactive")
    with pytest.raises(Denied) as e:
        authorize(identify(presented, toks, pols, NOW), "metrics:read", _Stack("100", "1"), None)
    assert e.value.reason == "inactive_policy"


def test_an_edited_policy_is_authorized_afresh_on_the_same_stack() -> None:
    """authorize keeps a policy's covering realms per (policy, stack) object: an edit (a new policy object,
    as every snapshot change makes one) must give the new answer at once, never the kept one."""
    sel = parse_selector('{env="dev"}')
    presented, toks, pols = _world()
    stack = _Stack("100", "1")
    assert authorize(identify(presented, toks, pols, NOW), "metrics:read", stack, None) == ()
    pols["p1"] = dataclasses.replace(pols["p1"], realms=(Realm("stack", "100", (sel,)),))
    assert authorize(identify(presented, toks, pols, NOW), "metrics:read", stack, None) == (sel,)
    pols["p1"] = dataclasses.replace(pols["p1"], realms=(Realm("stack", "101"),))
    with pytest.raises(Denied) as e:
        authorize(identify(presented, toks, pols, NOW), "metrics:read", stack, None)
    assert e.value.reason == "wrong_realm"
    pols["p1"] = dataclasses.replace(pols["p1"], realms=(Realm("org", "1"),))
    assert authorize(identify(presented, toks, pols, NOW), "metrics:read", stack, None) == ()


def test_org_realm_covers_every_stack_of_the_org() -> None:
    presented, toks, pols = _world(realms=(Realm("org", "1"),))
    ident = identify(presented, toks, pols, NOW)
    authorize(ident, "metrics:read", _Stack("101", "1"), None)
    with pytest.raises(Denied):
        authorize(ident, "metrics:read", _Stack("200", "2"), None)


def test_label_policies_union_and_unrestricted_realm_wins() -> None:
    a, b = parse_selector('{env="dev"}'), parse_selector('{team="a"}')
    assert label_policies((Realm("stack", "1", (a,)), Realm("org", "1", (b, a)))) == (a, b)
    assert label_policies((Realm("stack", "1", (a,)), Realm("org", "1"))) == ()


def test_ipv4_mapped_ipv6_client_matches_ipv4_ranges() -> None:
    p = AccessPolicy("p", "1", "p", "p", frozenset(), (), (ipaddress.ip_network("10.0.0.0/8"),))
    assert p.ip_allowed(ipaddress.ip_address("::ffff:10.0.0.1"))
    assert not p.ip_allowed(ipaddress.ip_address("::1"))


@pytest.mark.parametrize("text, expected", [
    ('{env="dev"}', '{env="dev"}'),
    ('up{job=~"a|b"}', '{__name__="up", job=~"a|b"}'),
    ('{a!="x", b!~"y.*", c=~".+"}', '{a!="x", b!~"y.*", c=~".+"}'),
    ('{a="q\\"uote\\\\"}', '{a="q\\"uote\\\\"}'),
])
def test_selector_parse_and_print(text: str, expected: str) -> None:
    sel = parse_selector(text)
    assert str(sel) == expected
    assert parse_selector(str(sel)) == sel


@pytest.mark.parametrize("bad", ["", "   ", "{}", '{a=~".*"}', '{a=~".*", b=~"(.*)"}', "{a=~\"(\"}",
                                 "rate(up[5m])", "up offset 5m", "{a=\"b\"}[5m]", '{a="b" or c="d"}', "{a=",
                                 "x" * 5000])
def test_bad_selectors_are_refused(bad: str) -> None:
    with pytest.raises(SelectorError):
        parse_selector(bad)


def test_selector_matches_semantics() -> None:
    sel = parse_selector('{env=~"dev|prod", team!="b"}')
    assert sel.matches({"env": "dev", "team": "a"})
    assert not sel.matches({"env": "devx", "team": "a"})  # regexes are anchored
    assert not sel.matches({"env": "prod", "team": "b"})
    assert parse_selector('{team!="b", env=~".+"}').matches({"env": "x"})


def test_selector_matching_everything_is_refused_with_advice() -> None:
    with pytest.raises(SelectorError, match="matches every series"):
        parse_selector('{team=~".*"}')


@pytest.mark.parametrize("text, matchers", [
    ('{env != "dev"}', [("env", "!=", "dev")]),  # the Cloud spec's own example
    ('{team!="b", env!~"x|y"}', [("team", "!=", "b"), ("env", "!~", "x|y")]),
    ('{a=""}', [("a", "=", "")]),  # "no label a" restricts too
])
def test_negative_only_selectors_are_valid_label_policies(text: str, matchers: list[tuple[str, str, str]]) -> None:
    sel = parse_selector(text)
    assert [(m.name, m.op, m.value) for m in sel.matchers] == matchers
    assert sel.text == text and parse_selector(str(sel)) == sel
    assert sel.matches({"env": "prod"}) == all(m.matches({"env": "prod"}) for m in sel.matchers)


def test_selector_keeps_the_text_as_written_but_compares_by_matchers() -> None:
    a, b = parse_selector('{ env = "dev" }'), parse_selector('{env="dev"}')
    assert a == b and hash(a) == hash(b)
    assert a.text == '{ env = "dev" }' and str(a) == '{env="dev"}' and b.text == '{env="dev"}'


TRUSTED = (ipaddress.ip_network("10.0.0.0/8"),)


@pytest.mark.parametrize("peer, xff, expected", [
    ("1.2.3.4", ["9.9.9.9"], "1.2.3.4"),                          # untrusted peer: XFF ignored
    ("10.0.0.1", ["9.9.9.9"], "9.9.9.9"),                         # trusted peer: right-most untrusted
    ("10.0.0.1", ["6.6.6.6, 9.9.9.9, 10.0.0.2"], "9.9.9.9"),      # spoofed left part ignored
    ("10.0.0.1", ["6.6.6.6", "9.9.9.9"], "9.9.9.9"),              # several headers
    ("10.0.0.1", [], "10.0.0.1"),
    ("10.0.0.1", ["garbage"], None),                              # unparsable: unknown, fails IP checks
    ("10.0.0.1", ["[2001:db8::1]:443"], "2001:db8::1"),
])
def test_client_ip(peer: str, xff: list[str], expected: str | None) -> None:
    got = client_ip(peer, xff, TRUSTED)
    if got is not None:  # (the resolved address hashes once; it must stay equal to, and hash like, ipaddress's)
        std = ipaddress.ip_address(str(got))
        assert got == std and hash(got) == hash(std) and {got: 1}.get(std) == 1
    assert (str(got) if got else None) == expected
