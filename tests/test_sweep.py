"""Sweep definitions (llm_core/experiments/sweep.py): a grid or a list of values over dotted fields, each variant
validated before any work starts, naming the variant and the field; data fields refused."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest
from helpers import subprocess_env

from llm_core.experiments import sweep
from llm_core.config import ConfigError, load_config
from llm_core.training.performance import available_cores


def config(**sweep_section):
    return load_config(None, {"sweep": sweep_section})


def test_a_grid_is_every_combination_and_a_list_goes_value_by_value():
    grid = sweep.variants(config(**{"training.learning_rate": [1e-3, 3e-3], "model.n_layer": [2, 4]}))
    assert [v.name for v in grid] == ["v0", "v1", "v2", "v3"]
    assert [(v.config.training.learning_rate, v.config.model.n_layer) for v in grid] == \
        [(1e-3, 2), (1e-3, 4), (3e-3, 2), (3e-3, 4)]
    assert grid[1].values == {"training.learning_rate": 1e-3, "model.n_layer": 4}
    assert grid[1].label == "training.learning_rate=0.001, model.n_layer=4"
    assert all(v.config.sweep == {} and v.config.model.n_embd == 128 for v in grid)  # the rest is the profile
    listed = sweep.variants(config(mode="list", name="sizes", **{"model.n_layer": [2, 4], "model.n_embd": [64, 96]}))
    assert [(v.config.model.n_layer, v.config.model.n_embd) for v in listed] == [(2, 64), (4, 96)]
    assert sweep.sweep_name(config(name="sizes", **{"model.n_layer": [2]})) == "sizes"
    assert [v.label for v in sweep.variants(load_config(None))] == ["the profile as it is"]  # no sweep: one


@pytest.mark.parametrize("section,message", [
    ({"tokenizer.vocab_size": [512, 1024]}, "sweep: Value error, tokenizer.vocab_size: only fields of model, "
                                            "training can vary"),
    ({"evaluation.max_val_tokens": [1000]}, "evaluation.max_val_tokens: only fields of model, training can vary"),
    ({"training.learning_rate": 0.001}, "training.learning_rate: must be a non-empty list"),
    ({"training.learning_rate": []}, "training.learning_rate: must be a non-empty list"),
    ({"mode": "random", "model.n_layer": [2]}, "mode must be one of"),
    ({"mode": "list", "model.n_layer": [2, 4], "model.n_embd": [64]}, "mode list needs lists of one length"),
])
def test_a_bad_sweep_section_is_refused_by_the_config(section, message):
    with pytest.raises(ConfigError, match=message):
        config(**section)


def test_a_bad_value_is_refused_with_the_profile_naming_the_variant_and_the_field(tmp_path):
    with pytest.raises(ConfigError, match=r"sweep variant v1 \(model.n_head=3\)[\s\S]*model: .*n_head \(3\) "
                                          r"must divide n_embd"):
        config(**{"model.n_head": [4, 3]})  # 128 is not divisible by 3
    with pytest.raises(ConfigError, match=r"sweep variant v0 \(training.learning_rate=-1\)[\s\S]*"
                                          r"training.learning_rate: Input should be greater than 0"):
        config(**{"training.learning_rate": [-1]})
    with pytest.raises(ConfigError, match="sweep.training.nope: no such config field"):
        config(**{"training.nope": [1]})
    # `scratchllm check-config` (and so `scratchllm run`) refuses it before any work, exit status 2
    profile = tmp_path / "bad_sweep.yaml"
    profile.write_text("sweep:\n  model.n_head: [4, 3]\n")
    done = subprocess.run([sys.executable, "-m", "pipelines.cli", "check-config", str(profile)],
                          capture_output=True, text=True, cwd=tmp_path, env=subprocess_env())
    assert done.returncode == 2 and "sweep variant v1 (model.n_head=3)" in done.stderr


@pytest.mark.slow
def test_a_2x2_sweep_materializes_end_to_end_and_a_rerun_trains_nothing(instance, tmp_path):
    """Materialize every asset with a 2x2 sweep in the profile: 4 trainings as child runs of one MLflow
    parent (distinct params, searchable), the comparison table and plots on the parent, the best variant
    registered; materializing again reuses every variant."""
    import dagster as dg
    import yaml
    from mlflow.tracking import MlflowClient
    from test_pipeline import TINY_TRAINING, materialize, run_config, write_corpus

    corpus = write_corpus(tmp_path, n_files=2)
    profile = tmp_path / "sweep.yaml"
    profile.write_text(yaml.safe_dump({**TINY_TRAINING, "evaluation": {"max_new_tokens": 4},
                                       "sweep": {"name": "lr-and-width", "training.learning_rate": [1e-4, 3e-3],
                                                 "model.n_embd": [32, 64]}}))
    config = run_config(tmp_path / "data", corpus)
    config["resources"]["scratchllm"]["config"]["profile"] = str(profile)
    assets = ["raw_corpus", "cleaned_shards", "tokenizer", "tokenized_dataset", "trained_model", "model_evaluation",
              "registered_model", "hf_export"]
    result = materialize(instance, config, assets=assets)
    assert result.success

    def metadata(key):
        event = instance.get_latest_materialization_event(dg.AssetKey(key))
        return {k: v.value for k, v in event.asset_materialization.metadata.items()}

    trained = metadata("trained_model")
    assert (trained["num_variants"], trained["num_trained"], trained["num_reused"]) == (4, 4, 0)
    # What each variant measured and reported through Pipes, as the single training reports it, is in Dagster.
    observed = [r.asset_observation.metadata for r in
                instance.fetch_observations(dg.AssetKey("trained_model"), limit=10).records]
    assert sorted(m["variant"].value for m in observed) == ["v0", "v1", "v2", "v3"]
    assert all(m["tokens_per_second"].value > 0 and m["peak_memory_mb"].value > 0 and "mfu" in m
               and "plan_vs_measured" in m for m in observed)
    client = MlflowClient(f"sqlite:///{tmp_path / 'data' / 'mlflow.db'}")
    parent = client.get_run(trained["mlflow_parent_run_id"])
    assert parent.info.run_name == "lr-and-width"
    assert parent.data.params == {"training.learning_rate": "[0.0001, 0.003]", "model.n_embd": "[32, 64]"}
    children = client.search_runs([parent.info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert len(children) == 4
    assert {(c.data.params["training.learning_rate"], c.data.params["model.n_embd"]) for c in children} == \
        {("0.0001", "32"), ("0.0001", "64"), ("0.003", "32"), ("0.003", "64")}
    found = client.search_runs([parent.info.experiment_id], "params.\"training.learning_rate\" = '0.003'")
    assert len(found) == 2  # variants found by a param, as in the MLflow UI's search
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"sweep_comparison.md", "sweep_comparison.csv", "val_bpb_by_variant.png", "loss_curves.png"} <= artifacts

    evaluation = metadata("model_evaluation")
    best = evaluation["best_variant"]
    assert len(re.findall(r"^\| v\d \|", evaluation["sweep_comparison"], re.M)) == 4
    bpbs = {c.data.tags["scratchllm.variant"]: c.data.metrics["eval_val_bpb"] for c in children}
    assert best == min(bpbs, key=bpbs.get) and evaluation["val_bpb"] == pytest.approx(bpbs[best])
    assert parent.info.run_id and client.get_run(parent.info.run_id).data.tags["scratchllm.best_variant"] == best
    registered = metadata("registered_model")
    best_run = next(c for c in children if c.data.tags["scratchllm.variant"] == best)
    assert registered["mlflow_run_id"] == best_run.info.run_id and registered["alias"] == "champion"

    again = materialize(instance, config, assets=["trained_model", "model_evaluation"])
    assert again.success
    trained = metadata("trained_model")
    assert (trained["num_trained"], trained["num_reused"]) == (0, 4)
    assert len(client.search_runs([parent.info.experiment_id])) == 5  # no new run: the parent and 4 children


@pytest.mark.slow
def test_a_size_sweep_fits_the_scaling_law_that_plan_budget_reads(instance, tmp_path):
    """Three sizes in list mode: the fit's plot, coefficients and JSON on the parent run, and
    `scratchllm plan --config <the sweep profile> --budget` recommends from it."""
    import yaml
    from mlflow.tracking import MlflowClient
    from test_pipeline import TINY_TRAINING, materialize, run_config, write_corpus

    corpus = write_corpus(tmp_path, n_files=2)
    profile = tmp_path / "ladder.yaml"
    profile.write_text(yaml.safe_dump({
        **TINY_TRAINING, "data_dir": str(tmp_path / "data"), "evaluation": {"max_new_tokens": 4},
        "corpus": {"sources": [str(corpus)], "shard_size_mb": 0.05, "max_document_bytes": 2048,
                   "pieces_are_documents": [str(corpus)]},
        "dataset": {"val_fraction": 0.2},
        "sweep": {"name": "ladder", "mode": "list", "model.n_embd": [16, 32, 64], "model.n_head": [2, 2, 4]}}))
    config = run_config(tmp_path / "data", corpus)
    config["resources"]["scratchllm"]["config"]["profile"] = str(profile)
    assert materialize(instance, config, assets=["raw_corpus", "cleaned_shards", "tokenizer", "tokenized_dataset",
                                                 "trained_model", "model_evaluation"]).success
    client = MlflowClient(f"sqlite:///{tmp_path / 'data' / 'mlflow.db'}")
    parent = client.search_runs([client.get_experiment_by_name("scratchllm").experiment_id],
                                "attributes.run_name = 'ladder'")[0]
    assert {"scaling/a", "scaling/b", "scaling/c", "scaling/b_low", "scaling/b_high"} <= set(parent.data.metrics)
    assert {"scaling_fit.png", "scaling_fit.json"} <= {a.path for a in client.list_artifacts(parent.info.run_id)}
    done = subprocess.run([sys.executable, "-m", "pipelines.cli", "plan", "--config", str(profile), "--budget",
                           "1e13"], capture_output=True, text=True, cwd=tmp_path, env=subprocess_env())
    assert done.returncode == 0, done.stderr
    assert "fit over 3 variants" in done.stdout and "predicted val" in done.stdout


def test_side_by_side_variants_get_their_own_devices_or_a_share_of_the_cores(tmp_path):
    """training.max_parallel_variants: on GPUs each slot gets num_processes devices of its own
    (CUDA_VISIBLE_DEVICES as the machine names them); on CPU an equal share of the threads; too few
    GPUs, or a launch over several machines, is refused naming the field."""
    from pipelines.resources import slot_environments

    two_ranks = load_config(None, {"training": {"num_processes": 2}})
    one_rank = load_config(None)
    on_gpus = slot_environments([two_ranks, one_rank], 2, ["2", "3", "5", "7"])
    assert [slot(two_ranks)["CUDA_VISIBLE_DEVICES"] for slot in on_gpus] == ["2,3", "5,7"]
    with pytest.raises(ValueError, match=r"training.max_parallel_variants: 3 variants at once x 2 processes need "
                                         r"6 GPUs, 4 are visible"):
        slot_environments([two_ranks], 3, ["0", "1", "2", "3"])
    on_cpu = slot_environments([one_rank], 2, [])
    threads = max(1, available_cores() // 2)
    assert [slot(one_rank)["OMP_NUM_THREADS"] for slot in on_cpu] == [str(threads)] * 2
    two_machines = load_config(None, {"training": {"accelerate_config": "assets_config/accelerate/multi_node.yaml",
                                                   "optimizer": "adamw"}})
    with pytest.raises(ValueError, match="training.max_parallel_variants: 2 variants at once, but "
                                         ".*multi_node.yaml spans several machines"):
        slot_environments([two_machines], 2, ["0", "1"])
    # how many train at once, or the MFU's denominator, is not what they train: the training keys stay the same
    from llm_core.training.training_run import training_key
    parallel = load_config(None, {"training": {"max_parallel_variants": 4, "peak_flops": 1e12}})
    assert training_key(parallel, "data") == training_key(one_rank, "data")
    assert parallel.config_hash() == one_rank.config_hash()


@pytest.mark.slow
def test_variants_train_side_by_side_and_a_killed_one_resumes_alone(instance, tmp_path, monkeypatch):
    """With training.max_parallel_variants: 2, a variant held at its first step (a test hold point)
    does not stop the other, which finishes meanwhile (one at a time, the sweep would wait for ever).
    The held one is then killed with kill -9: the other stays recorded, and a re-run trains only what
    is missing."""
    import signal
    import threading

    import yaml
    from helpers import held_pid, wait_until
    from test_pipeline import TINY_TRAINING, latest_metadata, materialize, run_config, write_corpus

    corpus = write_corpus(tmp_path, n_files=2)
    profile = tmp_path / "side_by_side.yaml"
    tiny = {**TINY_TRAINING, "training": {**TINY_TRAINING["training"], "max_parallel_variants": 2}}
    profile.write_text(yaml.safe_dump({**tiny, "sweep": {"training.learning_rate": [1e-4, 3e-3]}}))
    config = run_config(tmp_path / "data", corpus)
    config["resources"]["scratchllm"]["config"]["profile"] = str(profile)
    assert materialize(instance, config).success

    runs_dir, marker = tmp_path / "data" / "trained_model" / "runs", tmp_path / "held"
    monkeypatch.setenv("SCRATCHLLM_HOLD_AT", "step:1")
    monkeypatch.setenv("SCRATCHLLM_HOLD_MARKER", str(marker))

    def one_variant_finished() -> bool:
        return any(sweep.fully_trained(d, load_config(profile)) for d in runs_dir.glob("*"))

    waited = {}

    def kill_the_held_one_once_the_other_is_done():
        try:
            wait_until(lambda: marker.exists() and one_variant_finished(),
                       what="variant finishing while the other is held", timeout=240)
        except AssertionError as error:  # trained one at a time: the held one blocks the sweep
            waited["error"] = error
        finally:
            wait_until(marker.exists, what="a variant held", timeout=240)
            os.kill(held_pid(marker), signal.SIGKILL)

    killer = threading.Thread(target=kill_the_held_one_once_the_other_is_done)
    killer.start()
    first = materialize(instance, config, assets=["trained_model"])
    killer.join()
    assert "error" not in waited, waited["error"]
    # The step failed once the other variant was recorded, and its retry trained the killed one.
    events = instance.all_logs(first.run_id, of_type={dg.DagsterEventType.STEP_FAILURE,
                                                      dg.DagsterEventType.STEP_UP_FOR_RETRY})
    assert any("(exit code" in str(e.dagster_event.event_specific_data) for e in events)
    assert first.success
    trained = latest_metadata(instance, "trained_model")
    assert (trained["num_variants"], trained["num_trained"], trained["num_reused"]) == (2, 1, 1)
    assert trained["variants_at_once"] == 1  # the retry had one variant left
    record = json.loads((tmp_path / "data" / "trained_model" / "sweep.json").read_text())
    assert [v["healthy"] for v in record["variants"].values()] == [True, True]
    assert all(sweep.fully_trained(Path(v["path"]), load_config(profile)) for v in record["variants"].values())


def test_the_biggest_variants_start_first_when_several_train_at_once():
    """training_flops ranks the size ladder's variants by what they compute (~6 N D), so that the
    last variant still training when the others are done is a short one."""
    from llm_core.config import CONFIG_DIR
    from llm_core.model import Transformer
    from llm_core.training.train import model_args

    ladder = sweep.variants(load_config(CONFIG_DIR / "sweeps" / "size_ladder.yaml"))
    flops = [sweep.training_flops(v.config) for v in ladder]
    assert flops == sorted(flops) and flops[-1] > 20 * flops[0]
    v = ladder[2].config
    tokens = v.training.max_steps * v.training.batch_size * v.model.block_size
    assert flops[2] == pytest.approx(Transformer(model_args(v, v.tokenizer.vocab_size)).flops_per_token() * tokens)
