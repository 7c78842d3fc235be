"""Progress lines for long loops over files (ingest, validation, prepare of a big imagefolder).

    progress = Progress("datasets.photos: decoding", total=len(files), unit="images")
    for f in files:
        ...
        progress.step()
    progress.done()

A line every `every_s` seconds (3) on stderr, none at all for a loop that ends sooner, so small
datasets stay quiet; plain lines rather than a redrawn bar, because DVC and Prefect keep stage
output as log lines:

    datasets.photos: decoding 8192/20000 images (41%), 1890 images/s, about 6 s left
"""
from __future__ import annotations

import sys
import time
from typing import Callable, Optional, TextIO


class Progress:
    def __init__(self, what: str, total: int, unit: str = "files", every_s: float = 3.0,
                 stream: Optional[TextIO] = None, clock: Callable[[], float] = time.monotonic):
        self.what, self.total, self.unit, self.every_s = what, total, unit, every_s
        self.stream, self.clock = stream, clock
        self.count, self.lines = 0, 0
        self.start = self.last = clock()

    def step(self, n: int = 1) -> None:
        self.count += n
        now = self.clock()
        if now - self.last >= self.every_s:
            self.last = now
            self._say(now)

    def done(self) -> None:
        """A closing line, only when the loop was long enough to print one before."""
        if self.lines:
            self._say(self.clock(), final=True)

    def _say(self, now: float, final: bool = False) -> None:
        elapsed = max(now - self.start, 1e-9)
        rate = self.count / elapsed
        share = f" ({100 * self.count / self.total:.0f}%)" if self.total else ""
        tail = f"in {elapsed:.0f} s" if final else \
            f"about {(self.total - self.count) / rate:.0f} s left" if rate > 0 else "starting"
        print(f"{self.what} {self.count}/{self.total} {self.unit}{share}, {rate:.0f} {self.unit}/s, {tail}",
              file=self.stream or sys.stderr, flush=True)
        self.lines += 1
