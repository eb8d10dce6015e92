"""A small Mimir with its own label-based access control, written from grafana/mimir ``pkg/labelaccess``
(main, June 2026, ``-auth.label-access-control-enabled``; experimental, no stable release yet).

What the fake does, and where Mimir does it:

* ``middleware.go`` (``labelAccessMiddleware.Wrap``): every ``X-Prom-Label-Policy`` value is parsed
  (``policy.go`` ``ExtractLabelMatchersSlice``: each value split on ``,``, each piece split at the first
  ``:`` into tenant and selector, the selector ``url.PathUnescape``d and read by Prometheus'
  ``parser.ParseMetricSelector``, an empty label name refused); a failure is ``http.Error(w, err, 400)``:
  a plain-text body, ``invalid label policy header value...``. With a policy, a path ending in
  ``/cardinality/label_values``, ``/cardinality/label_names`` or ``/cardinality/active_series`` is 400
  ``... endpoint doesn't support access policies with label-based access control``.
* ``queryable.go``: the policies of the tenant in ``X-Scope-OrgID`` (``instancePolicyMap[orgID]``; a tenant
  the header does not name is not filtered at all) are OR-ed selectors, each an AND of matchers (a missing
  label is the empty value, regexes anchored): ``Select`` (queries, series) keeps the series one selector
  matches, ``LabelNames``/``LabelValues`` answer the union over the selectors.
* ``queryable_exemplar.go``: exemplars of the series one selector matches.
* Not filtered, as in Mimir (they do not read through the queryable): ``metadata``, ``user_stats``,
  ``cardinality/active_native_histogram_metrics`` (its path ends in none of the three suffixes).

``filters=False`` models a Mimir whose query-frontend parses the header (the flag set there) while its
queriers do not filter: the 400s above, but every answer whole.

Queries are plain vector selectors (``up{job="a"}``); each series holds one constant value. Answers have
Prometheus' JSON shapes.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import promql_parser as pp
from aiohttp import web

from tests.loki_lbac import PolicyHeaderError, extract

Matcher = tuple[str, str, str]
UNSUPPORTED: tuple[str, ...] = ("/cardinality/label_values", "/cardinality/label_names", "/cardinality/active_series")
_OPS = {"MatchOp.Equal": "=", "MatchOp.NotEqual": "!=", "MatchOp.Re": "=~", "MatchOp.NotRe": "!~"}


def matches(m: Matcher, labels: dict[str, str]) -> bool:
    name, op, value = m
    v = labels.get(name, "")
    if op == "=":
        return v == value
    if op == "!=":
        return v != value
    hit = re.fullmatch(value, v, re.DOTALL) is not None
    return hit if op == "=~" else not hit


def selector_matchers(text: str) -> list[Matcher]:
    """A query or ``match[]`` that is one vector selector, as Prometheus reads it."""
    node = pp.parse(text)
    if not isinstance(node, pp.VectorSelector):
        raise ValueError("the fake Mimir evaluates vector selectors only")
    out = [(m.name, _OPS[str(m.op)], m.value) for m in node.matchers.matchers]
    return ([("__name__", "=", node.name)] if node.name else []) + out


@dataclass
class Series:
    labels: dict[str, str]
    value: float
    exemplar_trace: str = ""


@dataclass
class FakeMimir:
    series: list[Series]
    filters: bool = True
    seen: list[tuple[str, dict[str, str], list[str]]] = field(default_factory=list)

    def visible_only(self, selectors: list[list[Matcher]]) -> FakeMimir:
        """The ground truth: a Mimir holding only the series some selector matches."""
        return FakeMimir([s for s in self.series if any(all(matches(m, s.labels) for m in sel) for sel in selectors)])

    def _visible(self, policies: list[list[Matcher]] | None) -> Callable[[dict[str, str]], bool]:
        if not policies or not self.filters:
            return lambda _labels: True
        return lambda labels: any(all(matches(m, labels) for m in sel) for sel in policies)

    def answer(self, path: str, params: list[tuple[str, str]], policies: list[list[Matcher]] | None) -> Any:
        """The JSON answer of ``path`` (the part after ``/prometheus/api/v1/``) under ``policies``."""
        visible = self._visible(policies)
        p = dict(params)
        rows = [s for s in self.series if visible(s.labels)]
        if path in ("query", "query_range", "query_exemplars"):
            sel = selector_matchers(p["query"])
            hit = [s for s in rows if all(matches(m, s.labels) for m in sel)]
            if path == "query":
                t = float(p.get("time", "1000"))
                return {"resultType": "vector", "result": [{"metric": s.labels, "value": [t, f"{s.value:g}"]}
                                                           for s in sorted(hit, key=_key)]}
            if path == "query_exemplars":
                return [{"seriesLabels": s.labels, "exemplars": [{"labels": {"trace_id": s.exemplar_trace},
                                                                  "value": f"{s.value:g}", "timestamp": 1000}]}
                        for s in sorted(hit, key=_key) if s.exemplar_trace]
            start, end, step = float(p["start"]), float(p["end"]), float(p["step"])
            steps = [start + i * step for i in range(int((end - start) // step) + 1)]
            return {"resultType": "matrix", "result": [{"metric": s.labels,
                                                        "values": [[t, f"{s.value:g}"] for t in steps]}
                                                       for s in sorted(hit, key=_key)]}
        matchers = [selector_matchers(v) for k, v in params if k == "match[]"]
        if matchers:
            rows = [s for s in rows if any(all(matches(m, s.labels) for m in sel) for sel in matchers)]
        if path == "series":
            return [s.labels for s in sorted(rows, key=_key)]
        if path == "labels":
            return sorted({k for s in rows for k in s.labels})
        if m := re.fullmatch(r"label/([^/]+)/values", path):
            return sorted({s.labels[m.group(1)] for s in rows if m.group(1) in s.labels})
        if path == "metadata":  # not filtered: Mimir reads metadata from the ingesters, not the queryable
            return {n: [{"type": "gauge", "help": f"{n} help", "unit": ""}]
                    for n in sorted({s.labels["__name__"] for s in self.series})}
        if path.startswith("cardinality/"):
            return {"label_values_count_total": len(self.series), "series_count_total": len(self.series)}
        raise KeyError(path)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        values = request.headers.getall("X-Prom-Label-Policy", [])
        params = list(request.query.items())
        if request.method == "POST":
            params += list((await request.post()).items())  # type: ignore[arg-type]
        self.seen.append((request.path, dict(request.headers), values))
        try:
            policy_set = extract(list(values))
        except PolicyHeaderError as exc:  # http.Error: text/plain, the error and a newline
            return web.Response(status=400, text=f"{exc}\n", content_type="text/plain")
        if policy_set and request.path.endswith(UNSUPPORTED):
            return web.Response(status=400, text=f"{request.path} endpoint doesn't support access policies with "
                                "label-based access control\n", content_type="text/plain")
        policies = policy_set.get(request.headers.get("X-Scope-OrgID", ""))  # another tenant's: no filter
        path = request.path.removeprefix("/prometheus/api/v1/")
        try:
            data = self.answer(path, params, policies)
        except KeyError:
            return web.json_response({"status": "error", "errorType": "not_found", "error": "not found"}, status=404)
        except (ValueError, BaseException) as exc:
            if isinstance(exc, KeyboardInterrupt | SystemExit):
                raise
            return web.json_response({"status": "error", "errorType": "bad_data", "error": str(exc)}, status=400)
        if path.startswith("cardinality/"):
            return web.json_response(data)
        return web.json_response({"status": "success", "data": data})

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        return app


def _key(s: Series) -> tuple[tuple[str, str], ...]:
    return tuple(sorted(s.labels.items()))
