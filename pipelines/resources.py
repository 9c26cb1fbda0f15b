"""Typed resources: MLflow tracking, and the launcher of distributed training (Dagster Pipes)."""

import os
import sys

import dagster as dg

from llm_core import tracking
from llm_core.config import ScratchConfig


class MLflowResource(dg.ConfigurableResource):
    """Where runs and models are tracked. Empty = $MLFLOW_TRACKING_URI, else sqlite under data_dir."""

    tracking_uri: str = ""
    experiment: str = tracking.EXPERIMENT

    def uri(self, cfg: ScratchConfig) -> str:
        return self.tracking_uri or tracking.tracking_uri(cfg)


def accelerate_command(cfg: ScratchConfig, module: str, args: list[str]) -> list[str]:
    """`accelerate launch` for the training config: an accelerate config file when one is named
    (GPUs, FSDP, multi-node), else N CPU processes through torchrun + gloo (`--cpu` would start one process only)."""
    t = cfg.training
    launch = [sys.executable, "-m", "accelerate.commands.launch"]
    if t.accelerate_config:
        launch += ["--config_file", t.accelerate_config, "--num_processes", str(t.num_processes)]
    else:
        if t.num_processes > 1:
            launch += ["--multi_gpu"]  # on CPU this is torchrun with the gloo backend
        launch += ["--num_processes", str(t.num_processes), "--num_machines", "1", "--main_process_port", "0",
                   # auto is decided by the training itself (llm_core/train.py), once per run
                   "--mixed_precision", "no" if t.mixed_precision == "auto" else t.mixed_precision,
                   "--dynamo_backend", "no"]
    # In its own process group, so that cancelling the Dagster run stops every rank.
    return [sys.executable, "-m", "pipelines.process_group", "--", *launch, "-m", module, *args]


def rank_environment(cfg: ScratchConfig) -> dict[str, str]:
    """Threads per rank = cores / ranks: oversubscribed CPUs run several times slower."""
    threads = max(1, (os.cpu_count() or 1) // cfg.training.num_processes)
    return {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
