"""Combine the legs of a LogQL metric fan-out (``gateway.lbac.metric_fanout``) into Loki's answer.

Shapes as Loki writes them (``pkg/util/marshal``, Prometheus ``model.SamplePair``): a matrix is
``{"metric": {...}, "values": [[<seconds>, "<value>"], ...]}`` per series, a vector
``{"metric": {...}, "value": [<seconds>, "<value>"]}``; values are Go's
``strconv.FormatFloat(v, 'f', -1, 64)``; series are sorted by ``labels.Compare`` (``sort.Sort`` of
a ``promql.Matrix`` and the instant vector in ``pkg/logql/engine.go``).
"""

from __future__ import annotations

import math
from decimal import Decimal
from typing import Any

from gateway.lbac.fanout import Merge, Plan
from gateway.merging import Unmergeable, merge_stats, success

__all__ = ["go_float", "merge_absent", "merge_extreme", "merge_signed"]


def go_float(v: float) -> str:
    """``strconv.FormatFloat(v, 'f', -1, 64)``: the shortest digits that read back, never an exponent."""
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    text = repr(v)
    if "e" in text or "E" in text:
        text = format(Decimal(text), "f")
    if text.endswith(".0"):
        text = text[:-2]
    return text


def _data(doc: Any) -> tuple[str, list[Any]]:
    data = success(doc)["data"]
    kind = data.get("resultType")
    if kind not in ("matrix", "vector"):
        raise Unmergeable(f"resultType {kind!r}, expected matrix or vector")
    return kind, data.get("result") or []


def _points(kind: str, series: Any) -> list[Any]:
    return list(series.get("values") or []) if kind == "matrix" else [series["value"]]


def _envelope(docs: list[Any], kind: str, result: list[Any]) -> dict[str, Any]:
    data: dict[str, Any] = {"resultType": kind, "result": result}
    stats = [d["data"]["stats"] for d in docs if isinstance(d["data"].get("stats"), dict)]
    if stats:
        data["stats"] = merge_stats(stats)
    out: dict[str, Any] = {"status": "success", "data": data}
    warnings = list(dict.fromkeys(w for d in docs for w in d.get("warnings") or []))
    if warnings:
        out["warnings"] = warnings
    return out


def merge_signed(docs: list[Any], plan: Plan) -> dict[str, Any]:
    """Per series and timestamp, the signed sum of the legs (inclusion-exclusion), exactly rounded."""
    if plan.counts is None or len(docs) != len(plan.counts.signs):
        raise Unmergeable("one sign per leg expected")
    kinds = {_data(d)[0] for d in docs}
    if len(kinds) != 1:
        raise Unmergeable("legs answered different result types")
    kind = kinds.pop()
    acc: dict[tuple[tuple[str, str], ...], tuple[dict[str, str], dict[float, tuple[Any, list[float], bool]]]] = {}
    for doc, sign in zip(docs, plan.counts.signs, strict=True):
        for s in _data(doc)[1]:
            metric = s["metric"]
            key = tuple(sorted(metric.items()))
            points = acc.setdefault(key, (metric, {}))[1]
            for ts, value in _points(kind, s):
                t = float(ts)
                raw, values, positive = points.get(t) or (ts, [], False)
                values.append(sign * float(value))
                points[t] = (raw, values, positive or sign > 0)
    result = []
    for key in sorted(acc):
        metric, points = acc[key]
        kept = [(points[t][0], go_float(math.fsum(points[t][1]))) for t in sorted(points) if points[t][2]]
        if not kept:
            continue
        if kind == "matrix":
            result.append({"metric": metric, "values": [[ts, v] for ts, v in kept]})
        else:
            result.append({"metric": metric, "value": [kept[0][0], kept[0][1]]})
    return _envelope(docs, kind, result)


def merge_absent(docs: list[Any], plan: Plan) -> dict[str, Any]:
    """The steps at which every leg reports absence, labelled as Loki labels the original query."""
    kind = ""
    common: dict[float, Any] | None = None
    for doc in docs:
        kind, found = _data(doc)
        here: dict[float, Any] = {}
        for s in found:
            for ts, value in _points(kind, s):
                here[float(ts)] = (ts, value)
        common = here if common is None else {t: v for t, v in common.items() if t in here}
    metric = dict(plan.labels)
    kept = [common[t] for t in sorted(common)] if common else []
    result: list[Any] = []
    if kept:
        if kind == "matrix":
            result = [{"metric": metric, "values": [[ts, v] for ts, v in kept]}]
        else:
            result = [{"metric": metric, "value": [kept[0][0], kept[0][1]]}]
    return _envelope(docs, kind or "matrix", result)


def merge_extreme(docs: list[Any], plan: Plan) -> dict[str, Any]:
    """Per series and timestamp the largest (``Merge.MAX``) or smallest leg value, written as that leg wrote it."""
    kinds = {_data(d)[0] for d in docs}
    if len(kinds) != 1:
        raise Unmergeable("legs answered different result types")
    kind = kinds.pop()
    better = (lambda a, b: a > b) if plan.merge is Merge.MAX else (lambda a, b: a < b)
    acc: dict[tuple[tuple[str, str], ...], tuple[dict[str, str], dict[float, tuple[Any, Any, float]]]] = {}
    for doc in docs:
        for s in _data(doc)[1]:
            metric = s["metric"]
            points = acc.setdefault(tuple(sorted(metric.items())), (metric, {}))[1]
            for ts, value in _points(kind, s):
                t, v = float(ts), float(value)
                have = points.get(t)
                if have is None or better(v, have[2]) or (math.isnan(have[2]) and not math.isnan(v)):
                    points[t] = (ts, value, v)
    result: list[Any] = []
    for key in sorted(acc):
        metric, points = acc[key]
        kept = [(points[t][0], points[t][1]) for t in sorted(points)]
        if kind == "matrix":
            result.append({"metric": metric, "values": [[ts, v] for ts, v in kept]})
        else:
            result.append({"metric": metric, "value": [kept[0][0], kept[0][1]]})
    return _envelope(docs, kind, result)
