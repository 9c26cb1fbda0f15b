"""llm_core.evaluate on a tiny trained model: the metrics agree with training's. Generation: test_generate.py."""

import math

import pytest

from llm_core import evaluate as ev


def test_metrics_match_the_final_evaluation_of_training(trained):
    cfg, result, model = trained
    r = ev.evaluate(cfg, model, cfg.data_path / "tokenizer")
    assert r.val_loss == pytest.approx(result.final_val_loss, rel=1e-6)
    assert r.val_bpb == pytest.approx(result.val_bpb, rel=1e-6)
    assert r.perplexity == pytest.approx(math.exp(r.val_loss))
    assert [s["prompt"] for s in r.samples] == ["ROMEO:", ""]  # an empty prompt starts from <|endoftext|>
