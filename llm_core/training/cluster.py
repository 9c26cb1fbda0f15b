"""Training on a Ray cluster (`engine.kind: ray`): the loop of llm_core/training/train.py as Ray Train workers.

    result, run = train_on_cluster(cfg, out_dir, log=print, on_metrics=None)
    python -m llm_core.training.cluster --config my_profile.yaml     # the same without Dagster

`training.num_processes` workers (Ray Train's TorchTrainer) of `engine.cpus_per_worker` CPUs (and
`engine.gpus_per_worker` GPUs) each, spread over the cluster's nodes. Ray Train starts the torch
process group (gloo on CPUs, NCCL on GPUs) and sets the variables accelerate reads (RANK, WORLD_SIZE,
MASTER_ADDR...), so the loop's Accelerator joins it as it would under `accelerate launch`; an
accelerate config named by `training.accelerate_config` (FSDP, mixed precision) reaches the workers
as the variables `accelerate launch` would have set. Batches, checkpoints and losses are the same as
a local launch with the same number of ranks.

This process is the driver: rank 0's log lines and metrics come back to it through a Ray queue.
Checkpoints are written to out_dir, which every node must see (checked first). When a worker or a
whole node is lost, Ray Train stops the group and starts it again, up to `engine.max_training_failures`
times; the loop then resumes from the newest checkpoint, as a re-run would. A divergence is not
retried (it would diverge again). When this process dies (a cancelled run), Ray stops its workers.
"""

from __future__ import annotations

import dataclasses
import os
import queue as queue_module
import threading
from pathlib import Path
from typing import Any, Callable

from llm_core.config import ConfigError, ScratchConfig, resolve_path
from llm_core.data.engine import check_shared_directory, ray_connection
from llm_core.faults import hold_environment, hold_point
from llm_core.files import read_json, write_json
from llm_core.model_files import SUMMARY_FILE
from llm_core.training import health
from llm_core.training.performance import thread_environment
from llm_core.training.train import TrainingDiverged, TrainResult, command_line, train

Log = Callable[[str], None]
RAY_TRAIN_DIR = "ray_train"  # Ray Train's own records of the run, under out_dir
FAILURE_FILE = "cluster_failure.json"  # why the last training on the cluster failed (BudgetSpent)


@dataclasses.dataclass
class ClusterRun:
    """Where the training ran: every worker's node, and how often the group was restarted."""

    nodes: list[str]  # the node address of each rank, in rank order
    restarts: int


class BudgetSpent(RuntimeError):
    """The workers were lost more often than engine.max_training_failures allows."""


def train_on_cluster(cfg: ScratchConfig, out_dir: Path, log: Log = print,
                     on_metrics: Callable[[int, dict], None] | None = None) -> tuple[TrainResult, ClusterRun]:
    """Train (or resume) into out_dir on the Ray cluster of `cfg.engine`; log and on_metrics get rank
    0's lines and metrics here. Raises TrainingDiverged, BudgetSpent, ConfigError (no room on the
    cluster) or EngineError (no cluster, data_dir not shared). The message of every failure but a
    divergence (which the loop records itself) is kept in out_dir: `failure(out_dir)`."""
    out_dir = Path(out_dir)
    clear_failure(out_dir)
    try:
        return _train_on_cluster(cfg, out_dir, log, on_metrics)
    except TrainingDiverged:
        raise  # recorded by the loop (llm_core/training/health.py)
    except Exception as error:  # the cluster, the settings, or a spent budget: what the asset's failure says
        write_json(out_dir / FAILURE_FILE, {"message": str(error)})
        raise


def _train_on_cluster(cfg: ScratchConfig, out_dir: Path, log: Log,
                      on_metrics: Callable[[int, dict], None] | None) -> tuple[TrainResult, ClusterRun]:
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.util.queue import Queue

    e, t = cfg.engine, cfg.training
    with ray_connection(e, log) as ray:
        nodes = check_shared_directory(ray, out_dir)  # checkpoints: every worker must resume from them
        resources = ray.cluster_resources()
        gpus = worker_gpus(cfg, resources)
        check_room(cfg, resources, gpus)
        log(f"training on the Ray cluster: {t.num_processes} workers x {e.cpus_per_worker:g} CPU"
            + (f" + {gpus:g} GPU" if gpus else "") + f" over {len(nodes)} node(s) "
            f"({', '.join(sorted(nodes.values()))}), up to {e.max_training_failures} restart(s) "
            f"(engine.max_training_failures)")
        messages = Queue(actor_options={"num_cpus": 0})
        trainer = TorchTrainer(
            _worker, train_loop_config={"config": cfg.model_dump(mode="json"), "out_dir": str(out_dir),
                                        "messages": messages, "env": worker_environment(cfg)},
            torch_config=TorchConfig(backend="nccl" if gpus else "gloo"),
            scaling_config=ScalingConfig(num_workers=t.num_processes, use_gpu=bool(gpus),
                                         resources_per_worker={"CPU": e.cpus_per_worker, "GPU": gpus},
                                         placement_strategy="SPREAD"),  # over the nodes, even if one could hold all
            run_config=RunConfig(name=f"scratchllm-{out_dir.name}", storage_path=str(out_dir / RAY_TRAIN_DIR),
                                 failure_config=FailureConfig(max_failures=e.max_training_failures)))
        return _fit(trainer, messages, cfg, out_dir, log, on_metrics)


def _fit(trainer, messages, cfg: ScratchConfig, out_dir: Path, log: Log,
         on_metrics: Callable[[int, dict], None] | None) -> tuple[TrainResult, ClusterRun]:
    """trainer.fit() in a thread while this one relays the workers' messages; then what it trained."""
    outcome: dict[str, Any] = {}

    def fit() -> None:
        try:
            trainer.fit()
        except BaseException as error:  # noqa: BLE001 - reraised below, in the caller's thread
            outcome["error"] = error

    thread = threading.Thread(target=fit, name="ray-train-fit", daemon=True)
    thread.start()
    nodes: dict[int, str] = {}
    starts = 0
    while True:
        try:
            kind, *payload = messages.get(timeout=1.0) if thread.is_alive() else messages.get_nowait()
        except queue_module.Empty:
            if thread.is_alive():
                continue
            break  # fit() returned and every message is read
        if kind == "start":
            rank, node, pid = payload
            log(f"worker {rank}: node {node}, pid {pid}")
            if rank == 0:
                starts += 1
                if starts > 1:
                    log(f"the training's workers were restarted ({starts - 1} of engine.max_training_failures: "
                        f"{cfg.engine.max_training_failures}) after a lost worker or node; resuming from the "
                        f"newest checkpoint")
            nodes[rank] = node
        elif kind == "log":
            log(payload[0])
        elif kind == "metrics" and on_metrics:
            on_metrics(*payload)
    thread.join()
    messages.shutdown()
    restarts = max(starts - 1, 0)
    if diverged := health.divergence(out_dir):  # every rank stopped at the same step: not retried
        raise TrainingDiverged(diverged["message"])
    if "error" in outcome:
        error = outcome["error"]
        message = (f"the training on the Ray cluster failed after {restarts} restart(s), the most "
                   f"engine.max_training_failures ({cfg.engine.max_training_failures}) allows: "
                   f"{type(error).__name__}: {error}".strip())
        raise BudgetSpent(message) from error
    summary = read_json(out_dir / SUMMARY_FILE)
    result = TrainResult(**{**summary, "out_dir": out_dir})
    return result, ClusterRun(nodes=[nodes[rank] for rank in sorted(nodes)], restarts=restarts)


def failure(out_dir: Path) -> str | None:
    """Why the last training on the cluster in out_dir failed (None when it did not, or diverged)."""
    return read_json(Path(out_dir) / FAILURE_FILE).get("message")


def clear_failure(out_dir: Path) -> None:
    """A new attempt (on the cluster or not): the last one's failure no longer describes out_dir."""
    (Path(out_dir) / FAILURE_FILE).unlink(missing_ok=True)


def worker_gpus(cfg: ScratchConfig, resources: dict) -> float:
    """GPUs per worker: engine.gpus_per_worker, else one when the cluster has GPUs."""
    if cfg.engine.gpus_per_worker is not None:
        return cfg.engine.gpus_per_worker
    return 1.0 if resources.get("GPU", 0) else 0.0


def check_room(cfg: ScratchConfig, resources: dict, gpus: float, trainings: int = 1) -> None:
    """Refuse, naming the fields, a training (or `trainings` side by side) the cluster cannot hold at once:
    Ray would wait for the resources for ever."""
    workers = trainings * cfg.training.num_processes
    side = f"training.max_parallel_variants ({trainings}) x " if trainings > 1 else ""
    for resource, field, per_worker in [("CPU", "engine.cpus_per_worker", cfg.engine.cpus_per_worker),
                                        ("GPU", "engine.gpus_per_worker", gpus)]:
        if workers * per_worker > resources.get(resource, 0) + 1e-9:
            raise ConfigError(f"{side}training.num_processes ({cfg.training.num_processes}) x {field} "
                              f"({per_worker:g}) = {workers * per_worker:g} {resource}s, but the Ray cluster has "
                              f"{resources.get(resource, 0):g}")


def check_cluster_room(configs: list[ScratchConfig], trainings: int) -> None:
    """Before trainings side by side on the cluster (a sweep): refuse them, naming the fields, when the
    cluster cannot hold `trainings` of the largest at once."""
    cfg = max(configs, key=lambda c: c.training.num_processes * c.engine.cpus_per_worker)
    with ray_connection(cfg.engine, log=lambda line: None) as ray:
        resources = ray.cluster_resources()
        check_room(cfg, resources, worker_gpus(cfg, resources), trainings)


def worker_environment(cfg: ScratchConfig) -> dict[str, str]:
    """What each worker sets before training: its thread count, the variables `accelerate launch` would
    set for training.accelerate_config (FSDP, mixed precision), and the test hooks of llm_core/faults.py."""
    env = thread_environment(max(1, int(cfg.engine.cpus_per_worker)))
    if cfg.training.accelerate_config:
        env.update(accelerate_environment(cfg.training.accelerate_config, cfg.training.num_processes))
    return {**env, **hold_environment()}


def accelerate_environment(config_file: str, num_processes: int) -> dict[str, str]:
    """The ACCELERATE_* / FSDP_* variables `accelerate launch --config_file` sets for its processes,
    computed by accelerate itself (DeepSpeed profiles are refused: they need its own launcher)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    path = str(resolve_path(config_file))
    args = launch_command_parser().parse_args(["--config_file", path, "--num_processes", str(num_processes),
                                               "--num_machines", "1", "train.py"])
    args, _, _ = _validate_launch_command(args)
    if args.use_deepspeed:
        raise ConfigError(f"training.accelerate_config: {config_file} is a DeepSpeed profile; with engine.kind: ray "
                          f"use a DDP or FSDP profile (or train with `accelerate launch`, engine.kind: local)")
    return {k: v for k, v in prepare_multi_gpu_env(args).items() if k.startswith(("ACCELERATE_", "FSDP_"))}


def _worker(args: dict) -> None:
    """One Ray Train worker: the training loop, rank 0 sending its lines and metrics to the driver."""
    import ray
    import ray.train

    from llm_core.config import validate_config

    os.environ.update(args["env"])
    rank, node = ray.train.get_context().get_world_rank(), ray.util.get_node_ip_address()
    sent = []  # in flight: a step does not wait for the driver (ordered: one caller, one actor)

    def send(*message) -> None:
        sent.append(args["messages"].actor.put_nowait.remote(message))

    send("start", rank, node, os.getpid())
    main = rank == 0
    try:
        train(validate_config(args["config"]), Path(args["out_dir"]),
              log=(lambda line: send("log", line)) if main else (lambda line: None),
              on_metrics=(lambda step, metrics: send("metrics", step, metrics)) if main else None,
              on_step=lambda step: hold_point(f"{node}/step:{step}"))  # tests kill a worker here
    except TrainingDiverged:
        pass  # recorded in out_dir by the main rank; the driver fails the run without a restart
    finally:
        ray.get(sent)  # every message delivered before the worker ends


def main(argv: list[str] | None = None) -> None:
    cfg, out_dir, _ = command_line(argv, __doc__.split("\n")[0])  # chat fine-tunes train locally
    train_on_cluster(cfg, out_dir)


if __name__ == "__main__":
    main()
