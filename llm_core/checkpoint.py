"""Checkpoints and model files: saving, finding the newest one that loads, loading a trained model.

    out_dir/
        checkpoints/step_N/     accelerate.save_state: weights (safetensors), optimizer, scheduler, RNG
                                states, the loader position and metric history (TrainingProgress),
                                + file_sizes.json and model_config.json
        model.safetensors       the final weights      } what load_model reads; a checkpoint
        model_config.json       the model's dimensions } directory loads the same way
        training_summary.json   TrainResult

A killed save leaves only `step_N.tmp` (never taken for a checkpoint). A checkpoint that does not
load (truncated files) is set aside as `step_N.corrupt` and the one before is used.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Callable

import torch

from llm_core.config import ScratchConfig
from llm_core.files import atomic_path, read_json, write_json
from llm_core.layout import LATEST_FILE, MODEL_DIR
from llm_core.model import ModelArgs, Transformer

CHECKPOINTS = "checkpoints"
WEIGHTS_FILE = "model.safetensors"
MODEL_CONFIG_FILE = "model_config.json"
FILE_SIZES = "file_sizes.json"  # in a checkpoint: the size of each file saved, to detect a truncated one
SUMMARY_FILE = "training_summary.json"


# ---------------------------------------------------------------------------------------------
# checkpoints: save, list, resume


def checkpoint_dirs(out_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (a killed save leaves only a `.tmp` directory, a checkpoint
    that did not load is renamed `.corrupt`)."""
    root = out_dir / CHECKPOINTS
    dirs = [d for d in root.iterdir() if d.is_dir() and re.fullmatch(r"step_\d+", d.name)] if root.exists() else []
    return sorted(dirs, key=checkpoint_step)


def checkpoint_step(checkpoint: Path) -> int:
    return int(checkpoint.name.split("_")[1])


class _TiedHeadIsExpected(logging.Filter):
    """accelerate warns on every save that it dropped `lm_head.weight`, a tensor shared with the
    embedding: with model.tie_embeddings that is the model, and loading ties them again."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Removed shared tensor {'lm_head.weight'}" not in record.getMessage()


logging.getLogger("accelerate.utils.other").addFilter(_TiedHeadIsExpected())


def save_checkpoint(accelerator, out_dir: Path, step: int, model_config: dict, keep: int = 2) -> None:
    """accelerate.save_state into step_N.tmp, renamed to step_N when every rank is done. With the
    model config beside the weights, a checkpoint loads (and generates) like a finished model."""
    final = out_dir / CHECKPOINTS / f"step_{step}"
    tmp = final.with_name(final.name + ".tmp")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_json(tmp / FILE_SIZES, {str(f.relative_to(tmp)): f.stat().st_size
                                      for f in sorted(tmp.rglob("*")) if f.is_file()})
        write_json(tmp / MODEL_CONFIG_FILE, model_config)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in checkpoint_dirs(out_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def truncated_files(checkpoint: Path) -> list[str]:
    """Files of a checkpoint whose size differs from the one recorded when it was saved (a copy or
    disk that cut them short). Checkpoints saved before sizes were recorded are not checked here."""
    sizes = read_json(checkpoint / FILE_SIZES)
    return [f"{name} ({(checkpoint / name).stat().st_size if (checkpoint / name).exists() else 'missing'} "
            f"of {size} bytes)" for name, size in sorted(sizes.items())
            if not (checkpoint / name).exists() or (checkpoint / name).stat().st_size != size]


def set_aside(checkpoint: Path) -> Path:
    """Rename a checkpoint that does not load to step_N.corrupt: kept for inspection, never retried."""
    aside = checkpoint.with_name(checkpoint.name + ".corrupt")
    n = 1
    while aside.exists():
        aside, n = checkpoint.with_name(f"{checkpoint.name}.corrupt{n}"), n + 1
    os.replace(checkpoint, aside)
    return aside


def resume(accelerator, out_dir: Path, log: Callable[[str], None]) -> int:
    """Load the newest checkpoint that loads (every rank agrees on which); set aside the newer ones
    that do not, with a warning naming each. Returns the step resumed from, 0 when there is none."""
    partly_loaded = None
    for checkpoint in reversed(checkpoint_dirs(out_dir)):
        problem = ", ".join(truncated_files(checkpoint))
        problem = f"truncated: {problem}" if problem else None
        if problem is None:
            try:
                accelerator.load_state(str(checkpoint))
            except Exception as error:  # whatever a damaged file raises (safetensors, pickle, EOF, ...)
                problem, partly_loaded = f"{type(error).__name__}: {error}", checkpoint
        failed = accelerator.reduce(torch.tensor(float(problem is not None), device=accelerator.device), "sum")
        if not float(failed):
            log(f"resumed from {checkpoint} (step {checkpoint_step(checkpoint)})")
            return checkpoint_step(checkpoint)
        if accelerator.is_main_process:
            aside = set_aside(checkpoint)
            log(f"WARNING: checkpoint {checkpoint} does not load ({problem or 'on another rank'}); "
                f"set aside as {aside.name}, trying the one before")
        accelerator.wait_for_everyone()
    if partly_loaded is not None:  # its weights may be in the model already: do not train on them
        raise RuntimeError(f"no checkpoint in {out_dir / CHECKPOINTS} loads, and {partly_loaded} failed half-way "
                           f"through loading; the bad ones are set aside (*.corrupt): run again to train from step 0")
    return 0


# ---------------------------------------------------------------------------------------------
# model files: save, load, find


def model_config(args: ModelArgs, cfg: ScratchConfig) -> dict:
    """model_config.json: the model's dimensions, and the config it was trained with."""
    return {"model": dataclasses.asdict(args), "config": cfg.model_dump(mode="json")}


def save_model_files(model: Transformer, cfg: ScratchConfig, out_dir: Path) -> None:
    """model.safetensors + model_config.json: what load_model (and the export) reads."""
    from safetensors.torch import save_model

    with atomic_path(out_dir / WEIGHTS_FILE) as tmp:
        save_model(model, str(tmp))  # handles the tied embedding / lm_head weight
    write_json(out_dir / MODEL_CONFIG_FILE, model_config(model.args, cfg))


def save_final(model: Transformer, cfg: ScratchConfig, out_dir: Path, summary: dict) -> None:
    """The trained weights (safetensors), the model config, and the training summary beside the checkpoints."""
    save_model_files(model, cfg, out_dir)
    write_json(out_dir / SUMMARY_FILE, summary)


def load_model(model_dir: Path, device: str = "cpu") -> Transformer:
    """A trained model from its directory, or from one of its checkpoints/step_N: model_config.json
    + model.safetensors (stored once if tied; `_orig_mod.` names of a compiled model accepted)."""
    from safetensors.torch import load_file

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
