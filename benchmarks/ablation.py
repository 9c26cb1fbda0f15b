"""What each training-recipe change buys: val bits/byte and time of one profile's training, per variant.

    python benchmarks/ablation.py [--config assets_config/default.yaml] [--variants all] [--seeds 1]

Every variant is the profile plus a few config overrides (VARIANTS below), trained from scratch on the
same tokenized dataset, each in its own process (`python -m llm_core.training.train`), one after another so that
they see the same machine. The dataset is built first if missing (`scratchllm run --select
*tokenized_dataset`). Prints one row per variant: final val bits/byte (mean over seeds), its change
against the first variant, its standard deviation over seeds (and each seed's value), training
seconds and tokens/s (medians).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from llm_core.model_files import load_model  # noqa: E402
from llm_core.config import deep_merge, load_config, validate_config  # noqa: E402
from llm_core.evaluation.evaluate import document_scores  # noqa: E402
from llm_core.layout import DATASET_DIR  # noqa: E402

# The 2023 recipe, the current default, then the default with one change undone or added.
RECIPE_2023 = {"training": {"optimizer": "adamw", "learning_rate": 1.0e-3, "lr_schedule": "cosine"},
               "model": {"fused_projections": False, "qk_norm": False, "mlp": "swiglu", "zero_init_output": False}}
VARIANTS = {
    "2023 recipe (AdamW 1e-3; cosine)": RECIPE_2023,
    "default": {},
    "2026-11 default (no QK-norm; Muon 5 iterations)": {"model": {"qk_norm": False},
                                                        "training": {"muon_ns_steps": 5}},
    "AdamW only (lr 3e-3)": {"training": {"optimizer": "adamw", "learning_rate": 3.0e-3}},
    "wsd schedule": {"training": {"lr_schedule": "wsd"}},
    "separate projections": {"model": {"fused_projections": False}},
    "qk_norm off": {"model": {"qk_norm": False}},
    "Muon 5 iterations": {"training": {"muon_ns_steps": 5}},
    "relu2 MLP": {"model": {"mlp": "relu2"}},
    "zero-init outputs": {"model": {"zero_init_output": True}},
    "bf16": {"training": {"mixed_precision": "bf16"}},
    "fp32": {"training": {"mixed_precision": "no"}},  # the default is auto: bf16 where it measures faster
}


def ensure_dataset(cfg, config_path: str | None) -> None:
    """Build the profile's tokenized dataset (`scratchllm run --select *tokenized_dataset`) if it is missing."""
    if not (cfg.data_path / DATASET_DIR / "manifest.json").exists():
        subprocess.run([sys.executable, "-m", "pipelines.cli", "run", "--select", "*tokenized_dataset"]
                       + (["--config", config_path] if config_path else []), cwd=ROOT, check=True)


def train_variant(cfg_values: dict, work: Path) -> dict:
    """Train one resolved config from scratch in a fresh process; its training_summary.json."""
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    (work / "config.json").write_text(json.dumps(cfg_values))
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "llm_core.training.train", "--resolved-config", str(work / "config.json"),
                    "--out-dir", str(work / "run")], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    wall_seconds = time.perf_counter() - start  # the whole process: start-up, training, its evaluation passes
    summary = json.loads((work / "run" / "training_summary.json").read_text())
    cfg = validate_config(cfg_values)  # the final scores as model_evaluation computes them
    per_document, _ = document_scores(load_model(work / "run"), cfg.data_path / DATASET_DIR,
                                      cfg.evaluation.max_val_tokens)
    nats, num_bytes = (sum(per_document.column(c).to_pylist()) for c in ("nats", "bytes"))
    return {**summary, "wall_seconds": wall_seconds, "val_bpb": nats / math.log(2) / num_bytes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=None, help="profile (default: default.yaml)")
    parser.add_argument("--variants", default="all", help="comma-separated names from VARIANTS, or all")
    parser.add_argument("--seeds", type=int, default=1, help="trainings per variant (seeds 1337, 1338, ...)")
    a = parser.parse_args()
    names = list(VARIANTS) if a.variants == "all" else [n.strip() for n in a.variants.split(",")]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; known: {list(VARIANTS)}")
    base = load_config(a.config)
    ensure_dataset(base, a.config)
    base_values = base.model_dump(mode="json")

    print(f"profile {a.config or 'default.yaml'}, {base.training.max_steps} steps, {a.seeds} seed(s) per variant\n")
    print("| variant | val bpb | sd over seeds | vs first | train s | process s | tokens/s |")
    print("|---|---|---|---|---|---|---|")
    first = None
    with tempfile.TemporaryDirectory(prefix="ablation-") as tmp:
        for name in names:
            summaries = []
            for seed in range(a.seeds):
                values = deep_merge(base_values, VARIANTS[name])
                values = deep_merge(values, {"training": {"seed": base.training.seed + seed,
                                                          "checkpoint_interval": base.training.max_steps}})
                summaries.append(train_variant(values, Path(tmp) / "variant"))
            bpbs = [s["val_bpb"] for s in summaries]
            bpb = statistics.mean(bpbs)
            first = bpb if first is None else first
            spread = f"{statistics.stdev(bpbs):.3f} ({', '.join(f'{b:.3f}' for b in bpbs)})" if len(bpbs) > 1 else "-"
            print(f"| {name} | {bpb:.3f} | {spread} | {bpb - first:+.3f} | "
                  f"{statistics.median(s['train_seconds'] for s in summaries):.1f} | "
                  f"{statistics.median(s['wall_seconds'] for s in summaries):.1f} | "
                  f"{statistics.median(s['tokens_per_second'] for s in summaries):,.0f} |", flush=True)


if __name__ == "__main__":
    main()
