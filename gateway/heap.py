"""A worker's garbage-collector policy: what start-up built is frozen, and young objects are collected seldom.

Reference counting frees almost everything a request allocates before the request ends; the collector only
has to find cycles, and on the warm data path it finds few (``bench.perreq``: about 4 objects per 10,000
requests). CPython's default starts a young collection every 700 net allocations of container objects,
and every tenth of those a middle one. A token's first use leaves three such objects alive for as long
as the decision cache keeps them (its key, the ``Decision`` and the ``Identity``; ``MAX_DECISIONS`` first
uses), so with the default each is traversed by two or three collections before it is dropped, and each
traversal touches its token and policy, scattered through the snapshot: about 1.7 µs per first use (gen0
0.5-0.7, gen1 0.8, a full collection about every 80,000 first uses 0.3-0.5; bench/README.md). Past
``YOUNG_THRESHOLD`` net allocations most of them have died unvisited. What the threshold costs is memory
held by cyclic garbage between collections (at most that many container objects, a few MB) and a longer
young collection when one comes (about 10 ms at 50,000 young objects, no longer than the middle
collections the default already runs: 7 to 20 ms in the same loop).
"""

from __future__ import annotations

import gc
from typing import Final

#: Young collections every this many net allocations of container objects (CPython's default: 700).
YOUNG_THRESHOLD: Final = 50_000


def settle() -> None:
    """Collect, freeze what is alive (a full collection then never walks it: the first snapshot's 100,000
    tokens took tens of ms each time), and collect young objects every ``YOUNG_THRESHOLD`` allocations."""
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, middle, old)
