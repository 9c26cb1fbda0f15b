"""Runs whose process is gone, and stopping a run on Ctrl-C: the bookkeeping Dagster leaves to us.

A run killed with kill -9 (or by the OOM killer, or a reboot) stays STARTED in the instance and
keeps its pool slots: the next training would wait for the `training` slot forever. Dagster's run
monitoring cannot tell for runs of the default launcher, but the in-process executor records the
pid of the process that executes a run ("Executing steps in process (pid: N)"). A STARTED run whose
process no longer exists (or whose pid now belongs to a younger process) is dead: it is marked
failed and its slots are freed, with a line that says so. This assumes the instance is local to
this machine, as the default sqlite instance under DAGSTER_HOME is.

Checked by `scratchllm run` before it starts, by every run when it starts (the `scratchllm`
resource), and every 10 s by the `dead_run_sweeper` sensor of `dagster dev`.
"""

from __future__ import annotations

import signal
import sys
import threading
import time
import uuid

import dagster as dg
import psutil

IN_PROGRESS = [dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.CANCELING]
PID_MESSAGE = "Executing steps in process (pid: "
CLOCK_SLACK_SECONDS = 2.0  # process start times and event timestamps come from different clocks


def run_process(instance: dg.DagsterInstance, run_id: str) -> tuple[int, float] | None:
    """(pid, when it started executing) of a run, from its engine event; None before that point."""
    records = instance.get_records_for_run(run_id, of_type=dg.DagsterEventType.ENGINE_EVENT).records
    for record in records:
        message = record.event_log_entry.message or ""
        if message.startswith(PID_MESSAGE):
            return int(message[len(PID_MESSAGE):].split(")")[0]), record.event_log_entry.timestamp
    return None


def process_is_alive(pid: int, since: float) -> bool:
    """Is `pid` the process that started executing at `since` (not a later process with its pid)?"""
    try:
        process = psutil.Process(pid)
        return process.status() != psutil.STATUS_ZOMBIE and process.create_time() <= since + CLOCK_SLACK_SECONDS
    except psutil.Error:
        return False


def fail_dead_runs(instance: dg.DagsterInstance) -> list[str]:
    """Mark failed every in-progress run whose process is gone, and free the pool slots of every
    run that has ended (Dagster's code server marks a run failed when its process was killed, but
    leaves its slots taken). Returns one line per run for the user."""
    lines = []
    holders = instance.event_log_storage.get_concurrency_run_ids()
    for run in instance.get_runs(dg.RunsFilter(run_ids=list(holders))) if holders else []:
        if run.is_finished:
            instance.event_log_storage.free_concurrency_slots_for_run(run.run_id)
            lines.append(f"run {run.run_id} ended ({run.status.value}) but still held pool slots: freed")
    for run in instance.get_runs(dg.RunsFilter(statuses=IN_PROGRESS)):
        process = run_process(instance, run.run_id)
        if process is None or process_is_alive(*process):
            continue
        pid = process[0]
        instance.report_run_failed(run, message=f"The process of this run (pid {pid}) is gone (killed, out of "
                                                f"memory, or a reboot): marked failed by scratchllm.")
        instance.event_log_storage.free_concurrency_slots_for_run(run.run_id)
        lines.append(f"run {run.run_id} (pid {pid}) was still marked {run.status.value} but its process is gone: "
                     f"marked FAILED and its pool slots freed")
    return lines


def pool_holders(instance: dg.DagsterInstance, pool: str) -> list[str]:
    """The runs that hold slots of `pool` now, each with its pid: what a run waiting for it waits for."""
    info = instance.event_log_storage.get_concurrency_info(pool)
    holders = []
    for run_id in sorted(info.active_run_ids):
        process = run_process(instance, run_id)
        holders.append(f"run {run_id}" + (f" (pid {process[0]})" if process else ""))
    return holders


STOP_GRACE_SECONDS = 15.0  # for the run to end by itself after its processes were told to stop


def execute_stoppably(job, instance: dg.DagsterInstance, **kwargs):
    """job.execute_in_process(...) that Ctrl-C and SIGTERM stop within seconds, whatever the run is
    doing, with its training ranks. Returns the result, or None when stopped by a signal.

    Dagster defers interrupts while a run waits (e.g. for a pool slot): a waiting run would ignore
    them. So the run executes in a thread (where Dagster leaves signals alone) and this thread stays
    in charge: on a signal it tells the run's child processes to stop (the training's process group
    wrapper takes its ranks down), gives the run a few seconds to end as failed, and otherwise
    marks it canceled, frees its slots and exits. A run with no step running (waiting for its data_dir
    or a pool slot) has nothing to finish: it is canceled at once.
    """
    run_id = str(uuid.uuid4())
    outcome: dict = {}
    stop_requested = threading.Event()

    def execute():
        try:
            outcome["result"] = job.execute_in_process(instance=instance, run_id=run_id, raise_on_error=False,
                                                       **kwargs)
        except BaseException as exc:  # reported by the caller's thread
            outcome["error"] = exc

    def request_stop(signum, frame):
        stop_requested.set()

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    worker = threading.Thread(target=execute, name=f"run-{run_id[:8]}", daemon=True)
    worker.start()
    try:
        while worker.is_alive() and not stop_requested.is_set():
            worker.join(0.2)
        if stop_requested.is_set():
            print(f"\nscratchllm: stopping run {run_id} and its processes", file=sys.stderr, flush=True)
            deadline = time.monotonic() + STOP_GRACE_SECONDS
            waiting = False
            while worker.is_alive() and time.monotonic() < deadline:
                stop_training_launchers()  # again and again: a step retry would start a new one
                if waiting := not steps_in_progress(instance, run_id):
                    break  # waiting for its data_dir or a pool slot: nothing to let finish
                worker.join(0.5)
            run = instance.get_run_by_id(run_id)
            if run is not None and not run.is_finished:
                instance.report_run_canceled(run, message="Stopped by Ctrl-C or SIGTERM (scratchllm run).")
                instance.event_log_storage.free_concurrency_slots_for_run(run_id)
            print(f"scratchllm: run {run_id} stopped" + (" while no step was running" if waiting else ""),
                  file=sys.stderr, flush=True)
            return None
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def steps_in_progress(instance: dg.DagsterInstance, run_id: str) -> set[str]:
    """The steps of a run that have started and not ended."""
    records = instance.get_records_for_run(run_id, of_type={
        dg.DagsterEventType.STEP_START, dg.DagsterEventType.STEP_SUCCESS, dg.DagsterEventType.STEP_FAILURE}).records
    started = {r.event_log_entry.step_key for r in records
               if r.event_log_entry.dagster_event_type == dg.DagsterEventType.STEP_START}
    return started - {r.event_log_entry.step_key for r in records
                      if r.event_log_entry.dagster_event_type != dg.DagsterEventType.STEP_START}


def stop_training_launchers() -> None:
    """SIGTERM to this process's training launchers (pipelines/process_group.py), which take their
    ranks down. Not to its other children: Dagster's log tailers must keep showing what happens."""
    for child in psutil.Process().children():
        try:
            if "pipelines.process_group" in child.cmdline():
                child.terminate()
        except psutil.Error:
            pass
