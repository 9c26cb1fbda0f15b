"""One run at a time per data directory: an OS file lock under data_dir (DirectoryLock).

Two runs writing the same shards and manifests (a second click on "Materialize all", the schedule
firing during a manual run, two terminals) would interleave their writes. A run holds
`<data_dir>/.scratchllm.lock` (flock) from its start to its end; a second run waits for it and says
which run holds it. The OS releases the lock when the holder dies, even by kill -9, so a crash
never leaves a stale lock behind.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from pathlib import Path
from typing import Callable

LOCK_FILE = ".scratchllm.lock"
POLL_SECONDS = 0.5
REMIND_SECONDS = 60.0


class DirectoryLock:
    def __init__(self, data_dir: Path, holder: dict):
        self.path = Path(data_dir) / LOCK_FILE
        self.holder = {**holder, "pid": os.getpid()}
        self._file = None

    def holder_of_lock(self) -> dict:
        """Who holds the lock now, as it wrote itself into the lock file ({} if unknown)."""
        try:
            return json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            return {}

    def acquire(self, log: Callable[[str], None] = print, timeout: float | None = None) -> None:
        """Wait until the lock is free (polling, so that Ctrl-C and SIGTERM stop the wait), then take it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a+")
        start = last_said = None
        while True:
            try:
                fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                now = time.monotonic()
                if start is None or now - last_said >= REMIND_SECONDS:
                    held = self.holder_of_lock()
                    log(f"waiting for {self.path.parent}: another run is using it ("
                        + ", ".join(f"{k} {v}" for k, v in held.items()) + "); this run starts when it ends")
                    start = start or now
                    last_said = now
                if timeout is not None and now - start >= timeout:
                    self.release()
                    raise TimeoutError(f"{self.path.parent} is still in use after {timeout:.0f} s")
                time.sleep(POLL_SECONDS)
        self._file.seek(0)
        self._file.truncate()
        self._file.write(json.dumps({**self.holder, "since": time.strftime("%Y-%m-%d %H:%M:%S")}))
        self._file.flush()
        if start is not None:
            log(f"{self.path.parent} is free after {time.monotonic() - start:.0f} s; starting")

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # closing the file releases the flock
            self._file = None

    def __enter__(self) -> "DirectoryLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
