"""llm_core.evaluate on a tiny trained model: the metrics agree with training's, samples are seeded."""

import math

import pytest
from helpers import QUIET, build_shards

from llm_core import evaluate as ev
from llm_core.config import PROJECT_ROOT, load_config
from llm_core.tokenize import build_tokenized_dataset
from llm_core.tokenizer import load, train_tokenizer
from llm_core.train import load_model, train


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    cfg = load_config(PROJECT_ROOT / "assets_config" / "ci.yaml", {
        "data_dir": str(root), "training": {"max_steps": 10, "warmup_steps": 2, "eval_interval": 10},
        "evaluation": {"prompts": ["ROMEO:", ""], "max_new_tokens": 12, "temperature": 0.8, "seed": 3}})
    shards = build_shards(cfg)
    train_tokenizer(cfg, shards, root / "tokenizer", log=QUIET)
    build_tokenized_dataset(cfg, load(root / "tokenizer"), root / "tokenizer", log=QUIET)
    result = train(cfg, root / "model", log=QUIET)
    return cfg, result, load_model(root / "model")


def test_metrics_match_the_final_evaluation_of_training(trained):
    cfg, result, model = trained
    r = ev.evaluate(cfg, model, cfg.data_path / "tokenizer")
    assert r.val_loss == pytest.approx(result.final_val_loss, rel=1e-6)
    assert r.val_bpb == pytest.approx(result.val_bpb, rel=1e-6)
    assert r.perplexity == pytest.approx(math.exp(r.val_loss))
    assert [s["prompt"] for s in r.samples] == ["ROMEO:", ""]  # an empty prompt starts from <|endoftext|>


def test_samples_are_seeded_and_greedy_at_temperature_zero(trained):
    cfg, _, model = trained
    tok = load(cfg.data_path / "tokenizer")
    same = [ev.sample(model, tok, "ROMEO:", 12, 0.8, seed=5) for _ in range(2)]
    assert same[0] == same[1] and len(same[0]) > 0
    assert ev.sample(model, tok, "ROMEO:", 12, 0.8, seed=6) != same[0]
    assert ev.sample(model, tok, "ROMEO:", 12, 0.0, seed=1) == ev.sample(model, tok, "ROMEO:", 12, 0.0, seed=2)
