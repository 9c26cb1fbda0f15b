"""Decontamination (llm_core/data/decontamination.py, run by tokenized_dataset): a task file whose items
are planted inside training documents of a real corpus; the check removes exactly those documents,
or keeps them and fails the blocking check, by configuration; near misses and validation documents
are left alone."""

from __future__ import annotations

import json

import pyarrow as pa
import pytest
from helpers import QUIET, build_shards, make_config, write_jsonl

from llm_core.data.decontamination import eval_ngrams, ngram_hashes, words
from llm_core.layout import CLEANED_SHARDS_DIR, DATASET_DIR
from llm_core.data.split import is_validation
from llm_core.data.tokenized_dataset import build_tokenized_dataset, verify_decontamination, verify_token_accounting
from llm_core.data.tokenizer import load_tokenizer, train_tokenizer

ITEMS = 4  # task items, each from a paragraph that is not in the corpus


def item_text(item: dict) -> str:
    return f"{item['context']}{item['choices'][item['label']]}"


@pytest.fixture(scope="module")
def planted(tmp_path_factory, prose):
    """A corpus of 60 paragraphs; items 0 and 1 are planted into 8 documents each (copied as they are,
    and upper-cased with extra punctuation), item 2 only as 12 of its words (a near miss at n = 13),
    item 3 nowhere. Returns (root, src, task path, tokenizer dir, the planted pieces' texts)."""
    root = tmp_path_factory.mktemp("decontamination")
    items = []
    for k, paragraph in enumerate(prose[100:100 + ITEMS]):
        split = paragraph.split()
        items.append({"context": " ".join(split[:20]), "choices": [" " + " ".join(split[20:26]), " no idea"],
                      "label": 0, "id": f"q{k}"})
    task = root / "qa.jsonl"
    task.write_text("".join(json.dumps(item) + "\n" for item in items))
    docs = list(prose[:60])
    for k in range(16):  # the copies sit in the middle of otherwise ordinary documents
        text = item_text(items[k % 2])
        copy = text if k < 8 else text.upper().replace(" ", ", ")
        docs[k * 3] = f"{docs[k * 3][:150]} {copy} {docs[k * 3][150:]}"
    near_miss = " ".join(words(item_text(items[2]))[5:17])
    docs[59] = f"{docs[59]} {near_miss}"
    src = root / "src"
    src.mkdir()
    write_jsonl(src / "docs.jsonl", docs)
    return root, src, task, docs


def build(root, src, task, mode: str, name: str):
    cfg = make_config(root / name, [src], corpus={"shard_size_mb": 0.008}, tokenizer={"vocab_size": 320},
                      dataset={"val_fraction": 0.25, "builtin_task_items": 0, "decontamination": mode},
                      evaluation={"tasks": [{"name": "qa", "path": str(task)}]})
    tok_dir = root / name / "tokenizer"
    if not tok_dir.exists():
        train_tokenizer(cfg, build_shards(cfg), tok_dir, log=QUIET)
    return cfg, tok_dir, build_tokenized_dataset(cfg, load_tokenizer(tok_dir), tok_dir, log=QUIET)


def pieces(cfg) -> dict[str, dict]:
    """Every cleaned piece by id: its doc_id, text and split."""
    import pyarrow.parquet as pq

    out = {}
    for shard in sorted((cfg.data_path / CLEANED_SHARDS_DIR / "shards").glob("*.parquet")):
        for row in pq.read_table(shard, columns=["id", "doc_id", "text"]).to_pylist():
            split = "val" if is_validation(row["doc_id"], cfg.dataset.val_fraction, cfg.dataset.seed) else "train"
            out[row["id"]] = {**row, "split": split}
    return out


def stored_ids(cfg, split: str) -> set[str]:
    out = set()
    for path in (cfg.data_path / DATASET_DIR / split).glob("*.docs.arrow"):
        out |= set(pa.ipc.open_file(pa.memory_map(str(path))).read_all().column("id").to_pylist())
    return out


def test_ngrams_ignore_case_and_punctuation_and_need_n_words():
    a = ngram_hashes("To be, or not to be: that is the question", 3)
    b = ngram_hashes("TO BE OR NOT TO BE -- THAT IS THE QUESTION!", 3)
    assert len(a) == 8 and a.tolist() == b.tolist()
    assert len(ngram_hashes("only four words here", 5)) == 0
    assert ngram_hashes("to be or", 3).tolist() != ngram_hashes("be or to", 3).tolist()  # order matters


def test_items_shorter_than_n_are_counted_not_checked(tmp_path):
    task = tmp_path / "t.jsonl"
    task.write_text(json.dumps({"context": "one two three", "choices": [" four", " five"], "label": 0}) + "\n"
                    + json.dumps({"context": " ".join(map(str, range(20))), "choices": [" a", " b"], "label": 1})
                    + "\n")
    ngrams = eval_ngrams({"t": task}, 13)
    assert (ngrams.items_checked, ngrams.items_too_short) == (2, 1)
    assert len(ngrams.hashes) == 21 - 13 + 1 and set(ngrams.owners) == {"t:2"}  # ids default to the line number
    assert ngrams.match("words " + " ".join(map(str, range(20))) + " b and more") == "t:2"
    assert ngrams.match(" ".join(map(str, range(8, 20))) + " b") == "t:2"  # the last 13 words
    assert ngrams.match(" ".join(map(str, range(8, 20))) + " a") is None  # with the wrong choice: not the item


def test_planted_copies_are_removed_exactly(planted):
    root, src, task, docs = planted
    cfg, tok_dir, r = build(root, src, task, "remove", "remove")
    everything = pieces(cfg)
    copies = {pid for pid, p in everything.items() if any(p["text"] == docs[k * 3] for k in range(16))}
    assert len(copies) == 16
    expected = {pid for pid in copies if everything[pid]["split"] == "train"}
    assert 0 < len(expected) < 16  # some copies landed in validation: those stay (nothing is trained on them)
    found = r.contamination["documents"]
    assert {c["id"] for c in found} == expected and all(c["removed"] for c in found)
    assert r.contamination["num_contaminated_documents"] == len(expected) == r.contamination["num_removed"]
    for c in found:  # named with the item it matches
        k = [k for k in range(16) if everything[c["id"]]["text"] == docs[k * 3]][0]
        assert c["item"] == f"qa:q{k % 2}" and c["doc_id"] == everything[c["id"]]["doc_id"]
    train, val = stored_ids(cfg, "train"), stored_ids(cfg, "val")
    assert not expected & train and copies - expected <= val
    assert train | val | expected == set(everything)  # nothing else is missing (the near miss is trained on)
    assert r.num_train_documents == sum(p["split"] == "train" for p in everything.values()) - len(expected)
    assert verify_token_accounting(cfg, load_tokenizer(tok_dir))[0]
    passed, details = verify_decontamination(cfg)
    assert passed and f"{len(expected)} contaminated training documents removed" in details

    again = build_tokenized_dataset(cfg, load_tokenizer(tok_dir), tok_dir, log=QUIET)
    assert again.num_shards_encoded == 0 and again.contamination["documents"] == found


def test_fail_mode_keeps_them_and_fails_the_check_then_remove_reencodes_only_their_shards(planted):
    root, src, task, _ = planted
    cfg, tok_dir, r = build(root, src, task, "fail", "fail")
    found = r.contamination["documents"]
    assert found and not any(c["removed"] for c in found)
    assert {c["id"] for c in found} <= stored_ids(cfg, "train")  # kept: the check stops training instead
    passed, details = verify_decontamination(cfg)
    assert not passed
    assert f"{len(found)} contaminated training documents kept (dataset.decontamination: fail)" in details
    assert found[0]["id"] in details and "matches qa:q" in details

    removing = cfg.model_copy(update={"dataset": cfg.dataset.model_copy(update={"decontamination": "remove"})})
    after = build_tokenized_dataset(removing, load_tokenizer(tok_dir), tok_dir, log=QUIET)
    shards_with_copies = {e["name"] for e in json.loads((cfg.data_path / DATASET_DIR / "manifest.json").read_text())
                          ["shards"] if e["contaminated"]}
    assert after.num_shards_encoded == len(shards_with_copies) < after.num_shards_encoded + after.num_shards_reused
    assert {c["id"] for c in after.contamination["documents"]} == {c["id"] for c in found}
    assert verify_decontamination(removing)[0]


def test_off_checks_nothing(planted):
    root, src, task, _ = planted
    cfg, _, r = build(root, src, task, "off", "off")
    assert r.contamination["documents"] == [] and verify_decontamination(cfg) == (
        True, "not checked: dataset.decontamination is off")


def test_a_bad_task_file_stops_tokenized_dataset_before_encoding(planted, tmp_path):
    root, src, _, _ = planted
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"context": "c", "choices": ["a", "b"], "label": 0}\n{broken\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: not a JSON object"):
        build(root, src, bad, "remove", "bad")
    assert not (root / "bad" / DATASET_DIR / "manifest.json").exists()


@pytest.mark.parametrize("tasks,message", [
    ([{"name": "continuation", "path": "x.jsonl"}], "task name 'continuation' is used twice"),
    ([{"name": "qa", "path": "x.jsonl"}, {"name": "qa", "path": "y.jsonl"}], "task name 'qa' is used twice"),
    ([{"name": "my task", "path": "x.jsonl"}], "evaluation.tasks.0.name"),
    (["x.jsonl"], "evaluation.tasks.0"),
])
def test_task_entries_are_checked_by_the_config(tmp_path, tasks, message):
    with pytest.raises(ValueError, match=message):
        make_config(tmp_path, [], evaluation={"tasks": tasks})


def test_in_dagster_the_failed_check_stops_training(planted, instance, tmp_path):
    """dataset.decontamination: fail through the code location: tokenized_dataset materializes with
    num_contaminated_documents, its blocking check fails, and trained_model does not run."""
    import dagster as dg
    import yaml

    from pipelines.definitions import defs

    root, src, task, _ = planted
    profile = tmp_path / "profile.yaml"
    profile.write_text(yaml.safe_dump({
        "corpus": {"sources": [str(src)], "shard_size_mb": 0.008}, "tokenizer": {"vocab_size": 320},
        "dataset": {"val_fraction": 0.25, "builtin_task_items": 0, "decontamination": "fail"},
        "evaluation": {"tasks": [{"name": "qa", "path": str(task)}]},
        "training": {"peak_flops": 1e12, "max_steps": 2, "batch_size": 2}}))
    assets = ["raw_corpus", "cleaned_shards", "tokenizer", "tokenized_dataset", "trained_model"]
    result = defs.resolve_job_def("materialize_everything").execute_in_process(
        instance=instance, raise_on_error=False, asset_selection=[dg.AssetKey(a) for a in assets],
        run_config={"resources": {"scratchllm": {"config": {"profile": str(profile),
                                                            "data_dir": str(tmp_path / "data")}}}})
    checks = {c.asset_check_key.name: c for c in result.get_asset_check_evaluations()}
    assert not checks["no_eval_contamination"].passed
    assert "contaminated training documents kept" in checks["no_eval_contamination"].metadata["details"].value
    event = instance.get_latest_materialization_event(dg.AssetKey("tokenized_dataset"))
    assert event.asset_materialization.metadata["num_contaminated_documents"].value > 0
    assert instance.get_latest_materialization_event(dg.AssetKey("trained_model")) is None
