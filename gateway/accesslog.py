"""One line per data-path request (JSON, or text with ``--log-format text``), written in batches.

Going through ``logging`` for every request (a record, a formatter, a lock and a flushed write
each time) cost a tenth of the gateway's CPU per request in the benchmark; here a line is one
``json.dumps`` appended to a list, and the list is written at most every 200 ms or 512 lines.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from typing import IO, Any, Final

from gateway import logfmt
from gateway.logfmt import access_line

FLUSH_SECONDS: Final = 0.2
FLUSH_LINES: Final = 512


class AccessLog:
    """Collects access-log lines and writes them to ``stream`` (stderr by default) in batches."""

    def __init__(self, stream: IO[str] | None = None, enabled: bool | None = None):
        self.stream = stream
        self.enabled = (logging.getLogger("gateway.access").isEnabledFor(logging.INFO)
                        if enabled is None else enabled)
        self._lines: list[str] = []
        self._timer: asyncio.TimerHandle | None = None

    def write(self, entry: dict[str, Any]) -> None:
        if not self.enabled:
            return
        entry["time"] = round(time.time(), 3)
        self._add(access_line(entry))

    def templated(self) -> bool:
        """Whether lines go out as JSON, so that ``write_json`` may be given one built from a template."""
        return self.enabled and logfmt.current() == "json"

    def write_json(self, head: str) -> None:
        """A JSON line that ``write`` would make of an entry, up to the ``time`` field (added here) and the
        closing brace: the callback path builds its common line from a template (gateway/dataplane/exchange.py)."""
        lines = self._lines  # (_add, inline: this runs per request)
        lines.append(f'{head},"time":{round(time.time(), 3)!r}}}')
        if len(lines) >= FLUSH_LINES:
            self.flush()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(FLUSH_SECONDS, self.flush)

    def _add(self, line: str) -> None:
        self._lines.append(line)
        if len(self._lines) >= FLUSH_LINES:
            self.flush()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(FLUSH_SECONDS, self.flush)

    def flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._lines:
            return
        stream = self.stream or sys.stderr
        stream.write("\n".join(self._lines) + "\n")
        stream.flush()
        self._lines.clear()
