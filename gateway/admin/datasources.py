"""Data sources, teams and the data-source LBAC rules API (placeholder until it lands)."""

from __future__ import annotations

from aiohttp import web


def add_routes(app: web.Application) -> None:
    """Register the data-source and team routes on ``app``."""
