"""llm_core.evaluate on a tiny trained model: the metrics agree with training's, samples are seeded."""

import math

import pytest

from llm_core import evaluate as ev
from llm_core.generate import TextGenerator, load_generator, package_model
from llm_core.tokenizer import load


def test_metrics_match_the_final_evaluation_of_training(trained):
    cfg, result, model = trained
    r = ev.evaluate(cfg, model, cfg.data_path / "tokenizer")
    assert r.val_loss == pytest.approx(result.final_val_loss, rel=1e-6)
    assert r.val_bpb == pytest.approx(result.val_bpb, rel=1e-6)
    assert r.perplexity == pytest.approx(math.exp(r.val_loss))
    assert [s["prompt"] for s in r.samples] == ["ROMEO:", ""]  # an empty prompt starts from <|endoftext|>


def test_samples_are_seeded_and_greedy_at_temperature_zero(trained):
    cfg, _, model = trained
    generator = TextGenerator(model, load(cfg.data_path / "tokenizer"))
    same = [generator.complete("ROMEO:", max_new_tokens=12, temperature=0.8, seed=5) for _ in range(2)]
    assert same[0] == same[1] and len(same[0]) > 0
    assert generator.complete("ROMEO:", max_new_tokens=12, temperature=0.8, seed=6) != same[0]
    greedy = [generator.complete("ROMEO:", max_new_tokens=12, temperature=0.0, seed=s) for s in (1, 2)]
    assert greedy[0] == greedy[1]


def test_streamed_pieces_add_up_to_the_completion(trained):
    cfg, _, model = trained
    generator = TextGenerator(model, load(cfg.data_path / "tokenizer"))
    pieces = list(generator.stream("ROMEO:", max_new_tokens=30, temperature=1.0, seed=4))
    assert len(pieces) > 1 and all(pieces)
    assert "".join(pieces) == generator.complete("ROMEO:", max_new_tokens=30, temperature=1.0, seed=4)


def test_a_packaged_model_generates_the_same_text(trained, tmp_path):
    cfg, result, model = trained
    package = package_model(result.out_dir, cfg.data_path / "tokenizer", tmp_path / "package")
    assert sorted(p.name for p in package.iterdir()) == ["model.safetensors", "model_config.json", "tokenizer"]
    expected = TextGenerator(model, load(cfg.data_path / "tokenizer")).complete("ROMEO:", seed=2)
    assert load_generator(package).complete("ROMEO:", seed=2) == expected
    with pytest.raises(FileNotFoundError, match="not a trained model directory"):
        load_generator(tmp_path)
