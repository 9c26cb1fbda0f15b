"""Run a command in its own process group and take the whole group down when told to stop.

Dagster Pipes cancels a step by sending SIGINT to the process it started. `accelerate launch`
does not pass that on to the training process(es) it spawned (its single-process launcher just
waits), so a cancelled run would leave ranks training. This wrapper is what Pipes starts:

    python -m pipelines.process_group -- accelerate launch ... -m pipelines.train_entry ...

On SIGINT or SIGTERM it sends SIGTERM to every process of the group, then SIGKILL to what is left
after a grace period. It exits with the command's exit code.
"""

import os
import signal
import subprocess
import sys
import time

GRACE_SECONDS = 10.0


def main(argv: list[str]) -> int:
    command = argv[argv.index("--") + 1:] if "--" in argv else argv
    if not command:
        print("usage: python -m pipelines.process_group -- COMMAND [ARGS...]", file=sys.stderr)
        return 2
    child = subprocess.Popen(command, start_new_session=True)  # the child leads a new process group

    def stop(signum, frame):
        try:
            os.killpg(child.pid, signal.SIGTERM)
            deadline = time.monotonic() + GRACE_SECONDS
            while child.poll() is None and time.monotonic() < deadline:
                time.sleep(0.1)
            os.killpg(child.pid, signal.SIGKILL)  # stragglers (ranks) that ignored SIGTERM
        except ProcessLookupError:
            pass
        sys.exit(128 + signum)

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    return child.wait()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
