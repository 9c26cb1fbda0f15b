"""The typed configuration of scratchllm: one pydantic model, loaded from YAML profiles.

A profile is a YAML file. It may be partial: it is deep-merged over `assets_config/default.yaml`.
Unknown keys and invalid values are refused before any work starts, with the field named
(e.g. `model.n_head: must divide model.n_embd`).

Relative paths (`data_dir`, `corpus.sources`) are resolved against the project root, so a run
behaves the same from the CLI, from `dagster dev` and from tests, whatever the working directory.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from llm_core.files import short_hash

PROJECT_ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = PROJECT_ROOT / "assets_config"
DEFAULT_PROFILE = CONFIG_DIR / "default.yaml"
CONFIG_ENV_VAR = "SCRATCHLLM_CONFIG"
# Fields that change when and where work runs, or how it is reported, not what it makes: left out of
# every key and hash.
SCHEDULING_FIELDS = {"training": {"max_parallel_variants", "peak_flops"}}
# Fields added after profiles were in use, left out of keys and hashes while they hold these values (the
# same training as before they existed), so that trainings and versions made before keep their keys.
OMITTED_AT = {"training": {"mixture": None, "muon_ns_steps": 5}, "registry": {"protected_sources": []}}
SOURCE_NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-")


class ConfigError(ValueError):
    """A profile that cannot be used; the message names the offending field(s)."""


class Section(BaseModel):
    # Refuse unknown keys: a typo must not silently fall back to a default.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _one_of(value: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ValueError(f"must be one of {list(allowed)}, got {value!r}")
    return value


def _check_source_name(name: str) -> str:
    if not name or not set(name) <= SOURCE_NAME_CHARS:
        raise ValueError(f"source name {name!r}: letters, digits, '_' and '-' only (it names metrics "
                         f"eval/<source>/bpb and sweep fields training.mixture.<source>)")
    return name


def _name_from_path(path: str) -> str:
    """A plain source's name: its file name without extensions, or its folder's name (for a glob, the
    folder before the first wildcard), with other characters turned into '_'."""
    path = path.split("://", 1)[-1].rstrip("/")
    head = path.split("*")[0].split("?")[0].split("[")[0]
    name = head.rsplit("/", 1)[-1] if head == path else head.rstrip("/").rsplit("/", 1)[-1]
    name = name.split(".")[0] or "source"
    return "".join(c if c in SOURCE_NAME_CHARS else "_" for c in name)


class SourceEntry(Section):
    """A named source: its files (as in plain `corpus.sources` entries) make one source of the corpus."""

    name: str = Field(description="Names the source in metadata, metrics (eval/<name>/bpb) and training.mixture.")
    paths: list[str] = Field(min_length=1, description="Files, directories, globs or fsspec URIs of this source.")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return _check_source_name(v)


class CorpusConfig(Section):
    sources: list[str | SourceEntry] = Field(
        default_factory=lambda: ["data/tinyshakespeare.txt"],
        description="Files, directories (recursive), globs or fsspec URIs (s3://, gs://, https://, memory://), each "
                    "a source named after it; or {name, paths} entries: named sources (training.mixture weighs them).",
    )
    extensions: list[str] = Field(
        default_factory=lambda: [".txt", ".md", ".jsonl", ".parquet"],
        description="File types read when a source is a directory or glob (compressed .gz/.zst variants included).",
    )
    txt_delimiter: str | None = Field(
        default=None, description="Split .txt/.md files into documents on this string; null = one document per file."
    )
    max_document_bytes: int = Field(
        default=8192,
        ge=256,
        description="Longer documents are cut at paragraph (blank line) boundaries into pieces of at most this size; "
                    "dedup and the train/val split still judge the whole document.",
    )
    pieces_are_documents: list[str] = Field(
        default_factory=lambda: ["data/tinyshakespeare.txt"],
        description="Sources (files, directories, globs, as in `sources`) that are collections of short texts: each "
                    "piece cut at max_document_bytes counts as a document of its own for dedup and the split.",
    )
    jsonl_text_field: str = Field(default="text", description="Field holding the text in .jsonl records.")
    parquet_text_column: str = Field(default="text", description="Column holding the text in .parquet files.")
    shard_size_mb: float = Field(default=32.0, gt=0, description="Target size of one output shard (uncompressed text).")

    @field_validator("sources")
    @classmethod
    def _non_empty_sources(cls, v: list) -> list:
        if not v:
            raise ValueError("needs at least one source (file, directory, glob or URI)")
        names = [s.name for s in v if isinstance(s, SourceEntry)]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"source names must be unique: {repeated} named twice")
        return v

    def named_sources(self) -> dict[str, list[str]]:
        """Source name -> its paths, in corpus order. A plain entry is named after its path (a name taken
        already gets -2, -3, ...)."""
        named = {s.name: list(s.paths) for s in self.sources if isinstance(s, SourceEntry)}
        out: dict[str, list[str]] = {}
        for s in self.sources:
            if isinstance(s, SourceEntry):
                out[s.name] = list(s.paths)
                continue
            base = name = _name_from_path(s)
            n = 1
            while name in out or name in named:
                n += 1
                name = f"{base}-{n}"
            out[name] = [s]
        return out

    def source_paths(self) -> list[str]:
        """Every configured path, named sources' paths in place."""
        return [p for paths in self.named_sources().values() for p in paths]

    @field_validator("extensions")
    @classmethod
    def _known_extensions(cls, v: list[str]) -> list[str]:
        for ext in v:
            _one_of(ext, (".txt", ".md", ".jsonl", ".parquet"))
        return v


class CleaningConfig(Section):
    """Normalization, PII scrubbing and Gopher/C4-style quality rules. A rule set to null is off."""

    unicode_form: Literal["NFC", "NFKC", "NFD", "NFKD"] = Field(default="NFC",
                                                               description="Unicode normalization form.")
    scrub_pii: bool = Field(default=True, description="Replace emails, IP addresses and phone numbers by placeholders.")
    min_chars: int | None = Field(default=200, ge=0)
    max_chars: int | None = Field(default=1_000_000, ge=1)
    min_words: int | None = Field(default=30, ge=0)
    min_mean_word_length: float | None = Field(default=3.0, ge=0)
    max_mean_word_length: float | None = Field(default=10.0, ge=0)
    max_symbol_word_ratio: float | None = Field(default=0.1, ge=0, description="(#, ..., …) per word.")
    min_alpha_word_fraction: float | None = Field(
        default=0.8, ge=0, le=1, description="Fraction of whitespace-separated words containing a letter."
    )
    max_duplicate_line_fraction: float | None = Field(default=0.3, ge=0, le=1)
    max_duplicate_paragraph_fraction: float | None = Field(default=0.3, ge=0, le=1)
    max_top_2gram_fraction: float | None = Field(
        default=0.2, ge=0, le=1, description="Share of words covered by the most frequent word 2-gram."
    )
    max_duplicate_5gram_fraction: float | None = Field(
        default=0.15, ge=0, le=1, description="Share of word 5-grams that repeat an earlier 5-gram of the document."
    )
    num_workers: int = Field(default=2, ge=1, description="Processes cleaning shards in parallel.")

    @model_validator(mode="after")
    def _bounds(self) -> "CleaningConfig":
        for low, high in (("min_chars", "max_chars"), ("min_mean_word_length", "max_mean_word_length")):
            lo, hi = getattr(self, low), getattr(self, high)
            if lo is not None and hi is not None and lo > hi:
                raise ValueError(f"{low} ({lo}) is larger than {high} ({hi})")
        return self


class DedupConfig(Section):
    exact: bool = Field(default=True, description="Drop documents whose normalized text was seen before.")
    near: bool = Field(default=True, description="Drop near duplicates found with MinHash + LSH.")
    shingle_words: int = Field(default=5, ge=1, le=32, description="Words per shingle.")
    num_permutations: int = Field(default=128, ge=8, le=1024)
    bands: int = Field(default=32, ge=1, description="LSH bands; num_permutations must be a multiple.")
    threshold: float = Field(default=0.8, gt=0, le=1,
                             description="Estimated Jaccard at or above which a doc is a near dup.")
    seed: int = Field(default=1234)

    @model_validator(mode="after")
    def _bands_divide(self) -> "DedupConfig":
        if self.num_permutations % self.bands:
            raise ValueError(f"bands ({self.bands}) must divide num_permutations ({self.num_permutations})")
        return self


class TokenizerConfig(Section):
    vocab_size: int = Field(default=2048, ge=260, le=1_000_000)
    max_training_bytes_mb: float = Field(default=200.0, gt=0)
    special_tokens: list[str] = Field(default_factory=lambda: ["<|endoftext|>", "<|pad|>", "<|user|>", "<|assistant|>",
                                                               "<|end|>"],
                                      description="Reserved tokens: the document boundary, padding and the chat "
                                                  "template's (a base trained with them can be fine-tuned to chat).")


class DatasetConfig(Section):
    val_fraction: float = Field(default=0.1, gt=0, lt=1, description="Share of the text held out for validation: "
                                "whole documents, or pieces when a few documents cannot give it (data/split.py).")
    seed: int = Field(default=1337, description="Seed of the train/val split.")
    packing: Literal["random", "document"] = Field(
        default="random", description="Training windows start anywhere ('random') or at document starts ('document').")
    builtin_task_items: int = Field(default=500, ge=0, description="Items of the built-in 'continuation' task "
                                                                   "made from the validation split (0: none).")
    decontamination: Literal["remove", "fail", "off"] = Field(
        default="remove", description="Training documents sharing an n-gram with an evaluation task item: 'remove' "
                                      "them (listed), 'fail' the blocking check, or 'off'.")
    decontamination_ngram: int = Field(default=13, ge=1, description="Words per n-gram of the contamination check.")


class ModelConfig(Section):
    n_layer: int = Field(default=4, ge=1)
    n_head: int = Field(default=4, ge=1)
    n_kv_head: int = Field(default=4, ge=1)
    n_embd: int = Field(default=128, ge=8)
    block_size: int = Field(default=64, ge=2)
    tie_embeddings: bool = True
    rope_theta: float = Field(default=10000.0, gt=0)
    norm_eps: float = Field(default=1e-5, gt=0)
    dropout: float = Field(default=0.0, ge=0, lt=1)
    fused_projections: bool = Field(default=True, description="q/k/v and gate/up as one matrix product each "
                                                              "(same weights and outputs, faster).")
    qk_norm: bool = Field(default=True, description="RMSNorm of each head's queries and keys (exported as "
                                                     "Qwen3ForCausalLM instead of LlamaForCausalLM).")
    mlp: Literal["swiglu", "relu2"] = Field(default="swiglu", description="'swiglu' (Llama), or 'relu2': relu(x)^2 "
                                            "with a 4x hidden layer (not exportable to transformers).")
    zero_init_output: bool = Field(default=False, description="Start the attention and MLP output "
                                                              "projections at zero.")

    @model_validator(mode="after")
    def _heads(self) -> "ModelConfig":
        if self.n_embd % self.n_head:
            raise ValueError(f"n_head ({self.n_head}) must divide n_embd ({self.n_embd})")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_kv_head ({self.n_kv_head}) must divide n_head ({self.n_head})")
        if (self.n_embd // self.n_head) % 2:
            raise ValueError("n_embd / n_head (the head size) must be even for RoPE")
        return self


class TrainingConfig(Section):
    max_steps: int = Field(default=1000, ge=1, description="Optimizer steps.")
    batch_size: int = Field(default=12, ge=1, description="Sequences per process per micro-step.")
    grad_accum_steps: int = Field(default=1, ge=1, description="Micro-steps per optimizer step.")
    learning_rate: float = Field(default=3e-3, gt=0, description="Peak learning rate (AdamW).")
    min_lr_ratio: float = Field(default=0.1, ge=0, le=1, description="Final learning rate / peak.")
    lr_schedule: Literal["cosine", "wsd"] = Field(default="cosine", description="'cosine' (warmup + cosine) or "
                                                  "'wsd' (warmup, stable, linear decay).")
    wsd_decay_fraction: float = Field(default=0.2, gt=0, le=1, description="Share of steps that decay (wsd).")
    warmup_steps: int | None = Field(default=None, ge=0, description="Linear warmup steps; null = "
                                                                     "warmup_fraction of max_steps.")
    warmup_fraction: float = Field(default=0.05, ge=0, lt=1, description="Warmup as a share of max_steps "
                                                                         "when warmup_steps is null.")
    optimizer: Literal["adamw", "muon"] = Field(
        default="muon", description="'adamw', or 'muon': Muon (torch.optim.Muon's, batched by shape) for the hidden "
                                    "matrices, AdamW for embeddings, head and gains.")
    muon_learning_rate: float = Field(default=0.01, gt=0, description="Muon's peak learning rate (same schedule).")
    muon_momentum: float = Field(default=0.95, ge=0, lt=1, description="Muon's momentum (Nesterov).")
    muon_ns_steps: int = Field(default=3, ge=1, le=10, description="Muon's Newton-Schulz iterations per update: "
                                                                 "fewer cost less time, orthogonalize less exactly.")
    weight_decay: float = Field(default=0.1, ge=0, description="AdamW decay of matrices (not norms).")
    beta1: float = Field(default=0.9, ge=0, lt=1)
    beta2: float = Field(default=0.95, ge=0, lt=1)
    grad_clip: float = Field(default=1.0, ge=0, description="Max gradient norm; 0 = no clipping.")
    num_processes: int = Field(default=1, ge=1, description="Training processes (ranks): on this machine, or "
                               "the workers on the cluster with engine.kind: ray.")
    seed: int = Field(default=1337, ge=0)
    mixed_precision: Literal["no", "bf16", "fp16", "auto"] = Field(
        default="auto", description="'no' (fp32), 'bf16', 'fp16' (GPU) or 'auto': bf16 on CUDA, and on a CPU with "
                                    "bf16 units when a training step measures at least 1.15x faster in it.")
    compile: bool | Literal["auto"] = Field(
        default=False, description="torch.compile the model: true, false, or 'auto': when the step time it saves "
                                   "over the run exceeds the compile time, measured once per shape on this machine "
                                   "(kernels cached under data_dir).")
    mixture: dict[str, float] | None = Field(
        default=None, description="Source name -> weight: the share of trained tokens drawn from each source "
                                  "(weights are normalized; a source left out gets none). null: every source in "
                                  "proportion to its size.")
    mixture_max_repetitions: float | dict[str, float] = Field(
        default=4.0, description="With a mixture: how many times a source's training tokens may be seen within "
                                 "max_steps (one value for all, or source -> value); more is refused before training.")
    activation_checkpointing: bool = Field(
        default=False, description="Recompute each transformer block's activations in backward instead of "
                                   "storing them: less activation memory for ~1/3 more compute (`scratchllm plan`).")
    checkpoint_interval: int = Field(default=250, ge=1, description="Save a resumable checkpoint every N steps.")
    eval_interval: int = Field(default=200, ge=1, description="Validation loss every N steps.")
    eval_batches: int = Field(default=20, ge=1, description="Validation batches per periodic evaluation.")
    log_interval: int = Field(default=10, ge=1, description="Send metrics to MLflow every N steps (a step "
                                                            "line is printed ~20 times per run).")
    health_spike_factor: float = Field(default=2.0, gt=1, description="training_health check: a loss above this "
                                                                      "multiple of the running median is a spike.")
    health_spike_steps: int = Field(default=10, ge=1, description="training_health check: fails when a spike "
                                                                  "lasts this many consecutive steps.")
    init_from: str | None = Field(default=None, description="Warm start: the weights of NAME@ALIAS, NAME/VERSION, a "
                                                             "run directory or a checkpoint; a fresh optimizer and "
                                                             "schedule. null: random weights.")
    accelerate_config: str | None = Field(default=None, description="An accelerate config YAML "
                                                                    "(assets_config/accelerate/*.yaml); null = CPU.")
    max_parallel_variants: int = Field(default=1, ge=1, description="Sweep variants trained at once: on GPUs each "
                                       "gets num_processes devices of its own, on CPU an equal share of the cores.")
    peak_flops: float | None = Field(default=None, gt=0, description="The MFU denominator, FLOP/s per process: "
                                     "null measures the best GEMM in the training precision at the start (~1 s on "
                                     "a CPU); a datasheet peak (989e12 for an H100's dense bf16) reports MFU as "
                                     "papers do.")

    @model_validator(mode="after")
    def _muon_needs_whole_matrices(self) -> "TrainingConfig":
        if self.optimizer != "muon" or not self.accelerate_config:
            return self
        path = resolve_path(self.accelerate_config)
        if not path.is_file():
            raise ValueError(f"accelerate_config: no file {path}")
        kind = (yaml.safe_load(path.read_text()) or {}).get("distributed_type")
        if kind in ("FSDP", "DEEPSPEED"):
            raise ValueError(f"optimizer: muon orthogonalizes whole matrices, but {self.accelerate_config} shards "
                             f"them ({kind}): use optimizer: adamw with sharded training, or a DDP profile")
        return self

    @field_validator("mixture")
    @classmethod
    def _mixture_weights(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        if v is None:
            return v
        for name, weight in v.items():
            _check_source_name(name)
            if not weight >= 0 or weight == float("inf"):
                raise ValueError(f"{name}: a weight is a number >= 0, got {weight}")
        if not any(w > 0 for w in v.values()):
            raise ValueError(f"needs a source with a weight above 0, got {v}")
        return v

    @field_validator("mixture_max_repetitions")
    @classmethod
    def _positive_repetitions(cls, v: float | dict[str, float]) -> float | dict[str, float]:
        for name, value in (v.items() if isinstance(v, dict) else [("", v)]):
            if not value > 0:
                raise ValueError(f"{name + ': ' if name else ''}must be above 0, got {value}")
        return v

    def max_repetitions(self, source: str) -> float:
        cap = self.mixture_max_repetitions
        return cap.get(source, 4.0) if isinstance(cap, dict) else cap

    @field_validator("warmup_steps")
    @classmethod
    def _warmup_below_max_steps(cls, v: int | None, info: ValidationInfo) -> int | None:
        max_steps = info.data.get("max_steps")  # absent when max_steps itself is invalid
        if v is not None and max_steps is not None and v >= max_steps:
            raise ValueError(f"warmup_steps ({v}) must be below max_steps ({max_steps}); "
                             f"leave it null to warm up over warmup_fraction of max_steps")
        return v

    @property
    def warmup(self) -> int:
        """The warmup steps in effect: warmup_steps if set, else warmup_fraction of max_steps, rounded,
        at least 1 (unless the fraction is 0) and below max_steps, so a shorter run never needs a new value."""
        if self.warmup_steps is not None:
            return self.warmup_steps
        return min(max(round(self.warmup_fraction * self.max_steps), int(self.warmup_fraction > 0)),
                   self.max_steps - 1)


class TaskFile(Section):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$", description="Names the metrics: eval/<name>/acc ...")
    path: str = Field(min_length=1, description="JSONL of {\"context\", \"choices\", \"label\"} per line.")


class EvaluationConfig(Section):
    prompts: list[str] = Field(default_factory=lambda: ["ROMEO:", "To be or not"])
    max_new_tokens: int = Field(default=100, ge=1)
    temperature: float = Field(default=0.8, ge=0)
    seed: int = 0
    tasks: list[TaskFile] = Field(default_factory=list, description="Multiple-choice tasks scored by "
                                                                    "log-likelihood, besides the built-in one.")
    max_val_tokens: int = Field(default=500_000, ge=1, description="The final validation scores use at most "
                                                                   "this many tokens: a fixed sample of whole "
                                                                   "documents, the same for every model.")

    @field_validator("tasks")
    @classmethod
    def _unique_task_names(cls, v: list[TaskFile]) -> list[TaskFile]:
        names = [t.name for t in v]
        for name in names:
            if names.count(name) > 1 or name == "continuation":  # the built-in task's name
                raise ValueError(f"task name {name!r} is used twice (the built-in task is 'continuation')")
        return v


class RegistryConfig(Section):
    model_name: str = Field(default="scratchllm", min_length=1)
    promotion_margin_bpb: float = Field(default=0.0, ge=0, description="`champion` moves only when the new "
                                                                       "version is better by more than this many "
                                                                       "bits per byte, at promotion_confidence.")
    promotion_confidence: float = Field(default=0.95, gt=0, lt=1, description="Confidence of the paired "
                                                                              "bootstrap interval over documents.")
    protected_sources: list[str] = Field(default_factory=list, description="Sources whose bits per byte must not get "
                                         "worse (paired interval over their validation documents) for `champion` "
                                         "to move.")


class SFTConfig(Section):
    """Chat fine-tuning (sft_dataset, chat_model): conversations, the base model, the fine-tune's settings.
    Every other training setting (optimizer, schedule, precision, processes) is the training section's."""
    base_model: str | None = Field(default="scratchllm@champion",
                                   description="The registered base model to fine-tune, NAME@ALIAS or NAME/VERSION; "
                                               "its tokenizer and architecture are the fine-tune's.")
    sources: list[str] = Field(default_factory=lambda: ["data/conversations.jsonl"],
                               description="Conversation JSONL files (relative: to the project root), one "
                               '{"messages": [{"role", "content"}, ...]} per line.')
    val_fraction: float = Field(default=0.1, gt=0, lt=1, description="Share of the conversations held out.")
    seed: int = Field(default=1337, description="Seed of the split and of the order of the packed rows.")
    max_steps: int = Field(default=300, ge=1)
    batch_size: int = Field(default=16, ge=1, description="Packed rows per process per micro-step.")
    learning_rate: float = Field(default=1.0e-3, gt=0, description="AdamW's peak (Muon's: muon_learning_rate).")
    muon_learning_rate: float = Field(default=0.005, gt=0)
    warmup_steps: int = Field(default=20, ge=0)
    eval_interval: int = Field(default=100, ge=1)

    @model_validator(mode="after")
    def _warmup_within_steps(self) -> "SFTConfig":
        if self.warmup_steps >= self.max_steps:  # refused with the profile, not when the fine-tune starts
            raise ValueError(f"warmup_steps ({self.warmup_steps}) must be below max_steps ({self.max_steps})")
        return self


class EngineConfig(Section):
    """Where the data stages' per-shard work and the training run. Outputs are byte-identical on both
    engines; a training gives the same losses."""

    kind: Literal["local", "ray"] = Field(default="local", description="local: worker processes on this machine, no "
                                          "services; ray: Ray core tasks on a cluster (scratchllm[ray]).")
    address: str = Field(default="auto", description="Ray only. auto: the cluster started on this machine with "
                                                     "`ray start`; host:port: the head of a running cluster; local: "
                                                     "a private one-machine cluster started and stopped by the run.")
    cpus_per_task: float = Field(default=1.0, gt=0, description="Ray only: CPUs reserved by each shard task.")
    memory_per_task_gb: float | None = Field(default=None, gt=0,
                                             description="Ray only: memory reserved by each shard task (null: none).")
    max_task_retries: int = Field(default=3, ge=0, description="Ray only: reruns of a task whose worker died.")
    local_num_cpus: int | None = Field(default=None, ge=1,
                                       description="Ray, address local: CPUs of the private cluster (null: all).")
    cpus_per_worker: float = Field(default=1.0, gt=0, description="Ray only: CPUs of each training worker "
                                   "(training.num_processes workers on the cluster); its thread count.")
    gpus_per_worker: float | None = Field(default=None, ge=0, description="Ray only: GPUs of each training worker "
                                          "(null: 1 when the cluster has GPUs, else 0).")
    max_training_failures: int = Field(default=3, ge=0, description="Ray only: how often the training's workers are "
                                       "restarted after one of them (or its node) is lost; each restart resumes "
                                       "from the newest checkpoint. 0: the first loss fails the run.")

    @field_validator("address")
    @classmethod
    def _address(cls, v: str) -> str:
        if v in ("auto", "local"):
            return v
        host, _, port = v.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"must be 'auto', 'local' or host:port of a Ray head (e.g. 10.0.0.5:6379), got {v!r}")
        return v


class AutomationConfig(Section):
    retrain_cron: str = Field(default="0 3 * * 1", description="When the retrain schedule runs (cron, UTC).")
    retrain_schedule_enabled: bool = Field(default=False, description="Start the schedule with the code location.")
    new_data_sensor_enabled: bool = Field(default=False, description="Retrain when corpus.sources change.")
    new_data_interval_seconds: int = Field(default=300, ge=30, description="How often the sensor lists the sources.")
    retrain_mode: Literal["scratch", "continue"] = Field(
        default="scratch", description="The retrain job (schedule, new-data sensor): 'scratch' (random weights) or "
                                       "'continue' (from the champion).")

    @field_validator("retrain_cron")
    @classmethod
    def _cron(cls, v: str) -> str:
        fields = v.split()
        if len(fields) != 5 or not all(set(f) <= set("0123456789*/,-") for f in fields):
            raise ValueError(f"must be a 5-field cron expression like '0 3 * * 1', got {v!r}")
        return v


class TrackingConfig(Section):
    uri: str | None = Field(default=None, description="Where every MLflow call goes (runs, registry, artifacts): an "
                            "MLflow tracking server http(s)://host:port (artifacts through its proxy); null: "
                            "$MLFLOW_TRACKING_URI, else sqlite under data_dir. The server's user and password come "
                            "from MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD, never from a profile.")

    @field_validator("uri")
    @classmethod
    def _no_credentials(cls, v: str | None) -> str | None:
        if v is None:
            return v
        from urllib.parse import urlsplit

        parts = urlsplit(v)
        if parts.scheme not in ("http", "https", "sqlite", "postgresql", "mysql", "file"):
            raise ValueError(f"must be an MLflow tracking server (http://host:port) or a database URI, got {v!r}")
        if parts.password is not None or (parts.scheme in ("http", "https") and parts.username):
            raise ValueError("must not hold a user or password: set MLFLOW_TRACKING_USERNAME and "
                             "MLFLOW_TRACKING_PASSWORD in the environment instead (a profile is shared and logged)")
        return v


SWEEP_MODES = ("grid", "list")  # every combination, or the i-th values of every list together
SWEEPABLE_SECTIONS = ("model", "training")  # what a training reads: the data is shared


class ScratchConfig(Section):
    data_dir: str = Field(default="data/run", description="Where every stage writes; relative to the project root. "
                                                          "A local path: on a Ray cluster, a mount every node shares.")
    corpus: CorpusConfig = Field(default_factory=CorpusConfig)
    cleaning: CleaningConfig = Field(default_factory=CleaningConfig)
    dedup: DedupConfig = Field(default_factory=DedupConfig)
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig)
    dataset: DatasetConfig = Field(default_factory=DatasetConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    registry: RegistryConfig = Field(default_factory=RegistryConfig)
    sft: SFTConfig = Field(default_factory=SFTConfig)
    automation: AutomationConfig = Field(default_factory=AutomationConfig)
    engine: EngineConfig = Field(default_factory=EngineConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    sweep: dict[str, Any] = Field(default_factory=dict, description="Dotted fields -> lists of values: one training "
                                                                   "per variant (experiments/sweep.py); empty: none.")

    @field_validator("sweep")
    @classmethod
    def _sweep(cls, v: dict[str, Any]) -> dict[str, Any]:
        mode = v.get("mode", "grid")
        if mode not in SWEEP_MODES:
            raise ValueError(f"mode must be one of {list(SWEEP_MODES)}, got {mode!r}")
        fields = {k: values for k, values in v.items() if k not in ("name", "mode")}
        for field, values in fields.items():
            if "." not in field or field.split(".", 1)[0] not in SWEEPABLE_SECTIONS:
                raise ValueError(f"{field}: only fields of {', '.join(SWEEPABLE_SECTIONS)} can vary (e.g. "
                                 f"training.learning_rate); the data stages run once for every variant")
            if not isinstance(values, list) or not values:
                raise ValueError(f"{field}: must be a non-empty list of values, got {values!r}")
        if mode == "list" and len({len(values) for values in fields.values()}) > 1:
            raise ValueError("mode list needs lists of one length, got "
                             + ", ".join(f"{k}: {len(values)}" for k, values in fields.items()))
        return v

    @model_validator(mode="after")
    def _known_source_names(self) -> "ScratchConfig":
        """Names in training.mixture, its repetition caps and registry.protected_sources are sources."""
        names = list(self.corpus.named_sources())
        caps = self.training.mixture_max_repetitions
        fields = {"training.mixture": list(self.training.mixture or {}),
                  "registry.protected_sources": self.registry.protected_sources,
                  "training.mixture_max_repetitions": list(caps) if isinstance(caps, dict) else []}
        for field, used in fields.items():
            unknown = [n for n in used if n not in names]
            if unknown:
                raise ValueError(f"{field}: no source named {unknown[0]!r} in corpus.sources (sources: {names})")
        return self

    @model_validator(mode="after")
    def _sweep_variants(self) -> "ScratchConfig":
        """Every variant of the sweep is a valid config: refused here, before any work starts."""
        if self.sweep:
            variants(self)
        return self

    @field_validator("data_dir")
    @classmethod
    def _local_data_dir(cls, v: str) -> str:
        if "://" in v:
            raise ValueError(f"must be a local path (on a cluster: storage every node mounts at the same path, "
                             f"e.g. NFS); fsspec URIs are for corpus.sources only, got {v!r}")
        return v

    @property
    def data_path(self) -> Path:
        return resolve_path(self.data_dir)

    def identity(self, *sections: str) -> dict:
        """Some sections as plain values, without the fields that only schedule work (how many sweep
        variants train at once): what cache keys, training keys and data versions are made of."""
        values = self.model_dump(mode="json", include=set(sections), exclude=SCHEDULING_FIELDS)
        for section, fields in OMITTED_AT.items():
            for field, value in fields.items():
                if section in values and values[section].get(field) == value:
                    del values[section][field]
                    if field == "mixture":  # the repetition cap only matters with a mixture
                        values[section].pop("mixture_max_repetitions", None)
        return values

    def section_hash(self, *sections: str) -> str:
        """A short stable hash of some sections: part of cache keys and data versions."""
        return short_hash(self.identity(*sections))

    def config_hash(self) -> str:
        """The hash of every section (where the data lives, which engine made it and where it is tracked
        excepted: outputs are the same on every engine; and the chat fine-tune's section, which comes
        after): what a registered version was made with."""
        return self.section_hash(*(name for name in type(self).model_fields
                                   if name not in ("data_dir", "engine", "tracking", "sft")))


def training_tokens(cfg: ScratchConfig) -> int:
    """The tokens a training reads: steps x sequences per step (every rank, every micro-step) x block size."""
    t = cfg.training
    return t.max_steps * t.batch_size * t.grad_accum_steps * t.num_processes * cfg.model.block_size


def resolve_path(path: str) -> Path:
    """Absolute local path for `path`; relative paths are taken from the project root."""
    p = Path(os.path.expanduser(path))
    return p if p.is_absolute() else PROJECT_ROOT / p


def deep_merge(base: dict, override: dict) -> dict:
    """`override` merged into a copy of `base`: dicts merge key by key, anything else replaces."""
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"config profile not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a profile must be a mapping of sections, got {type(data).__name__}")
    return data


def validate_config(raw: dict[str, Any], origin: str = "config") -> ScratchConfig:
    """Validate a full (already merged) config dict; errors name every bad field."""
    try:
        return ScratchConfig.model_validate(raw)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            field = ".".join(str(part) for part in err["loc"]) or "(top level)"
            message = "unknown field" if err["type"] == "extra_forbidden" else err["msg"]
            if err["type"] == "literal_error":  # "Input should be 'a' or 'b'": and what it was
                message += f", got {err['input']!r}"
            problems.append(f"  {field}: {message}")
        raise ConfigError(f"invalid {origin}:\n" + "\n".join(problems)) from None


def find_profile(profile: str | Path) -> Path:
    """The file a profile names: an absolute path; a relative one in the working directory, else in the
    project's assets_config/ (`--config ci.yaml`, `--config sweeps/size_ladder`), else in the project
    (`--config assets_config/ci.yaml` from anywhere); ConfigError if none has it."""
    path = Path(profile).expanduser()
    if path.is_absolute():
        candidates = [path]
    else:
        candidates = [Path.cwd() / path, CONFIG_DIR / path, PROJECT_ROOT / path]
        if not path.suffix:
            candidates.append(CONFIG_DIR / path.with_suffix(".yaml"))
    for candidate in candidates:
        if candidate.is_file():
            return candidate.resolve()
    raise ConfigError(f"config profile not found: {profile} (looked at {', '.join(map(str, candidates))})")


def active_profile_path() -> Path | None:
    """The profile chosen by SCRATCHLLM_CONFIG, or None for the default."""
    value = os.environ.get(CONFIG_ENV_VAR)
    return find_profile(value) if value else None


def profile_values(profile: str | Path | None = None) -> tuple[dict, str]:
    """(`default.yaml` deep-merged with a profile (argument, else $SCRATCHLLM_CONFIG), where it came
    from): the raw values of a profile, read once, not validated yet."""
    raw = _read_yaml(DEFAULT_PROFILE)
    origin = str(DEFAULT_PROFILE)
    path = find_profile(profile) if profile else active_profile_path()
    if path is not None and path != DEFAULT_PROFILE:
        raw = deep_merge(raw, _read_yaml(path))
        origin = str(path)
    return raw, origin


def load_config(profile: str | Path | None = None, overrides: dict | None = None) -> ScratchConfig:
    """Load `default.yaml`, deep-merge a profile (argument, else $SCRATCHLLM_CONFIG) and overrides, validate."""
    raw, origin = profile_values(profile)
    return validate_config(deep_merge(raw, overrides or {}), origin)


def changed_values(new: dict, old: dict) -> dict:
    """The part of `new` that differs from `old`, nested dicts compared key by key."""
    changed = {}
    for key, value in new.items():
        if isinstance(value, dict) and isinstance(old.get(key), dict):
            if inner := changed_values(value, old[key]):
                changed[key] = inner
        elif key not in old or old[key] != value:
            changed[key] = value
    return changed


# ---------------------------------------------------------------------------------------------
# sweeps: the variants of a profile (the grammar only; llm_core/experiments/sweep.py trains them)


@dataclasses.dataclass
class Variant:
    name: str  # "v0", "v1", ... in sweep order
    values: dict[str, Any]  # dotted field -> value
    config: ScratchConfig  # the profile with these values, without its sweep section

    @property
    def label(self) -> str:
        """e.g. "training.learning_rate=0.001, model.n_layer=2"."""
        return ", ".join(f"{k}={v}" for k, v in self.values.items()) or "the profile as it is"


def swept_fields(cfg: ScratchConfig) -> dict[str, list]:
    return {k: v for k, v in cfg.sweep.items() if k not in ("name", "mode")}


def sweep_name(cfg: ScratchConfig) -> str:
    return cfg.sweep.get("name") or "sweep-" + "-".join(f.rsplit(".", 1)[-1] for f in swept_fields(cfg))


def _nested(dotted: str, value: Any) -> dict:
    out: Any = value
    for part in reversed(dotted.split(".")):
        out = {part: out}
    return out


def variants(cfg: ScratchConfig) -> list[Variant]:
    """The variants of a config's sweep, each validated; without a sweep, one variant: the config."""
    fields = swept_fields(cfg)
    base = cfg.model_dump(mode="json", exclude={"sweep"})
    if not fields:
        return [Variant("v0", {}, validate_config(base))]
    rows = itertools.product(*fields.values()) if cfg.sweep.get("mode", "grid") == "grid" else zip(*fields.values())
    out = []
    for i, row in enumerate(rows):
        values = dict(zip(fields, row))
        for field in values:
            if not _has_field(cfg, field):
                raise ConfigError(f"sweep.{field}: no such config field")
        merged = base
        for field, value in values.items():
            merged = deep_merge(merged, _nested(field, value))
        label = ", ".join(f"{k}={v}" for k, v in values.items())
        out.append(Variant(f"v{i}", values, validate_config(merged, f"sweep variant v{i} ({label})")))
    return out


def _has_field(cfg: ScratchConfig, dotted: str) -> bool:
    section, _, source = dotted.partition(".mixture.")
    if section == "training" and source:  # one source's weight
        return source in cfg.corpus.named_sources()
    node: Any = cfg
    for part in dotted.split("."):
        if not hasattr(node, "model_fields") or part not in type(node).model_fields:
            return False
        node = getattr(node, part)
    return True
