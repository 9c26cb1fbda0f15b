"""Named sources and data mixtures on a real corpus of 3 sources of very different sizes: Shakespeare's
plays, paragraphs of Python's reference documentation, and a tiny source (a few more paragraphs and an
exact copy of one of the documentation's). Counts per source through every data stage, the loader's
token shares, the refusal of an impossible mixture, the natural draw unchanged, resume after kill -9,
and a protected source vetoing a promotion. (A 2-mixture sweep through the UI is in test_ui.py, which
shares its `dagster dev`.)"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys

import numpy as np
import pyarrow.compute as pc
import pytest

from helpers import (CI_PROFILE, QUIET, SUBPROCESS_TIMEOUT, held_pid, losses, run, subprocess_env, summary,
                     three_sources, train_command, wait_until)
from llm_core.config import PROJECT_ROOT, load_config
from llm_core.data import tokenizer as tok
from llm_core.data.cleaned_shards import build_cleaned_shards
from llm_core.data.raw_corpus import build_raw_corpus
from llm_core.data.tokenized_dataset import build_tokenized_dataset
from llm_core.errors import DataError
from llm_core.evaluation.evaluate import TASK_ITEMS_FILE, evaluate, save_evaluation
from llm_core.evaluation.promotion import compare
from llm_core.model_files import load_model
from llm_core.registry import model_card
from llm_core.training.loader import TokenWindows
from llm_core.training.mixture import check_mixture
from llm_core.training.training_run import mixture_tags
from llm_core.training.train import train

BLOCK, BATCH = 32, 4
THIRDS = {"plays": 1.0, "docs": 1.0, "tiny": 1.0}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, prose):
    """(config maker, stage results): the 3-source corpus through raw_corpus .. tokenized_dataset."""
    root = tmp_path_factory.mktemp("mixture")
    corpus_values = three_sources(root / "sources", prose)
    base = {"max_steps": 20, "warmup_steps": 5, "batch_size": BATCH, "checkpoint_interval": 10,
            "eval_interval": 10, "eval_batches": 5, "log_interval": 10}

    def make(**training):
        return load_config(CI_PROFILE, {"data_dir": str(root / "data"), "corpus": corpus_values,
                                        "training": {**base, **training}})

    cfg = make()
    raw = build_raw_corpus(cfg, QUIET)
    cleaned = build_cleaned_shards(cfg, QUIET)
    tokenizer_dir = cfg.data_path / "tokenizer"
    tok.train_tokenizer(cfg, [cleaned.shards_dir / p["name"] for p in cleaned.parts], tokenizer_dir, log=QUIET)
    dataset = build_tokenized_dataset(cfg, tok.load_tokenizer(tokenizer_dir), tokenizer_dir, log=QUIET)
    return make, {"raw": raw, "cleaned": cleaned, "dataset": dataset}


def test_per_source_counts_add_up_in_every_stage_and_a_cross_source_duplicate_counts_against_the_loser(corpus):
    _, r = corpus
    raw, cleaned, dataset = r["raw"], r["cleaned"], r["dataset"]
    assert list(raw.sources) == ["plays", "docs", "tiny"]
    assert raw.sources["docs"]["source_documents"] == 70 and raw.sources["tiny"]["source_documents"] == 11
    for key, total in (("documents", raw.num_documents), ("bytes", raw.num_bytes)):
        assert sum(c[key] for c in raw.sources.values()) == total

    c = cleaned.sources
    for key, total in (("documents_in", cleaned.num_documents_in), ("kept", cleaned.num_kept),
                       ("exact_duplicates", cleaned.num_exact_duplicates), ("bytes_in", cleaned.num_bytes_in),
                       ("bytes_out", cleaned.num_bytes_out), ("near_duplicates", cleaned.num_near_duplicates),
                       ("quarantined", cleaned.num_quarantined)):
        assert sum(s[key] for s in c.values()) == total, key
    assert sum(sum(s["filtered_by_rule"].values()) for s in c.values()) == cleaned.num_filtered
    for name, s in c.items():  # per source: in = kept + every way out
        assert s["documents_in"] == s["kept"] + s["exact_duplicates"] + s["near_duplicates"] + s["quarantined"] + \
            sum(s["filtered_by_rule"].values()), name
    # The copy in `tiny` comes after the original in `docs`: removed once, counted against tiny, across sources.
    assert c["tiny"]["exact_duplicates"] == 1 and c["tiny"]["cross_source_duplicates"] == 1
    assert c["docs"]["exact_duplicates"] == 0 and c["docs"]["kept"] == c["docs"]["documents_in"]

    d = dataset.sources
    assert sum(s["train_tokens"] for s in d.values()) == dataset.num_train_tokens
    assert sum(s["val_tokens"] for s in d.values()) == dataset.num_val_tokens
    assert sum(s["train_documents"] + s["val_documents"] for s in d.values()) == cleaned.num_kept
    assert d["plays"]["train_tokens"] > 3 * d["docs"]["train_tokens"] and d["docs"]["train_tokens"] > 5 * d["tiny"][
        "train_tokens"] > 0  # sizes very different


def test_a_mixture_gives_each_source_its_weight_of_the_trained_tokens(corpus):
    make, r = corpus
    steps, world = 300, 2
    loaders = [TokenWindows(r["dataset"].out_dir, "train", BLOCK, BATCH, seed=3, rank=rank, world_size=world,
                            mixture=THIRDS) for rank in range(world)]
    counted = loaders[0].tokens_per_source(steps)
    assert sum(counted.values()) == steps * BATCH * world * BLOCK
    # Counted independently: every window of every rank lies inside one source; count them by that source.
    data = loaders[0].data
    doc_sources = data.doc_sources()
    seen = np.zeros(len(data.sources), dtype=np.int64)
    for step in range(steps):
        for loader in loaders:
            x, y = loader.batch_at(step)
            assert x.shape == (BATCH, BLOCK) and np.array_equal(x[:, 1:], y[:, :-1])
        arrays, starts = loaders[0]._global_batch(step)
        for a, start in zip(arrays.tolist(), starts.tolist()):
            first, last = np.searchsorted(data.doc_starts[a], [start, start + BLOCK], side="right") - 1
            assert doc_sources[a][first] == doc_sources[a][last], "a window crosses from one source into another"
            seen[doc_sources[a][first]] += BLOCK
    assert dict(zip(data.sources, seen.tolist())) == counted
    total = sum(counted.values())
    for name in THIRDS:
        assert abs(counted[name] / total - 1 / 3) <= 0.02 / 3, (name, counted)
    # Without a mixture the tiny source gets its natural share: far less.
    natural = TokenWindows(r["dataset"].out_dir, "train", BLOCK, BATCH, seed=3).tokens_per_source(steps)
    assert natural["tiny"] < 0.1 * natural["plays"]


def test_without_a_mixture_windows_are_drawn_as_always(corpus):
    """The natural draw, written out independently: window starts uniform over every valid start of the
    whole split (seeded by seed and step), so a profile without a mixture trains exactly as before."""
    _, r = corpus
    loader = TokenWindows(r["dataset"].out_dir, "train", BLOCK, BATCH, seed=5, rank=1, world_size=2)
    arrays = loader.data.arrays
    valid = np.cumsum([len(a) - BLOCK for a in arrays])
    for step in range(20):
        picks = np.random.default_rng([5, step]).integers(0, valid[-1], size=2 * BATCH)[BATCH:]
        expected = []
        for pick in picks:
            a = int(np.searchsorted(valid, pick, side="right"))
            start = pick - (valid[a - 1] if a else 0)
            expected.append(arrays[a][start:start + BLOCK].astype(np.int64))
        assert np.array_equal(loader.batch_at(step)[0].numpy(), np.stack(expected))


def test_an_impossible_mixture_is_refused_naming_the_source_and_accepted_with_the_cap_raised(corpus, tmp_path):
    make, r = corpus
    tiny_tokens = r["dataset"].sources["tiny"]["train_tokens"]
    # Enough steps for a third of the tokens to be 8 passes over tiny's: twice the default cap of 4.
    steps = math.ceil(8 * tiny_tokens * 3 / (BATCH * BLOCK))
    cfg = make(max_steps=steps, mixture=THIRDS)
    with pytest.raises(DataError) as refused:
        check_mixture(cfg)
    message = str(refused.value)
    assert "training.mixture: source 'tiny' would be seen 8." in message and f"{tiny_tokens:,}" in message
    assert "training.mixture_max_repetitions allows 4" in message
    with pytest.raises(DataError, match="source 'tiny'"):  # the training itself refuses before its first step
        train(cfg, tmp_path / "refused", log=QUIET)
    assert not (tmp_path / "refused" / "checkpoints").exists()

    plan = check_mixture(make(max_steps=steps, mixture=THIRDS, mixture_max_repetitions={"tiny": 10}))
    assert {p.source: round(p.weight, 3) for p in plan} == {"plays": 0.333, "docs": 0.333, "tiny": 0.333}
    assert 8 <= next(p.repetitions for p in plan if p.source == "tiny") <= 8.1


def test_kill_9_mid_training_with_a_mixture_resumes_to_the_same_losses(corpus, tmp_path):
    make, _ = corpus
    cfg = make(max_steps=30, mixture={"plays": 1.0, "docs": 2.0, "tiny": 0.5}, mixture_max_repetitions=50)
    out, marker = tmp_path / "killed", tmp_path / "held"
    cmd = [sys.executable, *train_command(cfg, out)]
    env = {**subprocess_env(), "SCRATCHLLM_HOLD_AT": "train_step:15", "SCRATCHLLM_HOLD_MARKER": str(marker)}
    proc = subprocess.Popen(cmd, cwd=PROJECT_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        wait_until(marker.exists, proc, what="the training to hold at step 15", timeout=SUBPROCESS_TIMEOUT)
        assert held_pid(marker) == proc.pid
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # kill -9 at the hold point (or the cleanup of a failed wait)
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL and not (out / "training_summary.json").exists()

    resumed = run(cmd)  # the same command, without the hold
    assert "resumed from" in resumed.stdout and "(step 10)" in resumed.stdout
    reference = train(cfg, tmp_path / "uninterrupted", log=QUIET)
    got = summary(out)
    assert len(losses(got["history"])) == 30
    for step, (a, b) in enumerate(zip(losses(got["history"]), losses(reference.history), strict=True), 1):
        assert abs(a - b) <= 1e-6, f"step {step}: resumed {a} vs uninterrupted {b}"
    assert got["tokens_per_source"] == reference.tokens_per_source
    shares = {k: v / sum(got["tokens_per_source"].values()) for k, v in got["tokens_per_source"].items()}
    assert shares == pytest.approx({"plays": 1 / 3.5, "docs": 2 / 3.5, "tiny": 0.5 / 3.5}, abs=0.01)
    # Lineage: the registry's tags and the model card say the mixture and what each source gave.
    tags = mixture_tags(out)
    assert json.loads(tags["scratchllm.mixture"]) == {"plays": 1.0, "docs": 2.0, "tiny": 0.5}
    assert json.loads(tags["scratchllm.tokens_per_source"]) == got["tokens_per_source"]
    card = model_card.render(cfg, out)
    assert "### Data mixture" in card and f"| docs | 0.571 | {got['tokens_per_source']['docs']:,} |" in card
    assert mixture_tags(reference.out_dir.parent / "no-such-model") == {"scratchllm.mixture": "natural"}


def test_per_source_scores_follow_the_mixture_and_a_protected_source_vetoes_a_promotion(corpus, tmp_path):
    """Two trainings that differ only in their mixture: the one on `docs` alone scores better on docs'
    validation documents, the plays-heavy one on the plays' and overall (the plays are most of the
    validation text), yet with `docs` protected it is not promoted over the docs-only one."""
    make, _ = corpus
    scored = {}
    # Outside the project, document ids (and with them the split) follow the files' absolute paths, so each
    # run of this test holds out other documents (15-30): plays_heavy sees some docs, and the intervals are
    # 90% ones, so that no split makes "better overall" a coin toss (0.25 and 95% failed 1 run in ~10).
    for name, mixture in (("docs_heavy", {"docs": 1.0}), ("plays_heavy", {"plays": 1.0, "docs": 0.5})):
        cfg = make(max_steps=80, learning_rate=1e-2, mixture=mixture, mixture_max_repetitions=100)
        result = train(cfg, tmp_path / name, log=QUIET)
        assert set(result.tokens_per_source) == set(mixture)
        r = evaluate(cfg, load_model(tmp_path / name), cfg.data_path / "tokenizer")
        with_val = {n for n, c in corpus[1]["dataset"].sources.items() if c["val_documents"]}
        assert set(r.per_source) == with_val >= {"plays", "docs"}
        assert sum(s["bytes"] for s in r.per_source.values()) == pc.sum(r.per_document.column("bytes")).as_py()
        save_evaluation(cfg, r, tmp_path / f"{name}-eval")
        scored[name] = r
    docs_heavy, plays_heavy = scored["docs_heavy"].per_source, scored["plays_heavy"].per_source
    assert docs_heavy["docs"]["bpb"] < plays_heavy["docs"]["bpb"] - 0.1
    assert plays_heavy["plays"]["bpb"] < docs_heavy["plays"]["bpb"]
    assert scored["plays_heavy"].val_bpb < scored["docs_heavy"].val_bpb

    (tmp_path / "docs_heavy-eval" / TASK_ITEMS_FILE).unlink()  # bits per byte only: no task veto in the way

    def verdict(protected):
        return compare(tmp_path / "plays_heavy-eval", tmp_path / "docs_heavy-eval", scored["plays_heavy"].val_bpb,
                       scored["docs_heavy"].val_bpb, margin=0.0, confidence=0.9, protected_sources=protected)

    assert verdict([]).promote, verdict([]).reason
    vetoed = verdict(["docs"])
    assert not vetoed.promote and "worse beyond noise on source docs" in vetoed.reason
    (docs,) = vetoed.source_deltas
    assert docs.low > 0 and docs.documents == scored["docs_heavy"].per_source["docs"]["documents"]
    assert vetoed.tags()["promotion.source.docs"].startswith("+")
