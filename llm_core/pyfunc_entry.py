"""The MLflow pyfunc of a registered scratchllm model, logged as "model from code" (no pickle):
MLflow runs this file when it loads the model. See llm_core/registry.py."""

import mlflow

from llm_core.registry import TextGenerationModel

mlflow.models.set_model(TextGenerationModel())
