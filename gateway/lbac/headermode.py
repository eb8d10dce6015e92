"""Header mode: make what the backend filters the same as what it runs.

Loki's LBAC middleware looks at ``r.URL.Query()`` (``pkg/labelaccess/middleware.go``), while
its handlers execute the merged form, body first. A restricted read could hide one ``query``
in the body from the filter and another in the URL. So, as in enforce mode, URL and form body
are merged, a single-valued parameter given twice is refused, and everything travels in the URL.
"""

from __future__ import annotations

from typing import Final
from urllib.parse import urlencode

from gateway.errors import ProxyError
from gateway.lbac.restrict import Restriction, _pairs

#: Parameters the APIs read as lists (OR-ed selectors); every other one must appear once.
REPEATABLE: Final = frozenset({"match[]", "match"})
MAX_URL_QUERY: Final = 64 * 1024  # Loki's and Mimir's HTTP servers refuse far longer request lines


def normalize(raw_query: str, body: bytes | None) -> Restriction:
    """The request's parameters merged into its URL (the body emptied), or a 400 for a duplicate."""
    pairs = _pairs(raw_query, body)
    seen: set[str] = set()
    for name, _ in pairs:
        if name in seen and name not in REPEATABLE:
            raise ProxyError(400, f"parameter {name!r} given more than once (URL and body are merged)",
                             "bad_query")
        seen.add(name)
    encoded = urlencode(pairs)
    if len(encoded) > MAX_URL_QUERY:
        raise ProxyError(400, f"label-restricted query parameters exceed {MAX_URL_QUERY} bytes", "bad_query")
    return Restriction(query=encoded, body=b"" if body else None)
