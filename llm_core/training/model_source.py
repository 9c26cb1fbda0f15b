"""Where a model comes from: a directory, one of its checkpoints, or a registered MLflow version, and
the warm start of a new training from one (`training.init_from`).

A warm start (continued pretraining) takes the weights only: the new training starts at step 0 with
a fresh optimizer and its own warmup and schedule. It is refused, naming what differs, when the
source's architecture or tokenizer is not the one this training builds: the weights would not fit,
or would mean other tokens.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import TYPE_CHECKING

from llm_core.model_files import MODEL_CONFIG_FILE, load_model
from llm_core.config import ScratchConfig, resolve_path
from llm_core.files import read_json
from llm_core.layout import CHECKPOINTS, MODEL_TOKENIZER_SUBDIR, REGISTRY_CACHE_DIR, TOKENIZER_DIR

if TYPE_CHECKING:
    from llm_core.model import ModelArgs

REGISTERED = re.compile(r"[^/@]+(@[^/@]+|/\d+)")  # NAME@ALIAS or NAME/VERSION


def model_dir_of(spec: str, cfg: ScratchConfig) -> Path:
    """The model directory `spec` names: a directory (a trained run, or one of its checkpoints/step_N),
    or a registered model `NAME@ALIAS` / `NAME/VERSION`, downloaded from the profile's MLflow registry."""
    path = Path(spec).expanduser()
    if path.exists() or not REGISTERED.fullmatch(spec):
        return path  # a directory (loading it says so if it is not a model directory)
    from llm_core.registry import versions
    from llm_core import tracking

    return versions.download(spec, tracking.tracking_uri(cfg), cfg.data_path / REGISTRY_CACHE_DIR)


def tokenizer_dir_of(model_dir: Path, cfg: ScratchConfig) -> Path:
    """The tokenizer a model directory carries (a checkpoint: its run's), else the profile's."""
    run_dir = model_dir.parent.parent if model_dir.parent.name == CHECKPOINTS else model_dir
    carried = run_dir / MODEL_TOKENIZER_SUBDIR
    return carried if carried.is_dir() else cfg.data_path / TOKENIZER_DIR


@dataclasses.dataclass
class WarmStart:
    spec: str  # what training.init_from said
    model_dir: Path  # where the weights are
    registered_version: str | None  # "NAME/VERSION" when it came from the registry
    registered_run_id: str | None  # the MLflow run of that version


def resolve_init_from(cfg: ScratchConfig) -> WarmStart | None:
    """The source of `training.init_from`, downloaded if registered; None when it is not set."""
    spec = cfg.training.init_from
    if not spec:
        return None
    registered = REGISTERED.fullmatch(spec) and not Path(spec).expanduser().exists()
    model_dir = model_dir_of(spec, cfg) if registered else resolve_path(spec)  # paths: from the project root
    version = run_id = None
    if registered:
        from llm_core.registry import versions
        from llm_core import tracking

        found = versions.find_version(spec, tracking.tracking_uri(cfg))
        version, run_id = f"{found.name}/{found.version}", found.run_id
    if not (model_dir / MODEL_CONFIG_FILE).is_file():
        raise FileNotFoundError(f"training.init_from {spec!r}: {model_dir} is not a trained model (no "
                                f"{MODEL_CONFIG_FILE}); give a run directory, a checkpoint or NAME@ALIAS")
    return WarmStart(spec, model_dir, version, run_id)


def check_compatible(warm: WarmStart, args: ModelArgs, tokenizer_dir: Path, cfg: ScratchConfig) -> None:
    """Refuse a source whose architecture or tokenizer differs from this training's, naming the field."""
    from llm_core.model import COMPUTE_ONLY_FIELDS, ModelArgs

    theirs = dataclasses.asdict(ModelArgs(**read_json(warm.model_dir / MODEL_CONFIG_FILE)["model"]))
    ours = dataclasses.asdict(args)
    differ = [f"{'tokenizer.vocab_size' if k == 'vocab_size' else 'model.' + k}: {theirs[k]!r} there, {v!r} here"
              for k, v in ours.items() if k not in COMPUTE_ONLY_FIELDS and theirs[k] != v]
    if differ:
        raise ValueError(f"training.init_from {warm.spec!r} has another architecture: " + "; ".join(differ))
    source_tokenizer = tokenizer_dir_of(warm.model_dir, cfg) / "tokenizer.json"
    if source_tokenizer.read_bytes() != (tokenizer_dir / "tokenizer.json").read_bytes():
        raise ValueError(f"training.init_from {warm.spec!r} was trained with another tokenizer ({source_tokenizer} "
                         f"differs from {tokenizer_dir / 'tokenizer.json'}): its weights would mean other tokens")


def load_initial_weights(model, warm: WarmStart) -> None:
    """The source's weights into `model` (same architecture, checked before)."""
    model.load_state_dict(load_model(warm.model_dir).state_dict())
