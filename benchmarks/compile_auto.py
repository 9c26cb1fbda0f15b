"""torch.compile on this machine, as `training.compile` sees it: the compile time with an empty and with a
warm cache, compiled vs eager step time in fp32 and bf16, and what `auto` decides for the profile.

    python benchmarks/compile_auto.py [--config assets_config/default.yaml] [--steps 60]

Each training runs in its own process (benchmarks/ablation.py's trainer, `python -m llm_core.training.train`),
the profile with `training.compile: true` or `false`, `steps` steps, on the profile's dataset (built first
if missing). The compile cache is data_dir/compile_cache, emptied at the start; the second compiled run of
a precision finds the first one's kernels there. Prints per run: the first step (compiling, when compiled),
the median step, tokens/s and inductor's cache hits and misses; then `auto`'s decision for the profile's
max_steps, from the record the measurement writes.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchmarks.ablation import ensure_dataset, train_variant  # noqa: E402
from llm_core.config import deep_merge, load_config  # noqa: E402
from llm_core.training import compilation  # noqa: E402
from llm_core.training.train import model_args  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=None)
    parser.add_argument("--steps", type=int, default=60)
    a = parser.parse_args()
    cfg = load_config(a.config)
    ensure_dataset(cfg, a.config)
    shutil.rmtree(cfg.data_path / compilation.CACHE_DIR, ignore_errors=True)
    base = deep_merge(cfg.model_dump(mode="json"), {"training": {
        "max_steps": a.steps, "checkpoint_interval": a.steps, "eval_interval": a.steps, "warmup_steps": 5}})
    print(f"{cfg.model.n_layer} layers x {cfg.model.n_embd}, batch {cfg.training.batch_size} x {cfg.model.block_size}, "
          f"{a.steps} steps per run\n")
    print("| precision | run | first step s | median step ms | tokens/s | cache hits / misses |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory(prefix="compile-") as tmp:
        for precision in ("no", "bf16"):
            for run, compiled in (("eager", False), ("compiled, empty cache", True), ("compiled, warm cache", True)):
                values = deep_merge(base, {"training": {"compile": compiled, "mixed_precision": precision}})
                c = train_variant(values, Path(tmp) / "run")["compile"]
                cache = f"{c.get('cache_hits', '-')} / {c.get('cache_misses', '-')}" if compiled else "-"
                tokens = cfg.training.batch_size * cfg.model.block_size / c["median_step_seconds"]
                print(f"| {precision} | {run} | {c['first_step_seconds']:.1f} | {c['median_step_seconds'] * 1e3:.1f} | "
                      f"{tokens:,.0f} | {cache} |", flush=True)
    for precision in ("no", "bf16"):
        decision = compilation.decide("auto", model_args(cfg, cfg.tokenizer.vocab_size), cfg.training.batch_size,
                                      precision, "cpu", cfg.training.max_steps, cfg.data_path)
        print(f"\nauto, {precision}, {cfg.training.max_steps} steps: {decision['why']}")


if __name__ == "__main__":
    main()
