"""Go's ``r.ParseForm`` for tests: what Loki, Mimir and Prometheus read of a request's parameters.

Written from Go's source, independently of the gateway's reader (``gateway.lbac.params``):

* ``net/url`` ``parseQuery``: the text is cut at every ``&``; a piece containing ``;`` is skipped with the
  error "invalid semicolon separator in query"; an empty piece is skipped; the rest is cut at the first
  ``=`` (no ``=``: the value is empty) and both halves ``QueryUnescape``d (``+`` is a space, ``%`` needs
  two hex digits, else the piece is skipped with an error);
* ``net/http`` ``ParseForm``: for POST, PUT and PATCH with an ``application/x-www-form-urlencoded`` body,
  the body's values come first, then the URL's (``copyValues`` appends); other methods read the URL only;
* ``r.Form.Get(name)`` / ``r.FormValue(name)``: the first value, ``""`` when there is none;
  ``r.Form[name]``: every value.

Loki answers 400 to a request whose form does not parse (``pkg/util/server/middleware.go``
``NewPrepopulateMiddleware``); Prometheus' ``FormValue`` ignores the error.
"""

from __future__ import annotations

import re

_HEX = re.compile(r"%[0-9A-Fa-f]{2}")


class FormError(ValueError):
    pass


def query_unescape(s: str) -> str:
    """``url.QueryUnescape``; the bytes decoded as UTF-8 (invalid bytes replaced, for comparison only)."""
    out = bytearray()
    i = 0
    while i < len(s):
        c = s[i]
        if c == "%":
            if not _HEX.match(s, i):
                raise FormError(f"invalid URL escape {s[i:i + 3]!r}")
            out.append(int(s[i + 1:i + 3], 16))
            i += 3
            continue
        out += b" " if c == "+" else c.encode()
        i += 1
    return out.decode("utf-8", "replace")


def parse_query(text: str) -> tuple[list[tuple[str, str]], str | None]:
    """``url.ParseQuery`` as ordered pairs, and its first error (the pairs are kept either way)."""
    pairs: list[tuple[str, str]] = []
    err: str | None = None
    for piece in text.split("&") if text else []:
        if ";" in piece:
            err = err or "invalid semicolon separator in query"
            continue
        if not piece:
            continue
        key, _, value = piece.partition("=")
        try:
            pairs.append((query_unescape(key), query_unescape(value)))
        except FormError as exc:
            err = err or str(exc)
    return pairs, err


class Form:
    """``r.Form`` after ``ParseForm``."""

    def __init__(self, method: str, content_type: str, raw_query: str, body: bytes):
        self.pairs: list[tuple[str, str]] = []
        self.error: str | None = None
        ctype = content_type.split(";", 1)[0].strip().lower()
        if method in ("POST", "PUT", "PATCH") and ctype == "application/x-www-form-urlencoded":
            self.pairs, self.error = parse_query(body.decode("latin-1"))
        url_pairs, err = parse_query(raw_query)
        self.pairs += url_pairs
        self.error = self.error or err

    def get(self, name: str) -> str:
        """``r.Form.Get``: the first value, or ""."""
        return next((v for k, v in self.pairs if k == name), "")

    def list(self, name: str) -> list[str]:
        """``r.Form[name]``."""
        return [v for k, v in self.pairs if k == name]
