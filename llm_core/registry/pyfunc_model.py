"""The MLflow pyfunc of a registered scratchllm model, logged as "model from code" (no pickle):
MLflow runs this file when it loads the model. See llm_core/registry/versions.py.

    predict(["ROMEO:", ...], params={"max_new_tokens": 50, "temperature": 0.8, "seed": 0, "top_k": 0})
    -> the continuations, without the prompts; temperature 0 is greedy, top_k 0 means no top-k.

A chat model (its tokenizer carries a chat template) answers one conversation instead:

    predict({"messages": [{"role": "user", "content": "Who speaks first?"}]}, params={...})
    -> {"object": "chat.completion", "choices": [{"index": 0, "message": {"role": "assistant",
        "content": ...}, "finish_reason": "stop" | "length"}], "usage": {...}}

Bad params are refused before any generation with an MlflowException naming the param
(INVALID_PARAMETER_VALUE: `mlflow models serve` answers it with HTTP 400). Over REST, MLflow drops
the params the signature does not declare before predict sees them: `scratchllm serve` refuses
those itself (pipelines/serve.py).
"""

from pathlib import Path

import mlflow

from llm_core.data.tokenizer import chat_template_of
from llm_core.layout import MODEL_TOKENIZER_SUBDIR
from llm_core.registry.generate import load_generator
from llm_core.registry.requests import chat_messages, validated_params


class TextGenerationModel(mlflow.pyfunc.PythonModel):
    # No type hints on predict: only an explicit signature can declare the params, and MLflow's
    # type-hint inference would replace it (see registry.log_pyfunc).

    def load_context(self, context):
        model_dir = Path(context.artifacts["model"])
        self.generator = load_generator(model_dir)
        self.chat = chat_template_of(model_dir / MODEL_TOKENIZER_SUBDIR) is not None

    def predict(self, context, model_input, params: dict | None = None) -> list[str] | dict:
        p = validated_params(params)
        options = {**p, "top_k": p["top_k"] or None}  # 0 in a request: no top-k
        if self.chat:
            return self.generator.answer(chat_messages(model_input), **options)
        prompts = model_input.iloc[:, 0].tolist() if hasattr(model_input, "iloc") else list(model_input)
        return [self.generator.complete(str(prompt), **options) for prompt in prompts]


mlflow.models.set_model(TextGenerationModel())
