"""A data-mixture sweep on 3 real sources, and what a mixture costs the loader and the training.

    python benchmarks/mixture_sweep.py [--work-dir /tmp/scratchllm-mixtures] [--steps 150] [--repeats 3]

Sources (all on this machine, no download): `plays` (the bundled tiny Shakespeare), `pydocs` (Python's
reference documentation, pydoc_data.topics, a record per section) and `licenses` (the license texts
under /usr/share/common-licenses). The data stages run once; then one training per mixture (natural
proportions, equal thirds, and each source up-weighted to 0.6 with 0.2 for the others), each evaluated on
every source's validation documents. Prints:
  - per source: documents, training and validation tokens, and its share of the training split;
  - per mixture: the tokens each source gave the training, overall and per-source val bits per byte;
  - the loader alone (batches per second, mixture vs natural, median of repeats, interleaved), and full
    training steps (tokens/s of the same training with and without a mixture, median of repeats).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from llm_core.config import DEFAULT_PROFILE, PROJECT_ROOT, load_config  # noqa: E402
from llm_core.data import tokenizer as tok  # noqa: E402
from llm_core.data.cleaned_shards import build_cleaned_shards  # noqa: E402
from llm_core.data.raw_corpus import build_raw_corpus  # noqa: E402
from llm_core.data.tokenized_dataset import build_tokenized_dataset  # noqa: E402
from llm_core.evaluation.evaluate import evaluate  # noqa: E402
from llm_core.layout import DATASET_DIR, TOKENIZER_DIR  # noqa: E402
from llm_core.model_files import load_model  # noqa: E402
from llm_core.training.loader import TokenWindows  # noqa: E402
from llm_core.training.train import train  # noqa: E402

QUIET = lambda message: None  # noqa: E731
SOURCES = ("plays", "pydocs", "licenses")
MODEL = {"n_layer": 4, "n_head": 4, "n_kv_head": 4, "n_embd": 128, "block_size": 128}


def write_sources(root: Path) -> dict:
    """The three sources as files under root, as `corpus` profile values."""
    from pydoc_data.topics import topics

    root.mkdir(parents=True, exist_ok=True)
    with open(root / "pydocs.jsonl", "w") as f:
        for key in sorted(topics):
            f.write(json.dumps({"text": topics[key]}) + "\n")
    licenses = Path("/usr/share/common-licenses")
    if not licenses.is_dir():
        raise SystemExit(f"no {licenses}: this benchmark reads its license texts (Debian's base-files)")
    (root / "licenses").mkdir(exist_ok=True)
    for path in sorted(licenses.iterdir()):  # named without an extension: copied as .txt
        if path.is_file() and not path.is_symlink():
            (root / "licenses" / f"{path.name}.txt").write_text(path.read_text(errors="replace"))
    return {"sources": [{"name": "plays", "paths": [str(PROJECT_ROOT / "data" / "tinyshakespeare.txt")]},
                        {"name": "pydocs", "paths": [str(root / "pydocs.jsonl")]},
                        {"name": "licenses", "paths": [str(root / "licenses")]}],
            "pieces_are_documents": [str(PROJECT_ROOT / "data" / "tinyshakespeare.txt"), str(root / "pydocs.jsonl")],
            "max_document_bytes": 2048}


def config(work_dir: Path, corpus: dict, steps: int, mixture: dict | None):
    return load_config(DEFAULT_PROFILE, {
        "data_dir": str(work_dir / "data"), "corpus": corpus, "model": MODEL,
        "training": {"max_steps": steps, "batch_size": 16, "checkpoint_interval": steps, "eval_interval": steps,
                     "eval_batches": 10, "log_interval": 10, "mixture": mixture, "mixture_max_repetitions": 100}})


def build_data(cfg) -> dict:
    build_raw_corpus(cfg, QUIET)
    cleaned = build_cleaned_shards(cfg, QUIET)
    tokenizer_dir = cfg.data_path / TOKENIZER_DIR
    tok.train_tokenizer(cfg, [cleaned.shards_dir / p["name"] for p in cleaned.parts], tokenizer_dir, log=QUIET)
    return build_tokenized_dataset(cfg, tok.load_tokenizer(tokenizer_dir), tokenizer_dir, log=QUIET).sources


def loader_rate(dataset_dir: Path, mixture: dict | None, batches: int) -> float:
    loader = TokenWindows(dataset_dir, "train", MODEL["block_size"], 16, seed=0, mixture=mixture)
    start = time.perf_counter()
    for step in range(batches):
        loader.batch_at(step)
    return batches / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/scratchllm-mixtures"))
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    for old in ("runs", "speed"):  # trainings from an earlier run of the benchmark would resume, not train
        shutil.rmtree(args.work_dir / old, ignore_errors=True)
    corpus = write_sources(args.work_dir / "sources")
    natural_cfg = config(args.work_dir, corpus, args.steps, None)
    sources = build_data(natural_cfg)
    train_total = sum(s["train_tokens"] for s in sources.values())
    print("| source | documents (train/val) | train tokens | val tokens | share of training split |")
    print("|---|---|---|---|---|")
    for name, s in sources.items():
        print(f"| {name} | {s['train_documents']}/{s['val_documents']} | {s['train_tokens']:,} | {s['val_tokens']:,} "
              f"| {s['train_tokens'] / train_total:.1%} |")

    mixtures = {"natural": None, "thirds": {s: 1.0 for s in SOURCES},
                **{f"{s}-0.6": {o: (0.6 if o == s else 0.2) for o in SOURCES} for s in SOURCES}}
    print(f"\n{args.steps} steps x 16 x {MODEL['block_size']} tokens, model {MODEL}")
    print("| mixture | tokens trained per source | val bpb | " + " | ".join(f"{s} bpb" for s in SOURCES)
          + " | train s |")
    print("|---|---|---|" + "---|" * len(SOURCES) + "---|")
    for name, mixture in mixtures.items():
        cfg = config(args.work_dir, corpus, args.steps, mixture)
        out = args.work_dir / "runs" / name
        result = train(cfg, out, log=QUIET)
        r = evaluate(cfg, load_model(out), cfg.data_path / TOKENIZER_DIR)
        trained = ", ".join(f"{s} {n / 1e3:.0f}k" for s, n in result.tokens_per_source.items())
        print(f"| {name} | {trained} | {r.val_bpb:.4f} | "
              + " | ".join(f"{r.per_source[s]['bpb']:.4f}" if s in r.per_source else "-" for s in SOURCES)
              + f" | {result.train_seconds:.0f} |", flush=True)

    dataset_dir = natural_cfg.data_path / DATASET_DIR
    rates: dict[str, list[float]] = {"natural": [], "thirds": []}
    for _ in range(args.repeats):  # interleaved: drift in the machine's speed hits both alike
        for name in rates:
            rates[name].append(loader_rate(dataset_dir, mixtures[name], 2000))
    natural, thirds = (statistics.median(rates[n]) for n in ("natural", "thirds"))
    print(f"\nloader alone (batches of 16 x {MODEL['block_size']}): natural {natural:,.0f}/s, mixture {thirds:,.0f}/s, "
          f"ratio {thirds / natural:.3f}")
    speeds: dict[str, list[float]] = {"natural": [], "thirds": []}
    for i in range(args.repeats):
        for name in speeds:
            cfg = config(args.work_dir, corpus, 40, mixtures[name])
            result = train(cfg, args.work_dir / "speed" / f"{name}-{i}", log=QUIET)
            speeds[name].append(result.tokens_per_second)
    natural, thirds = (statistics.median(speeds[n]) for n in ("natural", "thirds"))
    print(f"training steps: natural {natural:,.0f} tokens/s, mixture {thirds:,.0f} tokens/s, ratio "
          f"{thirds / natural:.3f} (median of {args.repeats})")


if __name__ == "__main__":
    main()
