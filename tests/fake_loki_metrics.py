"""Metric queries for tests/fake_loki.py: range and vector aggregations evaluated as Loki evaluates them.

Written from Loki's source (grafana/loki main, read for this):

* ``pkg/logql/range_vector.go`` (``batchRangeVectorIterator.load``): a step at ``t`` with range
  ``r`` reads samples with ``t - r < ts <= t`` (the lower bound is not inclusive); a series exists
  at a step only when its window holds a sample. ``rate`` is the window's sum divided by the range
  in seconds (a count without ``unwrap``), ``bytes_*`` take the line's length.
* ``pkg/logql/log/metrics_extraction.go`` (``LabelExtractorWithStages``): without ``by``, the
  series labels are the stream's and the parsed labels minus the ``without`` names and minus the
  unwrapped label; with ``by (x, ...)`` only those; a line without the unwrapped label gives no sample.
* ``pkg/logql/log/parser.go`` (``LogfmtParser.Process``): ``key=value`` pairs; a key that is already
  a stream label is renamed ``key_extracted``; empty values (and bare keys) are skipped.
* ``pkg/logql/evaluator.go`` (``absentLabels``): ``absent_over_time`` answers 1 at the steps whose
  window holds no sample, labelled with the selector's ``=`` matchers, dropping a name that has any
  other matcher.
* ``pkg/logql/syntax/ast.go`` (``RangeAggregationExpr.validate``): ``by``/``without`` on a range
  aggregation only for ``avg``/``max``/``min``/... ``_over_time``, never on the sums.
* ``pkg/logql/engine.go``: a range query answers a matrix, an instant query a vector; series are
  sorted by ``labels.Compare``. Step timestamps go from ``start`` to ``end`` by ``step``.
* Values are written as Go's ``strconv.FormatFloat(v, 'f', -1, 64)``, timestamps as seconds.

The grammar evaluated (anything else is a 400, so no test passes on syntax the fake skips):
``sum|avg|max|min|count [by|without (..)] (expr) [by|without (..)]``, ``expr or expr``, around range aggregations
``op({selector} <line filters> [| logfmt] [| drop a, b] [| unwrap x] [range]) [by|without (..)]``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

_RANGE = re.compile(r"\[\s*(\d+)([smh])\s*\]")
_UNITS = {"s": 1, "m": 60, "h": 3600}
_FILTER = re.compile(r'\s*(\|=|!=|\|~|!~)\s*("(?:[^"\\]|\\.)*"|`[^`]*`)')
_STAGE = re.compile(r"\s*\|\s*(logfmt|drop|unwrap)\b\s*([A-Za-z_][A-Za-z0-9_]*(?:\s*,\s*[A-Za-z_][A-Za-z0-9_]*)*)?")
_WORD = re.compile(r"\s*([A-Za-z_][A-Za-z0-9_]*)")
_NAMES = re.compile(r"\s*\(\s*([A-Za-z_][A-Za-z0-9_]*(?:\s*,\s*[A-Za-z_][A-Za-z0-9_]*)*)?\s*\)")
_LOGFMT = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)=(\S*)")
RANGE_OPS = ("count_over_time", "rate", "bytes_over_time", "bytes_rate", "sum_over_time", "avg_over_time",
             "max_over_time", "min_over_time", "absent_over_time")
VECTOR_OPS = ("sum", "avg", "max", "min", "count")
# RangeAggregationExpr.validate (pkg/logql/syntax/ast.go): only these take by/without
_GROUPABLE = ("avg_over_time", "max_over_time", "min_over_time")

Labels = tuple[tuple[str, str], ...]


def go_float(v: float) -> str:
    if math.isnan(v):
        return "NaN"
    text = repr(v)
    if "e" in text:
        text = format(Decimal(text), "f")
    return text[:-2] if text.endswith(".0") else text


def line_filter(op: str, value: str) -> Callable[[str], bool]:
    """A line filter: ``|=``/``!=`` substring, ``|~``/``!~`` unanchored regex (Loki's ``pkg/logql/log/filter.go``)."""
    if op == "|=":
        return lambda line: value in line
    if op == "!=":
        return lambda line: value not in line
    rx = re.compile(value)
    if op == "|~":
        return lambda line: rx.search(line) is not None
    return lambda line: rx.search(line) is None


@dataclass
class _Range:
    op: str
    select: Callable[[dict[str, str]], bool]
    matchers: list[tuple[str, str]]  # (name, op) in order, with = values kept for absentLabels
    eq_values: dict[int, str]
    keep: Callable[[str], bool]
    logfmt: bool
    drop: tuple[str, ...]
    unwrap: str | None
    range_ns: int
    grouping: tuple[str, tuple[str, ...]] | None


@dataclass
class _Vector:
    op: str
    grouping: tuple[str, tuple[str, ...]] | None
    inner: _Expr


@dataclass
class _Or:  # Prometheus/Loki `or`: the left side, then the right side's series whose labels the left lacks
    left: _Expr
    right: _Expr


_Expr = _Range | _Vector | _Or


class _Parser:
    def __init__(self, text: str, parse_selector: Callable[[str], tuple[Callable[..., bool], int]],
                 string: Callable[[str], str], error: type[Exception]) -> None:
        self.s, self.pos = text, 0
        self.parse_selector, self.string, self.error = parse_selector, string, error

    def _ws(self) -> None:
        while self.pos < len(self.s) and self.s[self.pos].isspace():
            self.pos += 1

    def _eat(self, ch: str) -> None:
        self._ws()
        if not self.s.startswith(ch, self.pos):
            raise self.error(f"parse error: expected {ch!r} at {self.pos}")
        self.pos += len(ch)

    def _peek(self, ch: str) -> bool:
        self._ws()
        return self.s.startswith(ch, self.pos)

    def _grouping(self) -> tuple[str, tuple[str, ...]] | None:
        m = _WORD.match(self.s, self.pos)
        if m is None or m.group(1) not in ("by", "without"):
            return None
        n = _NAMES.match(self.s, m.end())
        if n is None:
            raise self.error(f"parse error: grouping at {self.pos}")
        self.pos = n.end()
        names = tuple(x.strip() for x in (n.group(1) or "").split(",") if x.strip())
        return m.group(1), names

    def expr(self) -> _Expr:
        e = self._primary()
        while (m := _WORD.match(self.s, self.pos)) is not None and m.group(1) == "or":
            self.pos = m.end()
            e = _Or(e, self._primary())
        return e

    def _primary(self) -> _Expr:
        if self._peek("("):
            self._eat("(")
            e = self.expr()
            self._eat(")")
            return e
        m = _WORD.match(self.s, self.pos)
        if m is None:
            raise self.error(f"parse error at {self.pos}")
        word = m.group(1)
        self.pos = m.end()
        if word in VECTOR_OPS:
            grouping = self._grouping()
            self._eat("(")
            inner = self.expr()
            self._eat(")")
            grouping = grouping or self._grouping()
            return _Vector(word, grouping, inner)
        if word in RANGE_OPS:
            self._eat("(")
            r = self._log_range(word)
            self._eat(")")
            r.grouping = self._grouping()
            if r.grouping is not None and word not in _GROUPABLE:
                raise self.error(f"parse error : grouping not allowed for {word} aggregation")
            return r
        raise self.error(f"parse error: the fake Loki does not evaluate {word!r}")

    def _log_range(self, op: str) -> _Range:
        self._ws()
        rest = self.s[self.pos :]
        select, used = self.parse_selector(rest)
        sel_text = rest[:used]
        matchers = re.findall(r'([A-Za-z_][A-Za-z0-9_]*)\s*(=~|!~|!=|=)\s*("(?:[^"\\]|\\.)*"|`[^`]*`)', sel_text)
        self.pos += used
        filters: list[Callable[[str], bool]] = []
        logfmt, drop, unwrap = False, (), None
        while True:
            if (f := _FILTER.match(self.s, self.pos)) is not None:
                filters.append(line_filter(f.group(1), self.string(f.group(2))))
                self.pos = f.end()
                continue
            if (st := _STAGE.match(self.s, self.pos)) is not None:
                names = tuple(x.strip() for x in (st.group(2) or "").split(",") if x.strip())
                if st.group(1) == "logfmt":
                    logfmt = True
                elif st.group(1) == "drop":
                    drop = drop + names
                else:
                    if len(names) != 1:
                        raise self.error("parse error: unwrap takes one label")
                    unwrap = names[0]
                self.pos = st.end()
                continue
            break
        self._ws()
        r = _RANGE.match(self.s, self.pos)
        if r is None:
            raise self.error(f"parse error: expected a range at {self.pos}")
        self.pos = r.end()
        if op in ("sum_over_time", "avg_over_time", "max_over_time", "min_over_time") and unwrap is None:
            raise self.error(f"parse error: {op} needs unwrap")
        eq = {i: self.string(v) for i, (_n, o, v) in enumerate(matchers) if o == "="}
        return _Range(op, select, [(n, o) for n, o, _ in matchers], eq, lambda line: all(f(line) for f in filters),
                      logfmt, drop, unwrap, int(r.group(1)) * _UNITS[r.group(2)] * 10**9, None)


def parse(query: str, parse_selector: Callable[[str], tuple[Callable[..., bool], int]],
          string: Callable[[str], str], error: type[Exception]) -> _Expr:
    p = _Parser(query, parse_selector, string, error)
    e = p.expr()
    p._ws()
    if p.pos != len(query):
        raise error(f"parse error: unexpected text at {p.pos}")
    return e


def _group(labels: dict[str, str], grouping: tuple[str, tuple[str, ...]] | None) -> Labels:
    if grouping is None:
        return tuple(sorted(labels.items()))
    how, names = grouping
    if how == "by":
        return tuple(sorted((k, v) for k, v in labels.items() if k in names and v != ""))
    return tuple(sorted((k, v) for k, v in labels.items() if k not in names))


def _samples(r: _Range, streams: list[Any], lo: int, hi: int) -> dict[Labels, list[float]]:
    """Samples in ``lo < ts <= hi`` per series key."""
    out: dict[Labels, list[float]] = {}
    for s in streams:
        if not r.select(s.labels):
            continue
        for ts, line in s.entries:
            if not (lo < ts <= hi) or not r.keep(line):
                continue
            labels = dict(s.labels)
            if r.logfmt:
                for k, v in _LOGFMT.findall(line):
                    if not v:
                        continue
                    labels[k + "_extracted" if k in s.labels else k] = v
            for name in r.drop:
                labels.pop(name, None)
            if r.unwrap is not None:
                raw = labels.get(r.unwrap, "")
                if raw == "":
                    continue
                value = float(raw)
                grouping = r.grouping
                if grouping is None or grouping[0] == "without":
                    names = (grouping[1] if grouping else ()) + (r.unwrap,)
                    grouping = ("without", names)
                key = _group(labels, grouping)
            else:
                value = float(len(line)) if r.op.startswith("bytes") else 1.0
                key = _group(labels, r.grouping)
            out.setdefault(key, []).append(value)
    return out


def _range_at(r: _Range, streams: list[Any], t: int) -> dict[Labels, float]:
    seconds = r.range_ns / 1e9
    found = _samples(r, streams, t - r.range_ns, t)
    if r.op == "absent_over_time":
        if found:
            return {}
        labels: dict[str, str] = {}
        empty = []
        for i, (name, op) in enumerate(r.matchers):
            if op == "=" and name not in labels:
                labels[name] = r.eq_values[i]
            else:
                empty.append(name)
        for name in empty:
            labels.pop(name, None)
        return {tuple(sorted(labels.items())): 1.0}
    fold: dict[str, Callable[[list[float]], float]] = {
        "count_over_time": lambda v: float(len(v)),
        "rate": lambda v: math.fsum(v) / seconds,
        "bytes_over_time": math.fsum,
        "bytes_rate": lambda v: math.fsum(v) / seconds,
        "sum_over_time": math.fsum,
        "avg_over_time": lambda v: math.fsum(v) / len(v),
        "max_over_time": max,
        "min_over_time": min,
    }
    return {k: fold[r.op](v) for k, v in found.items()}


def _eval(e: _Expr, streams: list[Any], t: int) -> dict[Labels, float]:
    if isinstance(e, _Range):
        return _range_at(e, streams, t)
    if isinstance(e, _Or):
        left = _eval(e.left, streams, t)
        return {**_eval(e.right, streams, t), **left}
    inner = _eval(e.inner, streams, t)
    groups: dict[Labels, list[float]] = {}
    for key, v in inner.items():
        labels = dict(key)
        if e.grouping is None:
            g: Labels = ()
        elif e.grouping[0] == "by":
            g = tuple(sorted((k, x) for k, x in labels.items() if k in e.grouping[1]))
        else:
            g = tuple(sorted((k, x) for k, x in labels.items() if k not in e.grouping[1]))
        groups.setdefault(g, []).append(v)
    fold: dict[str, Callable[[list[float]], float]] = {
        "sum": math.fsum, "avg": lambda v: math.fsum(v) / len(v), "max": max, "min": min,
        "count": lambda v: float(len(v)),
    }
    return {g: fold[e.op](v) for g, v in groups.items()}


def _seconds(ns: int) -> float | int:
    return ns // 10**9 if ns % 10**9 == 0 else ns / 1e9


def evaluate(expr: _Expr, streams: list[Any], steps: list[int], instant: bool) -> dict[str, Any]:
    """Loki's answer for a metric query at the given step timestamps (ns)."""
    series: dict[Labels, list[list[Any]]] = {}
    for t in steps:
        for key, v in _eval(expr, streams, t).items():
            series.setdefault(key, []).append([_seconds(t), go_float(v)])
    keys = sorted(series)
    if instant:
        result: list[Any] = [{"metric": dict(k), "value": series[k][0]} for k in keys]
        kind = "vector"
    else:
        result = [{"metric": dict(k), "values": series[k]} for k in keys]
        kind = "matrix"
    stats = {"summary": {"execTime": 0.001, "queueTime": 0.0001, "totalLinesProcessed": 0}}
    return {"status": "success", "data": {"resultType": kind, "result": result, "stats": stats}}
