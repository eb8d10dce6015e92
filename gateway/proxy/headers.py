"""What crosses the gateway: request headers scrubbed of credentials and tenant/control headers,
response headers scrubbed of hop-by-hop ones."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

from multidict import CIMultiDict, CIMultiDictProxy

HOP_BY_HOP: Final = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
                               "trailer", "trailers", "transfer-encoding", "upgrade", "proxy-connection"})
# Headers the client must never choose for the upstream: credentials, tenancy, label policies.
# Method overrides: an upstream (or a proxy before it) honouring one would run another method than the
# one the route table authorized.
_DROPPED: Final = HOP_BY_HOP | frozenset({"authorization", "x-scope-orgid", "x-prom-label-policy", "host",
                                          "x-forwarded-for", "x-real-ip", "forwarded", "cookie",
                                          "x-http-method-override", "x-http-method", "x-method-override"})
_DROPPED_PREFIXES: Final = ("x-mimir-", "x-loki-", "x-tempo-", "x-grafana-")
# Of those, the ones that only shape the answer, which Grafana sends. Loki's others are control
# (grafana/loki pkg/util/httpreq, pkg/querier/queryrange/querylimits): X-Loki-Query-Limits sets the
# query limits, X-Loki-Query-Limits-Context the whole query its byte limit is checked on (passed apart,
# restricted: gateway/lbac/limits_context.py), X-Loki-Disable-Pipeline-Wrappers turns off the
# pipeline wrappers (which enforce label access in Grafana Enterprise Logs), X-Loki-Actor-Path
# picks the query scheduler's queue.
_PASSED: Final = frozenset({"x-loki-response-encoding-flags"})  # categorize-labels: labels apart from metadata


_NO_TOKENS: Final = frozenset[str]()
_PLAIN_CONNECTION: Final = frozenset({"keep-alive", "close"})  # (both are hop-by-hop anyway)
_DROPPED_WITH_BODY: Final = _DROPPED | {"content-length", "content-type"}


def _connection_tokens(headers: CIMultiDictProxy[str]) -> frozenset[str] | set[str]:
    """The header names the client's Connection header lists (hop-by-hop too, RFC 9110 7.6.1)."""
    values = headers.getall("Connection", ())
    if not values or (len(values) == 1 and values[0].lower() in _PLAIN_CONNECTION):
        return _NO_TOKENS
    return {t.strip().lower() for v in values for t in v.split(",") if t.strip()}


def upstream_headers(incoming: CIMultiDictProxy[str], tenant: str, forwarded_for: str,
                     label_policy_headers: Iterable[str] = (), drop_body_headers: bool = False,
                     limits_context: str | None = None) -> CIMultiDict[str]:
    """Copy the client's headers minus the dropped ones; set the tenant and the forwarding chain."""
    extra = _connection_tokens(incoming)
    dropped = _DROPPED_WITH_BODY if drop_body_headers else _DROPPED
    out: CIMultiDict[str] = CIMultiDict()
    add = out.add
    for name, value in incoming.items():
        low = name.lower()
        if low in dropped or low in extra or (low.startswith(_DROPPED_PREFIXES) and low not in _PASSED):
            continue
        add(name, value)
    prior = ", ".join(incoming.getall("X-Forwarded-For", ()))
    # (X-Forwarded-For, X-Scope-OrgID and X-Prom-Label-Policy are dropped above: adding them sets them)
    add("X-Forwarded-For", f"{prior}, {forwarded_for}" if prior else forwarded_for)
    add("X-Scope-OrgID", tenant)
    for value in label_policy_headers:
        add("X-Prom-Label-Policy", value)
    if limits_context is not None:
        add("X-Loki-Query-Limits-Context", limits_context)
    return out


def response_headers(upstream: CIMultiDictProxy[str]) -> CIMultiDict[str]:
    extra = _connection_tokens(upstream)
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in upstream.items():
        low = name.lower()
        if low in HOP_BY_HOP or low in extra or low == "content-length":
            continue
        out.add(name, value)
    return out
