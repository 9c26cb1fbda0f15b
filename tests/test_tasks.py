"""Multiple-choice tasks (llm_core/evaluation/multiple_choice.py) on a tiny trained model and its real
tokenizer: bad task files refused naming file and line; the batched log-likelihoods equal one-at-a-time forward passes;
accuracy, length-normalized accuracy and the centered score; the evaluation report and MLflow names."""

import json
import math
from collections import Counter

import pytest
import torch
import torch.nn.functional as F

from llm_core.data import task_items
from llm_core.evaluation import evaluate as ev
from llm_core.evaluation import multiple_choice
from llm_core.data import tokenized_dataset as td
from llm_core.config import TaskFile
from llm_core.files import read_json
from llm_core.layout import CLEANED_SHARDS_DIR
from llm_core.data.split import plan_split
from llm_core.data.tokenizer import EOT, load_tokenizer


def task_file(path):
    """An evaluation.tasks entry named after its file."""
    return TaskFile(name=path.stem, path=str(path))


def write_task(path, items):
    path.write_text("".join(json.dumps(item) + "\n" for item in items))
    return path


ITEMS = [
    {"context": "ROMEO: What light through yonder", "choices": [" window breaks", " is it", " banana"], "label": 0},
    {"context": "To be or not to", "choices": [" be", " sea"], "label": 0, "id": "hamlet"},
    {"context": "My kingdom for a", "choices": [" horse", " house", " crown", " cat"], "label": 1},
]


@pytest.mark.parametrize("line,message", [
    ("{not json", "not a JSON object"),
    ('["a list"]', "not a JSON object"),
    ('{"context": "", "choices": ["a", "b"], "label": 0}', "'context' must be a non-empty string"),
    ('{"context": "c", "choices": ["a"], "label": 0}', "'choices' must be a list of at least 2"),
    ('{"context": "c", "choices": ["a", ""], "label": 0}', "'choices' must be a list of at least 2"),
    ('{"context": "c", "choices": ["a", "b"], "label": 2}', "'label' must be an integer from 0 to 1, not 2"),
    ('{"context": "c", "choices": ["a", "b"], "label": true}', "'label' must be an integer"),
    ('{"context": "c", "choices": ["a", "b"]}', "'label' must be an integer"),
])
def test_a_bad_item_is_refused_naming_the_file_and_line(tmp_path, line, message):
    path = tmp_path / "task.jsonl"
    path.write_text(json.dumps(ITEMS[0]) + "\n\n" + line + "\n")
    with pytest.raises(ValueError, match=rf"task\.jsonl:3: {message}"):
        task_items.load_task(path)


def test_a_missing_or_empty_task_file_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="evaluation.tasks: no task file .*nowhere.jsonl"):
        task_items.load_task(tmp_path / "nowhere.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="has no items"):
        task_items.load_task(tmp_path / "empty.jsonl")


def test_batched_log_likelihoods_equal_one_forward_per_choice(trained, tmp_path):
    cfg, _, model = trained
    tokenizer = load_tokenizer(cfg.data_path / "tokenizer")
    items = task_items.load_task(write_task(tmp_path / "t.jsonl", ITEMS))
    rows = multiple_choice.choice_rows(items, tokenizer, model.args.block_size)
    assert len(rows) == 9 and all(ids[0] == tokenizer.token_to_id(EOT) for ids, _ in rows)
    batched = multiple_choice.choice_log_likelihoods(model, rows, batch_size=4)  # several batches, padded rows
    for (ids, n), got in zip(rows, batched):
        x = torch.tensor([ids[:-1]])
        with torch.no_grad():
            logp = F.log_softmax(model(x)[0][0].float(), dim=-1)
        expected = sum(logp[t, ids[t + 1]].item() for t in range(len(ids) - 1 - n, len(ids) - 1))
        assert got == pytest.approx(expected, abs=1e-4)


def test_accuracies_follow_the_log_likelihoods(trained, tmp_path):
    cfg, _, model = trained
    tokenizer = load_tokenizer(cfg.data_path / "tokenizer")
    items = task_items.load_task(write_task(tmp_path / "t.jsonl", ITEMS))
    rows = multiple_choice.choice_rows(items, tokenizer, model.args.block_size)
    ll = multiple_choice.choice_log_likelihoods(model, rows)
    per_item = [ll[0:3], ll[3:5], ll[5:9]]
    acc = sum(max(range(len(v)), key=v.__getitem__) == item.label for v, item in zip(per_item, items)) / 3
    score = multiple_choice.score_task("t", items, model, tokenizer)
    assert score.items == 3 and score.acc == acc
    assert score.random == pytest.approx((1 / 3 + 1 / 2 + 1 / 4) / 3)
    assert score.centered == pytest.approx((acc - score.random) / (1 - score.random))
    assert 0 <= score.acc_norm <= 1
    # Relabelled so that the model's own favourite is right every time: accuracy 1, centered 1.
    favourite = [dict(item, label=max(range(len(v)), key=v.__getitem__)) for item, v in zip(ITEMS, per_item)]
    favourite_items = task_items.load_task(write_task(tmp_path / "p.jsonl", favourite))
    perfect = multiple_choice.score_task("p", favourite_items, model, tokenizer)
    assert perfect.acc == 1.0 and perfect.centered == pytest.approx(1.0)
    assert multiple_choice.core([score, perfect]) == pytest.approx((score.centered + 1.0) / 2)


def test_tasks_are_in_the_evaluation_and_a_bad_file_stops_it_before_any_scoring(trained, tmp_path):
    cfg, _, model = trained
    good = write_task(tmp_path / "shakespeare_mc.jsonl", ITEMS)
    with_tasks = cfg.model_copy(update={"evaluation": cfg.evaluation.model_copy(update={"tasks": [task_file(good)]})})
    r = ev.evaluate(with_tasks, model, cfg.data_path / "tokenizer")
    assert [t.name for t in r.tasks] == ["continuation", "shakespeare_mc"]  # the built-in task first
    assert r.core == pytest.approx((r.tasks[0].centered + r.tasks[1].centered) / 2)
    assert set(r.tasks[1].metrics()) == {"eval/shakespeare_mc/acc", "eval/shakespeare_mc/acc_norm",
                                         "eval/shakespeare_mc/centered"}
    assert math.isnan(multiple_choice.core([]))  # no tasks: no score

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"context": "c", "choices": ["a", "b"], "label": 5}\n')
    tasks = [task_file(good), task_file(bad)]
    broken = cfg.model_copy(update={"evaluation": cfg.evaluation.model_copy(update={"tasks": tasks})})
    with pytest.raises(ValueError, match=r"bad\.jsonl:1: 'label'"):
        ev.evaluate(broken, model, cfg.data_path / "tokenizer")


def test_the_builtin_task_comes_from_validation_documents_and_is_deterministic(trained, tmp_path):
    cfg = trained[0]
    cleaned = read_json(cfg.data_path / CLEANED_SHARDS_DIR / "manifest.json")["parts"]
    shards = [cfg.data_path / CLEANED_SHARDS_DIR / "shards" / part["name"] for part in cleaned]
    split = plan_split(cfg, shards).split
    items = task_items.load_task(td.builtin_task_path(cfg))
    assert len(items) == cfg.dataset.builtin_task_items
    assert all(len(item.choices) == task_items.CHOICES for item in items)
    assert min(Counter(item.label for item in items).values()) > len(items) / 8  # the answer is anywhere
    val = " ".join(" ".join(text.split()) for text in td.val_texts(cfg, shards, split))
    for item in items:  # the passage and its true next words follow each other in a validation document
        assert item.context + item.choices[item.label] in val
    again = tmp_path / "again.jsonl"
    texts = td.val_texts(cfg, shards, split)
    task_items.build_continuation_task(texts, again, cfg.dataset.builtin_task_items, cfg.dataset.seed)
    assert again.read_bytes() == td.builtin_task_path(cfg).read_bytes()
    assert task_items.build_continuation_task(["too short"] * 10, again, 5, 0) == 0 and not again.exists()


@pytest.mark.slow
def test_the_default_profiles_model_beats_chance_on_the_builtin_task_and_an_untrained_one_does_not(tmp_path):
    """The shipped default profile, trained as `make run` trains it (~90 s here), on the built-in task of
    its own validation split; the same architecture untrained. Chance is 0.25 (4 choices): "clearly
    above" is more than 3 standard errors of a 500-item accuracy at chance, "near" within 3."""
    from helpers import QUIET, build_dataset

    from llm_core.model_files import load_model
    from llm_core.config import load_config
    from llm_core.model import Transformer
    from llm_core.training.train import model_args, train

    cfg = load_config(None, {"data_dir": str(tmp_path)})  # default.yaml, only the data directory moved
    build_dataset(cfg)
    items = task_items.load_task(td.builtin_task_path(cfg))
    tokenizer = load_tokenizer(cfg.data_path / "tokenizer")
    torch.manual_seed(cfg.training.seed)
    untrained = Transformer(model_args(cfg, tokenizer.get_vocab_size()))  # the default model, random weights
    train(cfg, tmp_path / "model", log=QUIET)
    trained = load_model(tmp_path / "model")
    chance = multiple_choice.score_task("continuation", items, untrained.eval(), tokenizer)
    learned = multiple_choice.score_task("continuation", items, trained, tokenizer)
    stderr = math.sqrt(0.25 * 0.75 / len(items))
    print(f"continuation: untrained acc {chance.acc:.3f} / acc_norm {chance.acc_norm:.3f}, default profile "
          f"{learned.acc:.3f} / {learned.acc_norm:.3f}, random {learned.random:.3f}")
    assert learned.random == chance.random == 0.25 and len(items) == cfg.dataset.builtin_task_items
    assert abs(chance.acc - 0.25) < 3 * stderr and abs(chance.acc_norm - 0.25) < 3 * stderr
    assert learned.acc_norm > 0.25 + 3 * stderr and learned.acc > 0.25 + 2 * stderr
