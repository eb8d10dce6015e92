"""Label selectors (`{env="dev", team=~"a|b"}`): parsing, validation and exact printing.

A :class:`Selector` is the unit of a label policy: its matchers are AND-ed; the
selectors of one realm are OR-ed. Parsing goes through ``promql-parser`` so that what
we accept is what Prometheus accepts; printing quotes values JSON-style, which
PromQL, LogQL and Go's ``strconv.Unquote`` all read back unchanged.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, replace
from functools import lru_cache
from typing import Any, Final, Literal

import promql_parser
import re2

MatchOpStr = Literal["=", "!=", "=~", "!~"]
OPS: Final[tuple[MatchOpStr, ...]] = ("=", "!=", "=~", "!~")

_OP_FROM_PARSER: Final[dict[str, MatchOpStr]] = {
    "MatchOp.Equal": "=",
    "MatchOp.NotEqual": "!=",
    "MatchOp.Re": "=~",
    "MatchOp.NotRe": "!~",
}
_LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
MAX_SELECTOR_LEN: Final = 4096


class SelectorError(ValueError):
    """The text is not a usable label selector; the message says why."""


# json.dumps with an option builds a new encoder per call: one, made once.
_QUOTE: Final = json.JSONEncoder(ensure_ascii=False).encode


def quote(value: str) -> str:
    """Quote a label value so PromQL and LogQL read back exactly ``value``."""
    return _QUOTE(value)


def quote_name(name: str) -> str:
    """Label names outside the classic charset are written quoted (Prometheus 3 UTF-8 names)."""
    return name if _LABEL_NAME.fullmatch(name) else quote(name)


@dataclass(frozen=True, slots=True)
class LabelMatcher:
    """One matcher: ``name op "value"``; regexes are fully anchored, as in Prometheus."""

    name: str
    op: MatchOpStr
    value: str

    def __str__(self) -> str:
        return f"{quote_name(self.name)}{self.op}{quote(self.value)}"

    def matches(self, labels: dict[str, str]) -> bool:
        """Whether a label set satisfies this matcher (absent label = empty value)."""
        v = labels.get(self.name, "")
        if self.op == "=":
            return v == self.value
        if self.op == "!=":
            return v != self.value
        hit = _compiled(self.value).fullmatch(v) is not None
        return hit if self.op == "=~" else not hit


_RE2_OPTIONS: Final = re2.Options()
_RE2_OPTIONS.log_errors = False  # (a refused pattern is the caller's 4xx, not a line on stderr)


@lru_cache(maxsize=4096)
def _compiled(pattern: str) -> Any:
    """The regex as Prometheus, Mimir, Loki and Tempo run it (Go's RE2, ``^(?s:pattern)$``; use ``fullmatch``),
    compiled by RE2 itself: Python's ``re`` reads many patterns otherwise (``\\d`` and ``\\w`` Unicode-wide,
    ``[[:alpha:]]``, ``a{,3}``, look-around) and backtracks exponentially on some, and in the rule, alert and
    trace filters label values meet regexes any read token may send (X-Prom-Label-Policy). re2.error if invalid."""
    re2.compile(pattern, _RE2_OPTIONS)  # alone first: a pattern that parses alone cannot escape the group
    return re2.compile(f"(?s:{pattern})", _RE2_OPTIONS)


def regex_error(exc: Exception) -> str:
    """RE2's reason for refusing a pattern, as text."""
    detail = exc.args[0] if exc.args else exc
    return detail.decode(errors="replace") if isinstance(detail, bytes) else str(detail)


@dataclass(frozen=True, slots=True)
class Selector:
    """A label selector: matchers AND-ed together.

    ``source`` is the text as the admin wrote it, returned verbatim by the API (Terraform compares
    read-backs byte for byte); it takes no part in equality, so enforcement sees only the matchers,
    and ``str()`` stays the canonical form the LBAC headers and rewrites use.
    """

    matchers: tuple[LabelMatcher, ...]
    source: str = field(default="", compare=False)

    @property
    def text(self) -> str:
        """What the API returns: the text as written, or the canonical form when none was kept."""
        return self.source or str(self)

    def __str__(self) -> str:
        return "{" + ", ".join(str(m) for m in self.matchers) + "}"

    def matches(self, labels: dict[str, str]) -> bool:
        return all(m.matches(labels) for m in self.matchers)


def parse_selector(text: str) -> Selector:
    """Parse one selector such as ``{env="dev"}`` or ``up{job="x"}``.

    Refuses what cannot serve as a label policy: anything but a plain vector selector
    (no ranges, offsets, ``@``, ``or`` alternatives), no matchers (``{}``), or a selector
    whose every matcher is ``=~".*"`` (a policy that grants all is a mistake worth
    surfacing). Selectors of negative matchers only, such as ``{env != "dev"}`` (the Cloud
    spec's own example), are valid: a label policy is AND-ed with the query, so it needs
    no positive matcher of its own. The result keeps ``text`` as its ``source``.
    """
    if not isinstance(text, str) or not text.strip():
        raise SelectorError("must be a non-empty label selector such as {env=\"dev\"}")
    if len(text) > MAX_SELECTOR_LEN:
        raise SelectorError(f"must be at most {MAX_SELECTOR_LEN} characters")
    if text.count("(") > 64:  # deep nesting costs the parser dearly and is never a plain selector
        raise SelectorError("must be a plain label selector such as {env=\"dev\"}, not an expression")
    sel = _parse_cached(text.strip())
    return sel if sel.source == text else replace(sel, source=text)


_PROBE_NAME: Final = "__gateway_probe__"
#: Patterns with which a ``=~`` matcher matches every value.
_MATCH_ALL: Final = frozenset({".*", "(.*)", ".*?", "^.*$", "(?s:.*)"})


def _parse_vector(text: str) -> tuple[Any, bool]:
    """Parse ``text``; a selector PromQL refuses only because all its matchers match the empty
    value (``{env!="dev"}``) is parsed again under a probe metric name, which is then dropped."""
    try:
        return promql_parser.parse(text), False
    except (ValueError, RuntimeError) as exc:
        if "non-empty matcher" not in str(exc) or not text.startswith("{"):
            raise SelectorError(f"does not parse as a label selector: {exc}") from None
    try:
        return promql_parser.parse(_PROBE_NAME + text), True
    except (ValueError, RuntimeError) as exc:  # pragma: no cover - the first parse named the only problem
        raise SelectorError(f"does not parse as a label selector: {exc}") from None


@lru_cache(maxsize=8192)
def _parse_cached(text: str) -> Selector:
    expr, probed = _parse_vector(text)
    if not isinstance(expr, promql_parser.VectorSelector):
        raise SelectorError("must be a plain label selector such as {env=\"dev\"}, not an expression")
    if expr.offset is not None or expr.at is not None:
        raise SelectorError("must not carry offset or @ modifiers")
    if expr.matchers.or_matchers:
        raise SelectorError("'or' inside a selector is not supported; use one selector per alternative")
    matchers: list[LabelMatcher] = []
    if expr.name and not probed:
        matchers.append(LabelMatcher("__name__", "=", expr.name))
    for m in expr.matchers.matchers:
        op = _OP_FROM_PARSER.get(str(m.op))
        if op is None:  # pragma: no cover - the parser knows only four operators
            raise SelectorError(f"unsupported matcher operator {m.op}")
        if op in ("=~", "!~"):
            try:
                _compiled(m.value)
            except re2.error as exc:
                raise SelectorError(f"invalid regular expression {m.value!r}: {regex_error(exc)}") from None
        matchers.append(LabelMatcher(m.name, op, m.value))
    if not matchers:
        raise SelectorError("must contain at least one matcher")
    if all(m.op == "=~" and m.value in _MATCH_ALL for m in matchers):
        raise SelectorError("matches every series; a label policy must restrict something")
    return Selector(tuple(matchers), text)
