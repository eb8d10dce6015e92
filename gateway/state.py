"""The process state every handler reads, and its application key."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from gateway.cache import PolicyCache
from gateway.config import Config
from gateway.store import Store


@dataclass
class State:
    """Everything a handler needs. ``config`` is swapped whole on reload."""

    config: Config
    store: Store
    cache: PolicyCache
    draining: bool = False
    extras: dict[str, Any] = field(default_factory=dict)


STATE = web.AppKey("state", State)


def get_state(request: web.Request) -> State:
    return request.app[STATE]
