"""The process state every handler reads, and its application key."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from gateway.cache import PolicyCache
from gateway.config import Config
from gateway.decision_cache import DecisionCache
from gateway.store import Store


@dataclass
class State:
    """Everything a handler needs. ``config`` is swapped whole on reload."""

    config: Config
    store: Store
    cache: PolicyCache
    draining: bool = False
    in_flight: int = 0  # data-path requests being served (streams and tails included); drain waits on it
    idle: asyncio.Event = field(default_factory=asyncio.Event)  # set whenever in_flight drops to 0

    def request_done(self) -> None:
        self.in_flight -= 1
        if not self.in_flight:
            self.idle.set()
    extras: dict[str, Any] = field(default_factory=dict)
    decisions: DecisionCache = field(default_factory=DecisionCache)  # valid per cache.generation and config


STATE = web.AppKey("state", State)


def get_state(request: web.Request) -> State:
    return request.app[STATE]
