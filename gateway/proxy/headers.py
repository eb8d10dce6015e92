"""What crosses the gateway: request headers scrubbed of credentials and tenant/control headers,
response headers scrubbed of hop-by-hop ones."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from operator import itemgetter
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
_NAME: Final = itemgetter(0)  # of a (name, value) pair
_PLAIN_CONNECTION: Final = frozenset({"keep-alive", "close"})  # (both are hop-by-hop anyway)
_DROPPED_WITH_BODY: Final = _DROPPED | {"content-length", "content-type"}


def _connection_tokens(headers: CIMultiDictProxy[str]) -> frozenset[str] | set[str]:
    """The header names the client's Connection header lists (hop-by-hop too, RFC 9110 7.6.1)."""
    values = headers.getall("Connection", ())
    if not values or (len(values) == 1 and values[0].lower() in _PLAIN_CONNECTION):
        return _NO_TOKENS
    return {t.strip().lower() for v in values for t in v.split(",") if t.strip()}


#: Whether a header name, spelled as the client sent it, is dropped (by the fixed rules above; the Connection
#: header's own list is checked per request): by drop_body_headers. The same few names come on every
#: request; the names are the client's, so the table is bounded (past it, names are judged each time).
_VERDICTS: Final[dict[bool, dict[str, bool]]] = {False: {}, True: {}}
MAX_VERDICTS: Final = 1024


def _verdict(verdicts: dict[str, bool], name: str, drop_body_headers: bool) -> bool:
    low = name.lower()
    drop = low in (_DROPPED_WITH_BODY if drop_body_headers else _DROPPED) \
        or (low.startswith(_DROPPED_PREFIXES) and low not in _PASSED)
    if len(verdicts) < MAX_VERDICTS:
        verdicts[name] = drop
    return drop


#: The header names of a request, as sent and in order -> what picks the kept (name, value) pairs out of its
#: items (as a tuple). Clients send the same few sets; the names are theirs, so bounded like _VERDICTS.
_KEPT: Final[dict[bool, dict[tuple[str, ...], Callable[[tuple[tuple[str, str], ...]], tuple[tuple[str, str], ...]]]]] \
    = {False: {}, True: {}}


def _learn(table: dict[tuple[str, ...], Callable[[tuple[tuple[str, str], ...]], tuple[tuple[str, str], ...]]],
           names: tuple[str, ...], keep: list[int]) -> None:
    if len(table) >= MAX_VERDICTS:
        return
    if len(keep) >= 2:
        table[names] = itemgetter(*keep)
    elif keep:
        only = keep[0]
        table[names] = lambda items: (items[only],)
    else:
        table[names] = lambda items: ()


def upstream_headers(incoming: CIMultiDictProxy[str], tenant: str, forwarded_for: str,
                     label_policy_headers: Iterable[str] = (), drop_body_headers: bool = False,
                     limits_context: str | None = None) -> CIMultiDict[str]:
    """Copy the client's headers minus the dropped ones; set the tenant and the forwarding chain."""
    extra = _connection_tokens(incoming)
    verdicts = _VERDICTS[drop_body_headers]
    items = tuple(incoming.items())
    # Every name, repeats included, in order (multidict's keys() gives each name once: a request repeating a
    # header would otherwise reuse another request's positions and forward a dropped header).
    names = tuple(map(_NAME, items))
    kept = None if extra else _KEPT[drop_body_headers].get(names)
    if kept is not None:  # the same header names as a request before: the same ones kept, in C
        out: CIMultiDict[str] = CIMultiDict(kept(items))
        add = out.add
    else:
        out = CIMultiDict()
        add = out.add
        keep: list[int] = []
        for i, (name, value) in enumerate(items):
            drop = verdicts.get(name)
            if drop is None:
                drop = _verdict(verdicts, name, drop_body_headers)
            if drop or (extra and name.lower() in extra):
                continue
            add(name, value)
            keep.append(i)
        if not extra:
            _learn(_KEPT[drop_body_headers], names, keep)
    prior = ", ".join(incoming.getall("X-Forwarded-For")) if "X-Forwarded-For" in incoming else ""
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
