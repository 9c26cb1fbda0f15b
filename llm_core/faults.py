"""Named points where a test can stop a real run, to kill it there: no sleeps, no timing.

    SCRATCHLLM_HOLD_AT=step:5 SCRATCHLLM_HOLD_MARKER=/tmp/held scratchllm run ...

When the code reaches a point whose label matches SCRATCHLLM_HOLD_AT (an fnmatch pattern, with an
optional `#N` for the N-th match in this process), it writes its pid to SCRATCHLLM_HOLD_MARKER and
waits there until it is killed, or until the marker is deleted (a pause: it goes on). The test waits
for the marker, then does what a user or the OS would do at that moment (kill -9, Ctrl-C, a second
run, a server killed under it). Only the process that creates the marker holds: the run after the
kill (same environment), and any other process reaching the point while the marker exists, go
through. Unset, a hold point costs one dict lookup.
"""

from __future__ import annotations

import fnmatch
import os
import time
from pathlib import Path

HOLD_AT_ENV, HOLD_MARKER_ENV = "SCRATCHLLM_HOLD_AT", "SCRATCHLLM_HOLD_MARKER"
_matches: dict[str, int] = {}


def hold_environment() -> dict[str, str]:
    """The hold settings of this process, for the processes it starts elsewhere (Ray tasks, workers)."""
    return {k: os.environ[k] for k in (HOLD_AT_ENV, HOLD_MARKER_ENV) if k in os.environ}


def hold_point(label: str) -> None:
    pattern = os.environ.get(HOLD_AT_ENV)
    if not pattern:
        return
    pattern, _, nth = pattern.partition("#")
    if not fnmatch.fnmatchcase(label, pattern):
        return
    _matches[pattern] = _matches.get(pattern, 0) + 1
    if _matches[pattern] != int(nth or 1):
        return
    marker = Path(os.environ.get(HOLD_MARKER_ENV, "scratchllm_held"))
    if marker.exists():
        return
    # Two processes may reach a hold at once (Ray tasks on two nodes): the marker is created with its
    # content by one atomic link, which only one of them wins; the other goes through.
    tmp = marker.with_name(f"{marker.name}.{os.getpid()}.tmp")
    tmp.write_text(f"{os.getpid()} {label}\n")
    try:
        os.link(tmp, marker)
    except FileExistsError:
        return
    finally:
        tmp.unlink()
    while marker.exists():  # until killed, or released
        time.sleep(0.05)
