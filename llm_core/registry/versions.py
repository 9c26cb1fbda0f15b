"""The MLflow model registry: log a trained model as a pyfunc, register a version, move the aliases.

A registered version generates text:

    model = mlflow.pyfunc.load_model("models:/scratchllm@champion")
    model.predict(["ROMEO:"], params={"max_new_tokens": 50, "temperature": 0.8, "seed": 0})
    # -> ["the continuation, without the prompt"]; temperature 0 is greedy

and a chat fine-tune's (`scratchllm-chat`) answers a conversation:

    mlflow.pyfunc.load_model("models:/scratchllm-chat@champion").predict(
        {"messages": [{"role": "user", "content": "Who speaks first?"}]}, params={"temperature": 0})
    # -> {"choices": [{"message": {"role": "assistant", "content": ...}, "finish_reason": "stop"}], ...}

Its artifact is a model directory (see llm_core/registry/generate.py: weights as safetensors, model config,
tokenizer) and its code is this package, so loading it needs no pickle and no network.

Aliases: `champion` is the best version so far; a new version takes it when it is better beyond the
noise of a paired comparison over validation documents (llm_core/evaluation/promotion.py), and otherwise
becomes the `challenger`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
import tempfile
import warnings
from importlib import metadata
from pathlib import Path

import mlflow

from llm_core.data.tokenizer import chat_template_of
from llm_core.registry.requests import CHAT_INPUT, DEFAULT_PARAMS

CHAMPION, CHALLENGER = "champion", "challenger"
BPB_TAG = "val_bpb"  # version tag that the champion comparison reads
KEY_TAG = "scratchllm.training_key"  # one version per training: registering it again reuses it
# What the pyfunc imports; versions are pinned to this environment's (no slow inference at log time).
REQUIREMENTS = ("torch", "tokenizers", "safetensors", "numpy", "pyarrow", "pydantic", "pyyaml", "xxhash", "mlflow")
PYFUNC_MODEL = Path(__file__).with_name("pyfunc_model.py")  # logged as "model from code": no pickle
PACKAGE_DIR = Path(__file__).resolve().parent.parent  # llm_core: the code a logged model carries
# MLflow's advice for a model like ours, printed at logging (and loading): predict has no type hints on
# purpose (see pyfunc_model.py), and an input example would only make MLflow run the model while logging it.
MLFLOW_NOTICES = ("Add type hints to the `predict` method", "An input example was not provided")


@dataclasses.dataclass
class Registration:
    name: str
    version: str
    alias: str  # champion or challenger
    val_bpb: float
    previous_champion: str | None  # version that held `champion` before, if any
    previous_champion_bpb: float | None
    reused: bool  # this training was registered before; no new version was created

    @property
    def promoted(self) -> bool:
        return self.alias == CHAMPION


def pip_requirements() -> list[str]:
    return [f"{name}=={metadata.version(name).split('+')[0]}" for name in REQUIREMENTS]


def champion_version(client, name: str):
    """The ModelVersion holding `champion`, or None before the first one."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:  # no such model or no such alias yet
        return None


def champion(client, name: str) -> tuple[str, float] | None:
    """(version, val bpb) of the current champion, or None before the first one."""
    version = champion_version(client, name)
    return (str(version.version), float(version.tags.get(BPB_TAG, "inf"))) if version else None


def takes_messages(signature) -> bool:
    """Whether a registered version's signature is a chat model's (a conversation in)."""
    return signature is not None and CHAT_INPUT in signature.inputs.input_names()


def log_pyfunc(model_dir: Path, tokenizer_dir: Path, run_id: str, card: str | None = None):
    """Log the model directory (with its model card as README.md) as a pyfunc in the training's MLflow
    run; returns its ModelInfo. Runs inside tracking.using(uri)."""
    from mlflow.models import infer_signature

    from llm_core.registry.generate import package_model
    from llm_core.registry.model_card import write_card

    if chat_template_of(tokenizer_dir) is None:  # a base model: prompts in, continuations out
        signature = infer_signature(["a prompt"], ["a continuation"], params=DEFAULT_PARAMS)
    else:  # a chat model: a conversation in, a chat completion out (pyfunc_model.py)
        messages = [{"role": "user", "content": "a question", "name": "Ann"},  # OpenAI's `name`: optional
                    {"role": "assistant", "content": "an answer"}, {"role": "user", "content": "and?"}]
        signature = infer_signature({CHAT_INPUT: messages}, {
            "object": "chat.completion", "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8},
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "an answer"},
                         "finish_reason": "stop"}]}, params=DEFAULT_PARAMS)
    with tempfile.TemporaryDirectory() as tmp, mlflow.start_run(run_id=run_id), without_mlflow_notices():
        package = package_model(model_dir, tokenizer_dir, Path(tmp) / "model")
        if card is not None:
            write_card(card, package)
        return mlflow.pyfunc.log_model(
            name="model", python_model=str(PYFUNC_MODEL), artifacts={"model": str(package)},
            code_paths=[str(PACKAGE_DIR)], pip_requirements=pip_requirements(), signature=signature)


@contextlib.contextmanager
def without_mlflow_notices():
    """Drop the MLFLOW_NOTICES warnings, pass every other one on. Recorded and re-issued rather than
    filtered: around its type-hint check (run whenever pyfunc_model.py runs: logging or loading the
    model) MLflow puts a "once" filter of its own in front of any filterwarnings("ignore", ...) of ours."""
    try:
        with warnings.catch_warnings(record=True) as caught:
            yield
    finally:
        for w in caught:
            if not any(notice in str(w.message) for notice in MLFLOW_NOTICES):
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno, source=w.source)


def register(model_dir: Path, tokenizer_dir: Path, *, tracking_uri: str, run_id: str, name: str, val_bpb: float,
             tags: dict[str, str], verdict=None, card: str | None = None) -> Registration:
    """Register the model of a training (tags[KEY_TAG] identifies it) and give it an alias: `champion`
    if the verdict (llm_core/evaluation/promotion.py) promotes it, or without one if its val bpb is at least as
    good as the current champion's; else `challenger`. The verdict is kept as version tags."""
    from llm_core import tracking

    client = tracking.client(tracking_uri)
    before = champion(client, name)
    key = tags[KEY_TAG]
    existing = [v for v in client.search_model_versions(f"name = '{name}'") if v.tags.get(KEY_TAG) == key]
    if existing:
        version = existing[0].version
    else:
        with tracking.using(tracking_uri):  # mlflow.pyfunc.log_model only has the fluent API
            info = log_pyfunc(model_dir, tokenizer_dir, run_id, card)
            if not has_registered_model(client, name):
                client.create_registered_model(name, description="Text generation models trained by scratchllm.")
            version = client.create_model_version(name, source=info.model_uri, run_id=run_id, model_id=info.model_id,
                                                  tags={**tags, BPB_TAG: repr(float(val_bpb))}).version
    if before is None or before[0] == str(version):  # the first version, or already the champion
        alias = CHAMPION
    elif verdict is not None:
        alias = CHAMPION if verdict.promote else CHALLENGER
    else:
        alias = CHAMPION if val_bpb <= before[1] else CHALLENGER
    for tag, value in (verdict.tags() if verdict else {}).items():
        client.set_model_version_tag(name, str(version), tag, value)
    client.set_registered_model_alias(name, alias, version)
    previous, previous_bpb = before if before else (None, None)
    return Registration(name=name, version=str(version), alias=alias, val_bpb=float(val_bpb),
                        previous_champion=previous, previous_champion_bpb=previous_bpb, reused=bool(existing))


def find_version(spec: str, tracking_uri: str):
    """The registered ModelVersion that `NAME@ALIAS` or `NAME/VERSION` names (FileNotFoundError if none)."""
    from mlflow.exceptions import MlflowException

    from llm_core import tracking

    client = tracking.client(tracking_uri)
    name, alias = spec.split("@", 1) if "@" in spec else (spec.rsplit("/", 1)[0], None)
    try:
        return client.get_model_version_by_alias(name, alias) if alias else \
            client.get_model_version(name, spec.rsplit("/", 1)[1])
    except MlflowException as exc:
        raise FileNotFoundError(f"no registered model {spec!r} in {tracking_uri}: {exc.message}") from None


def download(spec: str, tracking_uri: str, cache_dir: Path) -> Path:
    """The model directory of a registered version, `NAME@ALIAS` or `NAME/VERSION`, downloaded
    into cache_dir/<name>/<version>-<its MLflow run> (once: a version never changes). The run id is in
    the name because a version number is unique within one registry only: another store (a fresh
    mlflow.db, a team's tracking server) has its own version 1, which must not be read from the cache."""
    from llm_core import tracking

    version = find_version(spec, tracking_uri)
    name = version.name
    target = Path(cache_dir) / name / f"{version.version}-{version.run_id or version.creation_timestamp}"
    if not (target / "artifacts" / "model").is_dir():
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp, tracking.using(tracking_uri):
            # complete, then renamed into place; `using`: models:/ URIs read the fluent registry URI
            local = mlflow.artifacts.download_artifacts(f"models:/{name}/{version.version}", dst_path=tmp)
            shutil.rmtree(target, ignore_errors=True)
            shutil.move(local, target)
    return target / "artifacts" / "model"


def code_version() -> str:
    """The git commit of this checkout (+ "-dirty" with uncommitted changes), else the package version."""
    import subprocess

    root = PACKAGE_DIR.parent
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"], check=True,
                                capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               check=True, capture_output=True, text=True, timeout=10).stdout.strip()
        return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return f"scratchllm=={metadata.version('scratchllm')}"


def has_registered_model(client, name: str) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
        return True
    except MlflowException:
        return False
