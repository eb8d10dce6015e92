"""``python -m bench.probe MODULE ARGS...``: run ``python -m MODULE ARGS...`` with two hooks, inherited by
forked workers, for ``bench.perreq``'s per-request counts of the floor and the gateway: SIGUSR2 writes the
process's garbage-collector counts to ``$BENCH_PROBE_DIR/PID.json``; SIGUSR1 starts ``cProfile`` (function
calls counted, Python's and C's), and the next SIGUSR1 stops it and writes ``$BENCH_PROBE_DIR/PID.calls.json``
(calls and own seconds by function; the profiler's overhead inflates the seconds, not the counts); SIGWINCH
likewise counts the bytecode instructions each Python function executes (``sys.settrace``: slow, but a
count that no other process on the machine can move) into ``PID.ops.json``."""

from __future__ import annotations

import gc
import json
import os
import runpy
import signal
import sys
from pathlib import Path
from typing import Any


def _dump(*_: Any) -> None:
    out = Path(os.environ["BENCH_PROBE_DIR"]) / f"{os.getpid()}.json"
    stats = gc.get_stats()
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps({"collections": [s["collections"] for s in stats],
                               "collected": sum(s["collected"] for s in stats),
                               "blocks": sys.getallocatedblocks()}))
    tmp.replace(out)


_profile: list[Any] = []


def _toggle(*_: Any) -> None:
    import cProfile
    import pstats
    if not _profile:
        prof = cProfile.Profile()
        _profile.append(prof)
        prof.enable()
        return
    prof = _profile.pop()
    prof.disable()
    stats = pstats.Stats(prof).stats  # type: ignore[attr-defined]
    calls = {f"{Path(k[0]).name}:{k[1]}:{k[2]}": [v[1], v[2]] for k, v in stats.items()}  # calls, own seconds
    out = Path(os.environ["BENCH_PROBE_DIR"]) / f"{os.getpid()}.calls.json"
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(calls))
    tmp.replace(out)


_ops: dict[str, list[int]] = {}
_tracing: list[bool] = []


def _trace(frame: Any, event: str, _arg: Any) -> Any:
    code = frame.f_code
    key = f"{Path(code.co_filename).name}:{code.co_firstlineno}:{code.co_name}"
    row = _ops.get(key)
    if row is None:
        row = _ops[key] = [0, 0]
    if event == "call":
        row[0] += 1
        frame.f_trace_opcodes = True
    elif event == "opcode":
        row[1] += 1
    return _trace


def _toggle_ops(*_: Any) -> None:
    if not _tracing:
        _ops.clear()
        _tracing.append(True)
        sys.settrace(_trace)
        return
    sys.settrace(None)
    _tracing.clear()
    out = Path(os.environ["BENCH_PROBE_DIR"]) / f"{os.getpid()}.ops.json"
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(_ops))
    tmp.replace(out)


def main() -> None:
    signal.signal(signal.SIGWINCH, _toggle_ops)
    signal.signal(signal.SIGUSR2, _dump)
    signal.signal(signal.SIGUSR1, _toggle)
    module, sys.argv = sys.argv[1], [sys.argv[1], *sys.argv[2:]]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
