"""Text the store can hold: one check for every string the admin API and the page store or filter on.

PostgreSQL's ``text`` cannot hold NUL, and UTF-8 cannot encode a lone surrogate (JSON's ``"\\ud800"``
decodes to one). Either reached asyncpg or ``.encode()`` and came back as a 500; both are refused
here, before any handler looks at the value, with a 400 (409 on Cloud paths) naming the field.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Final

from gateway.admin.errors import bad_request

#: How deep a JSON body is walked (``json.loads`` already bounds nesting by recursion; bodies are small).
_MAX_DEPTH: Final = 64


def problem(value: str) -> str | None:
    """Why ``value`` cannot be stored, or None when it can."""
    if "\x00" in value:
        return "must not contain a NUL character"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return "must be valid Unicode text (it holds a lone surrogate)"
    return None


def check(value: str, field: str) -> str:
    """``value`` when storable; a 400 naming ``field`` otherwise."""
    why = problem(value)
    if why is not None:
        raise bad_request(f"{field} {why}", field)
    return value


def check_tree(value: Any, field: str = "", depth: int = 0) -> None:
    """Every string of a decoded JSON document (keys and values); the field is its JSON path
    (``realms[0].labelPolicies[1].selector``)."""
    if isinstance(value, str):
        check(value, field or "request body")
    elif isinstance(value, dict):
        if depth >= _MAX_DEPTH:
            raise bad_request("request body is nested too deeply", field or None)
        for key, item in value.items():
            path = f"{field}.{key}" if field else str(key)
            check(key, path)
            check_tree(item, path, depth + 1)
    elif isinstance(value, list):
        if depth >= _MAX_DEPTH:
            raise bad_request("request body is nested too deeply", field or None)
        for i, item in enumerate(value):
            check_tree(item, f"{field}[{i}]", depth + 1)


def check_params(*params: Mapping[str, Any]) -> None:
    """Query, path and form parameters: names and values."""
    for mapping in params:
        items: Iterable[tuple[Any, Any]] = mapping.items()
        for key, val in items:
            name = check(str(key), "parameter name")
            if isinstance(val, str):
                check(val, name)
