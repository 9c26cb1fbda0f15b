"""A model directory: the files a trained model is (weights, dimensions, its tokenizer), saved and
loaded the same way by training, generation, the registry and the export.

    model.safetensors       the weights (a tied embedding / head matrix stored once)
    model_config.json       {"model": ModelArgs, "config": the config it was trained with}
    tokenizer/              the tokenizer it was trained with
    training_summary.json   what its training measured (a finished training's directory only)

A checkpoint directory (checkpoints/step_N) has the first two and loads the same way.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING

from llm_core.config import ScratchConfig
from llm_core.files import atomic_path, copy_file, read_json, write_json
from llm_core.layout import LATEST_FILE, MODEL_DIR, MODEL_TOKENIZER_SUBDIR

if TYPE_CHECKING:  # torch is imported where a model is built: reading this module's names needs none
    from llm_core.model import ModelArgs, Transformer

WEIGHTS_FILE = "model.safetensors"
MODEL_CONFIG_FILE = "model_config.json"
SUMMARY_FILE = "training_summary.json"


def model_config(args: ModelArgs, cfg: ScratchConfig) -> dict:
    """model_config.json: the model's dimensions, and the config it was trained with."""
    return {"model": dataclasses.asdict(args), "config": cfg.model_dump(mode="json")}


def save_model_files(model: Transformer, cfg: ScratchConfig, out_dir: Path) -> None:
    """model.safetensors + model_config.json: what load_model (and the export) reads."""
    from safetensors.torch import save_model

    with atomic_path(out_dir / WEIGHTS_FILE) as tmp:
        save_model(model, str(tmp))  # handles the tied embedding / lm_head weight
    write_json(out_dir / MODEL_CONFIG_FILE, model_config(model.args, cfg))


def load_model(model_dir: Path, device: str = "cpu") -> Transformer:
    """A trained model from its directory, or from one of its checkpoints/step_N: model_config.json
    + model.safetensors (stored once if tied; `_orig_mod.` names of a compiled model accepted)."""
    from safetensors.torch import load_file

    from llm_core.model import ModelArgs, Transformer

    model_dir = Path(model_dir)
    args = ModelArgs(**read_json(model_dir / MODEL_CONFIG_FILE)["model"])
    model = Transformer(args)
    state = {k.removeprefix("_orig_mod."): v for k, v in load_file(model_dir / WEIGHTS_FILE, device=device).items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if args.tie_embeddings and len(missing) == 1 and missing[0] in ("lm_head.weight", "embed_tokens.weight"):
        missing = []  # the tied matrix was saved under its other name
    if missing or unexpected:
        raise ValueError(f"{model_dir / WEIGHTS_FILE} does not fit its model_config.json: "
                         f"missing {missing}, unexpected {unexpected}")
    return model.eval()


def latest_model(cfg: ScratchConfig) -> dict:
    """The last trained_model materialization: {"key", "path", "mlflow_run_id", "tracking_uri"}."""
    latest = read_json(cfg.data_path / MODEL_DIR / LATEST_FILE)
    if not latest:
        raise FileNotFoundError(f"no trained model under {cfg.data_path / MODEL_DIR}: materialize `trained_model`")
    return latest


def copy_tokenizer(tokenizer_dir: Path, model_dir: Path) -> None:
    """Put the tokenizer a model was trained with beside it, so the model directory stands alone."""
    for f in Path(tokenizer_dir).iterdir():
        if f.is_file():
            copy_file(f, Path(model_dir) / MODEL_TOKENIZER_SUBDIR / f.name)
