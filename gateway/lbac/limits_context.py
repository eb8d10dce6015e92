"""Loki's ``X-Loki-Query-Limits-Context``: the whole query a split query belongs to, passed only where it
cannot widen what a token sees.

Grafana (``pkg/tsdb/loki/api.go``, feature ``lokiQueryLimitsContext``) sends the JSON
``{"expr": ..., "from": ..., "to": ...}`` with the first request of a split query. Loki's query frontend
(``pkg/util/querylimits``, ``pkg/querier/queryrange/limits.go`` ``getBytesReadForRequest``) then checks
``max_query_bytes_read`` against the index statistics of ``expr`` over ``[from, to]`` as well as of the
request's own query, and its refusal names the byte count. Left as sent, ``expr`` would let a label-
restricted token learn the volume of streams it cannot read; rewritten like the query (or dropped
where it cannot be), it only makes Loki's limit stricter. Loki ignores a malformed value and reads the
first of several, so a value this module cannot read is dropped, which is what Loki would do with it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Final

from gateway.lbac import RewriteError
from gateway.lbac.logql import restrict_logql
from gateway.policy.selector import Selector
from gateway.routes import Kind

HEADER: Final = "X-Loki-Query-Limits-Context"
_MAX_VALUE: Final = 64 * 1024  # a LogQL query is at most logql.MAX_QUERY_LEN; JSON adds little
#: Where Loki's query frontend reads it: the query endpoints (their size limiter).
_QUERY_KINDS: Final = frozenset({Kind.LOGQL})


def limits_context(values: Sequence[str], backend: str, kind: Kind, policies: tuple[Selector, ...]) -> str | None:
    """The value to send Loki, or None to send none.

    Without label policies the value passes as sent (the token reads the whole tenant anyway). With
    some, only on a query endpoint, and with ``expr`` restricted exactly as the query is; a value that
    is not Loki's JSON or whose ``expr`` cannot be restricted is dropped.
    """
    if not values or backend != "logs":
        return None
    value = values[0]
    if not policies:
        return value
    if kind not in _QUERY_KINDS or len(value) > _MAX_VALUE:
        return None
    try:
        ctx = json.loads(value)
    except ValueError:
        return None
    if not isinstance(ctx, dict) or not isinstance(expr := ctx.get("expr"), str) or not expr:
        return None
    try:
        restricted = restrict_logql(expr, policies)
    except RewriteError:
        return None
    out = {"expr": restricted, **{k: ctx[k] for k in ("from", "to") if k in ctx}}
    return json.dumps(out, separators=(",", ":"), ensure_ascii=False)
