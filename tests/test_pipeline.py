"""End to end: the data assets materialized through Dagster in a temporary instance, the CLI,
per-run config as the UI sends it, incremental re-materialization, and a killed run."""

import gzip
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from llm_core.registry import versions
from llm_core.model_files import load_model
from llm_core.config import PROJECT_ROOT, load_config
from llm_core.data.ingest import read_source
from llm_core.data.raw_corpus import _read_options, build_raw_corpus
from llm_core.data.sources import discover

SHAKESPEARE = (PROJECT_ROOT / "data" / "tinyshakespeare.txt").read_text()
CLI = [sys.executable, "-m", "pipelines.cli"]


def write_corpus(root: Path, n_files: int = 4, chars: int = 30_000) -> Path:
    """A few real-text files plus one of each kind of broken input."""
    corpus = root / "corpus"
    corpus.mkdir(parents=True)
    for i in range(n_files):
        (corpus / f"play_{i}.txt").write_text(SHAKESPEARE[i * chars:(i + 1) * chars])
    (corpus / "bad_utf8.txt").write_bytes(b"fine start " * 40 + b"\xff\xfe broken")
    (corpus / "binary.txt").write_bytes(b"\x00\x01\x02" * 100)
    (corpus / "empty.txt").write_bytes(b"")
    packed = gzip.compress(SHAKESPEARE[600_000:].encode())
    (corpus / "truncated.txt.gz").write_bytes(packed[: len(packed) * 2 // 3])
    (corpus / "records.jsonl").write_text(
        json.dumps({"text": SHAKESPEARE[200_000:203_000]}) + "\n{not json\n" + json.dumps({"body": "x"}) + "\n")
    return corpus


def run_config(data_dir: Path, corpus: Path, **sections) -> dict:
    """Run config as the Dagster UI launchpad sends it."""
    # Small documents (the plays are collections of scenes) and a 20% val split: enough validation
    # documents even in a tiny corpus.
    ops = {"raw_corpus": {"config": {"corpus": {"sources": [str(corpus)], "shard_size_mb": 0.05,
                                                "max_document_bytes": 2048, "pieces_are_documents": [str(corpus)]}}},
           # in-process: a pool of cleaning processes would cost more to start than these few KB take
           "cleaned_shards": {"config": {"cleaning": {"num_workers": 1}}},
           "tokenized_dataset": {"config": {"dataset": {"val_fraction": 0.2}}}}
    for asset, section_values in sections.items():
        ops.setdefault(asset, {"config": {}})["config"].update(section_values)
    return {"resources": {"scratchllm": {"config": {"data_dir": str(data_dir)}}}, "ops": ops}


DATA_ASSETS = ["raw_corpus", "cleaned_shards", "tokenizer", "tokenized_dataset"]
TINY_TRAINING = {"model": {"n_layer": 1, "n_head": 2, "n_kv_head": 1, "n_embd": 32, "block_size": 32},
                 "training": {"max_steps": 6, "warmup_steps": 2, "batch_size": 4, "eval_interval": 3,
                              "checkpoint_interval": 3, "eval_batches": 2, "peak_flops": 1e12}}


def materialize(instance, config: dict, assets: list[str] = DATA_ASSETS):
    from pipelines.definitions import defs

    job = defs.resolve_job_def("materialize_everything")
    return job.execute_in_process(instance=instance, run_config=config, raise_on_error=False,
                                  asset_selection=[dg.AssetKey(a) for a in assets])


def latest_metadata(instance, key: str) -> dict:
    event = instance.get_latest_materialization_event(dg.AssetKey(key))
    return {k: v.value for k, v in event.asset_materialization.metadata.items()}


@pytest.mark.slow
def test_materialize_all_in_a_dagster_instance(instance, tmp_path, monkeypatch):
    corpus = write_corpus(tmp_path)
    elsewhere = tmp_path / "elsewhere"  # the working directory, where no MLflow file may appear
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    task = tmp_path / "cloze.jsonl"  # a multiple-choice task file, as a user writes one, listed in the profile
    task.write_text(json.dumps({"context": "To be or not to", "choices": [" be", " sea"], "label": 0}) + "\n")
    profile = tmp_path / "profile.yaml"
    profile.write_text(yaml.safe_dump({"evaluation": {"tasks": [{"name": "cloze", "path": str(task)}]}}))
    config = run_config(tmp_path / "data", corpus, trained_model=TINY_TRAINING,
                        model_evaluation={"evaluation": {"max_new_tokens": 8}})
    config["resources"]["scratchllm"]["config"]["profile"] = str(profile)
    result = materialize(instance, config, assets=[*DATA_ASSETS, "trained_model", "model_evaluation",
                                                   "registered_model", "hf_export"])
    assert result.success

    model = latest_metadata(instance, "trained_model")
    assert model["world_size"] == 1 and model["num_parameters"] > 0 and model["final_val_loss"] > 0
    assert model["peak_memory_mb"] > 0 and model["planned_memory_mb"] > 0  # scratchllm plan vs measured
    assert "strategy: DDP" in model["plan_vs_measured"]
    assert "| peak memory per device (MB) |" in model["plan_vs_measured"]
    run = MlflowClient(f"sqlite:///{tmp_path / 'data' / 'mlflow.db'}").get_run(model["mlflow_run_id"])
    assert {f"data_version.{a}" for a in DATA_ASSETS} <= set(run.data.tags)  # runs compare by data too
    assert run.data.params["model.n_embd"] == "32" and "val_loss" in run.data.metrics
    assert len(MlflowClient(f"sqlite:///{tmp_path / 'data' / 'mlflow.db'}").get_metric_history(
        model["mlflow_run_id"], "train_loss")) == 6  # every step

    evaluation = latest_metadata(instance, "model_evaluation")
    assert "val_bpb" not in model and 0 < evaluation["val_bpb"]  # the final scores: computed once, here
    assert evaluation["num_val_documents"] > 0 and evaluation["val_tokens_per_second"] > 0
    assert (Path(evaluation["dagster/uri"]).parent / "per_document.parquet").exists()
    assert evaluation["mlflow_run_id"] == model["mlflow_run_id"] and "| ROMEO: |" in evaluation["samples"]
    metrics = MlflowClient(f"sqlite:///{tmp_path / 'data' / 'mlflow.db'}").get_run(
        model["mlflow_run_id"]).data.metrics
    assert metrics["eval_val_bpb"] == pytest.approx(evaluation["val_bpb"])
    assert "| cloze | 1 |" in evaluation["task_scores"] and metrics["eval/core"] == evaluation["core"]
    builtin = latest_metadata(instance, "tokenized_dataset")["builtin_task_items"]  # made from the val split
    assert builtin > 0 and f"| continuation | {builtin} |" in evaluation["task_scores"]
    assert "eval/continuation/acc_norm" in metrics
    assert metrics["eval/cloze/acc"] in (0.0, 1.0) and metrics["eval/cloze/centered"] in (-1.0, 1.0)

    exported = latest_metadata(instance, "hf_export")
    assert exported["num_parameters"] == model["num_parameters"] and "tokenizer.json" in exported["files"]
    card = (Path(exported["dagster/uri"]) / "README.md").read_text()  # the model card, from lineage
    assert f"**{evaluation['val_bpb']:.4f} bits per byte**" in card and "| cloze | 1 |" in card
    assert f"{model['num_parameters']:,} parameters" in card and "Decontamination (remove, 13-grams" in card
    assert "## Intended use and limits" in card
    # The trained model, loaded by transformers: our logits.
    from transformers import AutoModelForCausalLM

    x = torch.randint(0, 100, (2, 32))
    with torch.no_grad():
        diff = AutoModelForCausalLM.from_pretrained(exported["dagster/uri"])(x).logits - \
            load_model(model["dagster/uri"])(x)[0]
    assert diff.abs().max() <= 1e-4

    raw = latest_metadata(instance, "raw_corpus")
    clean = latest_metadata(instance, "cleaned_shards")
    # Broken inputs: bad utf-8 record, truncated gzip tail, malformed + field-less jsonl lines, and
    # the binary and empty files.
    assert raw["num_quarantined_files"] == 2
    assert raw["num_quarantined_records"] >= 4
    assert raw["num_documents"] > 50
    assert clean["num_documents_in"] == raw["num_documents"]
    assert clean["num_documents_in"] == (clean["num_kept"] + clean["num_filtered"] + clean["num_exact_duplicates"]
                                         + clean["num_near_duplicates"] + clean["num_quarantined"])
    assert clean["num_kept"] > 0.8 * raw["num_documents"]
    assert clean["dagster/uri"].startswith(str(tmp_path / "data"))
    assert "min_chars" in clean["filters"] and "| id | source | text |" in clean["preview"]
    checks = {c.asset_check_key.name: c.passed for c in result.get_asset_check_evaluations()}  # all blocking
    assert checks == {"raw_corpus_counts": True, "cleaned_shards_invariant": True, "tokenizer_roundtrip": True,
                      "token_ids_fit": True, "token_accounting": True, "no_eval_contamination": True,
                      "training_health": True, "beats_champion": True}

    registered = latest_metadata(instance, "registered_model")
    assert (registered["model_name"], registered["model_version"], registered["alias"]) == ("scratchllm", 1, "champion")
    version = MlflowClient(f"sqlite:///{tmp_path / 'data' / 'mlflow.db'}").get_model_version("scratchllm", "1")
    assert version.run_id == model["mlflow_run_id"] and version.tags["dagster.run_id"] == result.run_id
    assert {"data_version.cleaned_shards", "data_version.tokenized_dataset", "config_hash", "code_version"} \
        <= set(version.tags)
    version_dir = versions.download("scratchllm/1", f"sqlite:///{tmp_path / 'data' / 'mlflow.db'}", tmp_path / "v")
    assert (version_dir / "README.md").read_text() == card  # the registered version carries the same card

    # A training that barely moves the weights is a worse model: the challenger; the champion stays.
    worse = {**TINY_TRAINING, "training": {**TINY_TRAINING["training"], "learning_rate": 1e-7}}
    again = materialize(instance, run_config(tmp_path / "data", corpus, trained_model=worse,
                                             model_evaluation={"evaluation": {"max_new_tokens": 8}}),
                        assets=["trained_model", "model_evaluation", "registered_model"])
    assert again.success
    registered = latest_metadata(instance, "registered_model")
    assert (registered["model_version"], registered["alias"]) == (2, "challenger")
    assert {c.check_name: c.passed for c in again.get_asset_check_evaluations()} == {"training_health": True,
                                                                                    "beats_champion": False}
    check = next(c for c in again.get_asset_check_evaluations() if c.check_name == "beats_champion").metadata
    assert check["paired_documents"].value > 0 and 0 < check["interval_low"].value <= check["delta_bpb"].value
    assert "| continuation |" in check["task_deltas"].value and "not better beyond the margin" in check["details"].value

    # The chat path: the champion (version 1) fine-tuned on the shipped conversations, registered with its parent.
    sft = {"sft": {"max_steps": 10, "batch_size": 4, "warmup_steps": 2, "eval_interval": 5}}
    chatted = materialize(instance, run_config(tmp_path / "data", corpus, sft_dataset=sft, chat_model=sft),
                          assets=["sft_dataset", "chat_model"])
    assert chatted.success
    sft_meta, chat_meta = latest_metadata(instance, "sft_dataset"), latest_metadata(instance, "chat_model")
    assert sft_meta["base_model"] == "scratchllm/1" and sft_meta["conversations_read"] == 3000
    assert sft_meta["conversations_too_long"] > 0  # a 32-token context: counted, quarantined with the reason
    assert "**" in sft_meta["masked_example"]  # the learned tokens shown
    assert (chat_meta["model_name"], chat_meta["model_version"], chat_meta["alias"]) == ("scratchllm-chat", 1,
                                                                                        "champion")
    assert chat_meta["assistant_bpb"] < chat_meta["base_assistant_bpb"]
    store = MlflowClient(f"sqlite:///{tmp_path / 'data' / 'mlflow.db'}")
    assert store.get_model_version("scratchllm-chat", "1").tags["scratchllm.parent"] == "scratchllm/1"
    assert "| assistant bits/byte |" in chat_meta["comparison"]
    assert "| continuation acc_norm |" in chat_meta["comparison"]
    # `scratchllm chat` from another directory, no environment: two turns, a reset, one more turn
    (tmp_path / "chat.yaml").write_text(yaml.safe_dump({"data_dir": str(tmp_path / "data")}))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW", "SCRATCHLLM"))}
    talk = subprocess.run([*CLI, "chat", "--config", str(tmp_path / "chat.yaml"), "--max-new-tokens", "12"],
                          input='Who says: "Speak, speak."\nAnd then?\n/reset\nGive me a line of Romeo.\n',
                          capture_output=True, text=True, cwd=elsewhere, env=env, timeout=300)
    assert talk.returncode == 0, talk.stderr[-2000:]
    assert len(talk.stdout.splitlines()) == 3 and "<|" not in talk.stdout and "conversation reset" in talk.stderr
    # Its Hugging Face export chats as we do: the template renders our tokens, greedy generate gives our answer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llm_core.registry.generate import load_generator
    from llm_core.training.model_source import model_dir_of, tokenizer_dir_of

    hf_dir = tmp_path / "chat_export"
    exported = subprocess.run([*CLI, "export-hf", "--model", "scratchllm-chat@champion", "--out", str(hf_dir),
                               "--config", str(tmp_path / "chat.yaml")], cwd=elsewhere, env=env, timeout=300)
    assert exported.returncode == 0
    version_dir = model_dir_of("scratchllm-chat@champion", load_config(tmp_path / "chat.yaml"))
    ours = load_generator(version_dir, tokenizer_dir_of(version_dir, load_config(tmp_path / "chat.yaml")))
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": 'Who says: "Speak, speak."'}]
    prompt, stops = ours.chat_prompt(messages)
    hf_tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    hf_prompt = hf_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert list(hf_prompt) == prompt
    our_answer = [int(t) for t in ours.model.generate(torch.tensor([prompt]), 8, temperature=0, stop_token=stops)]
    hf_answer = AutoModelForCausalLM.from_pretrained(hf_dir).generate(
        torch.tensor([prompt]), max_new_tokens=8, do_sample=False)[0, len(prompt):].tolist()
    assert hf_answer[:len(our_answer)] == our_answer

    quarantine = (tmp_path / "data" / "quarantine" / "raw_corpus")
    entries = [json.loads(line) for f in quarantine.glob("*.jsonl") for line in f.read_text().splitlines()]
    reasons = " / ".join(e["reason"] for e in entries)
    for expected in ("binary file", "empty file", "invalid UTF-8", "truncated", "malformed JSON", "missing field"):
        assert expected in reasons
    assert any((quarantine / "files").iterdir())  # whole bad files are copied, not just named
    assert sorted(p.name for p in elsewhere.iterdir()) == []  # no mlflow.db, no mlruns


def test_without_conversations_there_is_no_chat_fine_tune(instance, tmp_path):
    """`sft.sources: []`: a user with no conversations opts out; the whole graph succeeds without the chat
    path (sft_dataset materializes nothing, chat_model is skipped), where it failed before."""
    no_chat = {"sft": {"sources": []}}
    result = materialize(instance, {"resources": {"scratchllm": {"config": {"data_dir": str(tmp_path / "data")}}},
                                    "ops": {"sft_dataset": {"config": no_chat}, "chat_model": {"config": no_chat}}},
                         assets=["sft_dataset", "chat_model"])
    assert result.success
    assert [e.step_key for e in result.all_events if e.event_type == dg.DagsterEventType.STEP_SKIPPED] == ["chat_model"]
    assert instance.get_latest_materialization_event(dg.AssetKey("sft_dataset")) is None
    assert any("sft.sources is empty: no chat fine-tune" in r.user_message for r in instance.all_logs(result.run_id))


def test_per_run_config_is_validated_and_applied(instance, tmp_path):
    corpus = write_corpus(tmp_path, n_files=2)
    bad = run_config(tmp_path / "data", corpus, cleaned_shards={"dedup": {"bands": 7}})
    result = materialize(instance, bad)
    assert not result.success
    failure = next(e for e in result.all_events if e.is_step_failure)
    assert "dedup" in str(failure.event_specific_data.error) and "bands" in str(failure.event_specific_data.error)

    strict = run_config(tmp_path / "data", corpus, cleaned_shards={"cleaning": {"min_chars": 10_000_000,
                                                                                 "max_chars": 20_000_000}})
    result = materialize(instance, strict)
    assert not result.success
    failure = next(e for e in result.all_events if e.is_step_failure)
    assert "cleaning kept no document" in str(failure.event_specific_data.error)


def test_rematerialize_recomputes_only_what_changed(instance, tmp_path):
    corpus = write_corpus(tmp_path)
    config = run_config(tmp_path / "data", corpus)
    assert materialize(instance, config).success
    first = latest_metadata(instance, "raw_corpus")

    assert materialize(instance, config).success
    again = latest_metadata(instance, "raw_corpus")
    assert again["num_shards_built"] == 0 and again["num_shards_reused"] == first["num_shards_built"]
    assert latest_metadata(instance, "cleaned_shards")["num_parts_cleaned"] == 0

    (corpus / "new_play.txt").write_text(SHAKESPEARE[500_000:530_000])
    assert materialize(instance, config).success
    grown = latest_metadata(instance, "raw_corpus")
    clean = latest_metadata(instance, "cleaned_shards")
    assert grown["num_shards_built"] == 1 and grown["num_shards_reused"] == first["num_shards_built"]
    assert clean["num_parts_cleaned"] == grown["num_parts"] - first["num_parts"]
    assert grown["num_documents"] > first["num_documents"]


def test_select_takes_the_selection_syntax_and_comma_lists():
    from pipelines.cli import parse_selection
    from pipelines.definitions import defs

    graph = defs.resolve_asset_graph()
    names = lambda select: sorted(k.to_user_string() for k in parse_selection(select, graph))  # noqa: E731
    assert names("raw_corpus,cleaned_shards") == ["cleaned_shards", "raw_corpus"]
    assert names(" tokenizer , hf_export ") == ["hf_export", "tokenizer"]
    assert names("+tokenizer,hf_export") == ["cleaned_shards", "hf_export", "tokenizer"]
    assert len(names("*")) == 10  # the chat path included
    for bad in ("raw_corpus,", "no_such_asset,raw_corpus"):
        with pytest.raises(Exception):
            parse_selection(bad, graph)


def write_profile(tmp_path: Path, corpus: Path) -> Path:
    profile = tmp_path / "profile.yaml"
    profile.write_text(yaml.safe_dump({"data_dir": str(tmp_path / "data"),
                                       "corpus": {"sources": [str(corpus)], "pieces_are_documents": [str(corpus)]},
                                       "dataset": {"val_fraction": 0.3}, **TINY_TRAINING}))
    return profile


def test_cli_run_fails_with_a_clear_message(tmp_path):
    """A corpus with nothing usable fails at its step with the reason under the step's name; an invalid
    profile is refused before any work, naming the field. (A successful `scratchllm run`:
    test_own_text.py.)"""
    env = {**os.environ, "DAGSTER_HOME": str(tmp_path / "home")}
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "empty.txt").write_bytes(b"")
    (broken / "binary.txt").write_bytes(b"\x00" * 50)
    bad_profile = tmp_path / "bad_profile.yaml"
    bad_profile.write_text(yaml.safe_dump({"data_dir": str(tmp_path / "data2"), "corpus": {"sources": [str(broken)]}}))
    failed = subprocess.run([*CLI, "run", "--config", str(bad_profile)], env=env, capture_output=True, text=True)
    assert failed.returncode == 1
    assert "the corpus is empty" in failed.stderr and "FAILED" in failed.stderr
    assert "\n  raw_corpus: " in failed.stderr  # the reason, under the failed step's name

    invalid = tmp_path / "invalid.yaml"
    invalid.write_text("corpus: {shard_size_mb: -1}\n")
    refused = subprocess.run([*CLI, "run", "--config", str(invalid)], env=env, capture_output=True, text=True)
    assert refused.returncode == 2 and "corpus.shard_size_mb" in refused.stderr


@pytest.mark.slow
def test_a_killed_run_leaves_no_half_written_shard(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(40):
        (corpus / f"doc_{i}.txt").write_text(SHAKESPEARE * 2)  # ~2 MB each, 80 MB in all
    profile = write_profile(tmp_path, corpus)
    shards = tmp_path / "data" / "raw_corpus" / "shards"
    code = ("import sys; from llm_core.config import load_config; "
            "from llm_core.data.raw_corpus import build_raw_corpus;"
            f"build_raw_corpus(load_config({str(profile)!r}, {{'corpus': {{'shard_size_mb': 4}}}}))")
    # Killed at a point the code signals: the second shard is written to its temporary name, not renamed.
    held = tmp_path / "held"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "SCRATCHLLM_HOLD_AT": "before_rename:*.parquet#2",
                                 "SCRATCHLLM_HOLD_MARKER": str(held)})
    wait_for(held, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()

    visible = list(shards.glob("*.parquet"))
    assert len(visible) == 1 and [p for p in shards.iterdir() if ".tmp-" in p.name]  # one done, one half
    for part in visible:  # every visible part is complete and readable
        assert pq.ParquetFile(part).metadata.num_rows > 0
    assert not (tmp_path / "data" / "raw_corpus" / "manifest.json").exists()

    cfg = load_config(profile, {"corpus": {"shard_size_mb": 4}})
    result = build_raw_corpus(cfg, log=lambda message: None)
    one_file = discover([str(corpus / "doc_0.txt")], cfg.corpus.extensions).files[0]
    assert result.num_documents == 40 * len(list(read_source(one_file, _read_options(cfg))))
    assert sum(pq.ParquetFile(p).metadata.num_rows for p in result.parts) == result.num_documents
    assert not [p for p in shards.iterdir() if ".tmp-" in p.name]  # leftovers of the killed run are gone


def wait_for(marker: Path, *procs: subprocess.Popen, timeout: float = 300) -> str:
    """Wait until a hold point (llm_core/faults.py) writes `marker`; fail early if a process ends."""
    deadline = time.monotonic() + timeout
    while not marker.exists():
        ended = [p.args for p in procs if p.poll() is not None]
        assert not ended, f"ended before reaching the hold point: {ended}"
        assert time.monotonic() < deadline, f"no {marker} after {timeout} s"
        time.sleep(0.05)
    return marker.read_text()


def test_a_failed_step_shows_its_cause_and_next_step_as_a_dagster_failure(instance, tmp_path):
    """What the Dagster UI shows of a step that fails on the user's data: a Failure whose description is
    the cause (not "Error occurred while executing op") and whose metadata has the next step."""
    config = run_config(tmp_path / "data", tmp_path / "no_such_corpus")
    result = materialize(instance, config, ["raw_corpus"])
    failure = next(e for e in result.all_events if e.is_step_failure).step_failure_data
    assert failure.error.cls_name == "Failure"
    assert failure.user_failure_data.description.startswith("the corpus is empty: no usable document in corpus.sources")
    assert "check-config" in failure.user_failure_data.metadata["next step"].value
