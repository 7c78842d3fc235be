"""One genflow process at a time changes a project: the lock file .genflow/run.lock.

    with project_lock(root, "genflow run --quick"):        # ProjectBusyError at once if it is held
        ...                                                 # data/, models/, exports/, reports/, registry
    with project_lock(root, "genflow run", wait=True, on_wait=print):   # blocks until it is free

The lock is the operating system's (filelock: flock on Linux and macOS, across processes on one
machine). It goes when its holder ends, however it ends: a process killed with SIGKILL leaves no lock
that blocks the next run. Beside it, .genflow/run.lock.json says who holds it (pid, start time,
command): information for the refusal message only, rewritten by every holder.

A process started by the holder on the same project (a `genflow stage` run by a flow, `dvc repro`)
inherits GENFLOW_PROJECT_LOCK and does not take the lock again: nested calls never deadlock. The
workers of one torchrun launch share one lock: the first of each node (LOCAL_RANK 0) takes it, the
others run under it. Another project (reproduce's temporary worktree) has a lock of its own.
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterator, Optional

from filelock import FileLock, Timeout

from components.errors import ProjectBusyError
from components.files import write_json
from components.layout import Layout

LOCK_NAME = "run.lock"
HOLDER_NAME = "run.lock.json"
HELD_ENV = "GENFLOW_PROJECT_LOCK"   # the project root whose lock this process (or its parent) holds
BUSY_EXIT = 3                       # `genflow` exits with this when the project is busy


def lock_file(root: Path) -> Path:
    return Layout(Path(root).resolve()).state / LOCK_NAME


def holder_file(root: Path) -> Path:
    return Layout(Path(root).resolve()).state / HOLDER_NAME


def _other_rank() -> bool:
    """A torchrun worker other than its node's first: that one holds the lock for all of them."""
    return os.environ.get("LOCAL_RANK", "0") != "0"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:   # another user's process: it exists
        return True
    return True


def describe_holder(root: Path) -> str:
    """'pid 812 on host, since 2026-12-03T05:33:07Z (genflow run --quick)', as far as it is known."""
    try:
        info = json.loads(holder_file(root).read_text(encoding="utf-8"))
        pid = int(info["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return "another genflow process (it has not written its details yet)"
    if info.get("host") == socket.gethostname() and not _alive(pid):   # the details of an earlier holder
        return "another genflow process (it has not written its details yet)"
    return f"pid {pid} on {info.get('host', '?')}, since {info.get('started', '?')} ({info.get('command', '?')})"


def busy_message(root: Path, can_wait: bool) -> str:
    what = "add --wait to block until it is free" if can_wait else "try again when it has finished"
    return (f"the project is busy: {lock_file(root)} is held by {describe_holder(root)}; wait for it to finish "
            f"(or stop it), or {what}")


@contextlib.contextmanager
def project_lock(root: Path, command: str, *, wait: bool = False, can_wait: bool = False,
                 on_wait: Optional[Callable[[str], None]] = None, poll_s: float = 0.5,
                 report_every_s: float = 30.0) -> Iterator[None]:
    """Hold the project's lock for the block. Busy: ProjectBusyError at once, or with wait=True block
    until free, calling on_wait(line) when it starts to wait and every report_every_s seconds.
    can_wait: the refusal tells the user about --wait (the commands that have it)."""
    root = Path(root).resolve()
    if os.environ.get(HELD_ENV) == str(root) or _other_rank():
        yield
        return
    path = lock_file(root)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(path), thread_local=False)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        if not wait:
            raise ProjectBusyError(busy_message(root, can_wait)) from None
        _wait_for(lock, root, on_wait or (lambda line: None), poll_s, report_every_s)
    before = os.environ.get(HELD_ENV)
    try:
        write_json(holder_file(root), {
            "pid": os.getpid(), "host": socket.gethostname(), "command": command,
            "started": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")})
        os.environ[HELD_ENV] = str(root)
        yield
    finally:
        if before is None:
            os.environ.pop(HELD_ENV, None)
        else:
            os.environ[HELD_ENV] = before
        with contextlib.suppress(OSError):
            holder_file(root).unlink()
        lock.release()


def _wait_for(lock: FileLock, root: Path, on_wait: Callable[[str], None], poll_s: float,
              report_every_s: float) -> None:
    t0 = last = time.monotonic()
    on_wait(f"waiting for {lock_file(root)}, held by {describe_holder(root)} (Ctrl-C to give up)")
    while True:
        try:
            lock.acquire(timeout=poll_s)
            return
        except Timeout:
            now = time.monotonic()
            if now - last >= report_every_s:
                last = now
                on_wait(f"still waiting for {lock_file(root)} ({now - t0:.0f}s), held by {describe_holder(root)}")
