"""Val bits/byte within nanoGPT's CPU-recipe time: nanoGPT's own train.py and scratchllm's profile, one after
another on the same machine.

    python benchmarks/nanogpt_recipe.py --nanogpt PATH/TO/nanoGPT [--config assets_config/default.yaml]
                                        [--variants "default,AdamW only (lr 3e-3)"] [--repeats 1]

1. nanoGPT: the CPU recipe of its README (`train.py config/train_shakespeare_char.py --device=cpu
   --compile=False --eval_iters=20 --log_interval=1 --block_size=64 --batch_size=12 --n_layer=4 --n_head=4
   --n_embd=128 --max_iters=2000 --lr_decay_iters=2000 --dropout=0.0`) in a copy of the checkout, on its
   shakespeare_char data made as its data/shakespeare_char/prepare.py makes it, from data/tinyshakespeare.txt
   (the file that script downloads; no network here). Its process's wall time is the time to beat; its last
   val loss (nats per character over 20 random batches of the last 10% of the text) / ln 2 is its bits per
   byte (the text is ASCII: a character is a byte).
2. scratchllm: the profile and the given variants of benchmarks/ablation.py, each trained from scratch in its
   own process on the profile's tokenized dataset; val bits/byte as model_evaluation computes it (every
   validation document, whole); the process's wall time (start-up, training, its evaluation passes).

Prints one row per training (medians over repeats, run interleaved) with its time relative to nanoGPT's.
"""

from __future__ import annotations

import argparse
import math
import pickle
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchmarks.ablation import VARIANTS, ensure_dataset, train_variant  # noqa: E402
from llm_core.config import deep_merge, load_config  # noqa: E402

CPU_RECIPE = ["config/train_shakespeare_char.py", "--device=cpu", "--compile=False", "--eval_iters=20",
              "--log_interval=1", "--block_size=64", "--batch_size=12", "--n_layer=4", "--n_head=4",
              "--n_embd=128", "--max_iters=2000", "--lr_decay_iters=2000", "--dropout=0.0"]


def prepare_shakespeare_char(checkout: Path, text_file: Path) -> None:
    """nanoGPT's data/shakespeare_char/prepare.py without the download: characters as ids, first 90% train."""
    data = text_file.read_text()
    chars = sorted(set(data))
    stoi = {ch: i for i, ch in enumerate(chars)}
    out = checkout / "data" / "shakespeare_char"
    split = int(len(data) * 0.9)
    for name, part in (("train", data[:split]), ("val", data[split:])):
        np.array([stoi[c] for c in part], dtype=np.uint16).tofile(out / f"{name}.bin")
    with open(out / "meta.pkl", "wb") as f:
        pickle.dump({"vocab_size": len(chars), "itos": dict(enumerate(chars)), "stoi": stoi}, f)


def run_nanogpt(checkout: Path) -> dict:
    """Wall seconds and val bits/byte of one run of the CPU recipe."""
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "train.py", *CPU_RECIPE], cwd=checkout, check=True, capture_output=True,
                         text=True).stdout
    seconds = time.perf_counter() - start
    step, val_loss = re.findall(r"step (\d+): train loss [\d.]+, val loss ([\d.]+)", out)[-1]
    shutil.rmtree(checkout / "out-shakespeare-char", ignore_errors=True)
    return {"steps": int(step), "seconds": seconds, "val_bpb": float(val_loss) / math.log(2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nanogpt", required=True, help="a nanoGPT checkout (its train.py and model.py)")
    parser.add_argument("--config", default=None, help="scratchllm profile (default: default.yaml)")
    parser.add_argument("--variants", default="default", help=f"comma-separated, of {list(VARIANTS)}")
    parser.add_argument("--repeats", type=int, default=1)
    a = parser.parse_args()
    names = [n.strip() for n in a.variants.split(",")]  # (variant names hold no comma)
    if unknown := [n for n in names if n not in VARIANTS]:
        parser.error(f"unknown variants {unknown}; known: {list(VARIANTS)}")
    cfg = load_config(a.config)
    ensure_dataset(cfg, a.config)

    with tempfile.TemporaryDirectory(prefix="nanogpt-recipe-") as tmp:
        checkout = Path(tmp) / "nanoGPT"
        shutil.copytree(a.nanogpt, checkout, ignore=shutil.ignore_patterns(".git", "out-*"))
        prepare_shakespeare_char(checkout, ROOT / "data" / "tinyshakespeare.txt")
        nanogpt = "nanoGPT CPU recipe (AdamW, 65 characters)"
        runs: dict[str, list[dict]] = {nanogpt: [], **{f"scratchllm {name}": [] for name in names}}
        base = cfg.model_dump(mode="json")
        for _ in range(a.repeats):  # interleaved, so that every training sees the same drift of the machine
            runs[nanogpt].append(run_nanogpt(checkout))
            for name in names:
                values = deep_merge(base, VARIANTS[name])
                values = deep_merge(values, {"training": {"checkpoint_interval": cfg.training.max_steps}})
                r = train_variant(values, Path(tmp) / "variant")
                runs[f"scratchllm {name}"].append({"steps": r["steps"], "seconds": r["wall_seconds"],
                                                   "val_bpb": r["val_bpb"]})

    budget = statistics.median(r["seconds"] for r in next(iter(runs.values())))
    print("\n| training | steps | wall s | vs nanoGPT's time | val bits/byte |\n|---|---|---|---|---|")
    for name, results in runs.items():
        seconds = statistics.median(r["seconds"] for r in results)
        print(f"| {name} | {results[0]['steps']} | {seconds:.1f} | {seconds / budget:.2f}x | "
              f"{statistics.median(r['val_bpb'] for r in results):.4f} |")


if __name__ == "__main__":
    main()
