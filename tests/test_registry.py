"""The MLflow registry on a real sqlite store: versions, the champion/challenger rule, and the
registered pyfunc loaded by alias generating the same text as the model it came from."""

import os
import subprocess
import sys

import mlflow
import pytest

from llm_core.registry import versions
from llm_core import tracking
from llm_core.config import PROJECT_ROOT
from llm_core.model_files import copy_tokenizer
from llm_core.registry.generate import load_generator


@pytest.fixture
def store(trained, tmp_path):
    """(register(key, val_bpb) -> Registration, tracking URI, model name) on a fresh store."""
    cfg, result, _ = trained
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    store_cfg = cfg.model_copy(update={"data_dir": str(tmp_path)})  # artifacts go under tmp_path

    def register(key: str, val_bpb: float) -> versions.Registration:
        run_id = tracking.start_training_run(store_cfg, uri, tags={versions.KEY_TAG: key})
        return versions.register(result.out_dir, cfg.data_path / "tokenizer", tracking_uri=uri, run_id=run_id,
                                 name="tiny", val_bpb=val_bpb, tags={versions.KEY_TAG: key, "lineage": "x"})

    return register, uri


def test_first_is_champion_worse_is_challenger_better_is_champion(store):
    register, uri = store
    first = register("a", 2.0)
    assert (first.version, first.alias, first.previous_champion) == ("1", "champion", None)
    worse = register("b", 2.5)
    assert (worse.version, worse.alias, worse.previous_champion, worse.previous_champion_bpb) == \
        ("2", "challenger", "1", 2.0)
    better = register("c", 1.9)
    assert (better.version, better.alias, better.previous_champion) == ("3", "champion", "1")
    equal = register("d", 1.9)  # as good as the champion: takes the alias
    assert equal.alias == "champion"

    client = tracking.client(uri)
    assert client.get_model_version_by_alias("tiny", "champion").version == 4
    assert client.get_model_version_by_alias("tiny", "challenger").version == 2
    v2 = client.get_model_version("tiny", "2")
    assert v2.tags["val_bpb"] == "2.5" and v2.tags["lineage"] == "x" and v2.run_id


def test_registering_the_same_training_again_reuses_its_version(store):
    register, uri = store
    assert register("a", 2.0).version == "1"
    again = register("a", 2.0)
    assert (again.version, again.alias, again.reused) == ("1", "champion", True)
    assert len(tracking.client(uri).search_model_versions("name = 'tiny'")) == 1


def test_pyfunc_loaded_by_alias_generates_like_the_model(store, trained):
    register, uri = store
    register("a", 2.0)
    with tracking.using(uri):
        model = mlflow.pyfunc.load_model("models:/tiny@champion")
    cfg, result, _ = trained
    generator = load_generator(result.out_dir, cfg.data_path / "tokenizer")

    greedy = model.predict(["ROMEO:", "To be"], params={"max_new_tokens": 15, "temperature": 0})
    assert greedy == [generator.complete(p, max_new_tokens=15, temperature=0) for p in ("ROMEO:", "To be")]
    sampled = model.predict(["ROMEO:"], params={"max_new_tokens": 15, "temperature": 0.8, "seed": 7})
    assert sampled == model.predict(["ROMEO:"], params={"max_new_tokens": 15, "temperature": 0.8, "seed": 7})
    assert sampled[0] == generator.complete("ROMEO:", max_new_tokens=15, temperature=0.8, seed=7)


def test_cli_generate_streams_from_an_alias_a_version_and_a_directory(store, trained, tmp_path, monkeypatch, capsys):
    from pipelines.cli import main

    register, uri = store
    register("a", 2.0)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    profile = tmp_path / "profile.yaml"
    profile.write_text(f"data_dir: {tmp_path / 'data'}\n")
    cfg, result, _ = trained
    expected = load_generator(result.out_dir, cfg.data_path / "tokenizer").complete(
        "ROMEO:", max_new_tokens=10, temperature=0)
    args = ["--prompt", "ROMEO:", "--max-new-tokens", "10", "--temperature", "0", "--config", str(profile)]

    copy_tokenizer(cfg.data_path / "tokenizer", result.out_dir)  # as the trained_model asset does
    run_id = versions.find_version("tiny/1", uri).run_id
    cached = tmp_path / "data" / "registry_cache" / "tiny" / f"1-{run_id}" / "artifacts" / "model"
    checkpoint = result.out_dir / "checkpoints" / "step_10"  # the last step: the final weights
    for model in ("tiny@champion", "tiny/1", str(cached), str(result.out_dir), str(checkpoint)):
        assert main(["generate", "--model", model, *args]) == 0
        assert capsys.readouterr().out == "ROMEO:" + expected + "\n"

    assert main(["generate", "--model", "tiny@nosuchalias", *args]) == 2
    assert "no registered model 'tiny@nosuchalias'" in capsys.readouterr().err
    assert main(["generate", "--model", str(tmp_path / "missing"), *args]) == 2
    assert "not a trained model directory" in capsys.readouterr().err


def test_the_download_cache_tells_stores_apart(store, trained, tmp_path):
    """Version 1 of a fresh store (a new mlflow.db, another tracking server) is not version 1 of the store
    that filled the cache: each is downloaded from its own store."""
    register, uri = store
    register("a", 2.0)
    cache = tmp_path / "registry_cache"
    first = versions.download("tiny/1", uri, cache)
    (first / "model_config.json").write_text("{}")  # marks this copy
    cfg, result, _ = trained
    other_uri = f"sqlite:///{tmp_path / 'other.db'}"
    other_cfg = cfg.model_copy(update={"data_dir": str(tmp_path / "other")})
    run_id = tracking.start_training_run(other_cfg, other_uri, tags={versions.KEY_TAG: "b"})
    versions.register(result.out_dir, cfg.data_path / "tokenizer", tracking_uri=other_uri, run_id=run_id,
                      name="tiny", val_bpb=2.0, tags={versions.KEY_TAG: "b"})
    second = versions.download("tiny/1", other_uri, cache)
    assert second != first and run_id in str(second)
    assert (second / "model_config.json").read_text() == (result.out_dir / "model_config.json").read_text()
    assert versions.download("tiny/1", uri, cache) == first  # each store's copy is kept and reused


def test_the_registered_model_loads_where_scratchllm_is_not_installed(store, tmp_path):
    """The pyfunc carries its code (code_paths): a process that cannot import llm_core loads and runs it."""
    register, uri = store
    register("a", 2.0)
    script = f"""
import sys
sys.meta_path = [f for f in sys.meta_path if not getattr(f, "__module__", "").startswith("__editable__")]
sys.path = [p for p in sys.path if p not in ("", {str(PROJECT_ROOT)!r})]
try:
    import llm_core
    sys.exit("llm_core is importable: the test proves nothing")
except ImportError:
    pass
import mlflow
mlflow.set_tracking_uri({uri!r})
model = mlflow.pyfunc.load_model("models:/tiny@champion")
print(model.predict(["ROMEO:"], params={{"max_new_tokens": 5, "temperature": 0}})[0] is not None)
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().endswith("True")


@pytest.mark.slow  # every CLI path in a fresh process: ~15 s
def test_registry_paths_need_no_environment_and_write_nothing_in_the_working_directory(trained, tmp_path):
    """As a newcomer runs them after `make run`: MLFLOW_TRACKING_URI unset, from another directory.
    The store is the profile's default (<data_dir>/mlflow.db); nothing appears where the user stands."""
    cfg, result, _ = trained
    profile = tmp_path / "profile.yaml"
    profile.write_text(f"data_dir: {tmp_path / 'data'}\nregistry: {{model_name: tiny}}\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()

    # The registry asset's path: llm_core.registry.register with the profile's URI, from `elsewhere`.
    script = f"""
import os
os.chdir({str(elsewhere)!r})
from llm_core import tracking
from llm_core.registry import versions
from llm_core.config import load_config
cfg = load_config({str(profile)!r})
uri = tracking.tracking_uri(cfg)
run_id = tracking.start_training_run(cfg, uri, tags={{versions.KEY_TAG: "k"}})
r = versions.register({str(result.out_dir)!r}, {str(cfg.data_path / 'tokenizer')!r}, tracking_uri=uri,
                      run_id=run_id, name="tiny", val_bpb=2.0, tags={{versions.KEY_TAG: "k"}})
print(r.version, r.alias, uri)
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=elsewhere, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split()[:2] == ["1", "champion"]
    assert done.stdout.split()[2] == f"sqlite:///{tmp_path / 'data' / 'mlflow.db'}"

    copy_tokenizer(cfg.data_path / "tokenizer", result.out_dir)
    expected = load_generator(result.out_dir, cfg.data_path / "tokenizer").complete(
        "ROMEO:", max_new_tokens=8, temperature=0)
    scratchllm = [sys.executable, "-m", "pipelines.cli"]
    generated = subprocess.run([*scratchllm, "generate", "--config", str(profile), "--model", "tiny@champion",
                                "--prompt", "ROMEO:", "--max-new-tokens", "8", "--temperature", "0"],
                               cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300)
    assert generated.returncode == 0, generated.stderr[-3000:]
    assert generated.stdout == "ROMEO:" + expected + "\n"

    exported = subprocess.run([*scratchllm, "export-hf", "--config", str(profile), "--model", "tiny@champion",
                               "--out", str(tmp_path / "hf")], cwd=elsewhere, env=env, capture_output=True,
                              text=True, timeout=300)
    assert exported.returncode == 0, exported.stderr[-3000:]
    assert (tmp_path / "hf" / "model.safetensors").is_file()

    # The README's pyfunc snippet: the user sets the URI, then loads by alias.
    load = f"""
import mlflow
mlflow.set_tracking_uri({f"sqlite:///{tmp_path / 'data' / 'mlflow.db'}"!r})
print(mlflow.pyfunc.load_model("models:/tiny@champion").predict(["ROMEO:"], params={{"max_new_tokens": 8,
                                                                                     "temperature": 0}})[0])
"""
    loaded = subprocess.run([sys.executable, "-c", load], cwd=elsewhere, env=env, capture_output=True, text=True,
                            timeout=300)
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    assert loaded.stdout == expected + "\n"  # print's newline; the completion may end in newlines itself
    assert sorted(p.name for p in elsewhere.iterdir()) == []  # no mlflow.db, no mlruns
