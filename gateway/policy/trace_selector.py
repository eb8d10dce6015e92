"""Trace selectors (``{resource.env="dev", resource.team=~"a|b"}``): the label policies of traces.

Grafana Cloud's team LBAC for Tempo writes rules as attribute selectors on *resource* attributes,
conditions AND-ed (``,``), rules OR-ed. A :class:`TraceSelector` is one such rule. Its semantics are
Tempo's own, read from grafana/tempo ``pkg/traceql``:

* values are TraceQL strings: Go ``text/scanner`` string literals read with ``strconv.Unquote``
  (``lexer.go``); attribute names are runs of attribute runes or ``"..."`` parts with ``\\"`` and
  ``\\\\`` escapes (``parseAttribute``);
* ``=~`` and ``!~`` use Prometheus' ``FastRegexMatcher`` (``pkg/regexp``), fully anchored like PromQL, in
  Go's RE2 syntax. Python's ``re`` reads many patterns otherwise (``\\d``, ``\\w``, ``\\s``, ``\\b`` are
  Unicode-wide, ``[[:alpha:]]`` and ``a{,3}`` mean other things, look-around and possessive repeats are
  accepted) and backtracks exponentially on some, so these regexes are compiled and matched by RE2 itself
  (``google-re2``, the C++ library Go's ``regexp`` was written from: same syntax and matches, in linear
  time: ``gateway.policy.selector._compiled``); ``\\C`` (any byte), the one escape Go refuses and RE2
  takes, is refused;
* a span whose resource lacks the attribute, or holds a non-string value, satisfies *no* comparison,
  not even ``!=`` or ``!~`` (``ast_execute.go``: operands of different types give false); so
  :meth:`TraceSelector.matches` sees only string-valued attributes and fails closed on the rest (string
  *arrays*, which Tempo compares element by element, included: stricter than Tempo, never laxer).

A :class:`TraceSelector` is a :class:`~gateway.policy.selector.Selector` (same ``matchers`` and
``source``) so that realms, decisions, caches and plans carry either kind unchanged; it never equals a
Prometheus selector, and which kind applies to which signal is decided once, by
:func:`gateway.policy.decision.for_signal`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Final

import re2

from gateway.policy.selector import (
    _MATCH_ALL,
    MAX_SELECTOR_LEN,
    LabelMatcher,
    MatchOpStr,
    Selector,
    SelectorError,
    _compiled,
    parse_selector,
    quote,
    regex_error,
)

#: The only scope a trace selector may name (Grafana: "LBAC is restricted to only contain resource
#: scope attributes").
SCOPE: Final = "resource."
MAX_MATCHERS: Final = 64
#: Runes that end an unquoted TraceQL attribute name (``isAttributeRune`` in Tempo's lexer), plus the quote.
_NOT_ATTRIBUTE: Final = frozenset('{}()=~!<>&|^,"')
_OPS: Final[tuple[MatchOpStr, ...]] = ("=~", "!~", "!=", "=")  # longest first
_SIMPLE_ESCAPES: Final = {"a": "\a", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v",
                          "\\": "\\", '"': '"'}
_OTHER_SCOPES: Final = ("span.", "event.", "link.", "instrumentation.", "parent.", "trace:", "span:", "event:",
                        "link:", "instrumentation:", ".")


def looks_like_trace_selector(text: str) -> bool:
    """Whether a label-policy text is meant as a trace selector (``{resource.`` or ``{ resource.``)."""
    return text.lstrip().startswith("{") and text.lstrip()[1:].lstrip().startswith(SCOPE)


def _is_attribute_rune(ch: str) -> bool:
    return not ch.isspace() and ch not in _NOT_ATTRIBUTE


def quote_attribute(name: str) -> str:
    """An attribute name as TraceQL reads it back: bare when it can be, else ``"..."``."""
    if name and all(_is_attribute_rune(c) for c in name):
        return name
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


@dataclass(frozen=True, slots=True)
class TraceSelector(Selector):
    """Resource-attribute matchers AND-ed; names are without the ``resource.`` prefix (``service.name``).

    ``source`` is the text as written (the API returns it verbatim); ``str()`` is the canonical form.
    """

    def __str__(self) -> str:
        return "{" + ", ".join(f"{SCOPE}{quote_attribute(m.name)}{m.op}{quote(m.value)}"
                               for m in self.matchers) + "}"

    def matches(self, labels: Mapping[str, str]) -> bool:
        """Whether a span whose resource has these *string* attributes is visible (absent = no match)."""
        for m in self.matchers:
            v = labels.get(m.name)
            if v is None:
                return False
            if m.op == "=":
                ok = v == m.value
            elif m.op == "!=":
                ok = v != m.value
            else:
                ok = (_compiled(m.value).fullmatch(v) is not None) == (m.op == "=~")
            if not ok:
                return False
        return True

    def condition(self) -> str:
        """A parenthesized TraceQL boolean expression Tempo evaluates exactly as :meth:`matches`."""
        return "(" + " && ".join(f"{SCOPE}{quote_attribute(m.name)} {m.op} {quote(m.value)}"
                                 for m in self.matchers) + ")"


def traceql_condition(selectors: Sequence[TraceSelector]) -> str:
    """The OR of the selectors' conditions, parenthesized: what a span must satisfy to be visible."""
    if not selectors:
        raise ValueError("no trace selectors: nothing to restrict by")
    if len(selectors) == 1:
        return selectors[0].condition()
    return "(" + " || ".join(s.condition() for s in selectors) + ")"


def visible(selectors: Sequence[TraceSelector], resource_attrs: Mapping[str, str]) -> bool:
    """Whether any selector lets a span with these resource attributes be seen."""
    return any(s.matches(resource_attrs) for s in selectors)


def parse_trace_selector(text: str) -> TraceSelector:
    """Parse ``{resource.env="dev", resource.team=~"a|b"}``; SelectorError says what is wrong.

    Refuses other scopes, operators other than ``=``, ``!=``, ``=~``, ``!~``, values other than
    double-quoted strings, invalid (or non-RE2) regexes, an empty selector and one whose every
    matcher is ``=~".*"``. The result keeps ``text`` as its ``source``.
    """
    if not isinstance(text, str) or not text.strip():
        raise SelectorError('must be a non-empty trace selector such as {resource.env="dev"}')
    if len(text) > MAX_SELECTOR_LEN:
        raise SelectorError(f"must be at most {MAX_SELECTOR_LEN} characters")
    sel = _parse_cached(text.strip())
    return sel if sel.source == text else replace(sel, source=text)


class _Reader:
    """A cursor over the selector text."""

    def __init__(self, text: str) -> None:
        self.s, self.i = text, 0

    def peek(self) -> str:
        return self.s[self.i] if self.i < len(self.s) else ""

    def skip_space(self) -> None:
        while self.i < len(self.s) and self.s[self.i].isspace():
            self.i += 1

    def fail(self, what: str) -> SelectorError:
        return SelectorError(f"does not parse as a trace selector at character {self.i + 1}: {what}")


def _attribute(r: _Reader) -> str:
    """Tempo's ``parseAttribute``: attribute runes and ``"..."`` parts (escapes ``\\"`` and ``\\\\``)."""
    out: list[str] = []
    while True:
        c = r.peek()
        if c == '"':
            r.i += 1
            while True:
                c = r.peek()
                if not c:
                    raise r.fail('unterminated quoted attribute name, expecting "')
                r.i += 1
                if c == '"':
                    break
                if c == "\\":
                    e = r.peek()
                    if e not in ('"', "\\") or not e:
                        raise r.fail("invalid escape sequence in a quoted attribute name")
                    r.i += 1
                    out.append(e)
                else:
                    out.append(c)
        elif c and _is_attribute_rune(c):
            out.append(c)
            r.i += 1
        else:
            break
    if not out:
        raise r.fail("an attribute name must follow 'resource.'")
    return "".join(out)


def _string(r: _Reader) -> str:
    """A Go double-quoted string literal (``text/scanner`` + ``strconv.Unquote``), as TraceQL reads it."""
    if r.peek() != '"':
        raise r.fail('values must be double-quoted strings, e.g. "dev"')
    r.i += 1
    out: list[str] = []
    s = r.s
    while True:
        if r.i >= len(s):
            raise r.fail("unterminated string")
        c = s[r.i]
        r.i += 1
        if c == '"':
            return "".join(out)
        if c == "\n":
            raise r.fail("newline in string")
        if c != "\\":
            out.append(c)
            continue
        e = s[r.i] if r.i < len(s) else ""
        r.i += 1
        if e in _SIMPLE_ESCAPES:
            out.append(_SIMPLE_ESCAPES[e])
            continue
        octal = bool(e) and e in "01234567"
        width = 3 if octal else {"x": 2, "u": 4, "U": 8}.get(e, 0)
        start = r.i - 1 if octal else r.i
        digits = s[start:start + width]
        allowed = "01234567" if octal else "0123456789abcdefABCDEF"
        if not width or len(digits) != width or any(d not in allowed for d in digits):
            raise r.fail("invalid escape sequence in a string")
        r.i = start + width
        code = int(digits, 8 if octal else 16)
        if (octal or e == "x") and code > 0x7F:
            raise r.fail("byte escapes above \\x7f are not supported; write the character itself")
        if code > 0x10FFFF or 0xD800 <= code <= 0xDFFF:
            raise r.fail("invalid Unicode code point in a string")
        out.append(chr(code))


@lru_cache(maxsize=4096)
def _parse_cached(text: str) -> TraceSelector:
    r = _Reader(text)
    if r.peek() != "{":
        raise r.fail("a trace selector starts with '{'")
    r.i += 1
    matchers: list[LabelMatcher] = []
    r.skip_space()
    if r.peek() == "}":
        raise SelectorError("must contain at least one matcher")
    while True:
        r.skip_space()
        if not text.startswith(SCOPE, r.i):
            other = next((p for p in _OTHER_SCOPES if text.startswith(p, r.i)), None)
            what = f"scope {other!r} is not supported" if other else "expected an attribute"
            raise r.fail(f"{what}; trace selectors compare resource attributes only, e.g. resource.env=\"dev\"")
        r.i += len(SCOPE)
        name = _attribute(r)
        r.skip_space()
        op = next((o for o in _OPS if text.startswith(o, r.i)), None)
        if op is None:
            raise r.fail("expected one of the operators =, !=, =~, !~")
        r.i += len(op)
        r.skip_space()
        value = _string(r)
        if op in ("=~", "!~"):
            _check_regex(value)
        matchers.append(LabelMatcher(name, op, value))
        if len(matchers) > MAX_MATCHERS:
            raise SelectorError(f"must have at most {MAX_MATCHERS} matchers")
        r.skip_space()
        c = r.peek()
        r.i += 1
        if c == "}":
            break
        if c != ",":
            raise r.fail("expected ',' (AND) or '}'; write '&&' as ',' and each '||' alternative as a "
                         "selector of its own" if c and c in "&|" else "expected ',' or '}'")
    r.skip_space()
    if r.i < len(text):
        raise r.fail("unexpected text after '}'")
    if all(m.op == "=~" and m.value in _MATCH_ALL for m in matchers):
        raise SelectorError("matches every span with those attributes; a label policy must restrict something")
    return TraceSelector(tuple(matchers), text)


def _any_byte_escape(pattern: str) -> bool:
    """Whether ``pattern`` holds ``\\C`` (an escaped backslash before a ``C`` is not one)."""
    i = pattern.find("\\")
    while i >= 0:
        if pattern[i + 1:i + 2] == "C":
            return True
        i = pattern.find("\\", i + 2)
    return False


def _check_regex(value: str) -> None:
    """Refuse a regex Tempo (Go's ``regexp/syntax``, Perl flags) would not compile: SelectorError says why."""
    if _any_byte_escape(value):
        raise SelectorError(f"invalid regular expression {value!r}: \\C (any byte) is not supported by Tempo")
    try:
        _compiled(value)
    except re2.error as exc:
        raise SelectorError(f"invalid regular expression {value!r}, not supported by Tempo (RE2 syntax): "
                            f"{regex_error(exc)}") from None


def parse_label_policy(text: str) -> Selector:
    """A label policy as written anywhere (access policies, team rules, X-Prom-Label-Policy): a trace
    selector when it starts ``{resource.``, else a Prometheus-style selector. SelectorError otherwise."""
    return parse_trace_selector(text) if looks_like_trace_selector(text) else parse_selector(text)
