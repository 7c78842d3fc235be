"""Crash injection for the fault tests: SIGKILL the whole process group at a named point.

    kill_point("register")            # dies here when GENFLOW_KILL_AT=register
    with kill_window("dvc-push"):     # dies inside when GENFLOW_KILL_AT=dvc-push@0.5
        repo.push()

GENFLOW_KILL_AT=NAME[#N][@SECONDS]: at the N-th time NAME is reached in this process (default the
first), SIGKILL this process's group (the process, the `genflow stage` or torchrun children it
started, a local Prefect server), as an out-of-memory killer or a pulled plug would. A window
kills SECONDS after it opens (default at once), or as it closes when it closes sooner, so the
process never gets past it. Unset (every normal run), each call is one dictionary lookup.

The points (tests/flows/test_crash_anywhere.py kills at each): replace-dir (a folder swap
between its two renames: data/raw at ingest), ingest (a snapshot written, not yet swapped in),
dvc-commit, train-checkpoint (right after a mid-training checkpoint), export (model.onnx written,
the rest of the export not), register (a version created, its challenger alias not yet set),
gate (registered, not yet gated), alias-move (an alias moved, its history not yet written),
dvc-push.
"""
from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from typing import Iterator

ENV = "GENFLOW_KILL_AT"
_reached: dict[str, int] = {}


def _armed(name: str) -> float | None:
    """Seconds to wait before the kill when this visit of `name` is the one to die at, else None."""
    spec = os.environ.get(ENV)
    if not spec:
        return None
    point, _, delay = spec.partition("@")
    point, _, nth = point.partition("#")
    if point != name:
        return None
    _reached[name] = _reached.get(name, 0) + 1
    if _reached[name] != int(nth or 1):
        return None
    return float(delay or 0)


def _kill(name: str, where: str) -> None:
    print(f"fault injection: SIGKILL {where} {name} ({ENV}={os.environ.get(ENV)})", file=sys.stderr, flush=True)
    os.killpg(os.getpgrp(), signal.SIGKILL)


def kill_point(name: str) -> None:
    """SIGKILL the process group here when GENFLOW_KILL_AT names this point."""
    if _armed(name) is not None:
        _kill(name, "at")


@contextlib.contextmanager
def kill_window(name: str) -> Iterator[None]:
    """SIGKILL the process group while the block runs, when GENFLOW_KILL_AT names it."""
    delay = _armed(name)
    if delay is None:
        yield
        return
    if delay <= 0:
        _kill(name, "as it starts:")
    timer = threading.Timer(delay, _kill, (name, "inside"))
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        _kill(name, "at the end of")   # the block was quicker than the delay: never get past it
