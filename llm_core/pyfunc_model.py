"""The MLflow pyfunc of a registered scratchllm model, logged as "model from code" (no pickle):
MLflow runs this file when it loads the model. See llm_core/registry.py.

    predict(["ROMEO:", ...], params={"max_new_tokens": 50, "temperature": 0.8, "seed": 0, "top_k": 0})
    -> the continuations, without the prompts; temperature 0 is greedy, top_k 0 means no top-k.
"""

from pathlib import Path

import mlflow

from llm_core.generate import load_generator
from llm_core.registry import DEFAULT_PARAMS


class TextGenerationModel(mlflow.pyfunc.PythonModel):
    # No type hints on predict: only an explicit signature can declare the params, and MLflow's
    # type-hint inference would replace it (see registry.log_pyfunc).

    def load_context(self, context):
        self.generator = load_generator(Path(context.artifacts["model"]))

    def predict(self, context, model_input, params: dict | None = None) -> list[str]:
        prompts = model_input.iloc[:, 0].tolist() if hasattr(model_input, "iloc") else list(model_input)
        p = {**DEFAULT_PARAMS, **(params or {})}
        return [self.generator.complete(str(prompt), max_new_tokens=int(p["max_new_tokens"]),
                                        temperature=float(p["temperature"]), top_k=int(p["top_k"]) or None,
                                        seed=int(p["seed"]))
                for prompt in prompts]


mlflow.models.set_model(TextGenerationModel())
