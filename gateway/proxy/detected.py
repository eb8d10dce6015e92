"""Loki's ``detected_labels`` computed from the visible streams' label sets (one ``series`` answer).

Loki's querier (``pkg/querier/querier.go``, ``DetectedLabels`` and ``countLabelsAndCardinality``) takes,
for the streams the query selects, every label's set of non-empty values, and keeps a label when
it is one of ``cluster``, ``namespace``, ``instance``, ``pod`` or when ``shouldRejectLabel`` is false:
a label with no values is dropped, one whose values are all IDs (``strconv.ParseFloat`` or
``uuid.Parse`` accept them) is dropped, except that at most two values that are all ``"0"``/``"1"``
are kept as booleans. ``cardinality`` is a HyperLogLog estimate there (``axiomhq/hyperloglog``, sparse,
exact for small sets); here it is the exact count. The query frontend strips the sketches
(``NewDetectedLabelsCardinalityFilter``) and answers ``{"detectedLabels": [{"label", "cardinality"}]}``.
"""

from __future__ import annotations

import re
from typing import Any, Final

from gateway.lbac.fanout import Plan
from gateway.merging import Unmergeable, success

__all__ = ["detected_labels", "merge_detected_from_series", "should_reject"]

STATIC: Final = frozenset({"cluster", "namespace", "instance", "pod"})
_BOOLS: Final = frozenset({"0", "1"})
# Go strconv.ParseFloat: decimal and hexadecimal (p exponent required) forms, inf/infinity/nan; underscores
# only with a base prefix.
_GO_FLOAT: Final = re.compile(
    r"[+-]?(?:(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?"
    r"|0[xX](?:_?[0-9a-fA-F])+(?:\.(?:[0-9a-fA-F]_?)*)?[pP][+-]?\d+"
    r"|0[xX]\.[0-9a-fA-F]+[pP][+-]?\d+"
    r"|[iI][nN][fF](?:[iI][nN][iI][tT][yY])?|[nN][aA][nN])\Z"
)
_HEX32: Final = re.compile(r"[0-9a-fA-F]{32}\Z")
_UUID36: Final = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}\Z")


def _is_uuid(v: str) -> bool:
    """google/uuid ``Parse``: 36 characters, ``urn:uuid:`` + 36, ``{`` 36 ``}``, or 32 hex digits."""
    if len(v) == 45 and v[:9].lower() == "urn:uuid:":
        v = v[9:]
    elif len(v) == 38 and v[0] == "{" and v[-1] == "}":
        v = v[1:-1]
    return bool(_UUID36.match(v) if len(v) == 36 else _HEX32.match(v))


def _is_id(v: str) -> bool:
    if _GO_FLOAT.match(v):
        try:  # ParseFloat's ErrRange: a finite spelling beyond float64 is an error there, so not an ID
            return not (abs(float.fromhex(v) if "x" in v.lower() else float(v)) == float("inf")
                        and "inf" not in v.lower())
        except ValueError:
            return True
    return _is_uuid(v)


def should_reject(values: set[str]) -> bool:
    """``shouldRejectLabel``: no values, or all IDs (at most two booleans excepted)."""
    if not values:
        return True
    if len(values) <= 2 and values <= _BOOLS:
        return False
    return all(_is_id(v) for v in values)


def detected_labels(streams: list[dict[str, str]]) -> list[dict[str, Any]]:
    """The detected labels of these streams, sorted by name."""
    values: dict[str, set[str]] = {}
    for labels in streams:
        for name, value in labels.items():
            seen = values.setdefault(name, set())
            if value != "":
                seen.add(value)
    return [{"label": k, "cardinality": len(v)} for k, v in sorted(values.items())
            if (k in STATIC and v) or not should_reject(v)]


def merge_detected_from_series(docs: list[Any], _plan: Plan) -> dict[str, Any]:
    streams = success(docs[0]).get("data") or []
    if not isinstance(streams, list) or not all(isinstance(s, dict) for s in streams):
        raise Unmergeable("the series answer is not a list of label sets")
    return {"detectedLabels": detected_labels(streams)}
