"""Your own text works the first time, run as a new user runs it: the `scratchllm` CLI from another
working directory, a fresh DAGSTER_HOME, no other environment variable, the default profile with
only corpus.sources changed."""

import gzip
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from llm_core.config import PROJECT_ROOT, load_config

CLI = [sys.executable, "-m", "pipelines.cli"]
SHAKESPEARE = (PROJECT_ROOT / "data" / "tinyshakespeare.txt").read_text()
# What `make run` printed before and nobody can act on.
NOISE = ["Removed shared tensor", "PreviewWarning", "Add type hints to the `predict` method", "Downloading artifacts",
         "system_metrics_monitor", "Creating initial MLflow database tables"]


def user_env(home: Path) -> dict[str, str]:
    return {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", str(home)), "DAGSTER_HOME": str(home)}


def scratchllm(*args: str, cwd: Path, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], cwd=cwd, env=env or user_env(cwd / "dagster_home"), capture_output=True,
                          text=True, timeout=timeout)


def write_texts(directory: Path, n: int = 5, size: int = 12_000) -> Path:
    """`n` files of a few KB of plays (the last one gzipped), as a user's handful of documents."""
    directory.mkdir(parents=True)
    for i in range(n):
        text = SHAKESPEARE[i * 200_000: i * 200_000 + size]
        text = text[text.index("\n\n") + 2:]  # start at a speaker
        if i == n - 1 and n > 1:
            (directory / f"part{i}.txt.gz").write_bytes(gzip.compress(text.encode()))
        else:
            (directory / f"part{i}.txt").write_text(text)
    return directory


def write_profile(path: Path, values: dict) -> Path:
    path.write_text(yaml.safe_dump(values))
    return path


@pytest.fixture(scope="module")
def own_text_run(tmp_path_factory):
    """`scratchllm run --config my.yaml` on 5 small files: the default profile with corpus.sources, and
    a fifth of its steps (nothing checked here depends on the model's quality)."""
    user = tmp_path_factory.mktemp("user")
    texts = write_texts(user / "texts")
    write_profile(user / "my.yaml", {"data_dir": str(user / "run"), "corpus": {"sources": [str(texts)]},
                                     "training": {"max_steps": 200},
                                     "sft": {"max_steps": 20, "warmup_steps": 5}})  # the chat path: short
    done = scratchllm("run", "--config", "my.yaml", cwd=user)  # relative: found in the working directory
    assert done.returncode == 0, done.stderr[-5000:]
    return user, done.stderr


@pytest.mark.slow
def test_five_small_files_split_sensibly_train_and_register(own_text_run):
    user, log = own_text_run
    split = json.loads((user / "run" / "tokenized_dataset" / "manifest.json").read_text())["split"]
    # Whatever the unit (5 documents may or may not hold one out whole), the split holds out about 10% of the text.
    assert split["as_asked"] and 0.05 <= split["val_share_bytes"] <= 0.2, split
    assert split["val_pieces"] > 0 and split["train_pieces"] > split["val_pieces"]
    assert f"tokenized_dataset: split by {split['unit']}" in log  # said in the log, with the numbers
    assert "registered scratchllm version 1" in log and "as `champion`" in log
    profile = str(user / "my.yaml")
    # The closing hint is a command that works as printed: the profile's first prompt, the profile.
    first_prompt = shlex.quote(next(p for p in load_config(profile).evaluation.prompts if p))
    assert log.splitlines()[-1].endswith(f"scratchllm generate --model scratchllm@champion --prompt {first_prompt} "
                                         f"--config {profile}")
    assert f"`make ui CONFIG={profile}` or `scratchllm ui --config {profile}`" in log
    assert [noise for noise in NOISE if noise in log] == []


@pytest.mark.slow
def test_a_corpus_too_small_fails_with_its_cause_and_next_step_in_the_summary(tmp_path):
    texts = write_texts(tmp_path / "texts", n=1, size=3_000)  # one piece: nothing can be held out
    typo = tmp_path / "txets"
    profile = write_profile(tmp_path / "tiny.yaml", {"data_dir": str(tmp_path / "run"),
                                                     "corpus": {"sources": [str(texts), str(typo)]}})
    done = scratchllm("run", "--config", str(profile), cwd=tmp_path)
    assert done.returncode == 1
    summary = done.stderr[done.stderr.index("scratchllm: run "):].splitlines()
    cause = summary[1:-1]  # between "run ... FAILED at tokenizer" and the pointer to the full trace
    assert summary[0].endswith("FAILED at tokenizer") and len(cause) <= 3, summary
    assert cause[0].startswith("  tokenizer: the corpus is too small to hold out validation text: 1 piece (")
    assert "next step: add text to corpus.sources" in cause[1]
    assert "Error occurred while executing" not in "".join(cause)  # Dagster's wrapper is not the cause
    assert f"corpus.sources: '{typo}' gives no file (path not found)" in done.stderr  # the typo, named


def test_a_training_that_would_read_its_few_files_20_times_over_is_warned_about(tmp_path):
    from llm_core.files import write_json
    from llm_core.layout import DATASET_DIR
    from llm_core.training.training_run import repetition_warning

    cfg = load_config(None, {"data_dir": str(tmp_path)})  # 1,000 steps of 12 x 64 tokens: 768,000 tokens
    write_json(tmp_path / DATASET_DIR / "manifest.json", {"split": {"train_tokens": 16_000}})  # 5 small files
    warning = repetition_warning(cfg)
    assert warning.startswith("training: 1000 steps read 0.77M tokens, 48 passes over the 16,000 tokens")
    assert "lower training.max_steps" in warning
    write_json(tmp_path / DATASET_DIR / "manifest.json", {"split": {"train_tokens": 100_000}})
    assert repetition_warning(cfg) is None  # 8 passes: nothing to say


def test_check_config_names_every_source_that_gives_no_file(tmp_path):
    texts = write_texts(tmp_path / "texts", n=2, size=3_000)
    write_profile(tmp_path / "p.yaml", {"corpus": {"sources": [
        str(texts), str(tmp_path / "nope"), str(tmp_path / "*.jsonl"), "s3://bucket/dump/*.parquet", "nosuch://x"]}})
    done = scratchllm("check-config", "--config", "p.yaml", cwd=tmp_path)
    assert done.returncode == 2
    problems = [line for line in done.stderr.splitlines() if line.startswith("# invalid")]
    assert len(problems) == 3, done.stderr  # the good directory and the well-formed s3 URI pass (no network)
    assert f"corpus.sources[1] '{tmp_path / 'nope'}': path not found" in problems[0]
    assert "corpus.sources[2]" in problems[1] and "no files matched" in problems[1]
    assert "corpus.sources[4] 'nosuch://x': unknown protocol 'nosuch'" in problems[2]
    fixed = write_profile(tmp_path / "fixed.yaml", {"corpus": {"sources": [str(texts)]}})
    assert scratchllm("check-config", str(fixed), cwd=tmp_path).returncode == 0  # positional, as before


@pytest.mark.parametrize("command", [["run"], ["check-config"], ["plan"], ["generate", "--prompt", "x"],
                                     ["export-hf", "--out", "x"], ["serve"], ["ui"]])
def test_a_missing_profile_is_one_clean_line_in_every_subcommand(tmp_path, command):
    done = scratchllm(*command, "--config", "nope.yaml", cwd=tmp_path, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [done.stderr.strip()], done.stderr  # one line, no traceback
    assert f"config profile not found: nope.yaml (looked at {tmp_path / 'nope.yaml'}, " \
           f"{PROJECT_ROOT / 'assets_config' / 'nope.yaml'}" in done.stderr


def test_a_relative_profile_is_found_in_the_project_from_any_directory(tmp_path):
    for spelling in ("ci.yaml", "ci", "assets_config/ci.yaml"):
        done = scratchllm("check-config", "--config", spelling, cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        assert yaml.safe_load(done.stdout)["training"]["max_steps"] == 30  # ci.yaml's, not the default's


def test_plan_without_arguments_plans_the_profile_in_force(tmp_path):
    env = {**user_env(tmp_path), "SCRATCHLLM_CONFIG": str(PROJECT_ROOT / "assets_config" / "ci.yaml")}
    ci = scratchllm("plan", cwd=tmp_path, env=env)
    default = scratchllm("plan", cwd=tmp_path)
    assert ci.returncode == 0 and default.returncode == 0, ci.stderr + default.stderr
    assert "2 layers x 32 wide" in ci.stdout and "4 layers x 128 wide" in default.stdout
