"""Ctrl-C for work that runs in threads.

Python delivers SIGINT to the main thread only; a model training in a flow's worker thread would
go on until its budget ends. `install()` (the CLI calls it) makes Ctrl-C also set a flag that the
training loop checks every step: it then writes a resumable checkpoint and stops, so the process
exits within a step and leaves no half-written file (every write is atomic, components.files).
"""
from __future__ import annotations

import signal
import threading

_STOP = threading.Event()
_ON_STOP: list = []   # callables run once when Ctrl-C is pressed (before KeyboardInterrupt is raised)


class Interrupted(KeyboardInterrupt):
    """Work stopped because Ctrl-C was pressed (or `request_stop` was called)."""


def request_stop() -> None:
    first = not _STOP.is_set()
    _STOP.set()
    if first:
        for callback in list(_ON_STOP):
            callback()


def on_stop(callback) -> None:
    """Call `callback()` when a stop is first requested (e.g. a client told not to wait on a server
    that Ctrl-C stops too). Cleared by `reset()`."""
    _ON_STOP.append(callback)


def stop_requested() -> bool:
    return _STOP.is_set()


def reset() -> None:
    _STOP.clear()
    _ON_STOP.clear()


def install() -> None:
    """Ctrl-C: raise KeyboardInterrupt in the main thread, as usual, and ask worker threads to stop."""
    if threading.current_thread() is not threading.main_thread():
        return
    reset()

    def on_sigint(signum, frame):
        request_stop()
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, on_sigint)
