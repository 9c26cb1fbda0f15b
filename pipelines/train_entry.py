"""What the trained_model asset runs under Dagster Pipes: llm_core.training.train in every rank that
`accelerate launch` starts, or, with `engine.kind: ray`, the driver of the Ray Train workers
(llm_core/training/cluster.py), which relays rank 0's lines and metrics.

Only the main rank (or the driver) talks to Dagster (a second `open_dagster_pipes()` would report a
second materialization) and to MLflow; the other ranks just train.
"""

import argparse
import dataclasses
import json
import os
from pathlib import Path

from llm_core import tracking
from llm_core.config import validate_config
from llm_core.faults import hold_point
from llm_core.experiments.plan import config_strategy, plan_vs_measured
from llm_core.training.cluster import clear_failure, train_on_cluster
from llm_core.training.train import ATTEMPT_TIMINGS, train


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--resolved-config", required=True)
    parser.add_argument("--out-dir", required=True)
    parser.add_argument("--mlflow-run-id", required=True)
    parser.add_argument("--tracking-uri", required=True)
    parser.add_argument("--dataset-dir", help="an sft_dataset: a chat fine-tune (default: the tokenized_dataset)")
    args = parser.parse_args()
    cfg = validate_config(json.loads(Path(args.resolved_config).read_text()))
    out_dir = Path(args.out_dir)

    on_cluster = cfg.engine.kind == "ray"
    if not on_cluster and int(os.environ.get("RANK", "0")) != 0:
        train(cfg, out_dir, log=lambda message: None, dataset_dir=args.dataset_dir)
        return
    clear_failure(out_dir)  # a failure on the cluster recorded by an earlier attempt

    import mlflow
    from dagster_pipes import open_dagster_pipes

    with open_dagster_pipes() as pipes, tracking.using(args.tracking_uri), \
            mlflow.start_run(run_id=args.mlflow_run_id, log_system_metrics=True):
        metrics = tracking.MetricsLogger(args.tracking_uri, args.mlflow_run_id)

        def on_metrics(step: int, values: dict) -> None:
            metrics(step, values)
            if step % cfg.training.checkpoint_interval == 0:
                # Sent up to the checkpoint that follows: a resumed run's MLflow curve has no gap.
                metrics.flush()
            hold_point(f"step:{step}")  # tests kill the run here (llm_core/faults.py)

        cluster_metadata = {}
        if on_cluster:
            result, where = train_on_cluster(cfg, out_dir, log=pipes.log.info, on_metrics=on_metrics)
            mlflow.set_tags({"scratchllm.nodes": ",".join(where.nodes), "scratchllm.restarts": where.restarts})
            cluster_metadata = {"nodes": ", ".join(where.nodes), "restarts": where.restarts}
        else:
            result = train(cfg, out_dir, log=pipes.log.info, on_metrics=on_metrics, dataset_dir=args.dataset_dir)
        mlflow.set_tags({"scratchllm.world_size": result.world_size,
                         "scratchllm.tokens_per_source": json.dumps(result.tokens_per_source)})
        # The run's decision (the same in every attempt) as params; what this attempt measured as metrics.
        mlflow.log_params({f"compile.{k}": v for k, v in result.compile.items() if k not in ATTEMPT_TIMINGS})
        mlflow.log_metrics({f"compile_{k}": v for k, v in result.compile.items() if k in ATTEMPT_TIMINGS})
        metrics.flush()
        curve = tracking.plot_loss_curve(result.history, out_dir / "loss_curve.png")
        for artifact in (curve, out_dir / "model_config.json", out_dir / "training_summary.json"):
            mlflow.log_artifact(str(artifact))
        vocab_size = json.loads((out_dir / "model_config.json").read_text())["model"]["vocab_size"]
        planned = plan_vs_measured(cfg, dataclasses.asdict(result), vocab_size)
        table = "\n".join(["| | planned (`scratchllm plan`, MFU 40%) | measured |", "|---|---|---|",
                           *(f"| {k} | {p:,.0f} | {m:,.0f} |" for k, (p, m) in planned.items())])
        pipes.report_asset_materialization(metadata={
            "peak_memory_mb": round(result.peak_memory_mb, 1),
            "planned_memory_mb": round(planned["peak memory per device (MB)"][0], 1),
            "plan_vs_measured": {"raw_value": f"strategy: {config_strategy(cfg).name}"
                                 f"{' + activation checkpointing' if cfg.training.activation_checkpointing else ''}"
                                 f"\n\n{table}", "type": "md"},
            "num_parameters": result.num_parameters, "final_train_loss": result.final_train_loss,
            "final_val_loss": result.final_val_loss,
            "tokens_per_second": round(result.tokens_per_second, 1),
            "train_seconds": round(result.train_seconds, 2), "world_size": result.world_size,
            "mfu": round(result.mfu, 4), "peak_flops": round(result.peak_flops),
            "mixed_precision": result.mixed_precision, "steps": result.steps,
            "resumed_from_step": result.resumed_from_step,
            "loss_curve": {"raw_value": str(curve), "type": "path"}, **cluster_metadata,
            "tokens_per_source": {"raw_value": result.tokens_per_source, "type": "json"},
            "compiled": result.compile["compiled"], "compile": result.compile["why"],
            "compile_timings": {"raw_value": {k: round(v, 4) for k, v in result.compile.items()
                                              if isinstance(v, float)}, "type": "json"},
        })


if __name__ == "__main__":
    main()
