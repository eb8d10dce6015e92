"""The worker's garbage-collector policy (gateway/heap.py), and the micro-benchmark measuring under it."""

from __future__ import annotations

import gc
import sys
from pathlib import Path
from typing import Any

import pytest

from gateway import heap

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, where bench/ lives

from bench import micro  # noqa: E402


def test_settle_freezes_what_is_alive_and_collects_young_objects_seldom() -> None:
    threshold = gc.get_threshold()
    alive = [[i] for i in range(100)]  # containers alive now: frozen with the rest
    try:
        heap.settle()
        assert gc.get_threshold() == (heap.YOUNG_THRESHOLD, *threshold[1:])
        assert gc.get_freeze_count() >= len(alive)
    finally:
        gc.unfreeze()
        gc.set_threshold(*threshold)


def test_the_micro_benchmark_measures_under_the_policy_and_restores_the_collector(
        monkeypatch: pytest.MonkeyPatch) -> None:
    threshold = gc.get_threshold()
    seen: list[tuple[int, ...]] = []
    real = micro.hot_path

    def hot_path(snap: micro.Snapshot, n: int) -> dict[str, Any]:
        seen.append(gc.get_threshold())
        return real(snap, n)

    monkeypatch.setattr(micro, "hot_path", hot_path)
    micro.run(n_tokens=40, n_policies=4, n=4)
    assert seen == [(heap.YOUNG_THRESHOLD, *threshold[1:])]
    assert gc.get_threshold() == threshold and gc.get_freeze_count() == 0
