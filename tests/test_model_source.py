"""Warm starts (`training.init_from`, llm_core/training/model_source.py) on real trainings of the ci profile and a
real MLflow sqlite registry: from the registered champion, a run directory and a checkpoint; refused
with the differing field named; `automation.retrain_mode: continue`; the parent in the lineage."""

import json
import shutil

import helpers
import pytest
import torch
from helpers import QUIET

from llm_core.training import model_source, training_run
from llm_core.registry import versions
from llm_core import tracking
from llm_core.model_files import MODEL_CONFIG_FILE, load_model
from llm_core.config import ConfigError, load_config
from llm_core.layout import DATASET_DIR
from llm_core.training.loader import TokenWindows
from llm_core.data.tokenizer import train_tokenizer
from llm_core.training.train import lr_at, model_args, train

pytestmark = pytest.mark.usefixtures("one_thread")


def config(data_dir, **training):
    """The ci profile without QK-norm (the default before 2026-12): the architecture of "a model saved
    before the switches existed", and what the other tests warm-start from and across."""
    cfg = helpers.config(data_dir, **training)
    cfg.model.qk_norm = False
    return cfg


@pytest.fixture(scope="module")
def source(data_dir, tmp_path_factory):
    """(config, result) of a 200-step training: a model that has learned something."""
    cfg = config(data_dir, max_steps=200, learning_rate=3.0e-3, checkpoint_interval=100, eval_interval=200)
    return cfg, train(cfg, tmp_path_factory.mktemp("source") / "run", log=QUIET)


@pytest.fixture
def registered(source, data_dir, tmp_path, monkeypatch):
    """The source registered as `warm` (champion) in a fresh store that the profile's URI points to."""
    cfg, result = source
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    store_cfg = cfg.model_copy(update={"data_dir": str(tmp_path)})  # its artifacts under tmp_path
    run_id = tracking.start_training_run(store_cfg, uri, tags={versions.KEY_TAG: "source"})
    versions.register(result.out_dir, data_dir / "tokenizer", tracking_uri=uri, run_id=run_id, name="warm",
                      val_bpb=2.0, tags={versions.KEY_TAG: "source"})
    return uri, run_id


def warm_config(data_dir, init_from, **training):
    return config(data_dir, max_steps=5, warmup_steps=2, checkpoint_interval=5, eval_interval=5, init_from=init_from,
                  **training)


def test_a_warm_start_from_the_champion_continues_from_its_loss(source, registered, data_dir, tmp_path):
    _, trained = source
    fresh = train(warm_config(data_dir, None), tmp_path / "fresh", log=QUIET)
    lines = []
    warm = train(warm_config(data_dir, "warm@champion"), tmp_path / "warm", log=lines.append)
    first_fresh, first_warm = fresh.history[0]["train_loss"], warm.history[0]["train_loss"]
    assert first_warm < first_fresh - 1.0, (first_warm, first_fresh)
    # Where the source left off: its first batch scored by the source model itself.
    cfg = warm_config(data_dir, "warm@champion")
    x, y = next(iter(TokenWindows(data_dir / DATASET_DIR, "train", cfg.model.block_size, cfg.training.batch_size,
                                  cfg.training.seed, 0, 1, cfg.dataset.packing)))
    with torch.no_grad():
        assert first_warm == pytest.approx(load_model(trained.out_dir)(x, y)[1].item(), abs=1e-5)
    # the weights only: step 0, and a fresh schedule with its own warmup
    assert warm.resumed_from_step == 0 and [h["step"] for h in warm.history] == [1, 2, 3, 4, 5]
    assert warm.history[0]["lr"] == pytest.approx(lr_at(1, cfg) * cfg.training.learning_rate)
    assert any("warm start from warm@champion" in line for line in lines)


def test_a_warm_start_records_its_parent_version_and_run(source, registered, data_dir):
    uri, parent_run = registered
    run = training_run.prepare(warm_config(data_dir, "warm@champion"), uri, tags={})
    resolved = run.resolved_config.read_text()  # the ranks read a directory, downloaded once
    assert '"init_from": "warm@champion"' not in resolved and "registry_cache" in resolved
    tags = tracking.client(uri).get_run(run.mlflow_run_id).data.tags
    assert tags[training_run.PARENT_TAG] == "warm/1" and tags[training_run.PARENT_RUN_TAG] == parent_run


def test_a_warm_start_from_a_run_directory_or_a_checkpoint(source, data_dir, tmp_path):
    _, trained = source
    for name, path in (("run", trained.out_dir), ("checkpoint", trained.out_dir / "checkpoints" / "step_100")):
        warm = train(warm_config(data_dir, str(path)), tmp_path / name, log=QUIET)
        assert warm.history[0]["train_loss"] < trained.history[0]["train_loss"] - 1.0, name


def test_another_architecture_is_refused_naming_the_field(source, data_dir, tmp_path):
    _, trained = source
    cfg = warm_config(data_dir, str(trained.out_dir))
    # fused_projections changes how the weights are multiplied, not what they are: not named.
    cfg.model = {**cfg.model.model_dump(), "n_layer": 3, "qk_norm": True,
                 "fused_projections": not cfg.model.fused_projections}
    with pytest.raises(ValueError, match=r"another architecture: model\.n_layer: 2 there, 3 here; "
                                         r"model\.qk_norm: False there, True here$"):
        train(cfg, tmp_path / "out", log=QUIET)


def test_a_model_saved_before_the_architecture_switches_is_compatible(source, data_dir, tmp_path):
    """model_config.json of a model trained before qk_norm/mlp/... existed: those are its defaults."""
    cfg, trained = source
    old = shutil.copytree(trained.out_dir, tmp_path / "old")
    saved = json.loads((old / MODEL_CONFIG_FILE).read_text())
    for field in ("fused_projections", "qk_norm", "mlp", "zero_init_output"):
        del saved["model"][field]
    (old / MODEL_CONFIG_FILE).write_text(json.dumps(saved))
    warm = model_source.resolve_init_from(warm_config(data_dir, str(old)))
    model_source.check_compatible(warm, model_args(cfg, saved["model"]["vocab_size"]), data_dir / "tokenizer", cfg)
    assert load_model(old).state_dict().keys() == load_model(trained.out_dir).state_dict().keys()


def test_another_tokenizer_is_refused(source, data_dir, tmp_path):
    cfg, trained = source
    run_dir = shutil.copytree(trained.out_dir, tmp_path / "source")
    shards = sorted((data_dir / "cleaned_shards" / "shards").glob("*.parquet"))
    other = cfg.model_copy(deep=True)
    other.tokenizer.special_tokens = [*cfg.tokenizer.special_tokens, "<|other|>"]
    train_tokenizer(other, shards, run_dir / "tokenizer", log=QUIET)  # the source carries its own tokenizer
    with pytest.raises(ValueError, match="trained with another tokenizer"):
        train(warm_config(data_dir, str(run_dir)), tmp_path / "out", log=QUIET)


def test_retrain_mode_continue_starts_from_the_champion_once_there_is_one(source, data_dir, tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'empty.db'}"
    cfg = load_config(overrides={"data_dir": str(data_dir), "registry": {"model_name": "warm"},
                                 "automation": {"retrain_mode": "continue"}})
    lines = []
    assert training_run.continue_from_champion(cfg, uri, lines.append).training.init_from is None
    assert "no warm@champion registered yet" in lines[-1]


def test_retrain_mode_continue_uses_the_registered_champion(registered, data_dir):
    uri, _ = registered
    cfg = load_config(overrides={"data_dir": str(data_dir), "registry": {"model_name": "warm"},
                                 "automation": {"retrain_mode": "continue"}})
    assert training_run.continue_from_champion(cfg, uri, QUIET).training.init_from == "warm@champion"
    scratch = cfg.model_copy(update={"automation": cfg.automation.model_copy(update={"retrain_mode": "scratch"})})
    assert training_run.continue_from_champion(scratch, uri, QUIET).training.init_from is None


def test_bad_retrain_mode_is_refused():
    with pytest.raises(ConfigError, match=r"automation\.retrain_mode"):
        load_config(overrides={"automation": {"retrain_mode": "resume"}})
