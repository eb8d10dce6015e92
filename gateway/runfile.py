"""A note, per config file, of the gateway serving it: which database it uses, and its pid.

``gateway token bootstrap`` reads it to refuse creating a second, empty embedded database while a
gateway started from the same file serves another one (for example with GATEWAY_DATABASE_URL set in
its environment only): the token would be printed, and refused by the running gateway.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from gateway.config import Config
from gateway.startup import redact


def database_of(cfg: Config) -> str:
    """What identifies the database a config uses: the URL without password, or the embedded data_dir."""
    return redact(cfg.database.url) if cfg.database.url else f"embedded PostgreSQL in {cfg.data_dir.resolve() / 'pg'}"


def path_for(config_path: str | os.PathLike[str]) -> Path:
    key = hashlib.sha256(str(Path(config_path).resolve()).encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"gateway-run-{os.getuid()}" / f"{key}.json"


def pid_alive(pid: int) -> bool:
    """Whether a process of this pid exists (one of another user's counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def write(config_path: str, cfg: Config, database: str) -> None:
    """Record this process as the gateway of ``config_path`` until it exits."""
    path = path_for(config_path)
    with contextlib.suppress(OSError):
        path.parent.mkdir(mode=0o700, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"pid": os.getpid(), "config": str(Path(config_path).resolve()),
                                   "database": database, "listen": f"{cfg.listen[0]}:{cfg.listen[1]}"}))
        tmp.replace(path)
        pid = os.getpid()
        atexit.register(_remove, path, pid)


def _remove(path: Path, pid: int) -> None:
    if os.getpid() != pid:  # a forked worker exiting must not remove the parent's note
        return
    with contextlib.suppress(OSError, ValueError):
        if json.loads(path.read_text()).get("pid") == pid:
            path.unlink()


def running(config_path: str) -> dict[str, Any] | None:
    """The live gateway serving ``config_path``, or None."""
    try:
        data = json.loads(path_for(config_path).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("pid"), int) or not pid_alive(data["pid"]):
        return None
    return data
