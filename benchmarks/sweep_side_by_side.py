"""A sweep's training time with its variants one at a time vs side by side (training.max_parallel_variants).

    python benchmarks/sweep_side_by_side.py [--parallel 1,2] [--steps 300] [--work-dir /tmp/scratchllm-sweep-bench]

The default profile on the bundled corpus with a sweep of 4 learning rates (`--steps` steps each).
The data stages run once (`scratchllm run --select "*tokenized_dataset"`); the data directory is then
copied once per setting of max_parallel_variants, and `scratchllm run --select trained_model` trains
the 4 variants there, as a user would, in a subprocess with its own DAGSTER_HOME. Prints, per setting,
the wall time of that run, its ratio against one at a time, the median tokens/s of a variant, and
how far each variant's final train loss moved (thread counts change float reduction order only).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
LEARNING_RATES = [1e-3, 2e-3, 3e-3, 6e-3]


def scratchllm_run(profile: Path, select: str, home: Path) -> float:
    """Seconds of `scratchllm run --config profile --select select`, which must succeed."""
    home.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "pipelines.cli", "run", "--config", str(profile), "--select", select],
                   cwd=ROOT, env={**os.environ, "DAGSTER_HOME": str(home)}, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def profile_for(work: Path, parallel: int, steps: int) -> Path:
    path = work / f"parallel{parallel}.yaml"
    path.write_text(yaml.safe_dump({
        "data_dir": str(work / f"data-parallel{parallel}"),
        "training": {"max_steps": steps, "max_parallel_variants": parallel, "checkpoint_interval": steps},
        "sweep": {"name": f"lr-parallel{parallel}", "training.learning_rate": LEARNING_RATES}}))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--parallel", default="1,2", help="settings of training.max_parallel_variants")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--work-dir", default="/tmp/scratchllm-sweep-bench")
    a = parser.parse_args()
    work = Path(a.work_dir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    settings = [int(p) for p in a.parallel.split(",")]
    first = profile_for(work, settings[0], a.steps)
    data_seconds = scratchllm_run(first, "*tokenized_dataset", work / "dagster-data")
    pristine = work / "data-pristine"
    shutil.copytree(work / f"data-parallel{settings[0]}", pristine)
    rows = []
    for parallel in settings:
        profile = profile_for(work, parallel, a.steps)
        data_dir = work / f"data-parallel{parallel}"
        shutil.rmtree(data_dir, ignore_errors=True)
        shutil.copytree(pristine, data_dir)
        seconds = scratchllm_run(profile, "trained_model", work / f"dagster-{parallel}")
        record = json.loads((data_dir / "trained_model" / "sweep.json").read_text())
        summaries = [json.loads((Path(v["path"]) / "training_summary.json").read_text())
                     for v in record["variants"].values()]
        rows.append((parallel, seconds, statistics.median(s["tokens_per_second"] for s in summaries),
                     [s["final_train_loss"] for s in summaries]))
        print(f"max_parallel_variants {parallel}: {seconds:.1f} s", flush=True)
    base_seconds, base_losses = rows[0][1], rows[0][3]
    print(f"\n{len(LEARNING_RATES)} variants x {a.steps} steps, default profile, {os.cpu_count()} cores "
          f"(data stages once: {data_seconds:.1f} s)\n")
    print("| max_parallel_variants | trained_model run, s | vs one at a time | tokens/s per variant (median) "
          "| max final-loss difference |")
    print("|---|---|---|---|---|")
    for parallel, seconds, tokens_per_second, losses in rows:
        moved = max(abs(x - y) for x, y in zip(losses, base_losses))
        print(f"| {parallel} | {seconds:.1f} | {base_seconds / seconds:.2f}x | {tokens_per_second:,.0f} "
              f"| {moved:.4f} |")


if __name__ == "__main__":
    main()
