"""How much of the graph's time evaluation takes on a large corpus, with a short training.

    python benchmarks/evaluation_share.py [--mb 300] [--steps 200] [--work-dir /tmp/scratchllm-eval-bench]

Runs every stage of the graph in this process on a generated corpus of about `--mb` MB
(make_corpus.make_sized_corpus, cached in the work dir) with the default profile and
`training.max_steps: --steps`: raw_corpus, cleaned_shards, tokenizer, tokenized_dataset (with the
built-in task and the decontamination check), trained_model, then model_evaluation (per-document
validation scores on at most evaluation.max_val_tokens, the tasks, the samples). Prints each stage's
seconds and share of the total, the evaluation's tokens and tokens/s, and what scoring the whole
validation split would have cost at that speed (once in training's final evaluation and once more
in model_evaluation, as before evaluation.max_val_tokens).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # import benchmarks.* and llm_core

from benchmarks.make_corpus import make_sized_corpus  # noqa: E402
from llm_core.evaluation import evaluate as ev  # noqa: E402
from llm_core.data.tokenizer import load_tokenizer, train_tokenizer  # noqa: E402
from llm_core.model_files import load_model  # noqa: E402
from llm_core.config import load_config  # noqa: E402
from llm_core.data.cleaned_shards import build_cleaned_shards, cleaned_shard_paths  # noqa: E402
from llm_core.data.raw_corpus import build_raw_corpus  # noqa: E402
from llm_core.layout import TOKENIZER_DIR  # noqa: E402
from llm_core.data.tokenized_dataset import build_tokenized_dataset  # noqa: E402
from llm_core.training.train import train  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mb", type=float, default=300)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--work-dir", default="/tmp/scratchllm-eval-bench")
    a = parser.parse_args()
    work = Path(a.work_dir)
    corpus = work / f"corpus-{a.mb:g}mb"
    if not (corpus / "corpus").is_dir():
        make_sized_corpus(corpus, a.mb)
    for stale in (work / "data", work / "run"):  # every stage from scratch: no shard or checkpoint reused
        shutil.rmtree(stale, ignore_errors=True)
    cfg = load_config(None, {"data_dir": str(work / "data"),
                             "corpus": {"sources": [str(corpus / "corpus")], "pieces_are_documents": []},
                             "training": {"max_steps": a.steps, "checkpoint_interval": a.steps,
                                          "eval_interval": a.steps}})
    quiet = lambda message: None  # noqa: E731
    seconds: dict[str, float] = {}

    def timed(stage: str, work_fn):
        start = time.perf_counter()
        result = work_fn()
        seconds[stage] = time.perf_counter() - start
        print(f"{stage}: {seconds[stage]:.1f} s", flush=True)
        return result

    tok_dir = cfg.data_path / TOKENIZER_DIR
    timed("raw_corpus", lambda: build_raw_corpus(cfg, quiet))
    timed("cleaned_shards", lambda: build_cleaned_shards(cfg, quiet))
    timed("tokenizer", lambda: train_tokenizer(cfg, cleaned_shard_paths(cfg), tok_dir, log=quiet))
    dataset = timed("tokenized_dataset",
                    lambda: build_tokenized_dataset(cfg, load_tokenizer(tok_dir), tok_dir, log=quiet))
    run_dir = work / "run"
    timed("trained_model", lambda: train(cfg, run_dir, log=quiet))
    r = timed("model_evaluation", lambda: ev.evaluate(cfg, load_model(run_dir), tok_dir))

    total = sum(seconds.values())
    print(f"\ncorpus {a.mb:g} MB: {dataset.num_train_tokens:,} train / {dataset.num_val_tokens:,} val tokens; "
          f"{a.steps} training steps; {dataset.contamination['num_removed']} contaminated documents removed\n")
    print("| stage | seconds | share |\n|---|---|---|")
    for stage, s in seconds.items():
        print(f"| {stage} | {s:.1f} | {s / total:.1%} |")
    print(f"| total | {total:.1f} | |\n")
    full = dataset.num_val_tokens / r.val_tokens_per_second
    print(f"model_evaluation scored {r.num_val_tokens:,} tokens ({r.num_val_documents:,} documents, "
          f"evaluation.max_val_tokens {cfg.evaluation.max_val_tokens:,}) at {r.val_tokens_per_second:,.0f} tokens/s; "
          f"val {r.val_bpb:.4f} bits/byte; tasks: "
          + ", ".join(f"{t.name} acc_norm {t.acc_norm:.3f}" for t in r.tasks))
    print(f"the whole val split at that speed: {full:.0f} s, twice before (training's final pass and "
          f"model_evaluation): {2 * full:.0f} s")


if __name__ == "__main__":
    main()
