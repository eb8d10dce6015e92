"""A small Loki for tests: stream selectors and line filters over a fixed data set, answered as Loki does.

Written from Loki's source (grafana/loki), for what the fan-out tests depend on:

* reading parameters: Go's ``r.ParseForm`` (tests/goform.py): a form body (POST) first, then the URL;
  every handler reads ``r.Form.Get`` (the first value; empty is the same as absent), series ``match``
  and ``match[]`` as lists; a form that does not parse is a 400 (``pkg/util/server/middleware.go``);
* ``lbac=True``: ``X-Prom-Label-Policy`` as Loki main's ``pkg/labelaccess`` applies it (parsed by
  tests/loki_lbac.py, 400 when malformed): a read sees only the streams some policy of the queried
  tenant matches, except ``detected_labels`` without a query, which ``pkg/querier/querier.go``
  ``DetectedLabels`` answers from the index without the policy (seen on a real Loki main:
  tests/e2e/test_real_loki.py), and label names, which ``Label`` reads from the index with the query's
  matchers only (``store.LabelNamesForMetricName``: ``labelaccess.StoreWrapper`` wraps label values, not
  names; the ingesters filter, but only hold recent data, so this fake answers as the store does);
* parameters (``pkg/loghttp/params.go``): ``limit`` defaults to 100 and must be positive;
  ``direction`` is ``FORWARD``/``BACKWARD`` in any case, default backward; a timestamp with a ``.``
  is float seconds, an integer of at most 10 digits is seconds, a longer one nanoseconds, else
  RFC 3339;
* a selector needs one matcher that does not match the empty string (Loki's "queries require at
  least one regexp or equality matcher that does not have an empty-compatible value"); regex
  matchers are anchored, a missing label has the empty value (Prometheus ``labels.Matcher``);
* line filters ``|=``, ``!=``, ``|~`` (unanchored regex), ``!~``, AND-ed in order;
* entries are merged across streams by timestamp, ties broken by the stream's label string,
  both reversed for backward (``pkg/iter`` heap iterators), the first ``limit`` kept; the answer
  lists streams sorted by label string (``logqlmodel.Streams.Less``) with their entries in query
  direction; a log query reads ``start <= ts < end``;
* JSON shapes (``pkg/util/marshal``, ``pkg/loghttp``): ``{"status":"success","data":{"resultType":
  "streams","result":[{"stream":{...},"values":[["<ns>","line"]]}],"stats":{...}}}``; labels and
  label values ``{"status":"success","data":[...]}``; series ``data`` a list of label maps;
  ``detected_labels`` ``{"detectedLabels":[{"label","cardinality"}]}``; ``index/stats``
  ``{"streams","chunks","bytes","entries"}``; tail frames ``{"streams":[...]}``;
* ``index/stats``: the streams with entries in ``start <= ts < end``, one chunk each, their entries
  and line bytes (``pkg/storage/stores/index/stats``: counts per stream, summed);
* ``index/volume`` and ``index/volume_range`` (``pkg/loghttp/query.go``, ``pkg/util/series_volume.go``
  ``PrepareLabelsAndMatchers``, ``pkg/ingester/instance.go`` ``getVolume``,
  ``pkg/storage/stores/index/seriesvolume``, ``pkg/querier/queryrange/volume.go``): the query is a
  plain selector; ``limit`` 0 means 100, negative is refused; ``aggregateBy`` ``series`` (default)
  or ``labels``; ``targetLabels`` (comma-separated) adds ``t=~".+"`` for each target the query does
  not name; a stream's volume is the bytes of its lines in the bucket; ``series`` groups a stream
  under its labels among the targets, or among the query's matcher names; ``labels`` adds it to
  each of its label names (the targets only, if given); buckets are ``util.ForInterval(step, start,
  end, endInclusive)`` (one bucket for ``index/volume``), each read from its start to its end
  truncated to seconds, keyed by its end, cut to the top ``limit`` by volume then name; the answer
  is a Prometheus ``vector`` (``matrix`` once a name has two samples), names ordered by their first
  sample's value, largest first, then name; a ``labels`` name is the series ``{name: ""}``;
* ``patterns`` (``pkg/pattern``): a stand-in for Drain, one pattern per line (``key=value`` values
  and runs of digits become ``<_>``), its level the line's first word; samples are counts per ``step`` (at least
  10s), summed per (pattern, level, timestamp) over streams (``iter.NewMerge``); then Loki's
  ``prunePatterns``: totals below 30 dropped, the top 300 by total kept, largest first.

Metric queries (``query_range`` and the instant ``query``) are evaluated by tests/fake_loki_metrics.py;
anything else in a query is answered 400, so a test never passes on syntax the fake does not evaluate.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from aiohttp import WSMsgType, web

from tests import fake_loki_metrics, goform
from tests.loki_lbac import PolicyHeaderError, extract

SEC = 10**9

_MATCHER = re.compile(r'\s*([A-Za-z_][A-Za-z0-9_]*)\s*(=~|!~|!=|=)\s*("(?:[^"\\]|\\.)*"|`[^`]*`)\s*(,|\})')
_FILTER = re.compile(r'\s*(\|=|!=|\|~|!~)\s*("(?:[^"\\]|\\.)*"|`[^`]*`)')
_EMPTY_MSG = ('queries require at least one regexp or equality matcher that does not have an empty-compatible '
              'value. For instance, app=~".*" does not meet this requirement, but app=~".+" will')


class LokiError(Exception):
    pass


@dataclass(frozen=True)
class Stream:
    labels: dict[str, str]
    entries: tuple[tuple[int, str], ...]  # (ns, line), any order


@asynccontextmanager
async def enforce_gateway(db_dsn: str, aiohttp_client: Any, aiohttp_server: Any, url: str) -> AsyncIterator[Any]:
    """The test gateway with every backend at ``url`` in enforce mode (tests.test_proxy's ``_env``)."""
    from tests.test_proxy import _env

    ups = {"metrics": {"url": url, "lbac": "enforce"}, "logs": {"url": url, "lbac": "enforce"},
           "traces": {"url": url, "write_url": url}}
    async with _env(db_dsn, aiohttp_client, aiohttp_server, lbac="enforce", upstreams=ups) as e:
        yield e


def stack_realm(selectors: tuple[str, ...], stack: str = "100") -> list[dict[str, Any]]:
    """Realms of an access policy: one stack with these selectors as its label policies."""
    return [{"type": "stack", "identifier": stack, "labelPolicies": [{"selector": s} for s in selectors]}]


def label_string(labels: dict[str, str]) -> str:
    return "{" + ", ".join(f"{k}={json.dumps(v)}" for k, v in sorted(labels.items())) + "}"


def _string(lit: str) -> str:
    return lit[1:-1] if lit[0] == "`" else str(json.loads(lit))


def _matcher(name: str, op: str, value: str) -> Callable[[dict[str, str]], bool]:
    if op == "=":
        return lambda ls: ls.get(name, "") == value
    if op == "!=":
        return lambda ls: ls.get(name, "") != value
    rx = re.compile(value, re.DOTALL)
    if op == "=~":
        return lambda ls: rx.fullmatch(ls.get(name, "")) is not None
    return lambda ls: rx.fullmatch(ls.get(name, "")) is None


def parse_selector(text: str) -> tuple[Callable[[dict[str, str]], bool], int]:
    """The stream matcher for ``{...}`` at the start of ``text`` and where it ends."""
    s = text.lstrip()
    offset = len(text) - len(s)
    if not s.startswith("{"):
        raise LokiError("parse error: a log query starts with a stream selector")
    pos, tests, non_empty = 1, [], False
    while True:
        m = _MATCHER.match(s, pos)
        if m is None:
            raise LokiError(f"parse error at {pos}")
        name, op, value = m.group(1), m.group(2), _string(m.group(3))
        test = _matcher(name, op, value)
        non_empty |= not test({})
        tests.append(test)
        pos = m.end()
        if m.group(4) == "}":
            break
    if not non_empty:
        raise LokiError(_EMPTY_MSG)
    return (lambda ls: all(t(ls) for t in tests)), offset + pos


Relabel = Callable[[dict[str, str]], dict[str, str]]


def parse_query(query: str) -> tuple[Callable[[dict[str, str]], bool], Callable[[str], bool]]:
    """A log query without label stages: its stream matcher and its line filter."""
    select, keep, relabel = parse_log_query(query)
    if relabel is not _unchanged:
        raise LokiError("parse error: label stages are evaluated on log queries only")
    return select, keep


def _unchanged(labels: dict[str, str]) -> dict[str, str]:
    return labels


def parse_log_query(query: str) -> tuple[Callable[[dict[str, str]], bool], Callable[[str], bool], Relabel]:
    """A log query's stream matcher, line filter and label stages (the labels the answer carries).

    Label stages as ``pkg/logql/log`` applies them: ``keep a, b`` deletes every other label
    (``keep_labels.go``), ``drop a, b`` those (``drop_labels.go``); ``label_format dst=src`` renames
    (``src`` goes), ``dst="text"`` sets a literal or ``{{.name}}`` template (``fmt.go``); a label
    left empty is not part of the answer's labels. Only names, no matchers, in ``keep``/``drop``.
    """
    select, pos = parse_selector(query)
    filters: list[Callable[[str], bool]] = []
    stages: list[Relabel] = []
    while pos < len(query):
        if not query[pos:].strip():
            break
        m = _FILTER.match(query, pos)
        if m is not None:
            filters.append(fake_loki_metrics.line_filter(m.group(1), _string(m.group(2))))
            pos = m.end()
            continue
        m = _LABEL_STAGE.match(query, pos)
        if m is None:
            raise LokiError(f"parse error: the fake Loki only evaluates line filters, keep, drop and "
                            f"label_format (at {pos})")
        stages.append(_label_stage(m.group(1), m.group(2)))
        pos = m.end()

    def relabel(labels: dict[str, str]) -> dict[str, str]:
        for stage in stages:
            labels = stage(labels)
        return {k: v for k, v in labels.items() if v != ""}

    return select, lambda line: all(f(line) for f in filters), relabel if stages else _unchanged


_NAME = r"[A-Za-z_][A-Za-z0-9_]*"
_STRING = r'"(?:[^"\\]|\\.)*"|`[^`]*`'
_LABEL_STAGE = re.compile(rf"\s*\|\s*(keep|drop|label_format)\s+((?:{_NAME})\s*(?:=\s*(?:{_NAME}|{_STRING}))?"
                          rf"(?:\s*,\s*{_NAME}\s*(?:=\s*(?:{_NAME}|{_STRING}))?)*)")
_ASSIGN = re.compile(rf"\s*({_NAME})\s*(?:=\s*({_NAME}|{_STRING}))?\s*(?:,|$)")
_TEMPLATE_FIELD = re.compile(rf"{{{{\s*\.({_NAME})\s*}}}}")


def _label_stage(op: str, args: str) -> Relabel:
    pairs = [(m.group(1), m.group(2)) for m in _ASSIGN.finditer(args)]
    if op in ("keep", "drop"):
        if any(v is not None for _, v in pairs):
            raise LokiError(f"the fake Loki evaluates {op} with label names only")
        names = {n for n, _ in pairs}
        if op == "keep":
            return lambda ls: {k: v for k, v in ls.items() if k in names}
        return lambda ls: {k: v for k, v in ls.items() if k not in names}
    if any(v is None for _, v in pairs):
        raise LokiError("label_format needs dst=src or dst=\"template\"")

    for _, src in pairs:
        if src[0] in "\"`" and "{{" in _TEMPLATE_FIELD.sub("", _string(src)):
            raise LokiError("the fake Loki evaluates label_format templates of {{.name}} only")

    def fmt(ls: dict[str, str]) -> dict[str, str]:
        # In order (LabelsFormatter.Process): a rename of a present label sets dst and deletes src (so
        # `a=a` deletes a); templates read the labels as they were at the first template.
        out = dict(ls)
        seen: dict[str, str] = {}
        for dst, src in pairs:
            if src[0] not in "\"`":
                if src in out:
                    out[dst] = out[src]
                    del out[src]
                continue
            seen = seen or dict(out)
            out[dst] = _TEMPLATE_FIELD.sub(lambda m, at=seen: at.get(m.group(1), ""), _string(src))
        return out
    return fmt


def parse_time(value: str | None, default: int) -> int:
    if not value:
        return default
    if "." in value:
        try:
            return round(float(value) * 1e9)
        except ValueError:
            pass
    try:
        n = int(value)
    except ValueError:
        try:
            return int(datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp() * 1e9)
        except ValueError:
            raise LokiError(f'cannot parse "{value}" to a valid timestamp') from None
    return n * 1_000_000_000 if len(value) <= 10 else n


def parse_matchers(text: str) -> list[tuple[str, str, str]]:
    """The matchers of a plain selector (Loki's ``syntax.ParseMatchers``, validated): (name, op, value)."""
    s = text.strip()
    if not s.startswith("{"):
        raise LokiError("parse error: only label matchers are supported")
    pos, out = 1, []
    while True:
        m = _MATCHER.match(s, pos)
        if m is None:
            raise LokiError("only label matchers are supported")
        out.append((m.group(1), m.group(2), _string(m.group(3))))
        pos = m.end()
        if m.group(4) == "}":
            break
    if s[pos:].strip():
        raise LokiError("only label matchers are supported")
    if all(_matcher(*x)({}) for x in out):
        raise LokiError(_EMPTY_MSG)
    return out


def parse_duration(value: str) -> int:
    """Loki's ``parseSecondsOrDuration`` (float seconds or a Prometheus duration), in nanoseconds."""
    try:
        return round(float(value) * 1e9)
    except ValueError:
        pass
    m = re.fullmatch(r"(\d+)(ms|s|m|h|d)", value)
    if m is None:
        raise LokiError(f'cannot parse "{value}" to a valid duration')
    return int(m.group(1)) * {"ms": 10**6, "s": 10**9, "m": 60 * 10**9, "h": 3600 * 10**9, "d": 86400 * 10**9}[
        m.group(2)]


def for_interval(step: int, start: int, end: int) -> list[tuple[int, int]]:
    """``util.ForInterval(step, start, end, endTimeInclusive=true)`` in nanoseconds (SplitGap: 1ms)."""
    if step <= 0:
        return [(start, end)]
    out, first, t = [], True, start - start % step
    while t < end:
        new_end = t + step
        new_end = end if new_end >= end else new_end - 10**6
        out.append((start if first else t, new_end))
        first = False
        t += step
    return out


def _json_ts(ns: int) -> int | float:
    ms = ns // 10**6
    return ms // 1000 if ms % 1000 == 0 else ms / 1000


def pattern_of(line: str) -> str:
    """Drain's logfmt tokenizer keeps the keys and varies the values; digits vary anywhere."""
    return re.sub(r"\d+", "<_>", re.sub(r"=\S*", "=<_>", line))


def is_metric(query: str) -> bool:
    """A metric query starts with a function or aggregation, a log query with its selector."""
    return not query.lstrip(" (").startswith("{")


def _step(value: str | None) -> int:
    """Loki's step: float seconds or a Prometheus duration (``pkg/loghttp/params.go``)."""
    if not value:
        raise LokiError("the fake Loki needs an explicit step")
    try:
        seconds = float(value)
    except ValueError:
        m = re.fullmatch(r"(\d+)([smh])", value)
        if m is None:
            raise LokiError(f'cannot parse "{value}" to a valid duration') from None
        seconds = int(m.group(1)) * {"s": 1, "m": 60, "h": 3600}[m.group(2)]
    if seconds <= 0:
        raise LokiError("zero or negative query resolution step widths are not accepted")
    return int(seconds * 10**9)


@dataclass
class FakeLoki:
    streams: list[Stream]
    now_ns: int = 0
    seen: list[tuple[str, list[tuple[str, str]]]] = field(default_factory=list)
    lbac: bool = False  # enforce X-Prom-Label-Policy as Loki with -lbac.enabled does

    def _under(self, policies: list[list[tuple[str, str, str]]]) -> FakeLoki:
        """The streams Loki's LBAC lets a read see: those some policy (its matchers AND-ed) matches."""
        tests = [[_matcher(*m) for m in pol] for pol in policies]
        return FakeLoki([s for s in self.streams if any(all(t(s.labels) for t in pol) for pol in tests)],
                        now_ns=self.now_ns)

    def visible_only(self, selectors: tuple[Any, ...]) -> FakeLoki:
        """The ground truth of a label policy: a Loki holding only the streams some selector matches."""
        return FakeLoki([s for s in self.streams if any(p.matches(s.labels) for p in selectors)], now_ns=self.now_ns)

    # ------------------------------------------------------------------ evaluation (pure)

    def _bounds(self, p: dict[str, str]) -> tuple[int, int]:
        end = parse_time(p.get("end"), self.now_ns)
        return parse_time(p.get("start"), end - 3600 * 10**9), end

    def _in_range(self, p: dict[str, str], select: Callable[[dict[str, str]], bool]) -> list[Stream]:
        start, end = self._bounds(p)
        return [s for s in self.streams if select(s.labels) and any(start <= t < end for t, _ in s.entries)]

    def query_range(self, p: dict[str, str]) -> dict[str, Any]:
        select, keep, relabel = parse_log_query(p.get("query", ""))
        limit_raw = p.get("limit") or "100"
        try:
            limit = int(limit_raw)
        except ValueError:
            raise LokiError(f'strconv.Atoi: parsing "{limit_raw}": invalid syntax') from None
        if limit <= 0:
            raise LokiError("limit must be a positive value")
        direction = (p.get("direction") or "BACKWARD").upper()
        if direction not in ("FORWARD", "BACKWARD"):
            raise LokiError(f"invalid direction '{p.get('direction')}'")
        start, end = self._bounds(p)
        items: list[tuple[int, str, dict[str, str], str]] = []
        scanned = 0
        for s in self.streams:
            if not select(s.labels):
                continue
            labels = relabel(s.labels)  # the answer's labels: after the pipeline
            key = label_string(labels)
            for t, line in s.entries:
                if start <= t < end:
                    scanned += 1
                    if keep(line):
                        items.append((t, key, labels, line))
        items.sort(key=lambda i: (i[0], i[1]), reverse=direction == "BACKWARD")
        items = items[:limit]
        grouped: dict[str, tuple[dict[str, str], list[list[str]]]] = {}
        for t, key, labels, line in items:
            grouped.setdefault(key, (labels, []))[1].append([str(t), line])
        result = [{"stream": grouped[k][0], "values": grouped[k][1]} for k in sorted(grouped)]
        stats = {"summary": {"totalEntriesReturned": len(items), "totalLinesProcessed": scanned,
                             "execTime": 0.001, "queueTime": 0.0001, "linesProcessedPerSecond": scanned * 1000}}
        return {"status": "success", "data": {"resultType": "streams", "result": result, "stats": stats}}

    def metric(self, p: dict[str, str], instant: bool) -> dict[str, Any]:
        expr = fake_loki_metrics.parse(p.get("query", ""), parse_selector, _string, LokiError)
        if instant:
            steps = [parse_time(p.get("time"), self.now_ns)]
        else:
            start, end = self._bounds(p)
            step = _step(p.get("step"))
            steps = list(range(start, end + 1, step))
        return fake_loki_metrics.evaluate(expr, self.streams, steps, instant)

    def labels(self, p: dict[str, str], name: str | None = None) -> dict[str, Any]:
        select = parse_selector(p["query"])[0] if p.get("query") else (lambda ls: True)
        out: set[str] = set()
        for s in self._in_range(p, select):
            if name is None:
                out.update(s.labels)
            elif s.labels.get(name):
                out.add(s.labels[name])
        return {"status": "success", "data": sorted(out)}

    def series(self, matches: list[str], p: dict[str, str]) -> dict[str, Any]:
        # ParseSeriesQuery: the union of `match` and `match[]`; a lone `{}` (spaces removed) is no match at
        # all, and no match is every stream
        distinct = sorted(set(matches))
        if len(distinct) == 1 and distinct[0].replace(" ", "") == "{}":
            distinct = []
        sels = [parse_selector(m)[0] for m in distinct]
        found = self._in_range(p, lambda ls: not sels or any(sel(ls) for sel in sels))
        return {"status": "success", "data": [s.labels for s in sorted(found, key=lambda s: label_string(s.labels))]}

    def detected_labels(self, p: dict[str, str]) -> dict[str, Any]:
        select = parse_selector(p["query"])[0] if p.get("query") else (lambda ls: True)
        values: dict[str, set[str]] = {}
        for s in self._in_range(p, select):
            for k, v in s.labels.items():
                values.setdefault(k, set()).add(v)
        # countLabelsAndCardinality / shouldRejectLabel (pkg/querier/querier.go): a label whose values are all
        # numbers or UUIDs is dropped (one or two "0"/"1" values excepted), cluster/namespace/instance/pod kept
        def looks_like_id(v: str) -> bool:
            try:
                float(v.replace("_", "x"))  # Go's ParseFloat takes no underscores here
                return True
            except ValueError:
                return re.fullmatch(r"[0-9a-fA-F]{8}-([0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}", v) is not None

        def keep(name: str, vs: set[str]) -> bool:
            if name in ("cluster", "namespace", "instance", "pod"):
                return bool(vs)
            if len(vs) <= 2 and vs <= {"0", "1"}:
                return bool(vs)
            return not all(looks_like_id(v) for v in vs)
        return {"detectedLabels": [{"label": k, "cardinality": len(values[k])} for k in sorted(values)
                                   if keep(k, values[k])]}

    def index_stats(self, p: dict[str, str]) -> dict[str, Any]:
        select = parse_selector(p.get("query", ""))[0]
        start, end = self._bounds(p)
        found = self._in_range(p, select)
        entries = [line for s in found for t, line in s.entries if start <= t < end]
        return {"streams": len(found), "chunks": len(found), "bytes": sum(len(x.encode()) for x in entries),
                "entries": len(entries)}  # Loki's key order (logproto.IndexStatsResponse)

    def volume(self, p: dict[str, str], ranged: bool) -> dict[str, Any]:
        matchers = parse_matchers(p.get("query", ""))
        raw_limit = p.get("limit") or "100"
        try:
            limit = int(raw_limit)
        except ValueError:
            raise LokiError(f'strconv.Atoi: parsing "{raw_limit}": invalid syntax') from None
        if limit < 0:
            raise LokiError("limit must be a positive value")
        limit = limit or 100
        aggregate = p.get("aggregateBy") or "series"
        if aggregate not in ("series", "labels"):
            raise LokiError("invalid aggregation option")
        targets = [t for t in (p.get("targetLabels") or "").split(",")] if p.get("targetLabels") else []
        names = [n for n, _, _ in matchers]
        if targets:
            matchers += [(t, "=~", ".+") for t in targets if t not in names]
            group_by = set(targets)
        else:
            group_by = set(names)
        tests = [_matcher(*m) for m in matchers]
        start, end = self._bounds(p)
        step = 0
        if ranged:
            step = parse_duration(p["step"]) if p.get("step") else max((end - start) // (250 * 10**9), 1) * 10**9
            if step <= 0:
                raise LokiError("zero or negative query resolution step widths are not accepted. "
                                "Try a positive integer")
        by_name: dict[str, list[tuple[int, int]]] = {}
        metrics: dict[str, dict[str, str]] = {}
        for b_start, b_end in for_interval(step, start, end):
            lo, hi = b_start // SEC * SEC, b_end // SEC * SEC  # model.TimeFromUnix(t.Unix())
            volumes: dict[str, int] = {}
            for s in self.streams:
                if not all(t(s.labels) for t in tests):
                    continue
                lines = [line for t, line in s.entries if lo <= t <= hi]
                if not lines:
                    continue
                size = sum(len(x.encode()) for x in lines)
                if aggregate == "series":
                    group = {k: v for k, v in s.labels.items() if k in group_by}
                    key = label_string(group)
                    metrics[key] = group
                    volumes[key] = volumes.get(key, 0) + size
                else:
                    for k in s.labels:
                        if not targets or k in group_by:
                            metrics[k] = {k: ""}
                            volumes[k] = volumes.get(k, 0) + size
            top = sorted(volumes.items(), key=lambda kv: (-kv[1], kv[0]))[:limit]
            for key, v in top:
                by_name.setdefault(key, []).append((b_end, v))
        matrix = any(len(v) > 1 for v in by_name.values())
        order = sorted(by_name, key=lambda k: (-sorted(by_name[k])[0][1], k))
        result: list[dict[str, Any]] = []
        for key in order:
            samples = [[_json_ts(t), str(v)] for t, v in sorted(by_name[key])]
            result.append({"metric": metrics[key], **({"values": samples} if matrix else {"value": samples[0]})})
        stats = {"summary": {"execTime": 0.001, "totalEntriesReturned": len(result), "splits": 1}}
        return {"status": "success", "data": {"resultType": "matrix" if matrix else "vector", "result": result,
                                              "stats": stats}}

    def patterns(self, p: dict[str, str]) -> dict[str, Any]:
        tests = [_matcher(*m) for m in parse_matchers(p.get("query", ""))]
        start, end = self._bounds(p)
        step = parse_duration(p["step"]) if p.get("step") else max((end - start) // (250 * 10**9), 1) * 10**9
        step = max(step // 10**6, 10_000)  # ms, at least drain.TimeResolution
        counts: dict[tuple[str, str], dict[int, int]] = {}
        for s in self.streams:
            if not all(t(s.labels) for t in tests):
                continue
            for t, line in s.entries:
                if start <= t <= end:
                    ms = t // 10**6
                    samples = counts.setdefault((pattern_of(line), line.split(" ", 1)[0]), {})
                    samples[ms - ms % step] = samples.get(ms - ms % step, 0) + 1
        totals = {k: sum(v.values()) for k, v in counts.items()}
        kept = sorted((k for k in counts if totals[k] >= 30), key=lambda k: (-totals[k], k))[:300]
        return {"status": "success", "data": [
            {"pattern": k[0], "level": k[1], "samples": [[t // 1000, n] for t, n in sorted(counts[k].items())]}
            for k in kept]}

    # ------------------------------------------------------------------ HTTP

    async def _params(self, request: web.Request) -> tuple[dict[str, str], list[tuple[str, str]]]:
        body = await request.read() if request.method in ("POST", "PUT", "PATCH") else b""
        form = goform.Form(request.method, request.headers.get("Content-Type", ""),
                           request.rel_url.raw_query_string, body)
        self.seen.append((request.path, form.pairs))
        if form.error:
            raise LokiError(form.error)
        first: dict[str, str] = {}
        for k, v in form.pairs:
            first.setdefault(k, v)  # r.Form.Get
        return first, form.pairs

    def _view(self, request: web.Request, p: dict[str, str]) -> FakeLoki:
        if not self.lbac:
            return self
        policies = extract(request.headers.getall("X-Prom-Label-Policy", [])).get(
            request.headers.get("X-Scope-OrgID", ""))
        if not policies or (request.path.endswith("/detected_labels") and not p.get("query")) \
                or request.path.endswith(("/labels", "/label")):
            return self
        return self._under(policies)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if request.headers.get("Upgrade", "").lower() == "websocket":
            return await self._tail(request)
        path = request.path
        try:
            p, pairs = await self._params(request)
            loki = self._view(request, p)
            if path.endswith(("/query_range", "/query")) and is_metric(p.get("query", "")):
                doc = loki.metric(p, instant=path.endswith("/query"))
            elif path.endswith("/query_range"):
                doc = loki.query_range(p)
            elif path.endswith(("/labels", "/label")):
                doc = loki.labels(p)
            elif m := re.search(r"/label/([^/]+)/values$", path):
                doc = loki.labels(p, m.group(1))
            elif path.endswith("/series"):
                doc = loki.series([v for k, v in pairs if k in ("match", "match[]")], p)
            elif path.endswith("/detected_labels"):
                doc = loki.detected_labels(p)
            elif path.endswith("/index/stats"):
                doc = loki.index_stats(p)
            elif path.endswith(("/index/volume", "/index/volume_range")):
                doc = loki.volume(p, ranged=path.endswith("_range"))
            elif path.endswith("/patterns"):
                doc = loki.patterns(p)
            else:
                return web.Response(status=404, text="404 page not found\n")
        except PolicyHeaderError as exc:
            return web.json_response({"status": "error", "error": str(exc)}, status=400)
        except (LokiError, re.error) as exc:
            return web.Response(status=400, text=str(exc), content_type="text/plain")
        return web.json_response(doc)

    async def _tail(self, request: web.Request) -> web.WebSocketResponse:
        p, _ = await self._params(request)
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        select, keep, relabel = parse_log_query(p.get("query", ""))
        items = sorted(((t, label_string(relabel(s.labels)), relabel(s.labels), line) for s in self.streams
                        if select(s.labels) for t, line in s.entries if keep(line)), key=lambda i: (i[0], i[1]))
        for t, _key, labels, line in items:  # one frame per entry, oldest first, as a tail of old lines
            await ws.send_str(json.dumps({"streams": [{"stream": labels, "values": [[str(t), line]]}]}))
        async for msg in ws:
            if msg.type != WSMsgType.TEXT:
                break
        return ws

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        return app
