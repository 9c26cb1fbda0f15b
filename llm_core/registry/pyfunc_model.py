"""The MLflow pyfunc of a registered scratchllm model, logged as "model from code" (no pickle):
MLflow runs this file when it loads the model. See llm_core/registry/versions.py.

    predict(["ROMEO:", ...], params={"max_new_tokens": 50, "temperature": 0.8, "seed": 0, "top_k": 0})
    -> the continuations, without the prompts; temperature 0 is greedy, top_k 0 means no top-k.

Bad params are refused before any generation with an MlflowException naming the param
(INVALID_PARAMETER_VALUE: `mlflow models serve` answers it with HTTP 400). Over REST, MLflow drops
the params the signature does not declare before predict sees them: `scratchllm serve` refuses
those itself (pipelines/serve.py).
"""

import math
from numbers import Integral, Real
from pathlib import Path

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

from llm_core.registry.generate import load_generator
from llm_core.registry.versions import DEFAULT_PARAMS

# The most tokens one request may ask for: generation crops its context to the model's block size,
# so any length would run, but a larger request would hold a serving worker for minutes.
MAX_NEW_TOKENS = 4096
SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed accepts


def invalid(message: str) -> MlflowException:
    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


def validated_params(params: dict | None) -> dict:
    """The request's params over DEFAULT_PARAMS, checked; raises `invalid(...)` naming the first bad one."""
    params = dict(params or {})
    unknown = sorted(set(params) - set(DEFAULT_PARAMS))  # MLflow drops unknown names before predict;
    if unknown:                                           # a direct call must not ignore a typo either
        raise invalid(f"unknown param(s) {unknown}; known: {sorted(DEFAULT_PARAMS)}")
    p = {**DEFAULT_PARAMS, **params}

    def integer(name: str, low: int, high: int, rule: str) -> int:
        value = p[name]
        if isinstance(value, bool) or not isinstance(value, Integral) or not low <= value <= high:
            raise invalid(f"param {name} must be {rule}, got {value!r}")
        return int(value)

    temperature = p["temperature"]
    if isinstance(temperature, bool) or not isinstance(temperature, Real) or not (
            math.isfinite(temperature) and temperature >= 0):
        raise invalid(f"param temperature must be a number >= 0 (0 = greedy), got {temperature!r}")
    return {"max_new_tokens": integer("max_new_tokens", 1, MAX_NEW_TOKENS,
                                      f"an integer from 1 to {MAX_NEW_TOKENS}"),
            "temperature": float(temperature),
            "top_k": integer("top_k", 0, 2**63 - 1, "an integer >= 0 (0 = no top-k)"),
            "seed": integer("seed", *SEED_RANGE, "an integer")}


class TextGenerationModel(mlflow.pyfunc.PythonModel):
    # No type hints on predict: only an explicit signature can declare the params, and MLflow's
    # type-hint inference would replace it (see registry.log_pyfunc).

    def load_context(self, context):
        self.generator = load_generator(Path(context.artifacts["model"]))

    def predict(self, context, model_input, params: dict | None = None) -> list[str]:
        p = validated_params(params)
        prompts = model_input.iloc[:, 0].tolist() if hasattr(model_input, "iloc") else list(model_input)
        return [self.generator.complete(str(prompt), max_new_tokens=p["max_new_tokens"],
                                        temperature=p["temperature"], top_k=p["top_k"] or None, seed=p["seed"])
                for prompt in prompts]


mlflow.models.set_model(TextGenerationModel())
