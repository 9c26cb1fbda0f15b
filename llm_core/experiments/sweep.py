"""Sweeps: one profile, several trainings that differ in a few fields, on the same data.

A profile's `sweep:` section maps dotted config fields to lists of values:

    sweep:
      name: lr-and-depth              # optional; names the MLflow parent run
      mode: grid                      # grid (default): every combination; list: the i-th values together
      training.learning_rate: [3.0e-4, 1.0e-3, 3.0e-3]
      model.n_layer: [2, 4]

Each variant is the profile with its values set, validated before any work starts (an error names
the variant and the field). Only fields of the model and training sections may vary (checked by the
config): the data stages run once and every variant shares their outputs.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from llm_core import tracking
from llm_core.config import ScratchConfig, swept_fields, sweep_name, training_tokens, variants
from llm_core.files import read_json, short_hash, write_json
from llm_core.layout import EVALUATION_DIR, MODEL_DIR
from llm_core.model_files import SUMMARY_FILE, WEIGHTS_FILE
from llm_core.training import training_run


def training_flops(cfg: ScratchConfig) -> float:
    """About what a variant's training computes (FLOPs per token x tokens, from its config): when
    several train at once the biggest start first, so that the last one running is a short one."""
    from llm_core.experiments import plan

    return plan.count(plan.setup_from_config(cfg)).flops_per_token * training_tokens(cfg)


# ---------------------------------------------------------------------------------------------
# a sweep's bookkeeping: its MLflow parent run and what each variant became

SWEEP_FILE = "sweep.json"  # trained_model/sweep.json: the last sweep trained
COMPARISON_COLUMNS = ["variant", "values", "val bpb", "core", "tokens/s", "train s", "training"]


def sweep_key(cfg: ScratchConfig, dataset_version: str) -> str:
    """Changes when the sweep, anything its trainings read, or the data change."""
    return short_hash([cfg.identity("sweep", "model", "training", "evaluation", "dataset"),
                       dataset_version])


def record_path(cfg: ScratchConfig) -> Path:
    return cfg.data_path / MODEL_DIR / SWEEP_FILE


def start(cfg: ScratchConfig, tracking_uri: str, dataset_version: str, tags: dict[str, str]) -> dict:
    """The record of this sweep: found again (a re-run keeps its parent run and finished variants) or
    new, with an MLflow parent run whose params are the swept fields."""
    key = sweep_key(cfg, dataset_version)
    record = read_json(record_path(cfg))
    if record.get("key") == key and record.get("tracking_uri") == tracking_uri:
        return record
    client = tracking.client(tracking_uri)
    run = client.create_run(tracking.experiment_id(tracking_uri, tracking.artifact_location(cfg)),
                            run_name=sweep_name(cfg), tags={**tags, "scratchllm.sweep": sweep_name(cfg)})
    for field, values in swept_fields(cfg).items():
        client.log_param(run.info.run_id, field, json.dumps(values))
    record = {"key": key, "name": sweep_name(cfg), "parent_run_id": run.info.run_id, "tracking_uri": tracking_uri,
              "variants": {}}
    save(cfg, record)
    return record


def save(cfg: ScratchConfig, record: dict) -> None:
    write_json(record_path(cfg), record)


def load(cfg: ScratchConfig) -> dict:
    """The record of the last sweep trained, or an error when it is not this config's sweep."""
    record = read_json(record_path(cfg))
    if not record or not record.get("variants"):
        raise FileNotFoundError(f"no sweep trained under {cfg.data_path / MODEL_DIR}: materialize `trained_model`")
    return record


def adopt(record: dict, run_id: str, variant: str) -> None:
    """Make a variant's MLflow run a child of the sweep's parent run. A run created for this sweep is
    one already; a training reused from before the sweep (same config, same data) becomes one unless
    another sweep holds it."""
    client = tracking.client(record["tracking_uri"])
    tags = client.get_run(run_id).data.tags
    if "mlflow.parentRunId" not in tags:
        client.set_tag(run_id, "mlflow.parentRunId", record["parent_run_id"])
        client.set_tag(run_id, "scratchllm.variant", variant)


def fully_trained(out_dir: Path, cfg: ScratchConfig) -> bool:
    """A training directory that holds the final model of all of cfg's steps: nothing left to train."""
    summary = read_json(out_dir / SUMMARY_FILE)
    return summary.get("steps") == cfg.training.max_steps and (out_dir / WEIGHTS_FILE).exists()


def compared_sources(reports: dict[str, dict]) -> list[str]:
    """The sources scored per variant, when the corpus has several (a column each in the comparison)."""
    names = list(dict.fromkeys(name for r in reports.values() for name in r.get("per_source", {})))
    return names if len(names) > 1 else []


def compare(record: dict, reports: dict[str, dict]) -> tuple[list[str], list[list], str | None]:
    """(comparison columns, rows, name of the best variant by val bpb among the evaluated ones): the
    columns are COMPARISON_COLUMNS and, with several sources, each source's bpb."""
    sources = compared_sources(reports)
    rows, best, best_bpb = [], None, math.inf
    for name, v in record["variants"].items():
        report, summary = reports.get(name, {}), read_json(Path(v["path"]) / SUMMARY_FILE)
        bpb = report.get("val_bpb")
        if bpb is not None and bpb < best_bpb:
            best, best_bpb = name, bpb
        rows.append([name, v["label"], f"{bpb:.4f}" if bpb is not None else "-",
                     f"{report['core']:+.3f}" if report.get("core") is not None else "-",
                     f"{summary.get('tokens_per_second', 0):,.0f}", f"{summary.get('train_seconds', 0):.1f}",
                     v["health"], *(f"{report['per_source'][s]['bpb']:.4f}" if s in report.get("per_source", {})
                                    else "-" for s in sources)])
    return COMPARISON_COLUMNS + [f"{s} bpb" for s in sources], rows, best


def plot(record: dict, reports: dict[str, dict], out_dir: Path) -> list[Path]:
    """val_bpb_by_variant.png, loss_curves.png (every variant's train loss, overlaid) and, with several
    sources, bpb_by_source.png (each variant's bpb per source, side by side)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    names = [n for n in record["variants"] if n in reports]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.bar(names, [reports[n]["val_bpb"] for n in names])
    ax.set_ylabel("val bits per byte")
    ax.set_title(record["name"])
    ax.set_ylim(min(reports[n]["val_bpb"] for n in names) * 0.95 if names else 0, None)
    fig.tight_layout()
    fig.savefig(out_dir / "val_bpb_by_variant.png")
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    for name, v in record["variants"].items():
        history = read_json(Path(v["path"]) / SUMMARY_FILE).get("history", [])
        ax.plot([h["step"] for h in history], [h["train_loss"] for h in history], linewidth=1,
                label=f"{name}: {v['label']}")
    ax.set_xlabel("step")
    ax.set_ylabel("train loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_dir / "loss_curves.png")
    plt.close(fig)
    files = [out_dir / "val_bpb_by_variant.png", out_dir / "loss_curves.png"]
    sources = compared_sources(reports)
    if sources:
        fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
        width = 0.8 / max(len(names), 1)
        for i, name in enumerate(names):
            ax.bar([j + i * width for j in range(len(sources))],
                   [reports[name]["per_source"].get(s, {}).get("bpb", 0) for s in sources], width,
                   label=f"{name}: {record['variants'][name]['label']}")
        ax.set_xticks([j + width * (len(names) - 1) / 2 for j in range(len(sources))], sources)
        ax.set_ylabel("val bits per byte")
        ax.set_title(f"{record['name']}: per source")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out_dir / "bpb_by_source.png")
        plt.close(fig)
        files.append(out_dir / "bpb_by_source.png")
    return files


def log_comparison(record: dict, columns: list[str], rows: list[list], best: str | None, files: list[Path]) -> None:
    """The comparison table (markdown and CSV), the plots and the best variant on the parent run."""
    client = tracking.client(record["tracking_uri"])
    run_id = record["parent_run_id"]
    table = "\n".join(["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
                      + ["| " + " | ".join(map(str, row)) + " |" for row in rows])
    client.log_text(run_id, table + "\n", "sweep_comparison.md")
    client.log_text(run_id, "\n".join(",".join(f'"{c}"' for c in row)
                                      for row in [columns, *rows]) + "\n", "sweep_comparison.csv")
    for path in files:
        client.log_artifact(run_id, str(path))
    if best is not None:
        client.set_tag(run_id, "scratchllm.best_variant", best)
        client.set_tag(run_id, "scratchllm.best_training_key", record["variants"][best]["key"])


def evaluate_variants(cfg: ScratchConfig, tracking_uri: str, log) -> tuple[dict, list[str], list[list], str]:
    """model_evaluation of a sweep: every healthy variant evaluated once (a report already written is
    reused), the comparison logged on the parent run, and the best variant by val bpb made the latest
    model (registry and export take it). Returns (record, comparison columns and rows, best variant)."""
    from llm_core.evaluation import evaluate as ev

    record = load(cfg)
    reports = {}
    by_name = {v.name: v for v in variants(cfg)}
    for name, v in record["variants"].items():
        if not v["healthy"]:
            continue
        report = read_json(ev.report_path(cfg, v["key"]))
        if "val_bpb" not in report:
            log(f"sweep {record['name']} {name}: evaluating {v['label']}")
            ev.evaluate_training(by_name[name].config, training_of(record, name).entry(), tracking_uri)
            report = read_json(ev.report_path(cfg, v["key"]))
        reports[name] = report
    columns, rows, best = compare(record, reports)
    if best is None:
        raise ValueError(f"sweep {record['name']}: no healthy variant to evaluate")
    out_dir = cfg.data_path / EVALUATION_DIR / "sweeps" / record["key"]
    files = plot(record, reports, out_dir)
    log_comparison(record, columns, rows, best, files)
    if any(f.startswith("model.") or f == "training.max_steps" for f in swept_fields(cfg)):
        fit_scaling(cfg, record, reports, out_dir, log)
    training_run.make_latest(cfg, training_of(record, best))
    return record, columns, rows, best


def training_of(record: dict, name: str) -> training_run.TrainingRun:
    v = record["variants"][name]
    return training_run.TrainingRun(v["key"], Path(v["path"]), v["mlflow_run_id"], record["tracking_uri"])


def fit_scaling(cfg: ScratchConfig, record: dict, reports: dict[str, dict], out_dir: Path, log) -> None:
    """A sweep over sizes or steps: the power law of val bpb in compute (llm_core/experiments/scaling.py), plotted,
    logged on the parent run, and saved where `scratchllm plan --budget` reads it."""
    from llm_core.experiments import scaling

    fitted = scaling.fit(scaling.points(record, reports))
    if fitted is None:
        log(f"sweep {record['name']}: fewer than {scaling.MIN_POINTS} compute values, no scaling fit")
        return
    png = scaling.plot(fitted, out_dir / "scaling_fit.png")
    scaling.save(fitted, out_dir / scaling.FIT_FILE)
    scaling.save(fitted, cfg.data_path / EVALUATION_DIR / scaling.FIT_FILE)  # the latest: for plan --budget
    client = tracking.client(record["tracking_uri"])
    for name in ("a", "b", "c", "b_low", "b_high", "tokens_per_param"):
        client.log_metric(record["parent_run_id"], f"scaling/{name}", float(getattr(fitted, name)))
    client.log_artifact(record["parent_run_id"], str(png))
    client.log_artifact(record["parent_run_id"], str(out_dir / scaling.FIT_FILE))
    log(f"sweep {record['name']}: val bpb = {fitted.a:.3g} (C/{fitted.scale:.3g})^-{fitted.b:.3f} + {fitted.c:.3f} "
        f"(exponent 90% interval [{fitted.b_low:.3f}, {fitted.b_high:.3f}]) over {len(fitted.points)} variants")
