"""``upstream_headers``: what the client's headers become upstream (unit level; tests/test_proxy.py checks
it end to end)."""

from __future__ import annotations

from multidict import CIMultiDict, CIMultiDictProxy

from gateway.proxy.headers import upstream_headers


def _h(*pairs: tuple[str, str]) -> CIMultiDictProxy[str]:
    return CIMultiDictProxy(CIMultiDict(pairs))


def test_credentials_tenancy_and_hop_by_hop_headers_are_dropped_and_the_tenant_set() -> None:
    out = upstream_headers(_h(("Host", "gw"), ("Authorization", "Basic x"), ("X-Scope-OrgID", "999"),
                              ("Connection", "keep-alive"), ("Accept", "application/json"),
                              ("X-Prom-Label-Policy", "999:%7B%7D"), ("X-Loki-Response-Encoding-Flags", "c"),
                              ("X-Loki-Query-Limits", "{}"), ("Content-Length", "3")), "100", "10.0.0.1")
    assert list(out.items()) == [("Accept", "application/json"), ("X-Loki-Response-Encoding-Flags", "c"),
                                 ("Content-Length", "3"), ("X-Forwarded-For", "10.0.0.1"), ("X-Scope-OrgID", "100")]


def test_headers_the_connection_header_names_are_dropped_in_every_connection_header() -> None:
    out = upstream_headers(_h(("Connection", "close"), ("Connection", "X-A, x-b"), ("X-A", "1"), ("X-B", "2"),
                              ("X-C", "3")), "100", "h")
    assert "X-A" not in out and "X-B" not in out and out["X-C"] == "3"
    out = upstream_headers(_h(("Connection", "X-A"), ("X-A", "1")), "100", "h")
    assert "X-A" not in out


def test_the_forwarding_chain_body_headers_and_label_policies() -> None:
    out = upstream_headers(_h(("X-Forwarded-For", "1.1.1.1"), ("X-Forwarded-For", "2.2.2.2"),
                              ("Content-Type", "text/plain"), ("Content-Length", "9")), "100", "3.3.3.3",
                           ("100:a", "100:b"), drop_body_headers=True)
    assert out.getall("X-Forwarded-For") == ["1.1.1.1, 2.2.2.2, 3.3.3.3"]
    assert "Content-Type" not in out and "Content-Length" not in out
    assert out.getall("X-Prom-Label-Policy") == ["100:a", "100:b"] and out.getall("X-Scope-OrgID") == ["100"]


def test_a_repeated_set_of_header_names_gives_the_same_headers_with_its_own_values() -> None:
    """The second request with the same names takes the remembered selection: same names kept, this
    request's values, per drop_body_headers; a Connection list still drops what it names."""
    names = ("Accept", "Authorization", "X-Custom", "Content-Type", "X-Custom", "X-Grafana-User")
    for body in (False, True):
        first = upstream_headers(_h(*((n, f"a{i}") for i, n in enumerate(names))), "100", "h",
                                 drop_body_headers=body)
        again = upstream_headers(_h(*((n, f"b{i}") for i, n in enumerate(names))), "100", "h",
                                 drop_body_headers=body)
        kept = [("Accept", "0"), ("X-Custom", "2")] + ([] if body else [("Content-Type", "3")]) + [("X-Custom", "4")]
        assert [(n, v[1:]) for n, v in list(first.items())[:-2]] == kept
        assert list(again.items())[:-2] == [(n, "b" + v) for n, v in kept]
    for name in ("X-Only", "Authorization"):  # one kept, none kept
        for _ in range(2):
            out = upstream_headers(_h((name, "v")), "100", "h")
            assert list(out.items())[:-2] == ([("X-Only", "v")] if name == "X-Only" else [])
    out = upstream_headers(_h(("Connection", "X-Custom"), ("Accept", "0"), ("X-Custom", "1")), "100", "h")
    assert "X-Custom" not in out and out["Accept"] == "0"


def test_a_repeated_header_never_reuses_another_requests_positions() -> None:
    """The positions kept are learnt per sequence of names, repeats included: a request that repeats a dropped
    header after one that did not must not have the repeat copied (it would carry the client's tenant or label
    policy upstream), nor fail on a shorter one."""
    first = CIMultiDictProxy(CIMultiDict([("Host", "g"), ("X-Scope-OrgID", "evil"), ("User-Agent", "a")]))
    assert "X-Scope-OrgID" in upstream_headers(first, "100", "1.2.3.4")  # (the gateway's own, set below)
    again = CIMultiDictProxy(CIMultiDict([("Host", "g"), ("X-Scope-OrgID", "evil"), ("X-Scope-OrgID", "evil2"),
                                          ("User-Agent", "a")]))
    out = upstream_headers(again, "100", "1.2.3.4")
    assert out.getall("X-Scope-OrgID") == ["100"] and out.getall("User-Agent") == ["a"]
    policies = CIMultiDictProxy(CIMultiDict([("Host", "g"), ("X-Prom-Label-Policy", "100:%7Ba%3D%22b%22%7D"),
                                             ("X-Prom-Label-Policy", "100:%7Bc%3D%22d%22%7D"), ("Accept", "x")]))
    assert upstream_headers(policies, "100", "1.2.3.4").getall("Accept") == ["x"]
    fewer = CIMultiDictProxy(CIMultiDict([("Host", "g"), ("X-Prom-Label-Policy", "100:%7Ba%3D%22b%22%7D"),
                                          ("Accept", "y")]))
    out = upstream_headers(fewer, "100", "1.2.3.4")
    assert "X-Prom-Label-Policy" not in out and out.getall("Accept") == ["y"]
