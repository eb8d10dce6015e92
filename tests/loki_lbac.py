"""X-Prom-Label-Policy parsed exactly as Loki's ``pkg/labelaccess/propagation.go`` does.

``ExtractLabelMatchersFromHeaders``: every header value is split on ``,`` (before anything
is unescaped), each piece split at the first ``:`` into tenant and selector
(``policyFromHeaderValue``), the selector ``url.PathUnescape``d and parsed with Prometheus'
``parser.ParseMetricSelector``. Any failure makes the middleware (``middleware.go``) answer
400 ``{"status":"error","error":"invalid label policy header value..."}``. Written from that
code, independently of the gateway's own parser (this uses promql-parser directly).
"""

from __future__ import annotations

import re

import promql_parser as pp

_HEX = re.compile(r"%([0-9A-Fa-f]{2})")


class PolicyHeaderError(ValueError):
    """The message Loki answers with (status 400)."""


def path_unescape(s: str) -> str:
    """Go's ``url.PathUnescape``: every ``%`` needs two hex digits; ``+`` stays ``+``."""
    i = 0
    while (i := s.find("%", i)) >= 0:
        if not _HEX.match(s, i):
            bad = s[i:i + 3]
            raise PolicyHeaderError(f"invalid label policy header value unable to url escape selector string, "
                                    f"'invalid URL escape \"{bad}\"'")
        i += 3
    raw = _HEX.sub(lambda m: chr(int(m.group(1), 16)), s).encode("latin-1")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:  # Go keeps the bytes, then the selector parser rejects invalid UTF-8
        raise PolicyHeaderError("invalid label policy header value unable to parse selector string") from None


_PAD = '__loki_lbac_pad__="x"'
_EMPTY_ONLY = "at least one non-empty matcher"


def parse_metric_selector(text: str) -> list[tuple[str, str, str]]:
    """``parser.ParseMetricSelector``: a plain vector selector (name and/or matchers) or an error.

    Unlike ``ParseExpr``, Prometheus' ``ParseMetricSelector`` skips the AST check, so a selector whose
    matchers all match the empty string (``{env!="dev"}``, ``{}``) is valid there; promql-parser always
    runs that check, so such a selector is re-parsed with one padding matcher that is then dropped.
    """
    padded = False
    try:
        try:
            node = pp.parse(text)
        except ValueError as exc:
            brace = text.find("{")
            if _EMPTY_ONLY not in str(exc) or brace < 0:
                raise
            rest = text[brace + 1:].lstrip()
            node = pp.parse(f"{text[:brace]}{{{_PAD}{'' if rest.startswith('}') else ','}{text[brace + 1:]}")
            padded = True
    except (ValueError, BaseException) as exc:  # pyo3 panics are BaseExceptions
        if isinstance(exc, KeyboardInterrupt | SystemExit):
            raise
        raise PolicyHeaderError(f"invalid label policy header value unable to parse selector string '{text}'"
                                ) from None
    if (not isinstance(node, pp.VectorSelector) or node.offset is not None or node.at is not None
            or node.matchers.or_matchers):
        raise PolicyHeaderError(f"invalid label policy header value unable to parse selector string '{text}'")
    ops = {"MatchOp.Equal": "=", "MatchOp.NotEqual": "!=", "MatchOp.Re": "=~", "MatchOp.NotRe": "!~"}
    out = [(m.name, ops[str(m.op)], m.value) for m in node.matchers.matchers
           if not (padded and m.name == "__loki_lbac_pad__")]
    if node.name:
        out.insert(0, ("__name__", "=", node.name))
    return out


def extract(values: list[str]) -> dict[str, list[list[tuple[str, str, str]]]]:
    """tenant → list of policies (each a list of (name, op, value)); raises PolicyHeaderError."""
    out: dict[str, list[list[tuple[str, str, str]]]] = {}
    for value in values:
        for piece in value.split(","):
            tenant, sep, selector = piece.partition(":")
            if not sep:
                raise PolicyHeaderError("invalid label policy header value, unable to parse tenant and selector")
            out.setdefault(tenant, []).append(parse_metric_selector(path_unescape(selector)))
    return out
