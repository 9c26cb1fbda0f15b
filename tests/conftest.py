"""Shared fixtures: a clean config environment, real English prose, temp-dir configs, the ci
profile's tokenized dataset, tiny trained models, a Dagster instance. Plain helpers: helpers.py.

The suite runs on pytest-xdist workers (`-n auto` in pyproject.toml; `-n 0` for one process, e.g. with
--pdb). Each worker gets a share of the cores of its own, and the slow tests go first."""

from __future__ import annotations

import collections
import functools
import os
from pathlib import Path

import pytest

from llm_core.config import CONFIG_ENV_VAR, PROJECT_ROOT, load_config


def pytest_configure(config):
    """An xdist worker runs on its own share of the cores (its subprocesses inherit it): two trainings
    side by side on 2 cores each sized for both cores ran several times slower than one after the
    other, and every thread count in the product follows the cores a process may use."""
    worker, workers = os.environ.get("PYTEST_XDIST_WORKER"), int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if worker and 1 < workers <= len(cores):
        index, share = int(worker.removeprefix("gw")), len(cores) // workers
        os.sched_setaffinity(0, cores[index * share:(index + 1) * share])


def pytest_collection_modifyitems(items):
    """The modules with the most slow tests first, each kept in its order (a worker runs a whole
    module): the quick ones then fill the end, so that no worker is left alone with a long module."""
    slow_tests = collections.Counter(item.module for item in items if item.get_closest_marker("slow"))
    items.sort(key=lambda item: -slow_tests[item.module])


@pytest.fixture(autouse=True)
def _no_profile_from_env(monkeypatch):
    """Tests run as a newcomer's shell would: they choose their profile explicitly, and neither a
    SCRATCHLLM_CONFIG nor an MLflow URI of the caller's shell leaks in (a path that works only with
    MLFLOW_TRACKING_URI exported is a bug, see test_registry.py)."""
    for name in (CONFIG_ENV_VAR, "MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="session")
def prose() -> list[str]:
    """Distinct real English paragraphs (Python's bundled docs) that pass the default quality rules.

    Any two share less than 10% of their word 5-grams, so they are neither exact nor near duplicates.
    """
    from pydoc_data.topics import topics

    from llm_core.data import clean, dedup

    rules = load_config().cleaning
    seen: set[tuple[str, ...]] = set()
    out: list[str] = []
    for key in sorted(topics):
        for para in topics[key].split("\n\n"):
            text = " ".join(para.split())
            if len(text) < 300 or para.startswith(" ") or ">>>" in text:
                continue
            words = text.lower().split()
            grams = {tuple(words[i:i + 5]) for i in range(len(words) - 4)}
            if not grams or len(grams & seen) > 0.1 * len(grams):
                continue
            if clean.quality_rule_failed(text, dedup.word_hashes(dedup.split_words(text)), rules):
                continue
            seen |= grams
            out.append(text)
    assert len(out) >= 80
    return out


@pytest.fixture(scope="module")
def one_thread():
    """One thread per process: tiny matrices, 2 cores, and concurrent tests (oversubscription is
    catastrophic: measured 3-7x slower). With OMP_NUM_THREADS set, train() leaves the thread count alone."""
    import torch

    before = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")
        torch.set_num_threads(1)
        yield
    torch.set_num_threads(before)


@pytest.fixture
def make_cfg(tmp_path):
    """`make_cfg(sources, corpus={...}, cleaning={...}, ...)`: helpers.make_config with data_dir under tmp_path."""
    from helpers import make_config

    return functools.partial(make_config, tmp_path / "run")


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    """The ci profile's corpus, cleaned, a 512-token BPE, and the tokenized dataset: built once."""
    from helpers import CI_PROFILE, build_dataset

    from llm_core.layout import DATASET_DIR

    root = tmp_path_factory.mktemp("train_data")
    build_dataset(load_config(CI_PROFILE, {"data_dir": str(root)}))
    assert (root / DATASET_DIR / "manifest.json").exists()
    return root


@pytest.fixture(scope="module")
def reference_run(data_dir, tmp_path_factory):
    """One in-process run of 20 steps, batch 4, world size 1: shared by several tests of a module
    (module scope: it trains under the module's one_thread)."""
    from helpers import QUIET, config

    from llm_core.training.train import train

    cfg = config(data_dir)
    out = tmp_path_factory.mktemp("reference") / "out"
    result = train(cfg, out, log=QUIET)
    return cfg, result


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """(cfg, TrainResult, model): a tiny model trained for 10 steps on the ci profile, with its
    tokenizer at <data_dir>/tokenizer and tokenized dataset, shared by the tests that need one."""
    from helpers import QUIET, build_shards

    from llm_core.model_files import load_model
    from llm_core.data.tokenized_dataset import build_tokenized_dataset
    from llm_core.data.tokenizer import load_tokenizer, train_tokenizer
    from llm_core.training.train import train

    root = tmp_path_factory.mktemp("trained")
    cfg = load_config(PROJECT_ROOT / "assets_config" / "ci.yaml", {
        "data_dir": str(root), "training": {"max_steps": 10, "warmup_steps": 2, "eval_interval": 10},
        "evaluation": {"prompts": ["ROMEO:", ""], "max_new_tokens": 12, "temperature": 0.8, "seed": 3}})
    shards = build_shards(cfg)
    train_tokenizer(cfg, shards, root / "tokenizer", log=QUIET)
    build_tokenized_dataset(cfg, load_tokenizer(root / "tokenizer"), root / "tokenizer", log=QUIET)
    result = train(cfg, root / "model", log=QUIET)
    return cfg, result, load_model(root / "model")


@pytest.fixture
def instance(tmp_path, monkeypatch):
    """A real Dagster instance of its own (sqlite under a temporary DAGSTER_HOME)."""
    import dagster as dg

    home = tmp_path / "dagster_home"
    home.mkdir()
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    with dg.DagsterInstance.get() as inst:
        yield inst


@pytest.fixture(scope="session")
def ray_cluster():
    """One real 2-node Ray cluster on loopback for the whole session (tests/ray_cluster.py), stopped
    by its process ids at the end."""
    pytest.importorskip("ray")
    from ray_cluster import RayCluster

    cluster = RayCluster.start()
    yield cluster
    cluster.stop()

