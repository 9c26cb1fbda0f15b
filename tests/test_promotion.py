"""Promotion that survives noise (llm_core/evaluation/promotion.py) with real trainings and a real MLflow store:
a re-run that differs only in its seed, whose difference is inside the paired interval, does not take
`champion`; a clearly better model does; a model worse on a task beyond noise does not; a champion
evaluated elsewhere is compared through the scores its MLflow run keeps."""

from __future__ import annotations

import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import CI_PROFILE, QUIET, build_dataset, config

from llm_core.evaluation import evaluate as ev
from llm_core.evaluation import promotion
from llm_core.registry import versions
from llm_core import tracking
from llm_core.model_files import load_model
from llm_core.config import load_config
from llm_core.layout import EVALUATION_DIR
from llm_core.training.train import train

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]

# name: (steps, seed). a and b differ only in their seed; weak has barely trained. Seeds can also
# differ beyond the interval (measured on the default profile: 1 pair of 3), which is what
# registry.promotion_margin_bpb is for; these two land inside it (measured for this corpus and recipe:
# of seeds 1338-1343 against 1337, only 1343 did; the pair must be re-chosen when the recipe changes).
TRAININGS = {"a": (800, 1337), "b": (800, 1343), "weak": (40, 1337)}


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    """(cfg, {name: val bpb}): the ci corpus cut into documents of at most 512 bytes (~230 validation
    documents, enough for an interval), three trainings, each evaluated into model_evaluation/<name>/."""
    root = tmp_path_factory.mktemp("promotion")
    build_dataset(load_config(CI_PROFILE, {"data_dir": str(root), "corpus": {"max_document_bytes": 512}}))
    bpb = {}
    for name, (steps, seed) in TRAININGS.items():
        cfg = config(root, max_steps=steps, seed=seed, checkpoint_interval=steps, eval_interval=steps)
        train(cfg, root / "runs" / name, log=QUIET)
        r = ev.evaluate(cfg, load_model(root / "runs" / name), root / "tokenizer")
        ev.save_evaluation(cfg, r, root / EVALUATION_DIR / name)
        bpb[name] = r.val_bpb
    return cfg, bpb


@pytest.fixture
def store(evaluated, tmp_path):
    """register(name, verdict) -> Registration on a fresh sqlite store; the store's URI."""
    cfg, bpb = evaluated
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    store_cfg = cfg.model_copy(update={"data_dir": str(tmp_path)})

    def register(name: str, verdict=None) -> versions.Registration:
        run_id = tracking.start_training_run(store_cfg, uri, tags={versions.KEY_TAG: name})
        eval_dir = cfg.data_path / EVALUATION_DIR / name
        tracking.log_evaluation(uri, run_id, {"val_bpb": bpb[name]}, [],
                                files=[eval_dir / ev.PER_DOCUMENT_FILE, eval_dir / ev.TASK_ITEMS_FILE])
        return versions.register(cfg.data_path / "runs" / name, cfg.data_path / "tokenizer", tracking_uri=uri,
                                 run_id=run_id, name=cfg.registry.model_name, val_bpb=bpb[name],
                                 tags={versions.KEY_TAG: name}, verdict=verdict)

    return register, uri


def test_the_interval_of_a_known_difference():
    rng = np.random.default_rng(1)
    values = 0.5 + rng.normal(0, 1, 400)
    low, high = promotion.bootstrap_interval(values, None, 0.95)
    assert low < values.mean() < high and high - low == pytest.approx(2 * 1.96 / 20, rel=0.2)  # ~ 2 x 1.96 sd/sqrt(n)
    assert promotion.bootstrap_interval(np.zeros(50), np.ones(50), 0.9) == (0.0, 0.0)


def test_a_seed_rerun_inside_the_interval_does_not_take_champion(evaluated, store):
    cfg, bpb = evaluated
    register, uri = store
    assert register("a").alias == "champion"
    verdict = promotion.against_champion(cfg, uri, "b", bpb["b"])
    print(f"seed 1343 vs 1337: {verdict.delta_bpb:+.4f} bits/byte [{verdict.low:+.4f}, {verdict.high:+.4f}], "
          f"{verdict.num_documents} documents")
    assert verdict.num_documents > 200 and verdict.delta_bpb == pytest.approx(bpb["b"] - bpb["a"], abs=1e-9)
    assert verdict.low < 0 < verdict.high and not verdict.promote  # a difference inside the noise
    assert "not better beyond the margin" in verdict.reason
    b = register("b", verdict)
    assert (b.alias, b.previous_champion) == ("challenger", "1")
    client = tracking.client(uri)
    assert str(client.get_model_version_by_alias(cfg.registry.model_name, "champion").version) == "1"
    tags = client.get_model_version(cfg.registry.model_name, b.version).tags
    assert tags["promotion.documents"] == str(verdict.num_documents) and "at 95%" in tags["promotion.interval"]
    assert "promotion.task.continuation" in tags


def test_a_clearly_better_model_takes_champion(evaluated, store):
    cfg, bpb = evaluated
    register, uri = store
    register("weak")
    verdict = promotion.against_champion(cfg, uri, "a", bpb["a"])
    assert verdict.promote and verdict.high < 0 and verdict.reason.startswith("better")
    assert register("a", verdict).alias == "champion"
    # A margin wider than the gain keeps the champion.
    strict = cfg.model_copy(update={"registry": cfg.registry.model_copy(
        update={"promotion_margin_bpb": -verdict.low + 0.01})})
    assert not promotion.compare(cfg.data_path / EVALUATION_DIR / "a", cfg.data_path / EVALUATION_DIR / "weak",
                                 bpb["a"], bpb["weak"], margin=strict.registry.promotion_margin_bpb,
                                 confidence=0.95).promote


def test_worse_on_a_task_beyond_noise_vetoes_promotion(evaluated, tmp_path):
    """a is better in bits/byte than weak; with its task answers made wrong on half the items it is not promoted."""
    cfg, bpb = evaluated
    new = tmp_path / "a-worse-on-tasks"
    shutil.copytree(cfg.data_path / EVALUATION_DIR / "a", new)
    items = pq.read_table(new / ev.TASK_ITEMS_FILE).to_pylist()
    old = {r["id"]: r["correct_norm"] for r in pq.read_table(cfg.data_path / EVALUATION_DIR / "weak" /
                                                              ev.TASK_ITEMS_FILE).to_pylist()}
    for i, row in enumerate(items):
        row["correct_norm"] = old[row["id"]] and i % 2 == 1  # right only where weak was, and on half of those
    pq.write_table(pa.Table.from_pylist(items), new / ev.TASK_ITEMS_FILE)
    verdict = promotion.compare(new, cfg.data_path / EVALUATION_DIR / "weak", bpb["a"], bpb["weak"], margin=0,
                                confidence=0.95)
    assert verdict.high < 0 and not verdict.promote
    assert verdict.task_deltas[0].high < 0 and "worse beyond noise on continuation" in verdict.reason


def test_a_champion_evaluated_elsewhere_is_compared_through_its_mlflow_run(evaluated, store, tmp_path):
    cfg, bpb = evaluated
    register, uri = store
    register("weak")
    elsewhere = cfg.model_copy(update={"data_dir": str(tmp_path / "elsewhere")})  # no model_evaluation/weak here
    shutil.copytree(cfg.data_path / EVALUATION_DIR / "a", elsewhere.data_path / EVALUATION_DIR / "a")
    verdict = promotion.against_champion(elsewhere, uri, "a", bpb["a"])
    assert verdict.num_documents > 200 and verdict.promote  # paired: the champion's run kept its scores
    assert (elsewhere.data_path / EVALUATION_DIR / "weak" / ev.PER_DOCUMENT_FILE).exists()


def test_without_the_champions_scores_the_means_decide_and_say_so(evaluated):
    cfg, bpb = evaluated
    verdict = promotion.compare(cfg.data_path / EVALUATION_DIR / "a", None, bpb["a"], bpb["weak"], margin=0,
                                confidence=0.95)
    assert verdict.promote and verdict.num_documents == 0 and "means compared" in verdict.reason
