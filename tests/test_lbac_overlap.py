"""Inclusion-exclusion terms: checked against brute force over every label set of a small universe."""

from __future__ import annotations

import itertools
import random

import pytest

from gateway.lbac.fanout import disjoint
from gateway.lbac.overlap import MAX_TERMS, TooManyTerms, intersect, signed_intersections
from gateway.policy.selector import parse_selector

_VALUES = ("", "a", "b", "c")
_UNIVERSE = [dict(zip(("env", "team", "app"), v, strict=True)) for v in itertools.product(_VALUES, repeat=3)]
_MATCHERS = ['env="a"', 'env!="a"', 'env=~"a|b"', 'team="b"', 'team!~"b|c"', 'app="c"', 'app=~".+"', 'env="b"']


def _random_policies(rng: random.Random, n: int) -> tuple:
    out = []
    for _ in range(n):
        ms = rng.sample(_MATCHERS, rng.randint(1, 2))
        out.append(parse_selector("{" + ", ".join(ms) + "}"))
    return tuple(out)


@pytest.mark.parametrize("seed", range(60))
def test_signed_counts_equal_the_union(seed: int) -> None:
    rng = random.Random(seed)
    pols = _random_policies(rng, rng.randint(1, 4))
    weights = {i: rng.randint(1, 9) for i in range(len(_UNIVERSE))}  # a stream's "bytes"
    union = sum(w for i, w in weights.items() if any(p.matches(_UNIVERSE[i]) for p in pols))
    total = 0
    for t in signed_intersections(pols, disjoint):
        total += t.sign * sum(w for i, w in weights.items() if t.selector.matches(_UNIVERSE[i]))
    assert total == union


def test_disjoint_policies_cost_one_term_each() -> None:
    pols = tuple(parse_selector(s) for s in ('{env="a"}', '{env="b"}', '{env="c"}'))
    terms = signed_intersections(pols, disjoint)
    assert [t.sign for t in terms] == [1, 1, 1]


def test_overlap_beyond_the_cap_is_refused() -> None:
    pols = tuple(parse_selector(f'{{l{i}="x"}}') for i in range(5))  # 31 terms
    with pytest.raises(TooManyTerms):
        signed_intersections(pols, disjoint)
    assert len(signed_intersections(pols[:4], disjoint)) == MAX_TERMS


def test_intersection_keeps_each_matcher_once() -> None:
    a, b = parse_selector('{env="a", team="b"}'), parse_selector('{team="b", app="c"}')
    assert str(intersect((a, b))) == '{env="a", team="b", app="c"}'
