"""What a training on a Ray cluster is given before Ray is involved (llm_core/training/cluster.py): the
launch command, GPUs per worker, the room check's refusals, the variables of an accelerate profile.
The trainings themselves run on a real 2-node cluster in test_ray_engine.py."""

import sys

import pytest
from helpers import CI_PROFILE

from llm_core.config import PROJECT_ROOT, ConfigError, load_config
from llm_core.training.cluster import accelerate_environment, check_room, worker_gpus
from pipelines.resources import launch_command

PROFILES = PROJECT_ROOT / "assets_config" / "accelerate"


def on_ray(**engine):
    return load_config(CI_PROFILE, {"engine": {"kind": "ray", **engine}, "training": {"num_processes": 4}})


def test_on_ray_the_dagster_step_starts_the_driver_alone_in_its_process_group():
    command = launch_command(on_ray(), "pipelines.train_entry", ["--out-dir", "x"])
    assert command == [sys.executable, "-m", "pipelines.process_group", "--", sys.executable, "-m",
                       "pipelines.train_entry", "--out-dir", "x"]  # no accelerate launch: Ray Train starts the ranks


def test_a_gpu_per_worker_when_the_cluster_has_gpus_unless_said_otherwise():
    assert worker_gpus(on_ray(), {"CPU": 64, "GPU": 8}) == 1.0
    assert worker_gpus(on_ray(), {"CPU": 64}) == 0.0
    assert worker_gpus(on_ray(gpus_per_worker=0.5), {"CPU": 64, "GPU": 8}) == 0.5


def test_a_training_the_cluster_cannot_hold_is_refused_naming_the_fields():
    check_room(on_ray(cpus_per_worker=2), {"CPU": 8, "GPU": 4}, gpus=1)  # 4 workers x (2 CPUs + 1 GPU): fits
    with pytest.raises(ConfigError, match=r"training.num_processes \(4\) x engine.gpus_per_worker \(1\) = 4 GPUs, "
                                          r"but the Ray cluster has 2"):
        check_room(on_ray(), {"CPU": 8, "GPU": 2}, gpus=1)
    with pytest.raises(ConfigError, match=r"engine.cpus_per_worker \(4\) = 16 CPUs, but the Ray cluster has 8"):
        check_room(on_ray(cpus_per_worker=4), {"CPU": 8}, gpus=0)


def test_an_fsdp_profile_reaches_the_workers_as_accelerate_launch_would_set_it_and_deepspeed_is_refused():
    env = accelerate_environment(str(PROFILES / "fsdp.yaml"), 4)
    assert env["ACCELERATE_USE_FSDP"] == "true" and env["FSDP_SHARDING_STRATEGY"] == "FULL_SHARD"
    assert env["FSDP_TRANSFORMER_CLS_TO_WRAP"] == "Block" and env["ACCELERATE_MIXED_PRECISION"] == "bf16"
    assert all(k.startswith(("ACCELERATE_", "FSDP_")) for k in env)  # no MASTER_ADDR etc.: Ray Train sets those
    with pytest.raises(ConfigError, match="training.accelerate_config: .*deepspeed_zero2.yaml is a DeepSpeed profile"):
        accelerate_environment(str(PROFILES / "deepspeed_zero2.yaml"), 4)
