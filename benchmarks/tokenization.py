"""Tokenizer-side throughput on this machine, in one process, on the same text (medians of --repeats).

  1. the `tokenized_dataset` stage (build_tokenized_dataset into a fresh output dir: read Parquet,
     encode, split, write Arrow IPC) vs a bare `Tokenizer.encode_batch(texts)` and `encode_batch_fast`
     over the same texts already in memory; goal: stage / bare >= 0.8;
  2. loader batches/s for TokenWindows(block 256, batch 8), random and document packing;
  3. tokenizer training time and peak RSS at two corpus sizes, each in its own subprocess.

The text: tiny Shakespeare repeated to --megabytes, each copy after the first with its words
permuted among words of similar frequency (a seeded, per-copy mapping), so the copies are neither
exact nor near duplicates and survive cleaning; then raw_corpus + cleaned_shards into --work-dir
(incremental: a second run reuses them).

  python benchmarks/tokenization.py [--megabytes 20] [--repeats 3] [--work-dir /tmp/scratchllm-bench-tokenize]

RAYON_NUM_THREADS is removed from the environment: `tokenizers` uses its default (one thread per core).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import resource
import shutil
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

os.environ.pop("RAYON_NUM_THREADS", None)  # the tokenizers' default: one thread per core
PROJECT_ROOT = Path(__file__).resolve().parent.parent
SHAKESPEARE = PROJECT_ROOT / "data" / "tinyshakespeare.txt"
WORD = re.compile(r"[A-Za-z]+")
QUIET = lambda msg: None  # noqa: E731


# ----------------------------------------------------------------------------------------------
# corpus


def _recase(word: str, like: str) -> str:
    if like.isupper() and len(like) > 1:
        return word.upper()
    if like[0].isupper():
        return word.capitalize()
    return word


def varied_copies(text: str, megabytes: float, out_dir: Path, window: int = 20) -> int:
    """Write copies of `text` (copy 0 verbatim, then word-permuted) until `megabytes`; returns bytes."""
    out_dir.mkdir(parents=True, exist_ok=True)
    ranked = [w for w, _ in Counter(w.lower() for w in WORD.findall(text)).most_common()]
    written, k = 0, 0
    while written < megabytes * 1e6:
        path = out_dir / f"copy{k:04d}.txt"
        if k == 0:
            varied = text
        else:
            rng = random.Random(k)
            mapping = {}
            for i in range(0, len(ranked), window):
                group = ranked[i:i + window]
                shuffled = group[:]
                rng.shuffle(shuffled)
                mapping.update(zip(group, shuffled))
            varied = WORD.sub(lambda m: _recase(mapping[m.group().lower()], m.group()), text)
        room = int(megabytes * 1e6) - written
        if len(varied.encode()) > room:  # the last copy is cut at a line end
            varied = varied.encode()[:room].decode(errors="ignore").rsplit("\n", 1)[0] + "\n"
        if not path.exists() or path.stat().st_size != len(varied.encode()):
            path.write_text(varied)
        written += len(varied.encode())
        k += 1
    for stale in out_dir.glob("copy*.txt"):
        if int(stale.stem[4:]) >= k:
            stale.unlink()
    return written


def make_config(work_dir: Path, shard_mb: float, vocab: int, max_training_mb: float = 200.0):
    from llm_core.config import DEFAULT_PROFILE, load_config

    return load_config(DEFAULT_PROFILE, overrides={
        "data_dir": str(work_dir / "run"), "corpus": {"sources": [str(work_dir / "src")], "shard_size_mb": shard_mb},
        "tokenizer": {"vocab_size": vocab, "max_training_bytes_mb": max_training_mb}})


def peak_rss_mb() -> float:
    """This process's peak RSS. VmHWM, not getrusage's ru_maxrss: on Linux ru_maxrss survives fork + exec,
    so a child would report its (big) parent's RSS at fork time."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


# ----------------------------------------------------------------------------------------------
# 3. training, in a child process (so its peak RSS is its own)


def train_child(work_dir: Path, shard_mb: float, vocab: int, megabytes: float) -> None:
    import psutil

    from llm_core.files import read_json
    from llm_core.layout import CLEANED_SHARDS_DIR
    from llm_core.data.tokenizer import train_tokenizer

    cfg = make_config(work_dir, shard_mb, vocab, max_training_mb=megabytes)
    parts = read_json(cfg.data_path / CLEANED_SHARDS_DIR / "manifest.json")["parts"]
    shards = [cfg.data_path / CLEANED_SHARDS_DIR / "shards" / p["name"] for p in parts]
    baseline = psutil.Process().memory_info().rss / 2**20
    out = work_dir / f"train-{megabytes:g}mb"
    start = time.perf_counter()
    result = train_tokenizer(cfg, shards, out, log=QUIET)
    total = time.perf_counter() - start
    shutil.rmtree(out, ignore_errors=True)
    print(json.dumps({"train_seconds": result.train_seconds, "total_seconds": total,
                      "bytes": result.num_training_bytes, "peak_rss_mb": peak_rss_mb(), "baseline_rss_mb": baseline,
                      "vocab": result.vocab_size, "bytes_per_token": result.bytes_per_token}))


def train_in_subprocess(args, megabytes: float) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--work-dir", str(args.work_dir), "--shard-mb",
           str(args.shard_mb), "--vocab", str(args.vocab), "--train-child", str(megabytes)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(f"training child failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--megabytes", type=float, default=20.0, help="corpus size (MB of text)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/scratchllm-bench-tokenize"))
    parser.add_argument("--shard-mb", type=float, default=8.0, help="corpus.shard_size_mb")
    parser.add_argument("--vocab", type=int, default=2048, help="tokenizer.vocab_size (the default profile's)")
    parser.add_argument("--train-sizes", default="5,20", help="MB of training text for the training runs")
    parser.add_argument("--loader-batches", type=int, default=500)
    parser.add_argument("--train-child", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.work_dir = args.work_dir.resolve()
    if args.train_child is not None:
        train_child(args.work_dir, args.shard_mb, args.vocab, args.train_child)
        return

    import torch

    from llm_core.data.cleaned_shards import build_cleaned_shards
    from llm_core.data.raw_corpus import build_raw_corpus
    from llm_core.training.loader import TokenWindows
    from llm_core.data.tokenized_dataset import build_tokenized_dataset
    from llm_core.data.tokenizer import iter_documents, load_tokenizer, train_tokenizer

    torch.set_num_threads(os.cpu_count() or 1)
    print(f"cores {os.cpu_count()}, RAYON_NUM_THREADS unset, TOKENIZERS_PARALLELISM="
          f"{os.environ.get('TOKENIZERS_PARALLELISM', '(unset)')}, repeats {args.repeats} (medians)")

    # --- corpus, cleaned shards, tokenizer (setup, not measured)
    start = time.perf_counter()
    size = varied_copies(SHAKESPEARE.read_text(), args.megabytes, args.work_dir / "src")
    cfg = make_config(args.work_dir, args.shard_mb, args.vocab)
    build_raw_corpus(cfg, QUIET)
    cleaned = build_cleaned_shards(cfg, QUIET)
    shards = [cleaned.shards_dir / p["name"] for p in cleaned.parts]
    tok_dir = args.work_dir / "tokenizer"
    train_tokenizer(cfg, shards, tok_dir, log=QUIET)
    texts = [t for _, t in iter_documents(shards)]
    text_mb = sum(len(t.encode()) for t in texts) / 1e6
    print(f"setup {time.perf_counter() - start:.1f} s: {size / 1e6:.1f} MB source text, {cleaned.num_kept} documents "
          f"kept ({cleaned.num_documents_in} in), {text_mb:.1f} MB cleaned in {len(shards)} shards; vocab {args.vocab}")

    rows: list[tuple[str, str, str]] = []

    # --- 1. stage vs bare encode_batch
    stage, bare, fast = [], [], []
    out_dir = cfg.data_path / "tokenized_dataset"
    for _ in range(args.repeats):
        shutil.rmtree(out_dir, ignore_errors=True)
        tokenizer = load_tokenizer(tok_dir)
        t0 = time.perf_counter()
        result = build_tokenized_dataset(cfg, tokenizer, tok_dir, log=QUIET)
        stage.append(time.perf_counter() - t0)
        assert result.num_shards_encoded == len(shards)

        tokenizer = load_tokenizer(tok_dir)
        tokenizer.encode_special_tokens = True  # as the stage encodes
        t0 = time.perf_counter()
        encodings = tokenizer.encode_batch(texts, add_special_tokens=False)
        bare.append(time.perf_counter() - t0)
        n_tokens = sum(len(e.ids) for e in encodings)
        del encodings
        t0 = time.perf_counter()
        encodings = tokenizer.encode_batch_fast(texts, add_special_tokens=False)
        fast.append(time.perf_counter() - t0)
        del encodings
    assert result.num_train_tokens + result.num_val_tokens == n_tokens + len(texts)  # + one EOT per document
    s, b, f = (statistics.median(x) for x in (stage, bare, fast))
    rows += [
        ("tokenized_dataset stage", f"{text_mb / s:.2f} MB/s", f"{s:.2f} s for {text_mb:.1f} MB, "
                                                                f"{n_tokens / s / 1e6:.2f} M tokens/s"),
        ("bare encode_batch (in memory)", f"{text_mb / b:.2f} MB/s", f"{b:.2f} s"),
        ("bare encode_batch_fast (in memory)", f"{text_mb / f:.2f} MB/s", f"{f:.2f} s"),
        ("ratio stage / encode_batch", f"{b / s:.2f}", "goal >= 0.8"),
        ("ratio stage / encode_batch_fast", f"{f / s:.2f}", ""),
    ]

    # --- 2. loader
    for packing in ("random", "document"):
        speeds = []
        for r in range(args.repeats):
            loader = TokenWindows(out_dir, "train", block_size=256, batch_size=8, seed=r, packing=packing)
            loader.batch_at(0)  # page in
            t0 = time.perf_counter()
            for step in range(args.loader_batches):
                x, y = loader.batch_at(step)
            speeds.append(args.loader_batches / (time.perf_counter() - t0))
        v = statistics.median(speeds)
        rows.append((f"TokenWindows {packing} (B 8, T 256)", f"{v:,.0f} batches/s",
                     f"{v * 8 * 256 / 1e6:.1f} M tokens/s; {1e6 / v:.0f} us/batch"))

    # --- 3. tokenizer training per size, each run in its own process
    for mb in (float(x) for x in args.train_sizes.split(",")):
        runs = [train_in_subprocess(args, mb) for _ in range(args.repeats)]
        secs = statistics.median(r["train_seconds"] for r in runs)
        trained_mb = runs[0]["bytes"] / 1e6
        rss = statistics.median(r["peak_rss_mb"] for r in runs)
        base = statistics.median(r["baseline_rss_mb"] for r in runs)
        rows.append((f"train tokenizer, cap {mb:g} MB", f"{secs:.2f} s",
                     f"{trained_mb:.1f} MB trained, {trained_mb / secs:.1f} MB/s, vocab {runs[0]['vocab']}, "
                     f"{runs[0]['bytes_per_token']:.2f} bytes/token held out"))
        rows.append((f"  peak RSS (cap {mb:g} MB)", f"{rss:,.0f} MB",
                     f"{rss - base:,.0f} MB above the process before training ({base:,.0f} MB)"))

    width = max(len(r[0]) for r in rows)
    vwidth = max(len(r[1]) for r in rows)
    print()
    print(f"{'measurement':<{width}}  {'median':>{vwidth}}  notes")
    print(f"{'-' * width}  {'-' * vwidth}  {'-' * 40}")
    for name, value, note in rows:
        print(f"{name:<{width}}  {value:>{vwidth}}  {note}")


if __name__ == "__main__":
    main()
