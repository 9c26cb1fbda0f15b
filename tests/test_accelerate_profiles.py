"""Every accelerate profile shipped in assets_config/accelerate parses, and the launch command the
trained_model asset builds uses it (or the CPU multi-process flags when none is named)."""

from pathlib import Path

import pytest
from accelerate.commands.config.config_args import ClusterConfig

from llm_core.config import CONFIG_DIR, load_config
from pipelines.resources import accelerate_command

PROFILES = sorted((CONFIG_DIR / "accelerate").glob("*.yaml"))


def test_profiles_exist():
    assert {p.stem for p in PROFILES} >= {"cpu_2proc", "ddp", "fsdp", "multi_node"}


@pytest.mark.parametrize("path", PROFILES, ids=lambda p: p.stem)
def test_profile_parses(path: Path):
    config = ClusterConfig.from_yaml_file(str(path))
    assert config.num_processes >= 2 and config.num_machines >= 1
    if path.stem == "fsdp":
        assert config.fsdp_config["fsdp_transformer_layer_cls_to_wrap"] == "Block"


def test_launch_command_uses_the_named_profile_or_cpu_flags():
    cpu = load_config(overrides={"training": {"num_processes": 2}})
    command = accelerate_command(cpu, "pipelines.train_entry", ["--x"])
    assert command[-3:] == ["-m", "pipelines.train_entry", "--x"] and "pipelines.process_group" in command
    assert "--multi_gpu" in command and command[command.index("--num_processes") + 1] == "2"

    fsdp = load_config(overrides={"training": {"num_processes": 8,
                                                "accelerate_config": str(CONFIG_DIR / "accelerate" / "fsdp.yaml")}})
    command = accelerate_command(fsdp, "pipelines.train_entry", [])
    assert command[command.index("--config_file") + 1].endswith("fsdp.yaml") and "--multi_gpu" not in command
