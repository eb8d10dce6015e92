"""Restrict TraceQL to the spans a token may see: every spanset filter ``{ X }`` becomes ``{ (X) && C }``.

``C`` is the policy's TraceQL condition (``gateway.policy.trace_selector.traceql_condition``). Tempo's
grammar (grafana/tempo ``pkg/traceql/expr.y``) has braces only around spanset filters and filters never
nest, so conjoining ``C`` inside every brace pair makes every span any part of the query can match,
relate (``>>``, ``~``, ``!<``...), count, group, select or aggregate (``| count()``, ``| rate()``,
``compare({...})``) one the policy shows: the query runs as if only visible spans existed. What that
cannot make exact is refused (:class:`~gateway.lbac.RewriteError`), never passed through:

* ``parent.`` attributes (they read the parent span, which may be hidden), ``rootServiceName`` and
  ``trace:rootService`` (a resource attribute of the root span, which may be hidden);
* a pipeline that does not start with a spanset filter (``count() > 1``, ``by(.a)``, ``(select(.a))``):
  Tempo then starts from every span;
* anything the tokenizer does not read exactly as Tempo's lexer would (character literals, control
  characters, unterminated strings or comments, nested or unbalanced braces).

The tokenizer mirrors ``lexer.go`` on Go's ``text/scanner`` in its default mode: ``"..."`` strings with
Go escapes, `````...````` raw strings, ``//`` and ``/* */`` comments (skipped; the rewrite drops them so
no comment can swallow the appended condition), and the attribute mode Tempo enters after ``.``,
``resource.``, ``span.``... in which everything but spaces and ``{}()=~!<>&|^,`` is the name, with
``"..."`` parts. Linear in the query's length; bounded before it runs (:data:`MAX_QUERY`, depth).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

from gateway.lbac import RewriteError
from gateway.lbac.bounds import MAX_DEPTH

MAX_QUERY: Final = 16 * 1024  # characters of one TraceQL query (Grafana's are well under 1 KiB)
MAX_FILTERS: Final = 256  # spanset filters in one query

# Token kinds.
LBRACE, RBRACE, LPAREN, RPAREN, PIPE, STRING, NUMBER, WORD, SCOPE, ATTR, OP, COMMA, COMMENT = (
    "{", "}", "(", ")", "|", "str", "num", "word", "scope", "attr", "op", ",", "comment")

#: Tempo's multi-character tokens (``tokenMap``) that the lexer builds by appending the next rune.
_OPERATORS: Final = frozenset({
    "!=", "=~", "!~", ">=", "<=", "&&", "||", ">>", "<<", "!>", "!<", "!>>", "!<<", "&~", "&>", "&<", "&>>", "&<<"})
_SINGLE: Final = frozenset("=!<>+-/%*^~&")
#: Words followed by ``.`` that start an attribute (``parent.`` is refused), and by ``:`` (scoped intrinsics).
_DOT_SCOPES: Final = frozenset({"resource", "span", "parent", "event", "link", "instrumentation"})
_COLON_SCOPES: Final = frozenset({"trace", "span", "event", "link", "instrumentation"})
#: Words whose ``(`` opens arguments, not a sub-pipeline.
CALLS: Final = frozenset({"count", "avg", "max", "min", "sum", "by", "coalesce", "select", "rate", "count_over_time",
                          "min_over_time", "max_over_time", "avg_over_time", "sum_over_time", "quantile_over_time",
                          "histogram_over_time", "compare", "topk", "bottomk", "with"})
_NOT_ATTRIBUTE: Final = frozenset("{}()=~!<>&|^,")
_COMPARISONS: Final = frozenset({"=", "!=", "<", "<=", ">", ">="})
_PIPELINE_OPS: Final = frozenset({"by", "select", "coalesce"})
#: What a hidden span would leak, by the token that reads it.
_FORBIDDEN: Final = {
    "rootServiceName": "rootServiceName reads the root span's resource, which your policy may hide",
    "trace:rootService": "trace:rootService reads the root span's resource, which your policy may hide",
    "parent.": "parent. attributes read the parent span, which your policy may hide",
}
_GO_SPACE: Final = frozenset("\t\n\r ")
_NUMBER: Final = re.compile(
    r"0[xX][0-9a-fA-F_]*(?:\.[0-9a-fA-F_]*)?(?:[pP][+-]?[0-9_]+)?|(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9][0-9_]*)"
    r"(?:[eE][+-]?[0-9_]+)?")
_DURATION_TAIL: Final = re.compile(r"[0-9.nsumhµdwy]*")
_DURATION: Final = re.compile(r"(?:[0-9]+(?:\.[0-9]+)?(?:ns|us|µs|ms|s|m|h|d|w|y))+")
_STRING: Final = re.compile(r'"(?:[^"\\\n]|\\(?:[abfnrtv\\"]|[0-7]{3}|x[0-9a-fA-F]{2}|u[0-9a-fA-F]{4}|'
                            r'U[0-9a-fA-F]{8}))*"')


@dataclass(frozen=True, slots=True)
class Token:
    kind: str
    text: str
    start: int
    end: int


def _is_attribute_rune(c: str) -> bool:
    return not c.isspace() and c not in _NOT_ATTRIBUTE


def _attribute_end(q: str, i: int) -> int:
    """Tempo's ``parseAttribute`` from ``i``: attribute runes and ``"..."`` parts with ``\\"``/``\\\\``."""
    n = len(q)
    while i < n:
        c = q[i]
        if c == '"':
            i += 1
            while True:
                if i >= n:
                    raise RewriteError('unterminated quoted attribute name (expecting ")')
                if q[i] == '"':
                    i += 1
                    break
                if q[i] == "\\":
                    if i + 1 >= n or q[i + 1] not in '"\\':
                        raise RewriteError("invalid escape sequence in a quoted attribute name")
                    i += 2
                else:
                    i += 1
        elif _is_attribute_rune(c):
            i += 1
        else:
            break
    return i


def tokenize(q: str) -> list[Token]:
    """Tempo's tokens of ``q`` (comments kept as COMMENT tokens); RewriteError where Tempo's lexer would fail
    or where reading it exactly is not certain."""
    out: list[Token] = []
    i, n = 0, len(q)
    attribute = False  # Tempo's parsingAttribute: the previous token was ``.``, ``resource.``...
    while i < n:
        c = q[i]
        if attribute:
            attribute = False
            if _is_attribute_rune(c):
                j = _attribute_end(q, i)
                out.append(Token(ATTR, q[i:j], i, j))
                i = j
                continue
        if c in _GO_SPACE:
            i += 1
            continue
        if q.startswith("//", i):
            j = q.find("\n", i)
            j = n if j < 0 else j
            out.append(Token(COMMENT, q[i:j], i, j))
            i = j
            continue
        if q.startswith("/*", i):
            j = q.find("*/", i + 2)
            if j < 0:
                raise RewriteError("unterminated comment")
            out.append(Token(COMMENT, q[i:j + 2], i, j + 2))
            i = j + 2
            continue
        if c == '"':
            m = _STRING.match(q, i)
            if m is None:
                raise RewriteError(f"unterminated or invalid string at {i + 1}")
            out.append(Token(STRING, m.group(), i, m.end()))
            i = m.end()
            continue
        if c == "`":
            j = q.find("`", i + 1)
            if j < 0:
                raise RewriteError(f"unterminated raw string at {i + 1}")
            out.append(Token(STRING, q[i:j + 1], i, j + 1))
            i = j + 1
            continue
        if c == "'":
            raise RewriteError("single quotes are not TraceQL strings; use double quotes")
        if c.isdecimal() or (c == "." and i + 1 < n and q[i + 1].isdecimal()):
            m = _NUMBER.match(q, i)
            j = m.end() if m is not None else i + 1
            tail = _DURATION_TAIL.match(q, j)
            if tail is not None and tail.end() > j and _DURATION.fullmatch(q[i:tail.end()]):
                j = tail.end()  # tryScanDuration: the longest run that parses as a duration
            out.append(Token(NUMBER, q[i:j], i, j))
            i = j
            continue
        if c == "_" or c.isalpha():
            j = i + 1
            while j < n and (q[j] == "_" or q[j].isalpha() or q[j].isdecimal()):
                j += 1
            word = q[i:j]
            if j < n and q[j] == "." and word in _DOT_SCOPES:
                out.append(Token(SCOPE, q[i:j + 1], i, j + 1))
                i, attribute = j + 1, True
            elif j < n and q[j] == ":" and word in _COLON_SCOPES:
                out.append(Token(SCOPE, q[i:j + 1], i, j + 1))
                i = j + 1
            else:
                out.append(Token(WORD, word, i, j))
                i = j
            continue
        if c == ".":
            out.append(Token(OP, ".", i, i + 1))
            i, attribute = i + 1, True
            continue
        if c in "{}()|,":
            if c == "|" and q.startswith("||", i):
                out.append(Token(OP, "||", i, i + 2))
                i += 2
                continue
            out.append(Token(c, c, i, i + 1))
            i += 1
            continue
        if c in _SINGLE:
            j = i + 1
            while j < n and q[i:j + 1] in _OPERATORS:  # the lexer appends runes while tokenMap has the result
                j += 1
            out.append(Token(OP, q[i:j], i, j))
            i = j
            continue
        raise RewriteError(f"unexpected character {c!r} at {i + 1}")
    return out


@dataclass(frozen=True, slots=True)
class _Filter:
    open: int  # index of ``{`` in the token list
    close: int  # index of ``}``


def _structure(tokens: list[Token]) -> tuple[list[_Filter], list[int]]:
    """The spanset filters and where a pipeline starts without one (its first token's index), after checking
    what the rewrite relies on (see the module docstring)."""
    filters: list[_Filter] = []
    starts: list[int] = []
    # Each open group: (index of its first token, is a call's argument list); the query itself is group 0.
    groups: list[tuple[int, bool]] = [(0, False)]
    in_filter: int | None = None
    prev: Token | None = None
    for k, t in enumerate(tokens):
        if t.kind == COMMENT:
            continue
        if t.kind == SCOPE and t.text in _FORBIDDEN or t.kind == WORD and t.text in _FORBIDDEN:
            raise RewriteError(_FORBIDDEN[t.text])
        if t.kind == WORD and t.text == "rootService" and prev is not None and prev.text == "trace:":
            raise RewriteError(_FORBIDDEN["trace:rootService"])
        if in_filter is not None:
            if t.kind == LBRACE:
                raise RewriteError("a spanset filter cannot hold another '{'")
            if t.kind == RBRACE:
                filters.append(_Filter(in_filter, k))
                in_filter = None
                if len(filters) > MAX_FILTERS:
                    raise RewriteError(f"more than {MAX_FILTERS} spanset filters")
        elif t.kind == LBRACE:
            in_filter = k
        elif t.kind == RBRACE:
            raise RewriteError("unbalanced '}'")
        elif t.kind == LPAREN:
            groups.append((k + 1, prev is not None and prev.kind == WORD and prev.text in CALLS))
            if len(groups) > MAX_DEPTH:
                raise RewriteError(f"the query nests deeper than {MAX_DEPTH} levels of brackets")
        elif t.kind == RPAREN:
            if len(groups) == 1:
                raise RewriteError("unbalanced ')'")
            start, call = groups.pop()
            if not call and _starts_unfiltered(tokens, start, k, root=False):
                starts.append(start)
        prev = t
    if in_filter is not None:
        raise RewriteError("unterminated spanset filter: '{' without '}'")
    if len(groups) != 1:
        raise RewriteError("unbalanced '('")
    if _starts_unfiltered(tokens, 0, len(tokens), root=True):
        starts.append(0)
    return filters, starts


def _starts_unfiltered(tokens: list[Token], start: int, end: int, root: bool) -> bool:
    """Whether the group ``tokens[start:end]`` is a pipeline that does not start with a spanset filter
    (``count() > 1``, ``by(.a) | ...``, ``(select(.a))``): Tempo then starts from every span, so the
    rewrite puts ``{ C } |`` in front.

    A group's first ``|``-separated element holding a ``{`` starts with a spanset expression. Without a
    ``|``, a non-root group without one is a scalar sub-expression (``(count() + 1)``) unless it compares
    or groups at its own level, which only a pipeline of its own does.
    """
    depth = 0
    has_filter = has_pipe = pipeline_op = False
    for t in tokens[start:end]:
        if t.kind == LPAREN:
            depth += 1
        elif t.kind == RPAREN:
            depth -= 1
        elif t.kind == LBRACE and not has_pipe:
            has_filter = True
        elif depth == 0 and not has_pipe:
            if t.kind == PIPE:
                has_pipe = True
            elif t.kind == OP and t.text in _COMPARISONS or t.kind == WORD and t.text in _PIPELINE_OPS:
                pipeline_op = True
    return not (has_filter or (not root and not has_pipe and not pipeline_op))


def _condition_text(condition: str) -> str:
    """The policy's condition, checked to be one boolean expression (no braces, pipes or comments)."""
    tokens = tokenize(condition)
    depth = 0
    for t in tokens:
        if t.kind in (LBRACE, RBRACE, PIPE, COMMENT, COMMA) or t.kind == SCOPE and t.text == "parent.":
            raise RewriteError("the policy's trace condition is not a plain boolean expression")
        depth += (t.kind == LPAREN) - (t.kind == RPAREN)
        if depth < 0:
            raise RewriteError("the policy's trace condition has unbalanced parentheses")
    if depth or not tokens:
        raise RewriteError("the policy's trace condition has unbalanced parentheses")
    return condition.strip()


def _check_bounds(query: str) -> None:
    if len(query) > MAX_QUERY:
        raise RewriteError(f"the TraceQL query is longer than {MAX_QUERY} characters; label-restricted queries are "
                           "limited to keep rewriting cheap")


def restrict(query: str, condition: str) -> str:
    """``query`` with ``condition`` conjoined in every spanset filter (``{}`` becomes ``{ C }``).

    Raises RewriteError (a 400) for what cannot be restricted exactly; the result is checked once more
    (every filter of the output ends with the condition) before it is returned.
    """
    _check_bounds(query)
    cond = _condition_text(condition)
    tokens = tokenize(query)
    if not any(t.kind != COMMENT for t in tokens):
        raise RewriteError("the TraceQL query is empty")
    filters, starts = _structure(tokens)
    parts: list[str] = []
    pos = 0
    filter_at = {f.open: f for f in filters}
    unfiltered = set(starts)
    k = 0
    while k < len(tokens):
        t = tokens[k]
        if k in unfiltered:
            while tokens[k].kind == COMMENT:  # (a group's first token, never its closing parenthesis)
                k += 1
            t = tokens[k]
            parts.append(query[pos:t.start] + "{ " + cond + " } | ")
            pos = t.start
        if t.kind == COMMENT:
            parts.append(query[pos:t.start] + " ")  # dropped: a // comment would swallow the condition
            pos = t.end
        elif (f := filter_at.get(k)) is not None:
            parts.append(query[pos:t.start])
            body = " ".join(query[b.start:b.end] if b.kind != ATTR else query[b.start:b.end]
                            for b in _spans(tokens, f.open + 1, f.close, query))
            parts.append("{ " + (f"({body}) && {cond}" if body else cond) + " }")
            pos = tokens[f.close].end
            k = f.close
        k += 1
    parts.append(query[pos:])
    out = "".join(parts)
    verify(out, cond)
    return out


@dataclass(frozen=True, slots=True)
class _Span:
    kind: str
    start: int
    end: int


def _spans(tokens: list[Token], start: int, end: int, query: str) -> list[_Span]:
    """A filter's body as runs of the original text between comments (comments dropped, spacing kept)."""
    runs: list[_Span] = []
    run_start: int | None = None
    last_end = 0
    for t in tokens[start:end]:
        if t.kind == COMMENT:
            if run_start is not None:
                runs.append(_Span(OP, run_start, last_end))
                run_start = None
            continue
        if run_start is None:
            run_start = t.start
        last_end = t.end
    if run_start is not None:
        runs.append(_Span(OP, run_start, last_end))
    return runs


def verify(rewritten: str, condition: str) -> None:
    """Check that every spanset filter of ``rewritten`` is ``{ C }`` or ``{ (X) && C }``: the rewrite's
    invariant, re-read by the same tokenizer (a failure is a bug, refused rather than sent)."""
    tokens = tokenize(rewritten)
    cond = [t.text for t in tokenize(condition)]
    filters, starts = _structure(tokens)
    if starts:
        raise RewriteError("internal error: a rewritten pipeline does not start with a spanset filter")
    for f in filters:
        body = [t.text for t in tokens[f.open + 1:f.close] if t.kind != COMMENT]
        if body == cond:
            continue
        n = len(cond)
        if (len(body) > n + 3 and body[-n:] == cond and body[-n - 1] == "&&" and body[0] == "("
                and body[-n - 2] == ")" and _closes_at(body, 0) == len(body) - n - 2):
            continue
        raise RewriteError("internal error: a rewritten spanset filter does not carry the policy")


def _closes_at(texts: list[str], i: int) -> int:
    depth = 0
    for j in range(i, len(texts)):
        depth += (texts[j] == "(") - (texts[j] == ")")
        if depth == 0:
            return j
    return -1


#: What Tempo's tag endpoints extract from ``q`` (``traceql.ExtractConditionGroups``; before 3.0
#: ``ExtractFetchRequest``): comparisons of a field with a literal, AND-ed, in one spanset filter. A ``q`` that
#: does not parse *and validate* is read as match-all, so each field takes only literals of its own type.
_ORDER: Final = frozenset({"=", "!=", "<", "<=", ">", ">="})
_EQUALITY: Final = frozenset({"=", "!="})
_REGEX: Final = frozenset({"=~", "!~"})
_STRING_OPS: Final = _EQUALITY | _REGEX
_KINDS: Final = frozenset({"unspecified", "internal", "server", "client", "producer", "consumer"})
#: intrinsic -> (operators, literal kinds, literal words) it is compared with
_TYPED: Final[dict[str, tuple[frozenset[str], frozenset[str], frozenset[str]]]] = {
    "name": (_STRING_OPS, frozenset({STRING}), frozenset()),
    "statusMessage": (_STRING_OPS, frozenset({STRING}), frozenset()),
    "rootName": (_STRING_OPS, frozenset({STRING}), frozenset()),
    "status": (_EQUALITY, frozenset(), frozenset({"ok", "error", "unset"})),
    "kind": (_EQUALITY, frozenset(), _KINDS),
    "duration": (_ORDER, frozenset({NUMBER}), frozenset()),
    "traceDuration": (_ORDER, frozenset({NUMBER}), frozenset()),
}
_ATTRIBUTE: Final = (_ORDER | _REGEX, frozenset({STRING, NUMBER}), frozenset[str]())
_MATCH_ALL: Final = frozenset({"", "{}", "{true}"})


def _field(body: list[Token], i: int) -> tuple[int, tuple[frozenset[str], frozenset[str], frozenset[str]]] | None:
    """How many tokens the field at ``body[i]`` takes and what it may be compared with (None: not a field
    Tempo extracts as a condition)."""
    t = body[i]
    nxt = body[i + 1] if i + 1 < len(body) else None
    if (t.kind == OP and t.text == "." or t.kind == SCOPE and t.text.endswith(".")) and nxt and nxt.kind == ATTR:
        return 2, _ATTRIBUTE
    if t.kind == SCOPE and t.text in ("span:", "trace:") and nxt and nxt.kind == WORD:
        name = {"rootName": "rootName", "duration": "traceDuration"}.get(nxt.text) if t.text == "trace:" \
            else nxt.text if nxt.text in ("name", "status", "statusMessage", "kind", "duration") else None
        return (2, _TYPED[name]) if name else None
    return (1, _TYPED[t.text]) if t.kind == WORD and t.text in _TYPED else None


def tags_query(q: str | None, condition: str) -> str:
    """The ``q`` for Tempo's v2 tag endpoints: the client's conditions AND-ed with the policy.

    Tempo narrows tag names and values to spans matching ``q`` only as far as it can extract conditions
    from it, and treats anything else (a parse failure, a pipeline, a bare attribute) as match-all, so the
    client's ``q`` must be one filter of ``field op literal`` comparisons joined by ``&&`` (what Grafana
    sends), each literal of its field's type (a ``q`` that fails Tempo's validation would be match-all),
    else it is refused. A condition of several selectors (an OR) is refused too: only Tempo 3.0 splits an
    OR into condition groups, and the gateway cannot tell which Tempo it talks to (the caller sends one
    look-up per selector instead: ``gateway.lbac.tracereads``).
    """
    _check_bounds(q or "")
    cond = _condition_text(condition)
    if any(t.kind == OP and t.text == "||" for t in tokenize(cond)):
        raise RewriteError("a tag look-up's q takes one trace selector's condition")
    text = (q or "").strip()
    if "".join(text.split()) in _MATCH_ALL:
        return "{ " + cond + " }"
    tokens = tokenize(text)
    refused = RewriteError("under label-based access control, q of tag requests must be one spanset filter of "
                           'comparisons joined by &&, e.g. { span.http.method = "GET" && status = error }')
    if (len(tokens) < 2 or tokens[0].kind != LBRACE or tokens[-1].kind != RBRACE
            or any(t.kind in (LBRACE, RBRACE, COMMENT) for t in tokens[1:-1])):
        raise refused
    _structure(tokens)  # refuses the forbidden fields
    body = tokens[1:-1]
    i = 0
    while True:
        field = _field(body, i) if i < len(body) else None
        if field is None or i + field[0] + 1 >= len(body):
            raise refused
        width, (ops, literals, words) = field
        op, lit = body[i + width], body[i + width + 1]
        if op.kind != OP or op.text not in ops:
            raise refused
        if not (lit.kind in literals and (op.text not in _REGEX or lit.kind == STRING)
                or lit.kind == WORD and lit.text in words):
            raise refused
        i += width + 2
        if i == len(body):
            break
        if body[i].kind != OP or body[i].text != "&&":
            raise refused
        i += 1
    return "{ " + text[body[0].start:body[-1].end] + " && " + cond + " }"


def check_tag_name(name: str) -> None:
    """Refuse a tag name whose values would describe hidden spans (``parent.…``, ``rootServiceName``,
    ``trace:rootService``): Tempo reads the name of ``/api/v2/search/tag/{name}/values`` as ``{name}``
    (``traceql.ParseIdentifier``)."""
    _structure(tokenize("{" + name + "}"))
