"""The scratchllm code location: every asset, check and resource. `dagster dev -w workspace.yaml`.

Every Dagster process loads it (the code server, each run, `scratchllm run`), so it loads light: an asset
imports torch, MLflow or Ray where it uses them, not at the top of its module (tests/test_definitions.py)."""

import dagster as dg

from pipelines.assets.chat import chat_assets
from pipelines.assets.corpus import data_assets, data_checks
from pipelines.assets.evaluation import evaluation_assets
from pipelines.assets.export import export_assets
from pipelines.assets.registry import registry_assets
from pipelines.assets.tokenizer import tokenizer_assets, tokenizer_checks
from pipelines.assets.training import training_assets
from pipelines.automation import retrain, schedules, sensors
from pipelines.config import ScratchllmResource
from pipelines.resources import MLflowResource

all_assets = [*data_assets, *tokenizer_assets, *training_assets, *evaluation_assets, *registry_assets,
              *export_assets, *chat_assets]
all_checks = [*data_checks, *tokenizer_checks]

materialize_everything = dg.define_asset_job(
    "materialize_everything", selection=dg.AssetSelection.all(),
    description="The whole graph, from the source files to the latest model and its chat fine-tune.",
)

defs = dg.Definitions(
    assets=all_assets,
    asset_checks=all_checks,
    jobs=[materialize_everything, retrain],
    schedules=schedules,
    sensors=sensors,
    resources={"scratchllm": ScratchllmResource(), "mlflow": MLflowResource()},
    # One step at a time in one process: stages parallelize inside themselves, and a per-step
    # subprocess costs seconds on a small machine.
    executor=dg.in_process_executor,
)
