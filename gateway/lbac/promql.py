"""Rewrite PromQL so that it can only read series visible under a set of label policies.

A policy set is a tuple of :class:`~gateway.policy.selector.Selector`: a series is
visible when it matches ANY selector (matchers inside one selector are AND-ed). The
rewrite must give, on the full backend, exactly the answer the query would give on a
backend holding only the visible series. What cannot be rewritten faithfully is refused
with :class:`~gateway.lbac.RewriteError`, never approximated.

How each construct is rewritten (``p1``, ``p2`` = policy selectors; every rule below
was checked against Prometheus 2.42 in ``tests/e2e/test_promql_differential.py``):

* One selector: its matchers are appended to every vector and matrix selector. Same-label
  conflicts (``{env="prod"}`` AND ``{env="dev"}``) select nothing, which is correct.
* Several selectors made of one equality matcher on the same label merge into one regex
  matcher (``env=~"dev|prod"``, values regex-escaped): exactly the same set of series.
* Otherwise, an instant vector selector ``v`` becomes ``(v{p1} or v{p2})``. ``or`` drops a
  right-hand series whose labels *other than* ``__name__`` equal a left-hand one's; for
  one selector expression that is the same series, unless a policy constrains
  ``__name__`` and the query does not fix the metric name: then the name is copied into
  a temporary label around the ``or`` (``label_replace``) so no series is lost.
* A matrix selector inside a function that works series by series (``rate``,
  ``*_over_time``, ...) becomes ``(f(v{p1}[r], ...) or f(v{p2}[r], ...))``, with the
  function's other arguments kept in place.
* ``timestamp(v)`` returns sample timestamps only when its argument is a selector, so with
  several selectors it becomes ``(timestamp(v{p1}) or timestamp(v{p2}))``.
* ``absent(v)`` / ``absent_over_time(v[r])`` take their output labels from the selector's
  equality matchers, so policy matchers would change them: the rewrite is
  ``absent(v{p1}) and on() absent(v{p2})`` with the labels reset (``label_replace``) to
  those Prometheus derives from the query's own selector.
* A bare range selector (``v[5m]`` at top level or under anything else) with several
  selectors cannot be expressed as one range vector: refused. ``info()`` is refused
  always: it joins ``target_info`` series that no selector names.

Implementation notes (traps in promql-parser 0.12, each covered by a test):

* The tree cannot be edited in place: assigning ``vs.matchers`` changes ``str()`` but not
  ``prettify()``/``transform()``. Replacements are built as text, parsed, and returned
  from a ``transform()`` *post_visit* callback (returning a replacement from *pre_visit*
  crashes the interpreter with a segfault).
* ``str()`` does not escape label values; ``prettify()`` does, so it prints the result.
* Backtick strings holding a backslash fail to parse: a small lexer turns every backtick
  string into a double-quoted one first.
* ``@`` timestamps: negative ones print as ``@ 0.000`` and huge ones are clamped, and
  reading ``AtModifier.at`` of a negative one panics (``PanicException`` is a
  ``BaseException``): such queries are refused by the lexer.
* The parser accepts ``{a="1" or b="2"}``, which Prometheus does not: refused.
* Finally the printed query is parsed again and every selector in it is checked to carry
  all matchers of at least one policy selector: a bug above fails closed, never open.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any, Final

import promql_parser as pp

from gateway.lbac import RewriteError
from gateway.lbac.bounds import SizedLRU
from gateway.policy.selector import LabelMatcher, Selector, quote, quote_name

Policies = tuple[Selector, ...]
_Triple = tuple[str, str, str]

_OP: Final[dict[str, str]] = {
    "MatchOp.Equal": "=",
    "MatchOp.NotEqual": "!=",
    "MatchOp.Re": "=~",
    "MatchOp.NotRe": "!~",
}

# Functions whose matrix argument is processed series by series: f(union) == union of f.
_RANGE_PER_SERIES: Final = frozenset(
    {
        "rate", "irate", "increase", "delta", "idelta", "deriv", "changes", "resets",
        "avg_over_time", "min_over_time", "max_over_time", "sum_over_time", "count_over_time",
        "quantile_over_time", "stddev_over_time", "stdvar_over_time", "last_over_time",
        "present_over_time", "mad_over_time", "first_over_time", "ts_of_max_over_time",
        "ts_of_min_over_time", "ts_of_last_over_time", "ts_of_first_over_time",
        "predict_linear", "holt_winters", "double_exponential_smoothing",
    }
)  # fmt: skip
_ABSENT: Final = frozenset({"absent", "absent_over_time"})
_REFUSED_FUNCS: Final[dict[str, str]] = {
    "info": "info() joins target_info series that no selector in the query names, so label "
    "policies cannot be applied to it",
}
_TMP_LABEL: Final = "__lbac_name__"
_IDENT = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_RE_META = re.compile(r"([\\.+*?()|\[\]{}^$])")
_AT_NUMBER = re.compile(r"0[xX][0-9a-fA-F]+|(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?|[iI][nN][fF]|[nN][aA][nN]")
_MAX_AT_SECONDS: Final = 1e15  # prettify() clamps beyond ~1.8e16; Prometheus refuses beyond ~9.2e15
MAX_QUERY_LEN: Final = 128 * 1024
MAX_DEPTH: Final = 64
_BRACKETS: Final = re.compile(r"[()\[\]{}]")
MAX_CACHED_QUERY: Final = 4096
MAX_OUTPUT_LEN: Final = 64 * 1024  # nested unions re-print their arguments: keep the worst case short


def _register_legacy_functions() -> None:
    """Prometheus 2.x still has ``holt_winters`` (renamed in 3.0); promql-parser 0.12 does not."""
    try:
        pp.register_extra_functions(
            [
                pp.Function(
                    "holt_winters",
                    [pp.ValueType.Matrix, pp.ValueType.Scalar, pp.ValueType.Scalar],
                    pp.ValueType.Vector,
                )
            ]
        )
    except ValueError:  # pragma: no cover - already registered or built in
        pass


_register_legacy_functions()


# --------------------------------------------------------------------------- public API


def restrict_promql(query: str, policies: Policies) -> str:
    """Return ``query`` rewritten to read only series matching one of ``policies``.

    Raises :class:`RewriteError` (message meant for the user) when the query does not
    parse or cannot be restricted faithfully. Results, refusals included, are cached.
    """
    r = _restrict_cached(query, policies)
    if type(r) is str:
        return r
    raise RewriteError(str(r))


def restrict_match(matches: Sequence[str], policies: Policies) -> list[str]:
    """Restrict the ``match[]`` selectors of series/labels/label-values/federate requests.

    The API ORs the ``match[]`` values, the policies OR their selectors: the result is
    every (match, policy) pair AND-ed, ``len(matches) * len(policies)`` selectors; with no
    ``match[]`` at all, one selector per policy.
    """
    r = _restrict_match_cached(tuple(matches), policies)
    if type(r) is tuple:
        return list(r)
    raise RewriteError(str(r))


# --------------------------------------------------------------------------- caching


def _restrict_cached(query: str, policies: Policies) -> str | RewriteError:
    """Cache results for queries of ordinary size only: a cache keyed by 128 KiB queries would pin memory."""
    if len(query) <= MAX_CACHED_QUERY:
        return _restrict_lru(query, policies)
    try:
        return _restrict(query, policies)
    except RewriteError as exc:
        return exc.with_traceback(None)  # a kept traceback would keep the query's frames alive


_CACHE: Final[SizedLRU[tuple[str, Policies], str | RewriteError]] = SizedLRU(4096)
_MATCH_CACHE: Final[SizedLRU[tuple[tuple[str, ...], Policies], tuple[str, ...] | RewriteError]] = SizedLRU(1024)


def _restrict_lru(query: str, policies: Policies) -> str | RewriteError:
    """Cached by (query, policies); a long result (unions multiply the text) is never kept."""
    key = (query, policies)
    hit = _CACHE.get(key)
    if hit is not None:
        return hit
    try:
        r: str | RewriteError = _restrict(query, policies)
    except RewriteError as exc:
        r = exc.with_traceback(None)  # a kept traceback would keep the query's frames alive
    _CACHE.put(key, r, len(r) if isinstance(r, str) else 0)
    return r


def _restrict_match_cached(matches: tuple[str, ...], policies: Policies) -> tuple[str, ...] | RewriteError:
    if sum(map(len, matches)) <= MAX_CACHED_QUERY:
        return _restrict_match_lru(matches, policies)
    try:
        return _restrict_matches(matches, policies)
    except RewriteError as exc:
        return exc.with_traceback(None)  # a kept traceback would keep the query's frames alive


def _restrict_match_lru(matches: tuple[str, ...], policies: Policies) -> tuple[str, ...] | RewriteError:
    key = (matches, policies)
    hit = _MATCH_CACHE.get(key)
    if hit is not None:
        return hit
    try:
        r: tuple[str, ...] | RewriteError = _restrict_matches(matches, policies)
    except RewriteError as exc:
        r = exc.with_traceback(None)  # a kept traceback would keep the query's frames alive
    _MATCH_CACHE.put(key, r, sum(map(len, r)) if isinstance(r, tuple) else 0)
    return r


# --------------------------------------------------------------------------- lexer


def _normalize(query: str) -> str:
    """Turn backtick strings into double-quoted ones and refuse ``@`` times the printer mangles.

    Respects ``"..."`` and ``'...'`` strings (with backslash escapes), raw backtick
    strings and ``#`` comments, so only real ``@`` modifiers are looked at. Also refuses
    bracket nesting past MAX_DEPTH: the parser's cost explodes with depth (1,000 levels take
    tens of seconds, ~12,000 crash the process), and no real query comes near.
    """
    out: list[str] = []
    i, n = 0, len(query)
    depth = 0
    while i < n:
        c = query[i]
        if c == "#":
            j = query.find("\n", i)
            j = n if j < 0 else j
            out.append(query[i:j])
            i = j
        elif c in "\"'":
            j = i + 1
            while j < n and query[j] != c:
                j += 2 if query[j] == "\\" else 1
            if j >= n:
                raise RewriteError("the query does not parse: unterminated quoted string")
            out.append(query[i : j + 1])
            i = j + 1
        elif c == "`":
            j = query.find("`", i + 1)
            if j < 0:
                raise RewriteError("the query does not parse: unterminated raw string")
            out.append(quote(query[i + 1 : j]))
            i = j + 1
        elif c == "@":
            _check_at(query, i + 1)
            out.append(c)
            i += 1
        else:
            j = i + 1
            while j < n and query[j] not in "#\"'`@":
                j += 1
            for b in _BRACKETS.finditer(query, i, j):  # parser cost grows steeply with nesting depth
                depth += 1 if b.group() in "([{" else -1
                if depth > MAX_DEPTH:
                    raise RewriteError(f"the query nests deeper than {MAX_DEPTH} levels of brackets")
            out.append(query[i:j])
            i = j
    return "".join(out)


def _skip_blanks(query: str, i: int) -> int:
    n = len(query)
    while i < n:
        if query[i].isspace():
            i += 1
        elif query[i] == "#":
            j = query.find("\n", i)
            i = n if j < 0 else j
        else:
            break
    return i


def _check_at(query: str, i: int) -> None:
    i = _skip_blanks(query, i)
    if query.startswith("-", i):
        raise RewriteError("negative @ timestamps are not supported")
    if query.startswith("+", i):
        i = _skip_blanks(query, i + 1)
    m = _AT_NUMBER.match(query, i)
    if m is None:
        return  # start(), end() or a syntax error the parser reports
    text = m.group(0)
    try:
        value = float(int(text, 16)) if text[:2].lower() == "0x" else float(text)
    except ValueError:  # pragma: no cover - the regex only matches numbers
        return
    if not value <= _MAX_AT_SECONDS:
        raise RewriteError(f"@ timestamp {text} is out of range")


# --------------------------------------------------------------------------- parsing helpers


def _parse(text: str, what: str) -> Any:
    try:
        return pp.parse(text)
    except BaseException as exc:  # pyo3 panics are BaseException
        if isinstance(exc, KeyboardInterrupt | SystemExit):
            raise
        raise RewriteError(f"{what} does not parse: {exc}") from None


def _triples(vs: Any) -> list[_Triple]:
    """The selector's own matchers (without the metric name); refuses ``or`` inside braces."""
    ms = vs.matchers
    if ms.or_matchers:
        raise RewriteError("'or' inside a selector's braces is not PromQL; write one selector per alternative")
    out: list[_Triple] = []
    for m in ms.matchers:
        op = _OP.get(str(m.op))
        if op is None:  # pragma: no cover - the parser knows four operators
            raise RewriteError(f"unsupported matcher operator {m.op}")
        out.append((m.name, op, m.value))
    return out


def _suffix(node: Any) -> str:
    """What ``prettify()`` prints after the selector's braces: ``[5m] @ 1.000 offset 1m``.

    Taken from the printer itself so range, offset and ``@`` keep their exact spelling.
    """
    text: str = node.prettify()
    i = 0
    m = _IDENT.match(text)
    if m:
        i = m.end()
    if i < len(text) and text[i] == "{":
        i += 1
        while i < len(text) and text[i] != "}":
            if text[i] == '"':
                i += 1
                while i < len(text) and text[i] != '"':
                    i += 2 if text[i] == "\\" else 1
            i += 1
        i += 1
    return text[i:]


def _selector_text(vs: Any, suffix: str, policy: Selector) -> str:
    """``vs`` with ``policy``'s matchers appended, values quoted by :func:`quote`."""
    items: list[str] = []
    head = vs.name or ""
    if head and (not _IDENT.fullmatch(head) or any(m.name == "__name__" for m in policy.matchers)):
        # `up{__name__=~"..."}` is "metric name set twice": move the name into the braces.
        items.append(f"__name__={quote(head)}")
        head = ""
    items.extend(f"{quote_name(n)}{op}{quote(v)}" for n, op, v in _triples(vs))
    items.extend(str(m) for m in policy.matchers)
    return f"{head}{{{', '.join(items)}}}{suffix}"


def _fixes_name(vs: Any) -> bool:
    return bool(vs.name) or any(n == "__name__" and op == "=" for n, op, _ in _triples(vs))


def _unparen(node: Any) -> Any:
    while isinstance(node, pp.ParenExpr):
        node = node.expr
    return node


# --------------------------------------------------------------------------- policies


def _re_escape(value: str) -> str:
    """Escape RE2 metacharacters; RE2 reads ``\\<punctuation>`` as the character itself."""
    return _RE_META.sub(r"\\\1", value)


def effective_policies(policies: Policies) -> Policies:
    """Deduplicate, and merge one-equality-matcher selectors on one label into a regex.

    ``{env="dev"}`` OR ``{env="prod"}`` is exactly ``{env=~"dev|prod"}`` (anchored regex,
    escaped values, "" included when given), which keeps the one-selector rewrite.
    """
    pols = tuple(dict.fromkeys(policies))
    if len(pols) > 1 and all(len(p.matchers) == 1 and p.matchers[0].op == "=" for p in pols):
        names = {p.matchers[0].name for p in pols}
        if len(names) == 1:
            regex = "|".join(_re_escape(p.matchers[0].value) for p in pols)
            return (Selector((LabelMatcher(names.pop(), "=~", regex),)),)
    return pols


# --------------------------------------------------------------------------- the rewrite


class _Rewriter:
    """``transform()`` callbacks; a stack of (kind, function name) tells a node its parents."""

    def __init__(self, policies: Policies) -> None:
        self.pols = policies
        self.multi = len(policies) > 1
        self.name_policy = any(m.name == "__name__" for p in policies for m in p.matchers)
        self.stack: list[tuple[str, str]] = []

    def pre(self, node: Any) -> None:
        fname = node.func.name if isinstance(node, pp.Call) else ""
        self.stack.append((type(node).__name__, fname))
        return None  # returning a replacement from pre_visit segfaults promql-parser 0.12

    def _ancestor(self) -> tuple[str, str]:
        """Nearest ancestor that is not a parenthesis (the stack no longer holds the node)."""
        for kind, fname in reversed(self.stack):
            if kind != "ParenExpr":
                return kind, fname
        return "", ""

    def post(self, node: Any) -> Any:
        self.stack.pop()
        if isinstance(node, pp.VectorSelector):
            return self._vector(node)
        if isinstance(node, pp.MatrixSelector):
            return self._matrix(node)
        if isinstance(node, pp.Call):
            return self._call(node)
        return None

    def _vector(self, vs: Any) -> Any:
        if self.stack and self.stack[-1][0] == "MatrixSelector":
            return None  # handled with its matrix selector
        kind, fname = self._ancestor()
        if kind == "Call" and (fname in _ABSENT or (fname == "timestamp" and self.multi)):
            return None  # handled by the call, which sees the selector itself
        return _parse(self._union(vs, _suffix(vs), lambda sel: sel), "the rewritten selector")

    def _matrix(self, ms: Any) -> Any:
        kind, fname = self._ancestor()
        if kind == "Call" and fname in _ABSENT:
            return None
        if not self.multi:
            return _parse(_selector_text(ms.vector_selector, _suffix(ms), self.pols[0]), "the rewritten selector")
        if kind == "Call" and fname in _RANGE_PER_SERIES:
            return None  # the call is distributed over the policies
        raise RewriteError(
            "a range vector selector outside a per-series function (such as a bare `v[5m]`) cannot be "
            "restricted to several label policies; wrap it in a function such as last_over_time()"
        )

    def _call(self, call: Any) -> Any:
        fname: str = call.func.name
        if fname in _REFUSED_FUNCS:
            raise RewriteError(_REFUSED_FUNCS[fname])
        if fname in _ABSENT:
            target = _unparen(call.args[0]) if call.args else None
            if isinstance(target, pp.VectorSelector | pp.MatrixSelector):
                return _parse(self._absent(fname, target), "the rewritten absent()")
            return None
        if not self.multi:
            return None
        if fname == "timestamp":
            target = _unparen(call.args[0])
            if isinstance(target, pp.VectorSelector):
                return _parse(
                    self._union(target, _suffix(target), lambda sel: f"timestamp({sel})"),
                    "the rewritten timestamp()",
                )
            return None
        if fname in _RANGE_PER_SERIES:
            for idx, arg in enumerate(call.args):
                target = _unparen(arg)
                if isinstance(target, pp.MatrixSelector):
                    texts = [a.prettify() for a in call.args]

                    def wrap(sel: str, idx: int = idx, texts: list[str] = texts) -> str:
                        return f"{fname}({', '.join([*texts[:idx], sel, *texts[idx + 1 :]])})"

                    vs = target.vector_selector
                    return _parse(self._union(vs, _suffix(target), wrap), f"the rewritten {fname}()")
        return None

    def _union(self, vs: Any, suffix: str, wrap: Callable[[str], str]) -> str:
        """``wrap(v{p})`` for each policy, OR-ed without losing series (see module doc)."""
        parts = [wrap(_selector_text(vs, suffix, p)) for p in self.pols]
        if sum(map(len, parts)) > MAX_OUTPUT_LEN:
            # nested per-series calls repeat their arguments once per policy: refuse blow-ups
            raise RewriteError("the query restricted to several label policies would be too large")
        if len(parts) == 1:
            return parts[0]
        if not (self.name_policy and not _fixes_name(vs)):
            return "(" + " or ".join(parts) + ")"
        tmp = quote(_TMP_LABEL)
        tagged = " or ".join(f'label_replace({x}, {tmp}, "$1", "__name__", "(.+)")' for x in parts)
        return f'label_replace({tagged}, {tmp}, "", "", "")'

    def _absent(self, fname: str, target: Any) -> str:
        vs = target.vector_selector if isinstance(target, pp.MatrixSelector) else target
        suffix = _suffix(target)
        own = _triples(vs)
        want = _absent_labels(own)
        sels = [_selector_text(vs, suffix, p) for p in self.pols]
        expr = " and on() ".join(f"{fname}({sel})" for sel in sels)
        # prettify() sorts matchers, and the order matters to absent(): derive the labels
        # the backend will compute from the printed form of the first selector.
        printed = _parse(_parse(sels[0], "the rewritten selector").prettify(), "the rewritten selector")
        printed_vs = printed.vector_selector if isinstance(printed, pp.MatrixSelector) else printed
        got = _absent_labels(_triples(printed_vs))
        fixes = sorted(k for k in set(got) | set(want) if got.get(k) != want.get(k))
        if not fixes:
            return expr if len(sels) == 1 else f"({expr})"
        for k in fixes:
            repl = quote(want.get(k, "").replace("$", "$$"))
            expr = f'label_replace({expr}, {quote(k)}, {repl}, {quote(k)}, "(?s:.*)")'
        return expr


def _absent_labels(matchers: Sequence[_Triple]) -> dict[str, str]:
    """Labels Prometheus gives ``absent(v{...})``: first equality per label, removed on repeats."""
    out: dict[str, str] = {}
    seen: set[str] = set()
    for name, op, value in matchers:
        if name == "__name__":
            continue
        if op == "=" and name not in seen:
            seen.add(name)
            if value:
                out[name] = value
            else:
                out.pop(name, None)
        else:
            out.pop(name, None)
    return out


def _check_policies(policies: Policies) -> None:
    if not policies:
        raise RewriteError("internal error: restriction requested without any label policy")
    for p in policies:
        if not isinstance(p, Selector) or not p.matchers:
            raise RewriteError("internal error: invalid label policy")


def _restrict(query: str, policies: Policies) -> str:
    _check_policies(policies)
    if not isinstance(query, str) or not query.strip():
        raise RewriteError("the query is empty")
    if len(query) > MAX_QUERY_LEN:
        raise RewriteError(f"the query is longer than {MAX_QUERY_LEN} characters")
    pols = effective_policies(policies)
    tree = _parse(_normalize(query), "the query")
    rw = _Rewriter(pols)
    try:
        out = pp.transform(tree, pre_visit=rw.pre, post_visit=rw.post)
        final: str = out.prettify()
    except RewriteError:
        raise
    except BaseException as exc:  # parser errors and pyo3 panics: fail closed
        if isinstance(exc, KeyboardInterrupt | SystemExit):
            raise
        raise RewriteError(f"the query could not be restricted: {exc}") from None
    _verify(final, pols)
    return final


def _restrict_matches(matches: tuple[str, ...], policies: Policies) -> tuple[str, ...]:
    _check_policies(policies)
    if not matches:
        return tuple(str(p) for p in policies)
    out: list[str] = []
    for m in matches:
        if not isinstance(m, str) or not m.strip():
            raise RewriteError("match[] must be a non-empty series selector")
        if len(m) > MAX_QUERY_LEN:
            raise RewriteError(f"match[] is longer than {MAX_QUERY_LEN} characters")
        vs = _parse(_normalize(m), "match[]")
        if not isinstance(vs, pp.VectorSelector) or vs.offset is not None or vs.at is not None:
            raise RewriteError(f'match[] must be a plain series selector such as up{{job="x"}}, got {m!r}')
        for p in policies:
            text = _selector_text(vs, "", p)
            _verify(text, policies)
            out.append(text)
    return tuple(out)


def _verify(final: str, policies: Policies) -> None:
    """Last line of defence: every selector of the printed query carries a whole policy selector."""
    tree = _parse(final, "the rewritten query")
    wanted = [frozenset((m.name, m.op, m.value) for m in p.matchers) for p in policies]
    problems: list[str] = []

    def check(node: Any) -> bool:
        if isinstance(node, pp.Call) and node.func.name in _REFUSED_FUNCS:
            problems.append(node.func.name)
        elif isinstance(node, pp.VectorSelector):
            have = set(_triples(node))
            if node.name:
                have.add(("__name__", "=", node.name))
            if not any(w <= have for w in wanted):
                problems.append(str(node))
        return not problems

    pp.walk(tree, check)
    if problems:
        raise RewriteError("internal error: the query could not be restricted safely")
