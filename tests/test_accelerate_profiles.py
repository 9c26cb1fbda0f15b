"""Every accelerate profile shipped in assets_config/accelerate parses, and the launch command the
trained_model asset builds uses it (or the CPU multi-process flags when none is named)."""

import sys
from pathlib import Path

import pytest
from accelerate.commands.config.config_args import ClusterConfig

from llm_core.config import CONFIG_DIR, ConfigError, load_config
from pipelines.resources import launch_command

PROFILES = sorted((CONFIG_DIR / "accelerate").glob("*.yaml"))


FSDP = {"fsdp": "FULL_SHARD", "fsdp_shard_grad_op": "SHARD_GRAD_OP", "fsdp_hybrid": "HYBRID_SHARD"}
DEEPSPEED = {"deepspeed_zero1": (1, "none"), "deepspeed_zero2": (2, "none"), "deepspeed_zero3": (3, "none"),
             "deepspeed_zero3_offload": (3, "cpu")}


def test_profiles_exist():
    assert {p.stem for p in PROFILES} >= {"cpu_2proc", "ddp", "multi_node", *FSDP, *DEEPSPEED}


@pytest.mark.parametrize("path", PROFILES, ids=lambda p: p.stem)
def test_profile_parses(path: Path):
    config = ClusterConfig.from_yaml_file(str(path))
    assert config.num_processes >= 2 and config.num_machines >= 1
    assert path.read_text().startswith("# "), "every profile starts with a comment: when to use it"
    if path.stem in FSDP:
        fsdp = config.fsdp_config
        assert config.distributed_type == "FSDP" and fsdp["fsdp_sharding_strategy"] == FSDP[path.stem]
        assert fsdp["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
        assert fsdp["fsdp_transformer_layer_cls_to_wrap"] == "Block"  # llm_core.model.Block: the wrap unit
        assert fsdp["fsdp_state_dict_type"] == "SHARDED_STATE_DICT"  # each rank saves its shard; resumable
        assert (config.num_machines > 1) == (path.stem == "fsdp_hybrid")
    if path.stem in DEEPSPEED:
        ds, (stage, offload) = config.deepspeed_config, DEEPSPEED[path.stem]
        assert config.distributed_type == "DEEPSPEED" and ds["zero_stage"] == stage
        assert ds["offload_optimizer_device"] == ds["offload_param_device"] == offload
        assert ds["gradient_clipping"] == load_config().training.grad_clip  # DeepSpeed clips, not train()
        assert "gradient_accumulation_steps" not in ds  # "auto": training.grad_accum_steps
        assert ds.get("zero3_save_16bit_model", False) == (stage == 3)  # final weights gathered


@pytest.mark.parametrize("path", [p for p in PROFILES if p.stem in DEEPSPEED], ids=lambda p: p.stem)
def test_deepspeed_profiles_become_the_plugin_accelerate_builds(path: Path, monkeypatch):
    """The environment `accelerate launch --config_file` hands the ranks, made by accelerate's own
    code, turned into the DeepSpeed config of its DeepSpeedPlugin. Starting the engine needs
    deepspeed and CUDA (not here)."""
    from accelerate.commands.launch import (
        _validate_launch_command,
        launch_command_parser,
    )
    from accelerate.utils import DeepSpeedPlugin
    from accelerate.utils.launch import prepare_deepspeed_cmd_env

    args, defaults, _ = _validate_launch_command(
        launch_command_parser().parse_args(["--config_file", str(path), "-m", "llm_core.training.train"]))
    args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)  # as launch_command does
    _, env = prepare_deepspeed_cmd_env(args)
    for key, value in env.items():
        if key.startswith("ACCELERATE_"):
            monkeypatch.setenv(key, value)
    config = DeepSpeedPlugin().deepspeed_config
    stage, offload = DEEPSPEED[path.stem]
    assert config["zero_optimization"]["stage"] == stage
    assert config["zero_optimization"]["offload_optimizer"]["device"] == offload
    assert config["zero_optimization"]["offload_param"]["device"] == offload
    assert config["gradient_accumulation_steps"] == "auto" and config["gradient_clipping"] == 1.0
    assert config["zero_optimization"].get("stage3_gather_16bit_weights_on_model_save", False) == (stage == 3)


def test_launch_command_uses_the_named_profile_or_cpu_flags():
    one_rank = launch_command(load_config(), "pipelines.train_entry", ["--x"])  # no launcher to start it
    assert one_rank == [sys.executable, "-m", "pipelines.process_group", "--", sys.executable, "-m",
                        "pipelines.train_entry", "--x"]
    cpu = load_config(overrides={"training": {"num_processes": 2}})
    command = launch_command(cpu, "pipelines.train_entry", ["--x"])
    assert command[-3:] == ["-m", "pipelines.train_entry", "--x"] and "pipelines.process_group" in command
    assert "--multi_gpu" in command and command[command.index("--num_processes") + 1] == "2"

    fsdp = load_config(overrides={"training": {"num_processes": 8, "optimizer": "adamw",
                                                "accelerate_config": str(CONFIG_DIR / "accelerate" / "fsdp.yaml")}})
    command = launch_command(fsdp, "pipelines.train_entry", [])
    assert command[command.index("--config_file") + 1].endswith("fsdp.yaml") and "--multi_gpu" not in command


@pytest.mark.parametrize("profile", ["fsdp", "fsdp_shard_grad_op", "deepspeed_zero1", "deepspeed_zero3"])
def test_muon_with_a_sharding_profile_is_refused_before_work_starts(profile):
    """Muon orthogonalizes each whole matrix: sharded (flattened) parameters would break it mid-run."""
    path = str(CONFIG_DIR / "accelerate" / f"{profile}.yaml")
    with pytest.raises(ConfigError, match=r"training: .*optimizer: muon .* shards them .*use optimizer: adamw"):
        load_config(overrides={"training": {"optimizer": "muon", "accelerate_config": path}})
    assert load_config(overrides={"training": {"optimizer": "muon", "accelerate_config": str(
        CONFIG_DIR / "accelerate" / "ddp.yaml")}}).training.optimizer == "muon"  # DDP keeps whole matrices
