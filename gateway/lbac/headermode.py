"""Header mode: make what the backend filters the same as what it runs.

Loki's LBAC middleware looks at ``r.URL.Query()`` (``pkg/labelaccess/middleware.go``), while
its handlers execute the merged form, body first. A restricted read could hide one ``query``
in the body from the filter and another in the URL. So, as in enforce mode, the parameters are
read once as the backend reads them (:mod:`gateway.lbac.params`: a single-valued parameter given
twice is refused, an empty one is absent) and everything travels in the URL.
"""

from __future__ import annotations

from typing import Final
from urllib.parse import urlencode

from gateway.errors import ProxyError
from gateway.lbac.restrict import Restriction, _pairs

MAX_URL_QUERY: Final = 64 * 1024  # Loki's and Mimir's HTTP servers refuse far longer request lines


def normalize(raw_query: str, body: bytes | None) -> Restriction:
    """The request's parameters merged into its URL (the body emptied), or a 400 for a duplicate."""
    encoded = urlencode(_pairs(raw_query, body))
    if len(encoded) > MAX_URL_QUERY:
        raise ProxyError(400, f"label-restricted query parameters exceed {MAX_URL_QUERY} bytes", "bad_query")
    return Restriction(query=encoded, body=b"" if body else None)
