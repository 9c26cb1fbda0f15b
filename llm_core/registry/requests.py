"""What a request to a registered model may ask, checked before any generation: the generation params
(DEFAULT_PARAMS fills in what a request leaves out) and a chat model's conversation. A refusal is an
MlflowException with INVALID_PARAMETER_VALUE naming what is wrong (HTTP 400 when served). Used by the
pyfunc (pyfunc_model.py) and, before MLflow's scoring server sees a request, by `scratchllm serve`.
"""

import math
from numbers import Integral, Real

from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

from llm_core.data.chat_template import conversation_problem

DEFAULT_PARAMS = {"max_new_tokens": 50, "temperature": 0.8, "seed": 0, "top_k": 0}
CHAT_INPUT = "messages"  # a chat model's input, as OpenAI's and MLflow's chat requests name it

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


def chat_messages(model_input) -> list[dict]:
    """The conversation of a chat request, checked: {"messages": [...]} as given, or as the one-row frame
    MLflow makes of it when it enforces the signature."""
    if hasattr(model_input, "iloc"):
        if CHAT_INPUT not in model_input or len(model_input) != 1:
            raise invalid(f'a chat model answers one conversation: {{"{CHAT_INPUT}": [...]}}')
        messages = model_input[CHAT_INPUT].iloc[0]
    elif isinstance(model_input, dict):
        messages = model_input.get(CHAT_INPUT)
    else:
        raise invalid(f'a chat model answers a conversation: {{"{CHAT_INPUT}": [...]}}, not prompts')
    messages = [dict(m) if isinstance(m, dict) else m for m in messages] if isinstance(messages, list) else messages
    if problem := conversation_problem(messages, prompt=True):
        raise invalid(f"{CHAT_INPUT}: {problem}")
    return messages
