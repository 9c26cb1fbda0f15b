"""Typed resources: MLflow tracking, and the launcher of distributed training (Dagster Pipes)."""

import contextlib
import dataclasses
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence

import dagster as dg
import yaml

from llm_core import tracking
from llm_core.training import training_run
from llm_core.training.performance import available_cores, thread_environment
from llm_core.config import ScratchConfig, resolve_path


class MLflowResource(dg.ConfigurableResource):
    """Where runs and models are tracked. Empty = $MLFLOW_TRACKING_URI, else sqlite under data_dir."""

    tracking_uri: str = ""
    experiment: str = tracking.EXPERIMENT

    def uri(self, cfg: ScratchConfig) -> str:
        return self.tracking_uri or tracking.tracking_uri(cfg)


def with_warm_start(context: dg.AssetExecutionContext, cfg: ScratchConfig, tracking_uri: str) -> ScratchConfig:
    """The retrain job (the schedule, the new-data sensor) with `automation.retrain_mode: continue`
    starts from the registered champion: training.init_from set for this run, for the tokenizer
    (which keeps the champion's) and the training alike."""
    if context.run.job_name != "retrain":
        return cfg
    return training_run.continue_from_champion(cfg, tracking_uri, context.log.info)


def launch_command(cfg: ScratchConfig, module: str, args: list[str], free_port: bool = False) -> list[str]:
    """The command that trains: with `engine.kind: ray`, the module alone (it drives Ray Train workers on
    the cluster, llm_core/training/cluster.py); with one rank and no accelerate config file, the module
    alone too (its Accelerator needs no launcher, and `accelerate launch` would only start it, after
    ~2.5 s of its own imports); else `accelerate launch` of the training config: an accelerate config
    file when one is named (GPUs, FSDP, multi-node), else N CPU processes through torchrun + gloo.
    free_port: a port of its own for the ranks' rendezvous (trainings side by side on one machine)."""
    t = cfg.training
    accelerate = [sys.executable, "-m", "accelerate.commands.launch"]
    if cfg.engine.kind == "ray" or (t.num_processes == 1 and not t.accelerate_config):
        launch = [sys.executable]
    elif t.accelerate_config:
        launch = [*accelerate, "--config_file", t.accelerate_config, "--num_processes", str(t.num_processes)]
        launch += ["--main_process_port", "0"] if free_port else []
    else:
        launch = [*accelerate, "--multi_gpu",  # on CPU this is torchrun with the gloo backend
                   "--num_processes", str(t.num_processes), "--num_machines", "1", "--main_process_port", "0",
                   # auto is decided by the training itself (llm_core/training/train.py), once per run
                   "--mixed_precision", "no" if t.mixed_precision == "auto" else t.mixed_precision,
                   "--dynamo_backend", "no"]
    # In its own process group, so that cancelling the Dagster run stops every rank.
    return [sys.executable, "-m", "pipelines.process_group", "--", *launch, "-m", module, *args]


def rank_environment(cfg: ScratchConfig, trainings: int = 1) -> dict[str, str]:
    """Threads per rank = cores / (ranks x trainings side by side): oversubscribed CPUs run several times slower."""
    return thread_environment(max(1, available_cores() // (cfg.training.num_processes * trainings)))


def visible_gpus() -> list[str]:
    """The CUDA devices this process may use, as CUDA_VISIBLE_DEVICES would name them."""
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    listed = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    return (listed or [str(i) for i in range(count)])[:count]


Environment = Callable[[ScratchConfig], dict[str, str]]  # a training's config -> its processes' environment


def slot_environments(configs: Sequence[ScratchConfig], slots: int, gpus: list[str]) -> list[Environment]:
    """For each of `slots` trainings side by side, the environment of what trains there: on GPUs,
    devices of its own (as many as the most processes any of `configs` launches); on CPU, threads
    from an equal share of the cores. Refused, naming the field, when the GPUs are too few or a
    training spans machines."""
    if slots == 1:
        return [rank_environment]
    if configs[0].engine.kind == "ray":  # each training is a Ray Train job: the cluster's room counts
        from llm_core.training import cluster

        cluster.check_cluster_room(list(configs), slots)
        return [rank_environment] * slots
    for cfg in configs:
        launcher = cfg.training.accelerate_config
        if launcher and (yaml.safe_load(resolve_path(launcher).read_text()) or {}).get("num_machines", 1) > 1:
            raise ValueError(f"training.max_parallel_variants: {slots} variants at once, but {launcher} spans "
                             f"several machines; set max_parallel_variants: 1")
    if not gpus:
        return [lambda cfg: rank_environment(cfg, trainings=slots)] * slots
    per_slot = max(cfg.training.num_processes for cfg in configs)
    if slots * per_slot > len(gpus):
        raise ValueError(f"training.max_parallel_variants: {slots} variants at once x {per_slot} processes need "
                         f"{slots * per_slot} GPUs, {len(gpus)} are visible ({','.join(gpus)})")

    def on_devices(ids: str) -> Environment:
        return lambda cfg: {**rank_environment(cfg), "CUDA_VISIBLE_DEVICES": ids}

    return [on_devices(",".join(gpus[i * per_slot:(i + 1) * per_slot])) for i in range(slots)]


@dataclasses.dataclass
class Finished:
    """A command run through Dagster Pipes, once it has ended."""

    name: str
    exit_code: int
    reported: dict  # the metadata its materialization reported through Pipes ({} when it reported none)


def run_side_by_side(context: dg.AssetExecutionContext, jobs: Sequence[tuple[str, ScratchConfig, list[str]]],
                     slots: list[Environment], on_exit: Callable[[Finished], None], poll_seconds: float = 0.5) -> None:
    """Run each (name, config, command) through Dagster Pipes, one per slot at a time, as soon as a
    slot is free, with that slot's environment; on_exit(Finished) as each ends, with what it reported.
    One training is one job in one slot. A cancelled Dagster run (or any error here) stops every
    command still running, as PipesSubprocessClient does."""
    waiting, free = list(jobs), list(range(len(slots)))
    running: dict[int, tuple[str, subprocess.Popen, contextlib.ExitStack, dg.PipesSession]] = {}
    try:
        while waiting or running:
            while waiting and free:
                slot, (name, cfg, command) = free.pop(0), waiting.pop(0)
                session_scope = contextlib.ExitStack()
                session = session_scope.enter_context(dg.open_pipes_session(
                    context=context, context_injector=dg.PipesTempFileContextInjector(),
                    message_reader=dg.PipesTempFileMessageReader()))
                process = subprocess.Popen(command, env={**os.environ, **slots[slot](cfg),
                                                         **session.get_bootstrap_env_vars()})
                running[slot] = (name, process, session_scope, session)
                if len(slots) > 1:
                    context.log.info(f"{name}: started ({len(running)} of {len(slots)} at once, "
                                     f"{len(waiting)} waiting)")
            time.sleep(poll_seconds)
            for slot, (name, process, session_scope, session) in list(running.items()):
                if process.poll() is not None:
                    session_scope.close()  # reads the command's last messages
                    del running[slot]
                    free.append(slot)
                    reported = {k: v for r in session.get_results() if isinstance(r, dg.MaterializeResult)
                                for k, v in (r.metadata or {}).items()}
                    on_exit(Finished(name, process.returncode, reported))
    finally:
        for name, process, _, _ in running.values():
            context.log.info(f"[pipes] stopping {name}: sending SIGINT")
            process.send_signal(signal.SIGINT)  # pipelines.process_group stops the ranks
        for name, process, session_scope, _ in running.values():
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
            with contextlib.suppress(Exception):
                session_scope.close()
