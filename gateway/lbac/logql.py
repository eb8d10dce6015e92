"""LogQL rewriting for label-based access control (enforce mode).

No Python LogQL parser exists, so this module carries a small lexer that mirrors the
one Loki uses (``pkg/logql/syntax/lex.go`` on top of Go's ``text/scanner`` in
``GoTokens`` mode), and a strict parser for stream selectors. Everything else in a
query is copied through byte for byte; only the stream selectors are re-printed.

Facts from Loki's grammar (``syntax.y``/``expr.y``) this relies on:

* ``OPEN_BRACE``/``CLOSE_BRACE`` occur in exactly one rule, ``selector``:
  ``{ matcher (, matcher)* }`` with ``matcher: IDENTIFIER (=|!=|=~|!~) STRING``.
  Every other ``{`` in a real query is inside a string (``line_format "{{.x}}"``,
  ``pattern "<_> {x}"``) or a comment, which the lexer skips. So restricting every
  ``{...}`` outside strings and comments restricts every stream the query reads.
* Strings are ``"..."`` with Go escapes (no newline) and raw backtick strings. The Go
  scanner also knows ``'x'`` char literals and ``//`` and ``/* */`` comments: Loki's
  lexer turns a char literal into an IDENTIFIER and silently skips Go comments. Both
  could hide a ``{`` from a lexer that does not know them (``/* " */ {secret="x"}``),
  and no real query uses them, so they are refused rather than imitated.
* ``#`` starts a comment to the end of the line; ``[`` is read raw up to ``]`` as a
  duration (no strings inside), so ranges are validated as durations.
* LogQL has no ``or`` between log (stream) queries and a stream selector cannot hold
  alternatives, but metric queries have the binary ``or`` operator, and range
  aggregations (``rate(...)``, ``count_over_time(...)``, ...) are the only place a
  selector occurs in a metric query (``logRangeExpr`` inside ``rangeAggregationExpr``),
  apart from the ``variants(...) of (...)`` form.

Several label policies (OR-ed) are handled, in order:

1. Exact simplification: duplicates and selectors that are a superset of another one
   (``{a="1"}`` already covers ``{a="1", b="2"}``) are dropped; selectors that agree
   on every matcher but one ``=``/``=~`` matcher on the same label are merged into one
   regex matcher (``{env="dev"}`` + ``{env="prod"}`` -> ``env=~"dev|prod"``). One
   selector left: plain insertion.
2. Metric queries: every range aggregation becomes the union of its restricted copies,
   ``(rate({s, p1}[5m]) or rate({s, p2}[5m]))``; outer aggregations then apply to the
   union, so ``sum by (x) (...)`` sums over the visible streams once. A range
   aggregation yields one series per stream label set (plus parsed labels), a stream
   visible under both policies gives the same series on both sides, and ``or`` keeps
   one. That only holds while the series labels still carry each stream's policy
   labels, so the union is refused for ``absent_over_time`` (its result does not
   depend on the streams' labels), range-aggregation grouping that drops a policy label,
   ``unwrap`` of a policy label, ``drop``/``keep``/``label_format`` touching a policy
   label, ``unpack`` and ``variants``. Loki only pushes an outer ``sum by`` down into a
   range aggregation that is its direct child (``VectorAggregationExpr.Extractor``),
   never through the ``or``. Known limit, never a leak: if a stream lacks a policy label
   and a parser or structured metadata supplies a label of that name, two streams can
   share a series label set and ``or`` keeps only one of them; so sums, maxima and minima
   whose pipeline has a parser are fanned out instead (``gateway.lbac.metric_fanout``), and
   the limit remains for the other aggregations and for structured metadata.
3. Anything else (log queries whose policies differ in more than one label value) is
   refused with a message saying why.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final

from gateway.lbac import RewriteError
from gateway.lbac.bounds import SizedLRU
from gateway.policy.selector import LabelMatcher, MatchOpStr, Selector

__all__ = [
    "MAX_QUERY_LEN",
    "parse_stream_selector",
    "restrict_logql",
    "restrict_logql_matchers",
    "stream_selectors",
]

MAX_QUERY_LEN: Final = 64 * 1024

_RANGE_OPS: Final = frozenset(
    {
        "count_over_time",
        "rate",
        "rate_counter",
        "bytes_over_time",
        "bytes_rate",
        "avg_over_time",
        "sum_over_time",
        "min_over_time",
        "max_over_time",
        "stdvar_over_time",
        "stddev_over_time",
        "quantile_over_time",
        "first_over_time",
        "last_over_time",
        "absent_over_time",
    }
)
_MATCH_OPS: Final = frozenset({"=", "!=", "=~", "!~"})
_LABEL_NAME: Final = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*\Z")
# Prometheus durations (model.ParseDuration); Loki reads `[...]` raw and parses it so.
_DURATION: Final = re.compile(r"(?:[0-9]+(?:ms|[smhdwy]))+\Z")

_TOKEN: Final = re.compile(
    r"""
    (?P<ws>[ \t\r\n]+)
  | (?P<comment>\#[^\n]*)
  | (?P<str>"(?:[^"\\\n]|\\[^\n])*")
  | (?P<raw>`[^`]*`)
  | (?P<ident>[^\W\d]\w*)
  | (?P<num>\.?\d[\w.]*)
  | (?P<range>\[[^\]]*\])
  | (?P<op>!=|=~|!~|!>|\|=|\|~|\|>|==|>=|<=|[{}(),.=|+\-*%^<>]|/(?![/*]))
    """,
    re.VERBOSE,
)

_SIMPLE_ESCAPES: Final = {
    "a": "\a",
    "b": "\b",
    "f": "\f",
    "n": "\n",
    "r": "\r",
    "t": "\t",
    "v": "\v",
    "\\": "\\",
    '"': '"',
}
_ESCAPE: Final = re.compile(r"\\(?:[abfnrtv\\\"]|[0-7]{3}|x[0-9a-fA-F]{2}|u[0-9a-fA-F]{4}|U[0-9a-fA-F]{8})")
_QUOTE_META: Final = re.compile(r"([\\.+*?()|\[\]{}^$])")


@dataclass(frozen=True, slots=True)
class _Tok:
    kind: str  # "str", "ident", "num", "range", "op"
    start: int
    end: int
    text: str  # source text; for strings the unquoted value


@dataclass(frozen=True, slots=True)
class _Sel:  # one parsed stream selector
    start: int  # offset of "{"
    end: int  # offset after "}"
    tok_open: int  # token index of "{"
    tok_close: int  # token index of "}"
    matchers: tuple[LabelMatcher, ...]


_Render = Callable[[_Sel], str]


def _unquote(lit: str) -> tuple[str, bool]:
    """Decode a Go string literal as Loki does; also report escapes that yield raw bytes.

    Raw bytes (``"\\xff"``) cannot be represented faithfully as text, so matcher values
    containing them are refused by the caller.
    """
    if lit[0] == "`":
        if "\r" in lit:  # Go's Unquote drops \r from raw strings; refuse the ambiguity
            raise RewriteError("carriage return inside a raw string")
        return lit[1:-1], False
    body = lit[1:-1]
    if "\\" not in body:
        return body, False
    out: list[str] = []
    raw_bytes = False
    pos = 0
    while True:
        i = body.find("\\", pos)
        if i < 0:
            out.append(body[pos:])
            break
        out.append(body[pos:i])
        m = _ESCAPE.match(body, i)
        if m is None:
            raise RewriteError(f"invalid escape sequence in string {lit[:40]!r}")
        esc = m.group()
        kind = esc[1]
        if kind in _SIMPLE_ESCAPES:
            out.append(_SIMPLE_ESCAPES[kind])
        elif kind in "01234567":
            code = int(esc[1:], 8)
            if code > 255:
                raise RewriteError(f"octal escape out of range in string {lit[:40]!r}")
            raw_bytes |= code > 127
            out.append(chr(code))
        elif kind == "x":
            code = int(esc[2:], 16)
            raw_bytes |= code > 127
            out.append(chr(code))
        else:
            code = int(esc[2:], 16)
            if code > 0x10FFFF or 0xD800 <= code <= 0xDFFF:
                raise RewriteError(f"invalid unicode escape in string {lit[:40]!r}")
            out.append(chr(code))
        pos = m.end()
    return "".join(out), raw_bytes


def _tokenize(query: str) -> list[_Tok]:
    """Split a query into tokens the way Loki's lexer does; refuse what it would not read alike."""
    if "\x00" in query:
        raise RewriteError("NUL character in query")
    if not query.isascii():
        try:
            query.encode("utf-8")
        except UnicodeEncodeError:
            raise RewriteError("query is not valid UTF-8") from None
    toks: list[_Tok] = []
    pos = 0
    n = len(query)
    match = _TOKEN.match
    while pos < n:
        m = match(query, pos)
        if m is None:
            ch = query[pos]
            if ch == '"':
                raise RewriteError(f"unterminated string at offset {pos}")
            if ch == "`":
                raise RewriteError(f"unterminated raw string at offset {pos}")
            if ch == "'":
                raise RewriteError(f"single quotes are not LogQL (offset {pos}); use double quotes")
            if ch == "/":
                raise RewriteError(f"'//' and '/*' are not LogQL comments (offset {pos}); use '#'")
            if ch == "[":
                raise RewriteError(f"missing closing ']' at offset {pos}")
            raise RewriteError(f"unexpected character {ch!r} at offset {pos}")
        kind = m.lastgroup
        end = m.end()
        if kind == "str" or kind == "raw":
            toks.append(_Tok("str", pos, end, _unquote(m.group())[0]))
        elif kind == "ident" or kind == "num":
            toks.append(_Tok(kind, pos, end, m.group()))
        elif kind == "range":
            if not _DURATION.match(query, pos + 1, end - 1):
                raise RewriteError(f"invalid range duration {m.group()!r}")
            toks.append(_Tok("range", pos, end, m.group()))
        elif kind == "op":
            toks.append(_Tok("op", pos, end, m.group()))
        pos = end
    return toks


def _parse_selectors(query: str, toks: list[_Tok]) -> list[_Sel]:
    """Find and strictly parse every ``{...}``; anything unexpected inside is refused."""
    sels: list[_Sel] = []
    i = 0
    n = len(toks)
    while i < n:
        t = toks[i]
        if t.kind != "op" or t.text not in ("{", "}"):
            i += 1
            continue
        if t.text == "}":
            raise RewriteError(f"unbalanced '}}' at offset {t.start}")
        open_idx = i
        matchers: list[LabelMatcher] = []
        i += 1
        while True:
            if i + 2 >= n:
                raise RewriteError(f"unterminated stream selector at offset {t.start}")
            name, op, val = toks[i], toks[i + 1], toks[i + 2]
            if name.kind == "op" and name.text == "}" and not matchers:
                raise RewriteError(f"empty stream selector at offset {t.start}")
            if name.kind != "ident" or not _LABEL_NAME.match(name.text):
                raise RewriteError(f"expected a label name at offset {name.start}")
            if op.kind != "op" or op.text not in _MATCH_OPS:
                raise RewriteError(f"expected one of = != =~ !~ at offset {op.start}")
            if val.kind != "str":
                raise RewriteError(f"expected a quoted value at offset {val.start}")
            value, raw_bytes = _unquote(query[val.start : val.end])
            if raw_bytes:
                raise RewriteError(f"byte escapes in label values are not supported (offset {val.start})")
            matchers.append(LabelMatcher(name.text, _as_op(op.text), value))
            i += 3
            if i >= n:
                raise RewriteError(f"unterminated stream selector at offset {t.start}")
            sep = toks[i]
            if sep.kind == "op" and sep.text == "}":
                sels.append(_Sel(t.start, sep.end, open_idx, i, tuple(matchers)))
                i += 1
                break
            if sep.kind != "op" or sep.text != ",":
                raise RewriteError(f"expected ',' or '}}' at offset {sep.start}")
            i += 1
    return sels


def _as_op(text: str) -> MatchOpStr:
    if text == "=":
        return "="
    if text == "!=":
        return "!="
    if text == "=~":
        return "=~"
    return "!~"


def _lex(query: str) -> tuple[list[_Tok], list[_Sel]]:
    if not isinstance(query, str) or not query.strip():
        raise RewriteError("empty LogQL query")
    if len(query) > MAX_QUERY_LEN:
        raise RewriteError(f"LogQL query longer than {MAX_QUERY_LEN} characters")
    toks = _tokenize(query)
    return toks, _parse_selectors(query, toks)


def stream_selectors(query: str) -> list[tuple[int, int]]:
    """Spans ``(start, end)`` of every stream selector ``{...}`` in ``query``.

    Raises :class:`RewriteError` for anything the lexer would not read exactly as Loki
    does, so a span list is only returned when it is complete.
    """
    return [(s.start, s.end) for s in _lex(query)[1]]


def parse_stream_selector(text: str) -> Selector:
    """Parse text that must be exactly one stream selector, such as a Loki ``match[]``."""
    toks, sels = _lex(text)
    if len(sels) != 1 or sels[0].tok_open != 0 or sels[0].tok_close != len(toks) - 1:
        raise RewriteError('expected exactly one stream selector such as {app="x"}')
    return Selector(sels[0].matchers)


def _print_selector(user: tuple[LabelMatcher, ...], extra: tuple[LabelMatcher, ...]) -> str:
    ms = list(user)
    ms.extend(m for m in extra if m not in user)
    return "{" + ", ".join(str(m) for m in ms) + "}"


def _adding(extra: tuple[LabelMatcher, ...]) -> _Render:
    return lambda s: _print_selector(s.matchers, extra)


def _quote_meta(value: str) -> str:
    """Escape RE2 metacharacters exactly like Go's ``regexp.QuoteMeta``."""
    return _QUOTE_META.sub(r"\\\1", value)


def simplify(policies: tuple[Selector, ...]) -> tuple[Selector, ...]:
    """Rewrite an OR of selectors into an equivalent, shorter OR (exact identities only)."""
    sets: list[frozenset[LabelMatcher]] = []
    kept: list[Selector] = []
    for p in policies:
        s = frozenset(p.matchers)
        if s not in sets:
            sets.append(s)
            kept.append(p)
    # Absorption: A or (A and B) == A.
    keep = [not any(o < s for o in sets) for s in sets]
    kept = [p for p, k in zip(kept, keep, strict=True) if k]
    sets = [s for s, k in zip(sets, keep, strict=True) if k]
    if len(kept) < 2:
        return tuple(kept)
    common = frozenset.intersection(*sets)
    rests = [s - common for s in sets]
    if not all(len(r) == 1 for r in rests):
        return tuple(kept)
    diff = [next(iter(r)) for r in rests]
    if len({m.name for m in diff}) != 1 or any(m.op not in ("=", "=~") for m in diff):
        return tuple(kept)
    # (C and x in A) or (C and x in B) == C and x in (A | B); regex matchers are anchored.
    alts = [_quote_meta(m.value) if m.op == "=" else f"(?:{m.value})" for m in diff]
    merged = LabelMatcher(diff[0].name, "=~", "|".join(alts))
    out = tuple(merged if m == diff[0] else m for m in kept[0].matchers)
    return (Selector(out),)


def _matching(toks: list[_Tok], open_idx: int) -> int:
    depth = 0
    for j in range(open_idx, len(toks)):
        t = toks[j]
        if t.kind == "op":
            if t.text == "(":
                depth += 1
            elif t.text == ")":
                depth -= 1
                if depth == 0:
                    return j
    raise RewriteError(f"unbalanced '(' at offset {toks[open_idx].start}")


def _check_union_safe(toks: list[_Tok], lo: int, hi: int, names: frozenset[str]) -> None:
    """Refuse a range aggregation whose series labels may not carry the policy labels."""
    op = toks[lo].text.lower()
    if op == "absent_over_time":
        raise RewriteError(
            "absent_over_time cannot be restricted by several label policies: absence under one "
            "policy is not absence under all; ask your admin for a single selector"
        )
    j = lo + 2
    while j < hi:
        t = toks[j]
        if t.kind == "op" and t.text == "|" and j + 1 < hi and toks[j + 1].kind == "ident":
            stage = toks[j + 1].text.lower()
            k = j + 2
            args: list[_Tok] = []
            while k < hi and not (toks[k].kind == "range" or (toks[k].kind == "op" and toks[k].text in ("|", ")"))):
                args.append(toks[k])
                k += 1
            idents = [a.text for a in args if a.kind == "ident"]
            if stage == "unpack":
                raise RewriteError(f"'| {stage}' cannot be combined with several label policies")
            if stage in ("drop", "label_format", "unwrap") and names.intersection(idents):
                raise RewriteError(
                    f"'| {stage}' changes a label used by your label policies; with several "
                    "policies that cannot be restricted exactly"
                )
            if stage == "keep":
                bare = {
                    a.text
                    for x, a in enumerate(args)
                    if a.kind == "ident"
                    and not (x + 1 < len(args) and args[x + 1].kind == "op" and args[x + 1].text in _MATCH_OPS)
                }
                if not names <= bare:
                    raise RewriteError(
                        "'| keep' must keep every label used by your label policies when several policies apply"
                    )
            j = k
            continue
        j += 1


def _grouping_end(toks: list[_Tok], close: int, names: frozenset[str]) -> int:
    """Index of the last token of a range aggregation, including ``by (...)``/``without (...)``."""
    g = close + 1
    if g + 1 < len(toks) and toks[g].kind == "ident" and toks[g].text.lower() in ("by", "without"):
        if not (toks[g + 1].kind == "op" and toks[g + 1].text == "("):
            return close
        end = _matching(toks, g + 1)
        labels = {t.text for t in toks[g + 2 : end] if t.kind == "ident"}
        ok = names <= labels if toks[g].text.lower() == "by" else not (names & labels)
        if not ok:
            raise RewriteError(
                "a range aggregation grouping that drops a label used by your label policies "
                "cannot be restricted by several policies; group in an outer sum instead"
            )
        return end
    return close


def _rewrite(query: str, policies: tuple[Selector, ...]) -> str:
    if not policies:
        raise RewriteError("no label policies given")
    toks, sels = _lex(query)
    pols = simplify(policies)
    if len(pols) == 1:
        extra = pols[0].matchers
        return _splice(query, 0, len(query), sels, _adding(extra))
    if not sels:
        return query
    names = frozenset(m.name for p in pols for m in p.matchers)
    # Range aggregations: rangeOp "(" ... ")" [by|without "(" labels ")"].
    calls: list[tuple[int, int]] = []
    i = 0
    while i < len(toks) - 1:
        t = toks[i]
        if t.kind == "ident" and t.text.lower() == "variants" and toks[i + 1].text == "(":
            raise RewriteError("variants() cannot be restricted by several label policies")
        if t.kind == "ident" and t.text.lower() in _RANGE_OPS and toks[i + 1].kind == "op" and toks[i + 1].text == "(":
            close = _matching(toks, i + 1)
            _check_union_safe(toks, i, close, names)
            end = _grouping_end(toks, close, names)
            calls.append((i, end))
            i = end + 1
            continue
        i += 1
    inside = [any(lo < s.tok_open and s.tok_close < hi for lo, hi in calls) for s in sels]
    if not all(inside):
        raise RewriteError(
            "log queries cannot be restricted by several label policies that differ on more than "
            "one label value (LogQL has no 'or' for log streams); ask your admin for a single "
            "selector, or use a metric query"
        )
    out: list[str] = []
    pos = 0
    for lo, hi in calls:
        start, end = toks[lo].start, toks[hi].end
        mine = [s for s in sels if start <= s.start and s.end <= end]
        if not mine:
            continue
        out.append(query[pos:start])
        copies = [_splice(query, start, end, mine, _adding(p.matchers)) for p in pols]
        out.append("(" + " or ".join(copies) + ")")
        pos = end
    out.append(query[pos:])
    return "".join(out)


def _splice(query: str, start: int, end: int, sels: Sequence[_Sel], render: _Render) -> str:
    out: list[str] = []
    pos = start
    for s in sels:
        out.append(query[pos : s.start])
        out.append(render(s))
        pos = s.end
    out.append(query[pos:end])
    return "".join(out)


_CACHE: Final[SizedLRU[tuple[str, tuple[Selector, ...]], tuple[bool, str]]] = SizedLRU(4096)


def _uncached(query: str, policies: tuple[Selector, ...]) -> tuple[bool, str]:
    try:
        return True, _rewrite(query, policies)
    except RewriteError as exc:
        return False, str(exc)


def _cached(query: str, policies: tuple[Selector, ...]) -> tuple[bool, str]:
    """Cached by (query, policies); a long result (one copy per policy) is never kept."""
    hit = _CACHE.get((query, policies))
    if hit is None:
        hit = _uncached(query, policies)
        _CACHE.put((query, policies), hit, len(hit[1]))
    return hit


def restrict_logql(query: str, policies: tuple[Selector, ...]) -> str:
    """Return ``query`` rewritten so it can only read streams visible under ``policies``.

    ``policies`` are OR-ed selectors. Raises :class:`RewriteError` (fail closed) for
    anything that cannot be lexed exactly or restricted without changing the meaning.
    Results, refusals included, are cached by ``(query, policies)``.
    """
    if len(query) > MAX_QUERY_LEN:
        raise RewriteError(f"LogQL query longer than {MAX_QUERY_LEN} characters")
    # Only ordinary-sized queries are cache keys: 64 KiB keys would let one client pin memory.
    ok, text = _cached(query, policies) if len(query) <= 4096 else _uncached(query, policies)
    if ok:
        return text
    raise RewriteError(text)


_MATCH_CACHE: Final[SizedLRU[tuple[str, tuple[Selector, ...]], tuple[str, ...]]] = SizedLRU(4096)


def _restrict_match(match: str, policies: tuple[Selector, ...]) -> tuple[str, ...]:
    hit = _MATCH_CACHE.get((match, policies))
    if hit is None:
        user = parse_stream_selector(match).matchers
        hit = tuple(_print_selector(user, p.matchers) for p in policies)
        _MATCH_CACHE.put((match, policies), hit, len(match) + sum(map(len, hit)))
    return hit


def restrict_logql_matchers(matches: Sequence[str], policies: tuple[Selector, ...]) -> list[str]:
    """Restrict Loki ``match``/``match[]`` selectors: one entry per (match, policy) pair.

    The series API returns the union of its selectors, so the OR of policies is exact
    here: ``len(matches) * len(policies)`` selectors, or one per policy when no
    ``match`` was given (otherwise the backend would list every stream).
    """
    if not policies:
        raise RewriteError("no label policies given")
    if not matches:
        return [_print_selector((), p.matchers) for p in policies]
    out: list[str] = []
    for m in matches:
        if len(m) > MAX_QUERY_LEN:
            raise RewriteError(f"selector longer than {MAX_QUERY_LEN} characters")
        out.extend(_restrict_match(m, policies))
    return out


def is_log_query(query: str) -> bool:
    """Whether ``query`` is a log query (its answer is streams): one selector, possibly in parentheses, first.

    Loki's grammar starts a log query with its selector (``logExpr: selector pipelineExpr |
    ( logExpr )``); every metric query starts with a function, an aggregation, a number or a
    parenthesised metric query. Raises :class:`RewriteError` where the lexer would.
    """
    toks, sels = _lex(query)
    i = 0
    while i < len(toks) and toks[i].kind == "op" and toks[i].text == "(":
        i += 1
    return len(sels) == 1 and sels[0].tok_open == i
