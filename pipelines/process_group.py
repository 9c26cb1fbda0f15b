"""Run a command in its own process group and take the whole group down when told to stop.

Dagster Pipes cancels a step by sending SIGINT to the process it started. `accelerate launch`
does not pass that on to the training process(es) it spawned (its single-process launcher just
waits), so a cancelled run would leave ranks training. This wrapper is what Pipes starts:

    python -m pipelines.process_group -- accelerate launch ... -m pipelines.train_entry ...

On SIGINT or SIGTERM it sends SIGTERM to every process of the group, then SIGKILL to what is left
after a grace period. It exits with the command's exit code.

When the process that started it dies without a word (kill -9, the OOM killer), the ranks must not
train on as orphans beside the next run: the wrapper watches its parent and kills the group at once.
"""

import os
import signal
import subprocess
import sys
import threading
import time

GRACE_SECONDS = 10.0
PARENT_POLL_SECONDS = 0.2


def kill_group_when_parent_dies(group: int, parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(PARENT_POLL_SECONDS)
    try:  # orphaned: nobody will read the results; checkpoints are written atomically
        os.killpg(group, signal.SIGKILL)
    finally:
        os._exit(137)


def main(argv: list[str]) -> int:
    command = argv[argv.index("--") + 1:] if "--" in argv else argv
    if not command:
        print("usage: python -m pipelines.process_group -- COMMAND [ARGS...]", file=sys.stderr)
        return 2
    parent = os.getppid()  # before anything else: it may die at any moment
    child = subprocess.Popen(command, start_new_session=True)  # the child leads a new process group
    stopping: dict[str, float] = {}

    def stop(signum, frame):
        # Only asks: the waiting happens below. (Popen.poll() inside a handler that interrupted
        # Popen.wait() cannot reap the child, so a handler that waited for it always ran out its grace.)
        if not stopping:
            stopping.update(signal=signum, deadline=time.monotonic() + GRACE_SECONDS)
            signal_group(child.pid, signal.SIGTERM)

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    threading.Thread(target=kill_group_when_parent_dies, args=(child.pid, parent), daemon=True).start()
    while True:
        try:
            code = child.wait(timeout=0.1)
            break
        except subprocess.TimeoutExpired:
            if stopping and time.monotonic() > stopping["deadline"]:
                signal_group(child.pid, signal.SIGKILL)
    if not stopping:
        return code
    while group_alive(child.pid) and time.monotonic() < stopping["deadline"]:  # ranks still stopping
        time.sleep(0.1)
    signal_group(child.pid, signal.SIGKILL)  # stragglers (ranks) that ignored SIGTERM
    return 128 + int(stopping["signal"])


def signal_group(group: int, signum: int) -> None:
    try:
        os.killpg(group, signum)
    except ProcessLookupError:
        pass


def group_alive(group: int) -> bool:
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    return True

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
