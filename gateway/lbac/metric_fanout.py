"""Fan-out for the LogQL metric queries the union rewrite cannot restrict exactly.

``gateway.lbac.logql`` restricts a metric query under several selectors by the union
``(rate({s, p1}[5m]) or rate({s, p2}[5m]))``, which is exact only while each series still carries
the policy labels. Where it is not (``absent_over_time``, a range-aggregation grouping that drops a
policy label, ``unwrap``/``drop``/``label_format``/``keep`` of a policy label, ``unpack``), two
shapes can still be answered exactly by sending several restricted queries and combining numbers:

* **Sums over streams** - the whole query is one range aggregation whose value adds up over the
  streams it reads (``count_over_time``, ``rate``, ``bytes_over_time``, ``bytes_rate``,
  ``sum_over_time``; with or without ``by``/``without``), possibly inside ``sum`` aggregations.
  Such a query's answer for the streams matching P1 or ... or Pn is, per series and timestamp, the
  inclusion-exclusion sum of the answers under the intersections (``gateway.lbac.overlap``). A
  series and a point are answered where a single-selector leg has them (any intersection's streams
  are also one selector's streams, so the negative terms add no series).
* **Maxima and minima** - the whole query is ``max_over_time`` (``min_over_time``), with or without
  ``by``/``without``, possibly inside ``max`` (``min``) aggregations: the largest sample of a group over
  the visible streams is the largest of the legs' answers, one leg per selector, per series and step.
* **``absent_over_time``** - the whole query is ``absent_over_time(<log range>)``: a step is absent
  for the visible streams exactly when it is absent under every selector, so the answer keeps the
  steps every leg answers, labelled as Loki labels it for the original query (``absentLabels`` in
  ``pkg/logql/evaluator.go``: the selector's ``=`` matchers, a name with any other matcher dropped).

Everything else stays refused with enforce's message. Known limit, documented: Loki deduplicates
samples with the same labels, timestamp and line (``pkg/iter`` heap iterators); two streams that a
parser or ``drop`` turns into the same series, holding the same line at the same nanosecond, are
counted once by Loki and twice by the sum. Numbers only, never a series outside the policy.
"""

from __future__ import annotations

from typing import Final

from gateway.lbac import RewriteError
from gateway.lbac.logql import _lex, _matching, _Tok
from gateway.policy.selector import LabelMatcher

__all__ = ["ADDITIVE_OPS", "MetricShape", "absent_labels", "has_parser", "shape"]

#: Range aggregations whose value is a sum over the samples of the streams read.
ADDITIVE_OPS: Final = frozenset({"count_over_time", "rate", "bytes_over_time", "bytes_rate", "sum_over_time"})
_GROUPING: Final = frozenset({"by", "without"})
#: The range aggregation a query ends in -> its shape; max/min over a union is the max/min over the legs.
_LEAVES: Final = {**dict.fromkeys(ADDITIVE_OPS, "additive"), "max_over_time": "max", "min_over_time": "min",
                  "absent_over_time": "absent"}
#: Vector aggregations each shape may sit in (sums in sums, maxima in maxima, absence in nothing).
_WRAPPABLE: Final = {"additive": frozenset({"sum"}), "max": frozenset({"max"}), "min": frozenset({"min"}),
                     "absent": frozenset()}
_VECTOR_WRAPPERS: Final = frozenset({"sum", "max", "min"})


class MetricShape:
    """What :func:`shape` found: ``"additive"``, ``"max"``, ``"min"`` or ``"absent"``, and the query's selector."""

    __slots__ = ("kind", "matchers", "parser")

    def __init__(self, kind: str, matchers: tuple[LabelMatcher, ...], parser: bool) -> None:
        self.kind = kind
        self.matchers = matchers
        self.parser = parser  # a stage adds labels from the line: the union's `or` may merge two streams


def _is(t: _Tok, text: str) -> bool:
    return t.kind == "op" and t.text == text


def _strip(toks: list[_Tok], i: int, j: int) -> tuple[int, int]:
    while i < j and _is(toks[i], "(") and _matching(toks, i) == j:
        i, j = i + 1, j - 1
    return i, j


def _after_grouping(toks: list[_Tok], k: int, j: int) -> int:
    """Index after an optional ``by (...)``/``without (...)`` starting at ``k``."""
    if k <= j and toks[k].kind == "ident" and toks[k].text.lower() in _GROUPING and k + 1 <= j \
            and _is(toks[k + 1], "("):
        return _matching(toks, k + 1) + 1
    return k


def shape(query: str) -> MetricShape | None:
    """The fan-out shape of a LogQL metric query, or None when neither applies.

    Raises :class:`gateway.lbac.RewriteError` where the lexer would.
    """
    toks, sels = _lex(query)
    if len(sels) != 1:
        return None
    i, j = _strip(toks, 0, len(toks) - 1)
    wrappers: set[str] = set()
    while i <= j:
        t = toks[i]
        if t.kind != "ident":
            return None
        name = t.text.lower()
        if name in _VECTOR_WRAPPERS:
            k = _after_grouping(toks, i + 1, j)
            if k > j or not _is(toks[k], "("):
                return None
            close = _matching(toks, k)
            if _after_grouping(toks, close + 1, j) != j + 1:
                return None
            i, j = _strip(toks, k + 1, close - 1)
            wrappers.add(name)
            continue
        kind = _LEAVES.get(name)
        if kind is not None and wrappers <= _WRAPPABLE[kind]:
            if i + 1 > j or not _is(toks[i + 1], "("):
                return None
            close = _matching(toks, i + 1)
            if _after_grouping(toks, close + 1, j) != j + 1:
                return None
            if not (toks[i + 1].start < sels[0].start and sels[0].end <= toks[close].start):
                return None
            if any(x.kind == "ident" and x.text.lower() == "variants" for x in toks[i + 1 : close]):
                return None
            return MetricShape(kind, sels[0].matchers, _has_parser(toks))
        return None
    return None


_PARSERS: Final = frozenset({"json", "logfmt", "regexp", "pattern", "unpack", "label_format"})


def has_parser(query: str) -> bool:
    """Whether a pipeline stage adds labels from the line (``| json``, ``| logfmt``, ...).

    False where the lexer refuses (the rewrite then answers with its message).
    """
    try:
        toks, _ = _lex(query)
    except RewriteError:
        return False
    return _has_parser(toks)


def _has_parser(toks: list[_Tok]) -> bool:
    return any(_is(t, "|") and k + 1 < len(toks) and toks[k + 1].kind == "ident"
               and toks[k + 1].text.lower() in _PARSERS for k, t in enumerate(toks))


def absent_labels(matchers: tuple[LabelMatcher, ...]) -> dict[str, str]:
    """The labels Loki gives an ``absent_over_time`` result (``absentLabels``, pkg/logql/evaluator.go)."""
    out: dict[str, str] = {}
    empty: list[str] = []
    for m in matchers:
        if m.name == "__name__":
            continue
        if m.op == "=" and m.name not in out:
            out[m.name] = m.value
        else:
            empty.append(m.name)
    for name in empty:
        out.pop(name, None)
    return dict(sorted(out.items()))
