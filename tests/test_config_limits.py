"""limits: head and body read deadlines and the per-worker connection cap (issue 12, item 4)."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.config import ConfigError, Limits, parse_config
from tests.conftest import TEST_CONFIG


def _parse(limits: Any) -> Limits:
    return parse_config({**TEST_CONFIG, "limits": limits}, env={}).limits


def test_defaults_and_overrides() -> None:
    assert (_parse({}).head_timeout, _parse({}).body_idle_timeout, _parse({}).max_connections) == (30.0, 30.0, 4096)
    got = _parse({"head_timeout": 5, "body_idle_timeout": 2.5, "max_connections": 100})
    assert (got.head_timeout, got.body_idle_timeout, got.max_connections) == (5.0, 2.5, 100)
    assert _parse({}).fanout_memory == 256 * 1024 * 1024 and _parse({"fanout_memory": 1 << 20}).fanout_memory == 1 << 20


@pytest.mark.parametrize(("limits", "expected"), [
    ({"head_timeout": 0}, "limits.head_timeout: must be a positive number of seconds"),
    ({"body_idle_timeout": "30s"}, "limits.body_idle_timeout: must be a positive number of seconds"),
    ({"max_connections": 1.5}, "limits.max_connections: must be a positive number of connections"),
    ({"max_connections": True}, "limits.max_connections: must be a positive number of connections"),
    ({"fanout_memory": 0}, "limits.fanout_memory: must be a positive number of bytes"),
    ({"fanout_memory": "256MiB"}, "limits.fanout_memory: must be a positive number of bytes"),
])
def test_bad_values_are_named(limits: dict[str, Any], expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        _parse(limits)
    assert any(expected in p for p in info.value.problems), info.value.problems
