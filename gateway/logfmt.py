"""One log format for every line on stderr: ``text`` for people at a terminal, ``json`` for collectors.

Start-up messages, errors, library warnings and the access log all go through here, so a log
pipeline never sees a mix. ``auto`` (the default) picks text when stderr is a terminal.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Mapping
from typing import Any, Final

FORMATS: Final = ("json", "text")
_format = "json"
ACCESS_JSON: Final = '{"level":"info","logger":"gateway.access",'
# One encoder for every access line (json.dumps with options builds a new encoder per call, and
# JSONEncoder.encode a new C encoder): the C encoder itself, made once, with JSONEncoder's defaults
# (ensure_ascii, allow_nan) and compact separators; an entry holds no cycles, so no cycle check.
_make: Any = getattr(json.encoder, "c_make_encoder", None)  # (CPython's; None only without _json)
json_string: Final[Any] = json.encoder.encode_basestring_ascii  # a str as the access log's encoder writes it
_iterencode: Any = _make(None, str, json_string, None, ":", ",", False, False, True) \
    if _make is not None else json.JSONEncoder(separators=(",", ":"), default=str).iterencode


def _ENCODE(entry: Mapping[str, Any]) -> str:  # noqa: N802 - a constant-like callable
    return "".join(_iterencode(entry, 0) if _make is not None else _iterencode(entry))


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts)) + f".{int(ts * 1000) % 1000:03d}Z"


def _value(v: Any) -> str:
    s = v if isinstance(v, str) else json.dumps(v, default=str, separators=(",", ":"))
    return json.dumps(s) if (not s or any(c in s for c in ' "=\n\t')) else s


class JsonFormatter(logging.Formatter):
    """``{"time": <unix seconds>, "level": "info", "logger": "gateway", "msg": "..."}``, like the access log."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {"time": round(record.created, 3), "level": record.levelname.lower(),
                               "logger": record.name, "msg": record.getMessage()}
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """``2026-01-31T12:00:00.000Z INFO gateway: message``; a traceback only for unexpected errors."""

    def format(self, record: logging.LogRecord) -> str:
        line = f"{_iso(record.created)} {record.levelname} {record.name}: {record.getMessage()}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def resolve(choice: str | None) -> str:
    """``json``/``text`` as given; ``auto`` or None: text on a terminal, JSON otherwise."""
    if choice in FORMATS:
        return choice
    return "text" if sys.stderr.isatty() else "json"


def setup(level: str, choice: str | None = None) -> str:
    """Route every logger to stderr in one format; returns the format chosen."""
    global _format
    _format = resolve(choice)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(TextFormatter() if _format == "text" else JsonFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper()))
    return _format




def current() -> str:
    return _format


def access_line(entry: Mapping[str, Any], fmt: str | None = None) -> str:
    """An access-log entry (its ``time`` in unix seconds) in the process's format."""
    if (fmt or _format) == "json":  # the keys every JSON line has, then the entry's own
        return ACCESS_JSON + _ENCODE(entry)[1:]
    rest = " ".join(f"{k}={_value(v)}" for k, v in entry.items() if k != "time" and v is not None)
    return f"{_iso(float(entry.get('time', time.time())))} INFO gateway.access: {rest}"
