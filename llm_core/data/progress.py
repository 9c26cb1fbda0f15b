"""Progress lines for the long-running data stages: at most one every few seconds."""

from __future__ import annotations

import time
from typing import Callable

Log = Callable[[str], None]


class Progress:
    """Logs at most every few seconds: 'what: done/total, MB, MB/s'."""

    def __init__(self, log: Log, what: str, total: int, every: float = 5.0):
        self.log, self.what, self.total, self.every = log, what, total, every
        self.start = self.last = time.monotonic()
        self.count = self.nbytes = 0

    def update(self, done: int, nbytes: int, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self.last >= self.every:
            self.last = now
            mb = nbytes / 1e6
            rate = f", {mb:.1f} MB, {mb / max(now - self.start, 1e-9):.1f} MB/s" if nbytes else ""
            self.log(f"{self.what}: {done}/{self.total}{rate}")

    def advance(self, nbytes: int) -> None:
        """One more item done, of `nbytes`."""
        self.count, self.nbytes = self.count + 1, self.nbytes + nbytes
        self.update(self.count, self.nbytes, force=self.count == self.total)
