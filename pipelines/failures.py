"""What a failed step tells the user: the cause in its own words, and the next step where one is known.

An asset that hits a problem with the user's data or settings (llm_core's DataError, ConfigError)
fails with a `dg.Failure` carrying that message and the next step as metadata, so the Dagster UI
shows the cause first rather than a wrapped ValueError; `scratchllm run` prints the same under each
failed step. The stack trace stays in the log.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import re

import dagster as dg

from llm_core.config import ConfigError
from llm_core.errors import DataError

NEXT_STEP = "next step"
CANCELLED = "stopped: the run was cancelled"


@contextlib.contextmanager
def as_failures():
    """User-facing errors raised inside become a dg.Failure, and a cancel ends the step for good."""
    try:
        yield
    except (DataError, ConfigError) as exc:
        next_step = getattr(exc, "next_step", None)
        raise dg.Failure(description=exc.args[0], allow_retries=False,
                         metadata={NEXT_STEP: next_step} if next_step else {}) from exc
    except (dg.DagsterExecutionInterruptedError, KeyboardInterrupt) as exc:
        # The UI's Terminate (or a run worker's SIGINT). Dagster retries an interrupted step whose
        # asset has a retry policy (trained_model's, for killed ranks): what the user stopped would
        # start again. The processes the step started are stopped already (run_side_by_side).
        raise dg.Failure(description=CANCELLED, allow_retries=False) from exc


def user_errors(asset_fn):
    """Decorate an asset's function (under @dg.asset), a plain one or a generator (output_required=False):
    its user-facing errors become a dg.Failure, and a cancel ends the step for good."""
    if inspect.isgeneratorfunction(asset_fn):
        @functools.wraps(asset_fn)
        def run_generator(*args, **kwargs):
            with as_failures():
                yield from asset_fn(*args, **kwargs)
        return run_generator

    @functools.wraps(asset_fn)
    def run(*args, **kwargs):
        with as_failures():
            return asset_fn(*args, **kwargs)
    return run


def step_cause(event: dg.DagsterEvent) -> list[str]:
    """The cause of a step failure in at most 2 lines: the innermost error's first line (without its
    class name) or the Failure's description, and the next step when one is known."""
    data = event.event_specific_data
    failure = getattr(data, "user_failure_data", None)
    if failure is not None and failure.description:
        next_step = failure.metadata.get(NEXT_STEP)
        return [first_line(failure.description)] + ([f"next step: {next_step.value}"] if next_step else [])
    error = getattr(data, "error", None)
    if error is None:
        return []
    while error.cause is not None:  # Dagster wraps the user's error: "Error occurred while executing op ..."
        error = error.cause
    return [first_line(error.message)]


def first_line(message: str) -> str:
    """The first non-empty line of an error message, without a leading exception class name."""
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()] or [""]
    line = re.sub(r"^[\w.]+(Error|Exception|Failure|Diverged): ", "", lines[0])
    return f"{line} {lines[1]}" if line.endswith(":") and len(lines) > 1 else line  # "invalid P:\n  field: why"
