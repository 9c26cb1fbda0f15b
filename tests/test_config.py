"""llm_core.config: loading, deep-merging, validation and path resolution of YAML profiles."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from llm_core.config import (
    CONFIG_DIR,
    CONFIG_ENV_VAR,
    DEFAULT_PROFILE,
    PROJECT_ROOT,
    ConfigError,
    ScratchConfig,
    TrainingConfig,
    deep_merge,
    load_config,
    resolve_path,
    variants,
)
from llm_core.data.sources import discover


def write_profile(path: Path, content) -> Path:
    path.write_text(content if isinstance(content, str) else yaml.safe_dump(content))
    return path


def test_default_profile_loads_with_the_yaml_values():
    cfg = load_config()
    raw = yaml.safe_load(DEFAULT_PROFILE.read_text())
    assert isinstance(cfg, ScratchConfig)
    assert cfg.corpus.sources == raw["corpus"]["sources"] == ["data/tinyshakespeare.txt"]
    assert cfg.corpus.max_document_bytes == raw["corpus"]["max_document_bytes"]
    assert cfg.model.n_embd == raw["model"]["n_embd"] and cfg.model.n_head == raw["model"]["n_head"]
    assert cfg.dedup.num_permutations % cfg.dedup.bands == 0
    assert cfg.data_path == PROJECT_ROOT / raw["data_dir"]
    # every field of the default profile is a real field: the dump round-trips to the same config
    assert ScratchConfig.model_validate(cfg.model_dump()) == cfg


def test_partial_profile_deep_merges_over_default(tmp_path):
    profile = write_profile(tmp_path / "small.yaml", {"model": {"n_layer": 2}, "corpus": {"txt_delimiter": "<|doc|>"}})
    cfg, default = load_config(profile), load_config()
    assert cfg.model.n_layer == 2
    assert cfg.model.n_head == default.model.n_head and cfg.model.n_embd == default.model.n_embd
    assert cfg.corpus.txt_delimiter == "<|doc|>"
    assert cfg.corpus.sources == default.corpus.sources
    assert cfg.training == default.training and cfg.cleaning == default.cleaning


def test_overrides_merge_over_the_profile(tmp_path):
    profile = write_profile(tmp_path / "p.yaml", {"training": {"batch_size": 3, "grad_accum_steps": 2}})
    cfg = load_config(profile, overrides={"training": {"batch_size": 5}})
    assert (cfg.training.batch_size, cfg.training.grad_accum_steps) == (5, 2)


def test_deep_merge_does_not_mutate_its_inputs():
    base = {"a": {"b": 1, "c": [1]}, "d": 1}
    override = {"a": {"b": 2}, "e": {"f": 3}}
    merged = deep_merge(base, override)
    assert merged == {"a": {"b": 2, "c": [1]}, "d": 1, "e": {"f": 3}}
    merged["a"]["c"].append(2)
    assert base == {"a": {"b": 1, "c": [1]}, "d": 1} and override == {"a": {"b": 2}, "e": {"f": 3}}


@pytest.mark.parametrize("profile, field", [
    ({"corpus": {"sourcez": ["x.txt"]}}, "corpus.sourcez"),
    ({"modle": {"n_layer": 2}}, "modle"),
    ({"training": {"learning_rte": 0.1}}, "training.learning_rte"),
])
def test_unknown_key_is_refused_naming_the_field(tmp_path, profile, field):
    path = write_profile(tmp_path / "typo.yaml", profile)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert f"{field}: unknown field" in str(info.value)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("profile, expected", [
    ({"model": {"n_head": 3}}, ["model", "n_head (3) must divide n_embd (128)"]),
    ({"model": {"n_head": 4, "n_kv_head": 3}}, ["model", "n_kv_head (3) must divide n_head (4)"]),
    ({"dedup": {"num_permutations": 128, "bands": 10}}, ["dedup", "bands (10) must divide num_permutations (128)"]),
    ({"cleaning": {"min_chars": 500, "max_chars": 100}}, ["cleaning", "min_chars (500) is larger than max_chars"]),
    ({"corpus": {"shard_size_mb": -1}}, ["corpus.shard_size_mb", "greater than 0"]),
    ({"corpus": {"shard_size_mb": 0}}, ["corpus.shard_size_mb"]),
    ({"corpus": {"sources": []}}, ["corpus.sources", "at least one source"]),
    ({"corpus": {"extensions": [".csv"]}}, ["corpus.extensions", ".csv"]),
    ({"cleaning": {"unicode_form": "NFX"}}, ["cleaning.unicode_form", "NFX"]),
    ({"training": {"mixed_precision": "fp8"}}, ["training.mixed_precision", "fp8"]),
    ({"model": {"n_layer": "many"}}, ["model.n_layer"]),
    ({"dataset": {"val_fraction": 1.5}}, ["dataset.val_fraction"]),
    ({"corpus": {"sources": [{"name": "a", "paths": ["x"]}, {"name": "a", "paths": ["y"]}]}},
     ["corpus.sources", "['a'] named twice"]),
    ({"corpus": {"sources": [{"name": "a.b", "paths": ["x"]}]}}, ["corpus.sources", "source name 'a.b'"]),
    ({"training": {"mixture": {"tinyshakespeare": 1, "typo": 1}}},
     ["training.mixture: no source named 'typo'", "tinyshakespeare"]),
    ({"training": {"mixture": {"tinyshakespeare": 0}}}, ["training.mixture", "a weight above 0"]),
    ({"training": {"mixture": {"tinyshakespeare": -1}}}, ["training.mixture", "a number >= 0"]),
    ({"training": {"mixture_max_repetitions": {"tinyshakespeare": 0}}}, ["training.mixture_max_repetitions"]),
    ({"registry": {"protected_sources": ["nope"]}}, ["registry.protected_sources: no source named 'nope'"]),
])
def test_invalid_values_are_refused_naming_the_field(tmp_path, profile, expected):
    with pytest.raises(ConfigError) as info:
        load_config(write_profile(tmp_path / "bad.yaml", profile))
    message = str(info.value)
    for part in expected:
        assert part in message, message


def test_every_bad_field_is_reported_at_once(tmp_path):
    profile = write_profile(tmp_path / "bad.yaml", {"corpus": {"shard_size_mb": -1, "sourcez": []},
                                                     "training": {"max_steps": 0}})
    with pytest.raises(ConfigError) as info:
        load_config(profile)
    message = str(info.value)
    assert "corpus.shard_size_mb" in message and "corpus.sourcez" in message and "training.max_steps" in message


def test_env_var_picks_the_profile(tmp_path, monkeypatch):
    profile = write_profile(tmp_path / "env.yaml", {"training": {"batch_size": 7}})
    monkeypatch.setenv(CONFIG_ENV_VAR, str(profile))
    assert load_config().training.batch_size == 7
    # an explicit profile wins over the environment
    explicit = write_profile(tmp_path / "explicit.yaml", {"training": {"batch_size": 9}})
    assert load_config(explicit).training.batch_size == 9


def test_env_var_pointing_nowhere_is_a_config_error(tmp_path, monkeypatch):
    monkeypatch.setenv(CONFIG_ENV_VAR, str(tmp_path / "nope.yaml"))
    with pytest.raises(ConfigError, match="not found"):
        load_config()


def test_relative_data_dir_resolves_against_project_root(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(overrides={"data_dir": "some/run"})
    assert cfg.data_path == PROJECT_ROOT / "some" / "run"
    absolute = load_config(overrides={"data_dir": str(tmp_path / "abs")})
    assert absolute.data_path == tmp_path / "abs"
    assert resolve_path("~/x") == Path.home() / "x"


def test_relative_corpus_sources_resolve_against_project_root(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a working directory where data/tinyshakespeare.txt does not exist
    found = discover(load_config().corpus.sources, load_config().corpus.extensions)
    assert not found.missing
    assert [f.uri for f in found.files] == [str(PROJECT_ROOT / "data" / "tinyshakespeare.txt")]
    assert found.files[0].size > 0 and found.files[0].kind == "txt"


def test_missing_profile_is_a_clear_config_error(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(missing)
    assert "not found" in str(info.value) and str(missing) in str(info.value)


@pytest.mark.parametrize("content, kind", [("- a\n- b\n", "list"), ("just a string\n", "str"), ("42\n", "int")])
def test_non_mapping_yaml_is_a_clear_config_error(tmp_path, content, kind):
    path = write_profile(tmp_path / "list.yaml", content)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "must be a mapping" in str(info.value) and kind in str(info.value)


def test_invalid_yaml_is_a_clear_config_error(tmp_path):
    path = write_profile(tmp_path / "broken.yaml", "model: {n_layer: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)


def test_empty_profile_is_the_default(tmp_path):
    assert load_config(write_profile(tmp_path / "empty.yaml", "")) == load_config()


def test_section_hash_is_stable_and_tracks_changes():
    a, b = load_config(), load_config()
    assert a.section_hash("cleaning", "dedup") == b.section_hash("cleaning", "dedup")
    changed = load_config(overrides={"cleaning": {"min_words": 31}})
    assert changed.section_hash("cleaning") != a.section_hash("cleaning")
    assert changed.section_hash("dedup") == a.section_hash("dedup")


def test_sources_are_named_after_their_paths_unless_named():
    corpus = load_config(overrides={"corpus": {"sources": [
        "data/tinyshakespeare.txt", {"name": "manuals", "paths": ["docs/", "README.md"]}, "data/*.txt",
        "s3://bucket/web-2024/", "other/tinyshakespeare.md"]}}).corpus
    assert corpus.named_sources() == {"tinyshakespeare": ["data/tinyshakespeare.txt"],
                                      "manuals": ["docs/", "README.md"], "data": ["data/*.txt"],
                                      "web-2024": ["s3://bucket/web-2024/"],
                                      "tinyshakespeare-2": ["other/tinyshakespeare.md"]}
    assert corpus.source_paths()[1:3] == ["docs/", "README.md"]


def test_trainings_made_before_mixtures_keep_their_keys():
    """A profile without a mixture has the identity it had before mixtures existed: no retraining."""
    cfg = load_config()
    assert "mixture" not in cfg.identity("training")["training"]
    assert "mixture_max_repetitions" not in cfg.identity("training")["training"]
    assert "protected_sources" not in cfg.identity("registry")["registry"]
    mixed = load_config(overrides={"training": {"mixture": {"tinyshakespeare": 1}}})
    assert mixed.section_hash("training") != cfg.section_hash("training")
    assert mixed.section_hash("corpus", "cleaning", "dedup", "tokenizer", "dataset") == \
        cfg.section_hash("corpus", "cleaning", "dedup", "tokenizer", "dataset")  # no data stage re-runs


def test_a_sweep_may_vary_one_source_weight_of_the_mixture():
    cfg = load_config(overrides={"corpus": {"sources": [{"name": "a", "paths": ["x"]}, {"name": "b", "paths": ["y"]}],
                                            "pieces_are_documents": []},
                                 "training": {"mixture": {"a": 1, "b": 1}}, "sweep": {"training.mixture.b": [0.5, 2]}})
    assert [v.config.training.mixture for v in variants(cfg)] == [{"a": 1, "b": 0.5}, {"a": 1, "b": 2}]
    with pytest.raises(ConfigError, match="sweep.training.mixture.c: no such config field"):
        load_config(overrides={"sweep": {"training.mixture.c": [1]}})


def test_default_yaml_and_the_schema_defaults_agree():
    """default.yaml is the one source of defaults; the pydantic Field defaults must say the same."""
    assert ScratchConfig().model_dump(mode="json") == yaml.safe_load(DEFAULT_PROFILE.read_text())


@pytest.mark.parametrize("training, warmup", [
    ({}, 50),                                            # the default profile: 5% of 1000, as before
    ({"max_steps": 20}, 1),                              # 5% of 20 rounds to 1
    ({"max_steps": 2}, 1),
    ({"max_steps": 1}, 0),                               # a single step cannot warm up
    ({"max_steps": 300, "warmup_fraction": 0.1}, 30),
    ({"max_steps": 300, "warmup_fraction": 0}, 0),
    ({"max_steps": 20, "warmup_fraction": 0.99}, 19),    # always below max_steps
    ({"max_steps": 300, "warmup_steps": 7}, 7),          # set explicitly: used as is
])
def test_warmup_follows_the_run_length_unless_set(training, warmup):
    assert load_config(overrides={"training": training}).training.warmup == warmup


def test_existing_profiles_keep_their_warmup():
    assert load_config(CONFIG_DIR / "ci.yaml").training.warmup == 5
    assert load_config(CONFIG_DIR / "shakespeare_best.yaml").training.warmup == 100  # 5% of 2000


def check_config(profile: Path) -> subprocess.CompletedProcess:
    """`scratchllm check-config PROFILE` as a user runs it: no SCRATCHLLM_* or other variables set."""
    return subprocess.run([sys.executable, "-m", "pipelines.cli", "check-config", str(profile)], cwd=PROJECT_ROOT,
                          env={"PATH": os.environ["PATH"]}, capture_output=True, text=True, timeout=120)


def test_a_profile_that_only_shortens_training_is_valid(tmp_path):
    done = check_config(write_profile(tmp_path / "short.yaml", {"training": {"max_steps": 20}}))
    assert done.returncode == 0, done.stderr
    resolved = yaml.safe_load(done.stdout)["training"]
    assert resolved["max_steps"] == 20 and resolved["warmup_steps"] is None  # null: 5% of max_steps
    assert TrainingConfig(**resolved).warmup == 1


def test_a_warmup_the_user_set_at_or_beyond_max_steps_is_refused_naming_it(tmp_path):
    done = check_config(write_profile(tmp_path / "bad.yaml", {"training": {"max_steps": 20, "warmup_steps": 20}}))
    assert done.returncode == 2
    assert "training.warmup_steps: Value error, warmup_steps (20) must be below max_steps (20)" in done.stderr
