"""The Access Policies page (served by the gateway itself with aiohttp-jinja2)."""

from __future__ import annotations

from aiohttp import web


def setup(app: web.Application) -> None:
    """Register the page's routes on ``app`` (placeholder until the page lands)."""
