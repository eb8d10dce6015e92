"""Loki's counting endpoints under several label policies: inclusion-exclusion legs and their signed merge.

``index/stats``, ``index/volume`` and ``index/volume_range`` count over streams, and each stream's
contribution depends on the stream alone, so under OR-ed policies P1..Pn the answer is
``sum over subsets S of (-1)^(|S|+1) * answer(AND of S)`` (:mod:`gateway.lbac.overlap`): one leg
per term, each today's single-selector rewrite with the intersection as the policy, merged here
with the terms' signs. What was read in grafana/loki (main, 2026-08) and decided:

* ``index/stats`` (``pkg/storage/stores/index/stats/stats.go`` ``MergeStats``; TSDB
  ``single_file_index.go`` ``Stats``; ``pkg/querier/ingester_querier.go``): streams, chunks,
  bytes and entries are per stream (a stream counts once its chunks hold entries in the range)
  and summed across ingesters, stores and the frontend's 24h splits. Within one request streams
  are deduplicated by a bloom filter (1% false positives, Loki's own estimate); each leg is its
  own request, so the terms cancel exactly and only Loki's own estimate error remains. Merge:
  the signed sum per key, Loki's key order.
* Volumes (``pkg/ingester/instance.go`` ``getVolume``, TSDB ``Volume``, ``pkg/util/series_volume.go``
  ``PrepareLabelsAndMatchers``, ``pkg/loghttp/query.go`` ``targetLabels``/``volumeLimit``/
  ``volumeAggregateBy``): with ``aggregateBy=series`` (the default) a stream's bytes go to the
  label set made of its labels among the *names of the query's matchers*, or among
  ``targetLabels`` when given, in which case Loki first adds ``t=~".+"`` for every target the
  query does not name. A leg's query also names the policy's labels, so each leg sends
  ``targetLabels`` = the original query's matcher names (series mode, none given), and, when the
  client gave targets, the original query gets Loki's ``t=~".+"`` matchers before the rewrite (a
  policy naming ``t`` would otherwise stop Loki from adding it). ``aggregateBy=labels`` counts a
  stream's bytes once per label name (targets only, if given) and needs no change. The same
  holds for a single selector or a union rewrite: one leg, grouped as the original query.
* ``limit`` (default 100, 0 means 100, negative is a 400): every level keeps the top ``limit``
  names by volume, ties by name (``seriesvolume.MapToVolumeResponse``), per step bucket
  (``pkg/querier/queryrange/volume.go``). A leg cut that way cannot be merged exactly, so each
  leg asks for ``max(limit, VOLUME_LEG_LIMIT)`` (Loki's default ``volume_max_series``), and a leg
  whose bucket came back that full is refused with a 400 (it may have been cut). Complete legs
  are merged per (name, bucket), a name kept only where a positive term had it (a name in a
  negative term is always in a positive one: an intersection holds fewer streams), then each
  bucket is cut to the client's ``limit`` and the answer is built as ``ToPrometheusResponse``
  does: samples by time, ``vector`` unless some name has several samples, names ordered by their
  first sample's value (largest first), then name; ``labels`` mode names a series ``{name: ""}``.

Patterns are not counted here: Loki's pattern querier drops the patterns seen fewer than 30 times
in the request and keeps the top 300 (``pkg/pattern/ingester_querier.go`` ``prunePatterns``), so
per-policy answers miss what only their sum would keep; see ``gateway.lbac.fanout``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Final

from gateway.lbac import restrict
from gateway.merging import Unmergeable, success
from gateway.policy.selector import LabelMatcher, Selector, SelectorError, parse_selector

__all__ = ["VOLUME_LEG_LIMIT", "Counts", "Inexact", "Unmergeable", "merge_index_stats", "merge_volumes",
           "volume_params", "with_leg_limit"]

#: Volumes asked of each leg at least (Loki's default ``limits.volume-max-series``).
VOLUME_LEG_LIMIT: Final = 1000
_DEFAULT_LIMIT: Final = 100  # pkg/loghttp/query.go defaultVolumeLimit
_LABEL_NAME: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


class Inexact(ValueError):
    """The legs' answers cannot give the exact answer (a leg was cut to its limit)."""


@dataclass(frozen=True, slots=True)
class Counts:
    """What a signed merge needs besides the answers: one sign per leg, and for volumes the limits."""

    signs: tuple[int, ...]
    limit: int = _DEFAULT_LIMIT  # the client's limit (volumes)
    leg_limit: int = 0  # what each leg asked for (volumes); 0: no cut to watch for
    by_labels: bool = False  # aggregateBy=labels: names are label names


@dataclass(frozen=True, slots=True)
class VolumeParams:
    """A volume request's parameters for its legs, before the policy rewrite."""

    pairs: list[tuple[str, str]]  # for a single leg: grouping fixed, limit untouched
    limit: int | None  # the client's limit; None: invalid, sent on unchanged for Loki to refuse
    by_labels: bool


def _names(sel: Selector) -> list[str]:
    return list(dict.fromkeys(m.name for m in sel.matchers))


def _one(pairs: list[tuple[str, str]], name: str) -> str:
    """The parameter's value or empty; given twice (URL and body), a 400 as for ``query``."""
    return restrict._one(pairs, name, required=False) or ""


def volume_params(pairs: list[tuple[str, str]]) -> VolumeParams | None:
    """The parameters each volume leg sends so it groups as the original query, or None.

    None: the query is not a plain selector (Loki refuses it; today's rewrite passes it on).
    """
    query = _one(pairs, "query").strip()
    if not query.startswith("{"):
        return None
    try:
        sel = parse_selector(query)
    except SelectorError:
        return None
    names = _names(sel)
    targets = [t for t in _one(pairs, "targetLabels").split(",") if t]
    if not all(_LABEL_NAME.match(t) for t in targets):
        return None  # Loki matches no stream by such a name; a leg could not even name it
    by_labels = _one(pairs, "aggregateBy") == "labels"
    extra = tuple(LabelMatcher(t, "=~", ".+") for t in dict.fromkeys(targets) if t not in names)
    out = [(k, v) for k, v in pairs if k not in ("query", "targetLabels")]
    out.append(("query", str(Selector(sel.matchers + extra))))
    if targets:
        out.append(("targetLabels", _one(pairs, "targetLabels")))
    elif not by_labels:
        out.append(("targetLabels", ",".join(names)))
    return VolumeParams(out, _limit(_one(pairs, "limit")), by_labels)


def _limit(raw: str) -> int | None:
    if not raw.strip():
        return _DEFAULT_LIMIT
    try:
        n = int(raw)
    except ValueError:
        return None
    return _DEFAULT_LIMIT if n == 0 else n if n > 0 else None


def with_leg_limit(params: VolumeParams) -> tuple[list[tuple[str, str]], int]:
    """The pairs with the leg's larger limit, and that limit (the client's invalid limit stays)."""
    if params.limit is None:
        return params.pairs, 0
    leg = max(params.limit, VOLUME_LEG_LIMIT)
    return [(k, v) for k, v in params.pairs if k != "limit"] + [("limit", str(leg))], leg


# --------------------------------------------------------------------------- merges


def merge_index_stats(docs: list[Any], signs: tuple[int, ...]) -> dict[str, int]:
    """``{"streams","chunks","bytes","entries"}``: the signed sum per key."""
    keys = list(dict.fromkeys(k for d in docs for k in d))
    out = {k: sum(s * int(d.get(k, 0)) for d, s in zip(docs, signs, strict=True)) for k in keys}
    if any(v < 0 for v in out.values()):
        raise Unmergeable(f"index stats summed to a negative count: {out}")
    return out


def label_string(labels: dict[str, str]) -> str:
    """Prometheus ``labels.String()`` (names sorted), the name Loki orders volumes by."""
    return "{" + ", ".join(f"{k}={json.dumps(v, ensure_ascii=False)}" for k, v in sorted(labels.items())) + "}"


def _volume_name(metric: dict[str, str], by_labels: bool) -> str:
    if by_labels:
        if len(metric) != 1:
            raise Unmergeable(f"a label volume names {len(metric)} labels")
        return next(iter(metric))
    return label_string(metric)


def _value(v: Any) -> int:
    f = float(v)
    if f != int(f) or f < 0:
        raise Unmergeable(f"volume {v!r} is not a byte count")
    return int(f)


def merge_volumes(docs: list[Any], counts: Counts) -> tuple[dict[str, Any], list[Any]]:
    """Volume answers (``vector`` or ``matrix``) merged with the terms' signs (see the module docstring).

    Returns the answer without ``data.stats``, and the legs' query statistics to fold into it.
    """
    sums: dict[float, dict[str, int]] = {}
    positive: dict[float, set[str]] = {}
    metrics: dict[str, dict[str, str]] = {}
    stats: list[Any] = []
    for doc, sign in zip(docs, counts.signs, strict=True):
        data = success(doc)["data"]
        kind = data.get("resultType")
        if kind not in ("vector", "matrix"):
            raise Unmergeable(f"resultType {kind!r}, expected vector or matrix")
        if "stats" in data:
            stats.append(data["stats"])
        per_bucket: dict[float, int] = {}
        for r in data.get("result") or []:
            name = _volume_name(r["metric"], counts.by_labels)
            metrics.setdefault(name, r["metric"])
            for ts, v in ([r["value"]] if kind == "vector" else r["values"]):
                bucket = sums.setdefault(ts, {})
                bucket[name] = bucket.get(name, 0) + sign * _value(v)
                per_bucket[ts] = per_bucket.get(ts, 0) + 1
                if sign > 0:
                    positive.setdefault(ts, set()).add(name)
        if counts.leg_limit and any(n >= counts.leg_limit for n in per_bucket.values()):
            raise Inexact(f"a label policy's share of the volumes reached the {counts.leg_limit} asked for, so "
                          "it may have been cut and the sum would be wrong; narrow the query or set targetLabels")
    by_name: dict[str, list[tuple[float, int]]] = {}
    for ts, bucket in sums.items():
        kept = [(n, bucket[n]) for n in positive.get(ts, ())]
        if any(v < 0 for _, v in kept):
            raise Unmergeable("volumes summed to a negative count")
        kept.sort(key=lambda nv: (-nv[1], nv[0]))
        for n, v in kept[: counts.limit]:
            by_name.setdefault(n, []).append((ts, v))
    for samples in by_name.values():
        samples.sort()
    matrix = any(len(s) > 1 for s in by_name.values())
    order = sorted(by_name, key=lambda n: (-by_name[n][0][1], n))
    result: list[dict[str, Any]] = []
    for n in order:
        if matrix:
            result.append({"metric": metrics[n], "values": [[t, str(v)] for t, v in by_name[n]]})
        else:
            t, v = by_name[n][0]
            result.append({"metric": metrics[n], "value": [t, str(v)]})
    return {"status": "success", "data": {"resultType": "matrix" if matrix else "vector", "result": result}}, stats
