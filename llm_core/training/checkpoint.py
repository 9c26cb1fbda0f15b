"""Checkpoints: saving, finding the newest one that loads, resuming; the finished training's files.

    out_dir/
        checkpoints/step_N/     accelerate.save_state: weights (safetensors), optimizer, scheduler, RNG
                                states, the loader position and metric history (TrainingProgress),
                                + file_sizes.json and model_config.json
        model.safetensors       the final weights      } what model_files.load_model reads; a
        model_config.json       the model's dimensions } checkpoint directory loads the same way
        training_summary.json   TrainResult

A killed save leaves only `step_N.tmp` (never taken for a checkpoint). A checkpoint that does not
load (truncated files) is set aside as `step_N.corrupt` and the one before is used.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from pathlib import Path
from typing import Callable

import torch

from llm_core.config import ScratchConfig
from llm_core.files import read_json, write_json
from llm_core.layout import CHECKPOINTS
from llm_core.model import Transformer
from llm_core.model_files import MODEL_CONFIG_FILE, SUMMARY_FILE, save_model_files

FILE_SIZES = "file_sizes.json"  # in a checkpoint: the size of each file saved, to detect a truncated one


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
# the finished training


def save_final(model: Transformer, cfg: ScratchConfig, out_dir: Path, summary: dict) -> None:
    """The trained weights (safetensors), the model config, and the training summary beside the checkpoints."""
    save_model_files(model, cfg, out_dir)
    write_json(out_dir / SUMMARY_FILE, summary)
