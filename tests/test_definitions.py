"""The code location: it loads, it holds exactly the graph, checks, jobs and automation we ship,
its launchpad shows the active profile, and a run reads its profile once."""

import json
import os
import subprocess
import sys

import pytest
import yaml

from llm_core.config import PROJECT_ROOT

ASSETS = ["chat_model", "cleaned_shards", "hf_export", "model_evaluation", "raw_corpus", "registered_model",
          "sft_dataset", "tokenized_dataset", "tokenizer", "trained_model"]
CHECKS = ["chat_model:training_health", "cleaned_shards:cleaned_shards_invariant", "raw_corpus:raw_corpus_counts",
          "registered_model:beats_champion",
          "tokenized_dataset:no_eval_contamination", "tokenized_dataset:token_accounting",
          "tokenized_dataset:token_ids_fit", "tokenizer:tokenizer_roundtrip", "trained_model:training_health"]


def test_the_code_location_loads_with_every_asset_and_check_and_nothing_else():
    from pipelines.definitions import defs

    graph = defs.resolve_asset_graph()
    assert sorted(k.to_user_string() for k in graph.get_all_asset_keys()) == ASSETS
    assert sorted(k.to_user_string() for k in graph.asset_check_keys) == CHECKS
    assert sorted(j.name for j in defs.resolve_all_job_defs()) == ["__ASSET_JOB", "materialize_everything", "retrain"]
    assert [s.name for s in defs.schedules] == ["retrain_schedule"]
    assert sorted(s.name for s in defs.sensors) == ["dead_run_sweeper", "new_data_sensor"]
    assert sorted(defs.resources) == ["mlflow", "scratchllm"]


def test_the_instance_scratchllm_writes_starts_launches_within_a_second_and_trains_one_at_a_time(tmp_path,
                                                                                               monkeypatch):
    """The dagster.yaml that `scratchllm ui`/`run` write on first use: the queue is looked at every second
    (Dagster's default, 5 s, made every UI launch wait ~3 s), every pool holds 1, no telemetry; and a dead
    run's pool slot is freed within 10 s by the sweeper sensor (it was 30 s)."""
    import dagster as dg

    from pipelines.automation import dead_run_sweeper
    from pipelines.cli import prepare_environment

    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path))
    prepare_environment(None)
    with dg.DagsterInstance.from_config(str(tmp_path)) as instance:
        assert instance.run_coordinator.dequeue_interval_seconds == 1
        assert instance.get_concurrency_config().pool_config.default_pool_limit == 1
        assert not instance.telemetry_enabled
    assert dead_run_sweeper.minimum_interval_seconds == 10


def test_the_code_location_loads_without_torch_mlflow_or_ray():
    """Every Dagster process loads the code location: the code server (and each "Reload definitions"),
    every run's worker, `scratchllm run`. torch and MLflow took 3 of its 4.7 s; the assets import them
    where they use them, so a run of the data stages never pays for them."""
    done = subprocess.run([sys.executable, "-c", "import sys, pipelines.definitions; "
                           "print(sorted(m for m in ('torch', 'mlflow', 'ray') if m in sys.modules))"],
                          cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["[]"]


def test_dagster_validates_the_workspace(tmp_path):
    done = subprocess.run([sys.executable, "-m", "dagster", "definitions", "validate", "-w", "workspace.yaml"],
                          cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "DAGSTER_HOME": str(tmp_path)})
    assert done.returncode == 0, done.stderr[-3000:]


def test_definitions_show_the_active_profile_in_run_config():
    """The UI's launchpad defaults are the profile's values (here the one pytest loaded)."""
    from pipelines.config import ACTIVE_CONFIG
    from pipelines.definitions import defs

    job = defs.resolve_job_def("materialize_everything")
    fields = job.run_config_schema.config_type.fields["ops"].config_type.fields
    corpus = fields["raw_corpus"].config_type.fields["config"].config_type.fields["corpus"].config_type.fields
    assert corpus["max_document_bytes"].default_value == ACTIVE_CONFIG.corpus.max_document_bytes
    assert corpus["sources"].default_value == ACTIVE_CONFIG.corpus.sources


EDIT_THEN_RUN = """
import glob, json, os, sys
import dagster as dg
import yaml

profile = sys.argv[1]
os.environ["SCRATCHLLM_CONFIG"] = profile
from pipelines.definitions import defs  # the code location loads the profile (as `dagster dev` does)

values = yaml.safe_load(open(profile))  # then the user edits it, while the UI keeps running
values["training"]["learning_rate"] = 0.002
values["dataset"]["val_fraction"] = 0.25
open(profile, "w").write(yaml.safe_dump(values))

keys = [dg.AssetKey(k) for k in ("raw_corpus", "cleaned_shards", "tokenizer", "tokenized_dataset", "trained_model")]
with dg.DagsterInstance.get() as instance:
    result = defs.resolve_job_def("materialize_everything").execute_in_process(
        instance=instance, asset_selection=keys, raise_on_error=False)
assert result.success
resolved = glob.glob(os.path.join(values["data_dir"], "trained_model", "runs", "*", "resolved_config.json"))
print(json.dumps({"trained": json.load(open(resolved[0]))}))
"""


@pytest.mark.slow
def test_a_run_uses_one_snapshot_of_the_profile_even_if_it_was_edited_after_the_code_location_loaded(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    text = (PROJECT_ROOT / "data" / "tinyshakespeare.txt").read_text()
    (corpus / "plays.txt").write_text(text[:150_000])
    profile = tmp_path / "profile.yaml"
    profile.write_text(yaml.safe_dump({
        "data_dir": str(tmp_path / "data"), "corpus": {"sources": [str(corpus)], "pieces_are_documents": [str(corpus)]},
        "cleaning": {"num_workers": 1}, "dataset": {"val_fraction": 0.1}, "tokenizer": {"vocab_size": 300},
        "model": {"n_layer": 1, "n_head": 2, "n_kv_head": 1, "n_embd": 32, "block_size": 32},
        "training": {"peak_flops": 1e12, "max_steps": 2, "batch_size": 2, "learning_rate": 0.001, "eval_batches": 1}}))
    env = {**os.environ, "DAGSTER_HOME": str(tmp_path / "dagster_home")}
    (tmp_path / "dagster_home").mkdir()
    done = subprocess.run([sys.executable, "-c", EDIT_THEN_RUN, str(profile)], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    # Both the section that is run config of trained_model (training) and the one that is not
    # (dataset, read by tokenized_dataset and by training's identity) come from the edited profile.
    assert out["trained"]["training"]["learning_rate"] == 0.002
    assert out["trained"]["dataset"]["val_fraction"] == 0.25
