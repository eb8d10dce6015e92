"""Cost bounds for rewriting, checked on the raw text before anything is parsed.

The PromQL rewrite costs roughly (operators + 1)³ × policies + policies³ (the parser and
printer re-walk nested unions): a 499-character chain ``a+a+...+a`` took 10 s, and 60 ``match[]``
times 400 client-sent selectors made an 833 KB upstream request. So a request is measured
first (a linear scan), refused with 400 past the bounds, and its :func:`weight` decides
whether the rewrite may run on the event loop or must go to the rewrite process pool.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from dataclasses import dataclass
from itertools import accumulate
from typing import Final, Generic, TypeVar

from gateway.lbac import RewriteError

MAX_OPERATORS: Final = 64  # binary and set operators in one PromQL/LogQL query
MAX_TERMS: Final = 512  # names and selectors in one query
MAX_MATCH_VALUES: Final = 64  # match[] values of one series/labels request
MAX_MATCH_PRODUCT: Final = 256  # match[] values × label policies: the selectors sent upstream
MAX_POLICIES: Final = 128  # label policies applied to one request (token ∩ team rules ∩ client)
#: Weights are in rewrite microseconds on a loaded 2-core machine (about 4x less when idle), measured.
INLINE_WEIGHT: Final = 2000  # at most ~2 ms of rewriting on the event loop; heavier goes to the pool
MAX_WEIGHT: Final = 2_200_000  # 64 operators x 8 policies, or 128 policies: ~0.6 s idle, ~2.3 s loaded
MAX_CACHED_RESULT: Final = 16 * 1024  # characters; a bigger rewritten result is recomputed, never kept
#: Bracket nesting of one query or selector. promql-parser's cost explodes with depth (8,000 levels
#: blocked a worker for 8.7 s, 12,000 crashed it with SIGSEGV) and our LogQL lexer walks nested
#: parentheses once per level; no real query comes near 64. Checked before any parser sees the text.
MAX_DEPTH: Final = 64

_STRINGS: Final = re.compile(r'"(?:[^"\\]|\\.)*"?|\'(?:[^\'\\]|\\.)*\'?|`[^`]*`?|#[^\n]*', re.DOTALL)
_BRACES: Final = re.compile(r"\{[^{}]*\}?")
_OPERATORS: Final = re.compile(r"==|!=|<=|>=|[-+*/%^<>]|\b(?:and|or|unless|atan2)\b", re.IGNORECASE)
_NAMES: Final = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")
_NOT_BRACKETS: Final = re.compile(r"[^()]+")
_AS_PARENS: Final = str.maketrans("[{]}", "(())")
_DELTA: Final = {"(": 1, ")": -1}


@dataclass(frozen=True, slots=True)
class Cost:
    operators: int
    terms: int


def measure(query: str) -> Cost:
    """Operators and terms of a query, over-counted rather than under (strings and matchers blanked)."""
    bare = _STRINGS.sub(" ", query)
    selectors = len(_BRACES.findall(bare))
    bare = _BRACES.sub(" ", bare)
    return Cost(len(_OPERATORS.findall(bare)), selectors + len(_NAMES.findall(bare)))


def nesting_exceeds(text: str, limit: int = MAX_DEPTH) -> bool:
    """Whether brackets outside strings nest deeper than ``limit``: one linear scan, no parser.

    About 45 ns per bracket (a 1 MiB form body of brackets: ~45 ms); text with at most ``limit``
    opening brackets is answered from three counts. Unbalanced text is left for the parser to refuse.
    """
    if text.count("(") + text.count("[") + text.count("{") <= limit:
        return False
    bare = _NOT_BRACKETS.sub("", _STRINGS.sub(" ", text).translate(_AS_PARENS))
    return max(accumulate(map(_DELTA.__getitem__, bare), initial=0)) > limit


def check_nesting(text: str) -> None:
    """Refuse (RewriteError, a 400) text nested deeper than MAX_DEPTH, before anything parses it."""
    if nesting_exceeds(text):
        raise RewriteError(f"the query nests deeper than {MAX_DEPTH} levels of brackets")


def check_query(query: str, policies: int) -> Cost:
    """Refuse (RewriteError, a 400) a query whose rewrite could cost more than the bounds allow."""
    check_policies(policies)
    check_nesting(query)
    cost = measure(query)
    if cost.operators > MAX_OPERATORS:
        raise RewriteError(f"the query has more than {MAX_OPERATORS} operators; label-restricted queries are "
                           "limited to keep rewriting cheap")
    if cost.terms > MAX_TERMS:
        raise RewriteError(f"the query has more than {MAX_TERMS} names and selectors; label-restricted queries "
                           "are limited to keep rewriting cheap")
    return cost


def check_matches(n_matches: int, policies: int) -> None:
    check_policies(policies)
    if n_matches > MAX_MATCH_VALUES:
        raise RewriteError(f"more than {MAX_MATCH_VALUES} match[] selectors")
    if max(n_matches, 1) * policies > MAX_MATCH_PRODUCT:
        raise RewriteError(f"{n_matches} match[] selectors times {policies} label policies exceed "
                           f"{MAX_MATCH_PRODUCT} selectors; send fewer match[] values")


def check_policies(policies: int) -> None:
    if policies > MAX_POLICIES:
        raise RewriteError(f"more than {MAX_POLICIES} label policies apply to this request")


def promql_weight(cost: Cost, policies: int) -> int:
    """Estimated rewrite cost (fitted: 32 ops x 16 policies 0.58 s, 64 x 8 2.3 s, ``up`` x 128 0.44 s)."""
    return (cost.operators + 1) ** 3 * policies + policies**3


def check_weight(weight: int, cost: Cost, policies: int) -> None:
    if weight > MAX_WEIGHT:
        raise RewriteError(f"{cost.operators} operators under {policies} label policies are too costly to restrict "
                           f"(at most 64 operators under 8 policies, 50 under 16); simplify the query")


def logql_weight(cost: Cost, policies: int) -> int:
    """The LogQL lexer is linear in operators × policies (64 × 16 took 8 ms), in the same units."""
    return (cost.operators + 1) * policies * 8


K = TypeVar("K")
V = TypeVar("V")


class SizedLRU(Generic[K, V]):
    """A least-recently-used cache that refuses values bigger than ``max_size`` (never kept)."""

    def __init__(self, max_entries: int, max_size: int = MAX_CACHED_RESULT) -> None:
        self._data: OrderedDict[K, V] = OrderedDict()
        self.max_entries, self.max_size = max_entries, max_size

    def get(self, key: K) -> V | None:
        v = self._data.get(key)
        if v is not None:
            self._data.move_to_end(key)
        return v

    def put(self, key: K, value: V, size: int) -> None:
        if size > self.max_size:
            return
        self._data[key] = value
        self._data.move_to_end(key)
        while len(self._data) > self.max_entries:
            self._data.popitem(last=False)

    def clear(self) -> None:
        self._data.clear()

    def __len__(self) -> int:
        return len(self._data)
