"""scratchllm's core: plain Python and torch, no Dagster (README "Layout")."""

import os

# No network at run time: MLflow (3.x) sends usage telemetry unless told not to. Every scratchllm process
# imports this package before MLflow does, and the processes it starts (ranks, an `mlflow server`) inherit it.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
