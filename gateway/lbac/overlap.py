"""Inclusion-exclusion over OR-ed label policies, for quantities that add up over streams.

A label policy is an OR of selectors P1..Pn. For a quantity Q that is a sum over streams (bytes,
entries, chunks, a ``count_over_time`` summed by some labels, a pattern's sample counts), the value
for the streams matching any selector is exact by inclusion-exclusion:

    Q(P1 or ... or Pn) = sum over non-empty subsets S of (-1)^(|S|+1) * Q(AND of S)

and AND of selectors is one selector (the matchers side by side; LogQL and PromQL accept several
matchers on one label). Subsets holding two selectors that no label set can satisfy together
(:func:`gateway.lbac.fanout.disjoint`'s check) contribute nothing and are left out, so disjoint
policies cost n requests, overlapping ones up to 2^n - 1. At most :data:`MAX_TERMS` terms are
asked for; beyond, the caller refuses.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from itertools import combinations
from typing import Final

from gateway.policy.selector import LabelMatcher, MatchOpStr, Selector

__all__ = ["MAX_TERMS", "Term", "TooManyTerms", "disjoint_pieces", "signed_intersections"]

#: Most upstream requests one inclusion-exclusion may cost (4 overlapping selectors: 15).
MAX_TERMS: Final = 15


class TooManyTerms(ValueError):
    """The policies overlap so much that inclusion-exclusion would cost more than MAX_TERMS requests."""


@dataclass(frozen=True, slots=True)
class Term:
    """One signed intersection: add ``sign`` times the quantity measured under ``selector``."""

    sign: int  # +1 or -1
    selector: Selector
    members: tuple[int, ...]  # indexes of the policies intersected (for logs and tests)


def intersect(selectors: tuple[Selector, ...]) -> Selector:
    """The AND of selectors as one selector: every matcher once, in first-seen order."""
    seen: dict[LabelMatcher, None] = {}
    for s in selectors:
        for m in s.matchers:
            seen.setdefault(m, None)
    return Selector(tuple(seen))


def signed_intersections(policies: tuple[Selector, ...],
                         disjoint: Callable[[Selector, Selector], bool]) -> tuple[Term, ...]:
    """The inclusion-exclusion terms for the OR of ``policies`` (simplified by the caller).

    ``disjoint(a, b)`` must be sound (True only when no label set matches both); subsets with such
    a pair are empty and skipped. Raises :class:`TooManyTerms` beyond :data:`MAX_TERMS`.
    """
    n = len(policies)
    apart = {(i, j) for i in range(n) for j in range(i + 1, n) if disjoint(policies[i], policies[j])}
    terms: list[Term] = []
    for size in range(1, n + 1):
        for members in combinations(range(n), size):
            if any((i, j) in apart for k, i in enumerate(members) for j in members[k + 1 :]):
                continue
            terms.append(Term(1 if size % 2 else -1, intersect(tuple(policies[i] for i in members)), members))
            if len(terms) > MAX_TERMS:
                raise TooManyTerms(
                    f"{n} label policies overlap so much that an exact answer would take more than "
                    f"{MAX_TERMS} upstream requests"
                )
    return tuple(terms)


# Each matcher's complement, exact where a missing label reads as the empty value (Loki, Prometheus).
_NEGATED: Final[dict[MatchOpStr, MatchOpStr]] = {"=": "!=", "!=": "=", "=~": "!~", "!~": "=~"}


def _minus(piece: Selector, other: Selector, disjoint: Callable[[Selector, Selector], bool]) -> list[Selector]:
    """``piece AND NOT other`` as disjoint selectors: for other's matchers m1..mk, the pieces
    ``piece, m1..m(i-1), not mi`` (NOT of an AND is an OR of complements, made disjoint by order)."""
    if disjoint(piece, other):
        return [piece]
    out: list[Selector] = []
    prefix: list[LabelMatcher] = []
    for m in other.matchers:
        if m not in piece.matchers:  # (m in piece: NOT m leaves nothing of it)
            cut = intersect((piece, Selector((*prefix, LabelMatcher(m.name, _NEGATED[m.op], m.value)))))
            if not disjoint(cut, cut):  # a selector at odds with itself matches nothing
                out.append(cut)
        prefix.append(m)
    return out


def disjoint_pieces(policies: tuple[Selector, ...], disjoint: Callable[[Selector, Selector], bool],
                    most: int) -> tuple[Selector, ...]:
    """Selectors no two of which match one label set, whose OR is the OR of ``policies``:
    ``P1``, ``P2 and not P1``, ``P3 and not P1 and not P2``... each negation split at its matchers.

    Where an answer holds entries that cannot be told apart by their labels (a log query whose
    pipeline rewrites labels: ``keep``, ``drop``, ``label_format``), per-piece answers are merged
    without deduplication: a stream reaches exactly one piece. Raises :class:`TooManyTerms` beyond
    ``most`` pieces.
    """
    pieces: list[Selector] = []
    for i, policy in enumerate(policies):
        mine = [policy]
        for other in policies[:i]:
            mine = [cut for piece in mine for cut in _minus(piece, other, disjoint)]
        pieces.extend(mine)
        if len(pieces) > most:
            raise TooManyTerms(f"{len(policies)} label policies overlap so much that an exact answer would "
                               f"take more than {most} upstream requests")
    return tuple(pieces)
