"""Train the model with `accelerate`: alone, or one process per rank.

    python -m llm_core.training.train --config assets_config/ci.yaml
    accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no \\
        --dynamo_backend no -m llm_core.training.train --config assets_config/ci.yaml     # 2 CPU ranks (gloo)

Everything a run needs to continue after a kill is in `out_dir/checkpoints/step_N`: weights
(safetensors), optimizer, scheduler, RNG states, the loader position and the metric history
(TrainingProgress). A new run with the same out_dir resumes from the newest checkpoint that loads
(llm_core/training/checkpoint.py) and follows the same loss curve as a run that was never stopped: a batch
is a pure function of (seed, step), see llm_core/training/loader.py.

A non-finite loss or weights stop the training at once (TrainingDiverged, and `diverged.json`, see
llm_core/training/health.py); no checkpoint of non-finite weights is ever saved.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import time
from pathlib import Path
from typing import Callable

import torch

from llm_core.training import health, model_source
from llm_core.training.checkpoint import checkpoint_dirs, checkpoint_step, resume, save_checkpoint, save_final
from llm_core.model_files import model_config
from llm_core.config import ScratchConfig, load_config, validate_config
from llm_core.files import read_json, write_json
from llm_core.layout import DATASET_DIR, MODEL_DIR, MODEL_TOKENIZER_SUBDIR, TOKENIZER_DIR
from llm_core.training.loader import PackedRows, TokenWindows, is_sft_dataset, sequential_batches
from llm_core.training import compilation
from llm_core.training.mixture import check_mixture
from llm_core.training.muon import BatchedMuon
from llm_core.faults import hold_point
from llm_core.model import ModelArgs, Transformer
from llm_core.training.performance import (PeakMemory, available_cores, choose_precision, hardware,
                                           measure_peak_flops, mfu)

# ---------------------------------------------------------------------------------------------
# pieces


def model_args(cfg: ScratchConfig, vocab_size: int) -> ModelArgs:
    m = cfg.model
    return ModelArgs(vocab_size=vocab_size, n_layer=m.n_layer, n_head=m.n_head, n_kv_head=m.n_kv_head,
                     n_embd=m.n_embd, block_size=m.block_size, tie_embeddings=m.tie_embeddings,
                     rope_theta=m.rope_theta, norm_eps=m.norm_eps, dropout=m.dropout,
                     fused_projections=m.fused_projections, qk_norm=m.qk_norm, mlp=m.mlp,
                     zero_init_output=m.zero_init_output)


def lr_at(step: int, cfg: ScratchConfig) -> float:
    """Learning-rate multiplier at an optimizer step: linear warmup, then cosine or WSD decay."""
    t = cfg.training
    if step < t.warmup:
        return (step + 1) / t.warmup
    if t.lr_schedule == "cosine":
        progress = (step - t.warmup) / max(t.max_steps - t.warmup, 1)
        return t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    decay_start = t.max_steps - int(t.wsd_decay_fraction * t.max_steps)  # warmup-stable-decay
    if step < decay_start:
        return 1.0
    return 1.0 - (1 - t.min_lr_ratio) * (step - decay_start) / max(t.max_steps - decay_start, 1)


def to_device(device: torch.device, *tensors: torch.Tensor) -> list[torch.Tensor]:
    """CPU batches onto the training device; to a GPU through pinned memory, so the copy is
    asynchronous and overlaps the previous step's kernels."""
    if device.type != "cuda":
        return list(tensors)
    return [t.pin_memory().to(device, non_blocking=True) for t in tensors]


def use_tensor_cores(device: torch.device) -> None:
    """fp32 matrix products in TF32 on GPUs that have it (Ampere and later): ~8x the fp32 rate at
    the precision training needs (nanoGPT and torchtitan do the same); bf16 autocast is unaffected."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def make_optimizers(model: torch.nn.Module, cfg: ScratchConfig) -> list[torch.optim.Optimizer]:
    """[AdamW] (weight decay on matrices only, not on norm gains, as in GPT-2/Llama training), or with
    `training.optimizer: muon` [AdamW, Muon]: Muon (torch.optim.Muon's algorithm, batched by shape: muon.py)
    takes 2D matrices only and is meant for the hidden ones (attention and MLP projections); the
    embeddings, the head and the gains stay on AdamW. Each optimizer has its own learning rate under the
    same schedule; Muon's matrices are not decayed (as in the speedrun recipes it comes from)."""
    t = cfg.training
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    hidden = [p for name, p in named if t.optimizer == "muon" and p.dim() == 2 and name.startswith("layers.")]
    hidden_ids = {id(p) for p in hidden}
    rest = [p for _, p in named if id(p) not in hidden_ids]
    adamw = torch.optim.AdamW([{"params": [p for p in rest if p.dim() >= 2], "weight_decay": t.weight_decay},
                               {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0}],
                              lr=t.learning_rate, betas=(t.beta1, t.beta2),
                              fused=True)  # one kernel for all parameters (CPU and GPU): 5x faster here
    if not hidden:
        return [adamw]
    return [adamw, BatchedMuon(hidden, lr=t.muon_learning_rate, momentum=t.muon_momentum, weight_decay=0.0,
                               ns_steps=t.muon_ns_steps)]


PRECISION_FILE = "precision.json"


def step_timer(args: ModelArgs, batch_size: int) -> Callable[[torch.dtype], float]:
    """seconds(dtype): one forward + backward of one fresh model of `args` on one random batch on CPU,
    with bf16 autocast when `dtype` is bf16: what a precision costs this model here. The first call of
    each precision warms it up first (untimed); later calls reuse the model."""
    model = Transformer(args)
    x = torch.randint(0, args.vocab_size, (batch_size, args.block_size))
    warmed: set[torch.dtype] = set()

    def step(dtype: torch.dtype) -> float:
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            _, loss = model(x, x)
        loss.backward()
        model.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    def seconds(dtype: torch.dtype) -> float:
        if dtype not in warmed:
            step(dtype)
            warmed.add(dtype)
        return step(dtype)

    return seconds


def decided_once(path: Path, decide: Callable[[], dict], timeout: float) -> dict:
    """A decision of the run's first rank (written to `path` in the run directory) that every rank and
    every resume of the run takes as it is."""
    if not path.exists() and int(os.environ.get("RANK", "0")) == 0:
        write_json(path, decide())
    deadline = time.monotonic() + timeout
    while not path.exists():  # another rank: the first one is measuring
        if time.monotonic() > deadline:
            raise RuntimeError(f"rank {os.environ.get('RANK')}: no {path} from the first rank after {timeout:.0f} s")
        time.sleep(0.1)
    return read_json(path)


def training_precision(cfg: ScratchConfig, out_dir: Path, device: torch.device) -> tuple[str, str]:
    """(precision, why): `training.mixed_precision`, with `auto` decided once per run by the first rank
    (performance.choose_precision)."""
    t = cfg.training
    if t.mixed_precision != "auto":
        return t.mixed_precision, "as configured"

    def measured() -> dict:
        args = model_args(cfg, cfg.tokenizer.vocab_size)
        precision, why = choose_precision("auto", device, step_timer(args, t.batch_size))
        return {"mixed_precision": precision, "why": f"auto: {why}"}

    decided = decided_once(out_dir / PRECISION_FILE, measured, timeout=120)
    return decided["mixed_precision"], decided["why"]


def accelerator_state_for(precision: str) -> None:
    """accelerate keeps one AcceleratorState per process and refuses a second precision in it ("restart
    your runtime"). A process that trains more than once (a notebook, a sweep run in-process, the test
    suite) may train in another precision next, e.g. fp32 and then `auto` choosing bf16: the earlier
    training is over, so its state is dropped (the process group, in PartialState, stays)."""
    from accelerate.state import AcceleratorState

    state = AcceleratorState._shared_state
    if state and state.get("_mixed_precision") != precision:
        AcceleratorState._reset_state(reset_partial_state=False)


def compile_choice(cfg: ScratchConfig, out_dir: Path, args: ModelArgs, precision: str, device: torch.device,
                   log: Callable[[str], None]) -> dict:
    """training.compile decided once per run (llm_core/training/compilation.py), by the first rank."""
    def measured() -> dict:
        return compilation.decide(cfg.training.compile, args, cfg.training.batch_size, precision, device.type,
                              cfg.training.max_steps, cfg.data_path, log)

    return decided_once(out_dir / compilation.COMPILE_FILE, measured, timeout=1800)  # a first compile takes minutes


class TrainingDiverged(RuntimeError):
    """A non-finite loss or non-finite weights: the run cannot continue, and retrying would repeat it."""


def stop_diverged(accelerator, out_dir: Path, step: int, what: str, history: list[dict]) -> None:
    """Record the divergence with the last steps of the history (main rank) and raise TrainingDiverged
    on every rank. Every rank gets here at the same step: they all see the same reduced loss."""
    good = checkpoint_dirs(out_dir)
    last_good = (f"the last good checkpoint is {good[-1]} (step {checkpoint_step(good[-1])})" if good
                 else "no checkpoint was saved before it")
    message = (f"training diverged at step {step}: {what}; {last_good}. Lower training.learning_rate "
               f"(or lengthen the warmup) and train again")
    if accelerator.is_main_process:
        health.record_divergence(out_dir, step, message, {
            "what": what, "last_good_checkpoint": str(good[-1]) if good else None,
            "recent_history": [{k: str(v) if isinstance(v, float) and not math.isfinite(v) else v
                                for k, v in h.items()} for h in history[-10:]]})
    accelerator.wait_for_everyone()  # the record is written before any rank exits (the launcher stops the rest)
    raise TrainingDiverged(message)


def weights_finite(model, accelerator) -> bool:
    """Every parameter finite on every rank (each checks its own shard under FSDP / ZeRO)."""
    bad = sum(int((~torch.isfinite(p.detach())).any()) for p in model.parameters())
    return not float(accelerator.reduce(torch.tensor(float(bad), device=accelerator.device), "sum"))


def progress_every(cfg: ScratchConfig) -> int:
    """Steps between printed step lines: at most ~20 per run, on steps whose throughput is measured
    (a multiple of log_interval)."""
    t = cfg.training
    return t.log_interval * -(-t.max_steps // (20 * t.log_interval))  # ceil: never more than 20


def format_duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


class TrainingProgress:
    """Where the loop is besides the model and optimizer: the loader position and the metric history.
    Saved in every checkpoint with `register_for_checkpointing` (by position, not by class name)."""

    def __init__(self, loader: TokenWindows | PackedRows):
        self.loader = loader
        self.history: list[dict] = []

    def state_dict(self) -> dict:
        return {"loader": self.loader.state_dict(), "history": self.history}

    def load_state_dict(self, state: dict) -> None:
        self.loader.load_state_dict(state["loader"])
        self.history = list(state["history"])


@dataclasses.dataclass
class TrainResult:
    num_parameters: int
    final_train_loss: float
    final_val_loss: float  # on eval_batches, as every periodic evaluation (model_evaluation scores the final model)
    tokens_per_second: float
    train_seconds: float
    world_size: int
    mfu: float
    steps: int
    resumed_from_step: int
    peak_memory_mb: float  # of the main rank, see PeakMemory; `scratchllm plan` estimates it
    peak_flops: float  # the MFU denominator: training.peak_flops, else the best GEMM measured in the training precision
    hardware: str  # what trained (the model card says it)
    mixed_precision: str  # what the training ran in (`auto` decided once per run, see training_precision)
    tokens_per_source: dict[str, int]  # trained tokens per corpus source (every rank's), see TokenWindows
    compile: dict  # training.compile's decision, why, and the timings: see compile_report
    history: list[dict]
    out_dir: Path

    def summary(self) -> dict:
        """training_summary.json: every field but out_dir (the directory it is written in)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "out_dir"}


# What one start of a run measured (a resume measures again): first and median step, what compiling took,
# and inductor's cache hits and misses (a warm cache compiles from disk).
ATTEMPT_TIMINGS = ("first_step_seconds", "median_step_seconds", "this_compile_seconds", "cache_hits", "cache_misses")


def compile_report(decision: dict, step_times: list[float], cfg: ScratchConfig, args: ModelArgs, precision: str,
                   device: torch.device) -> dict:
    """The decision with what this attempt measured: its first step (compiling, when compiled) against its
    median step. A compiled run's first step beyond the median is what compiling cost with the cache as
    it was: remembered as the warm compile time of the shape."""
    report = dict(decision)
    if len(step_times) >= 3:
        median = sorted(step_times[1:])[len(step_times[1:]) // 2]
        report.update(first_step_seconds=step_times[0], median_step_seconds=median)
        if decision["compiled"]:
            from torch._dynamo.utils import counters

            report["this_compile_seconds"] = max(step_times[0] - median, 0.0)
            report.update(cache_hits=counters["inductor"]["fxgraph_cache_hit"],
                          cache_misses=counters["inductor"]["fxgraph_cache_miss"])
            key = compilation.shape_key(args, cfg.training.batch_size, precision, device.type)
            compilation.remember_warm_compile(cfg.data_path, key, report["this_compile_seconds"])
    return report


def evaluate_loss(model, dataset_dir: Path, cfg: ScratchConfig, accelerator,
                  max_batches: int | None) -> tuple[float, int]:
    """(mean loss per token, tokens scored) over the validation split, or its first `max_batches`
    batches per rank; each rank scores a slice, the sums are reduced across ranks."""
    model.eval()
    total = torch.zeros(2, dtype=torch.float64)  # (sum of token losses, number of tokens)
    batches = sequential_batches(dataset_dir, "val", cfg.model.block_size, cfg.training.batch_size,
                                 accelerator.process_index, accelerator.num_processes)
    with torch.no_grad(), accelerator.autocast():
        for i, (x, y) in enumerate(batches):
            if max_batches is not None and i >= max_batches:
                break
            _, loss = model(*to_device(accelerator.device, x, y))
            n = int((y != -100).sum())
            total += torch.tensor([float(loss) * n, n], dtype=torch.float64)
    total = accelerator.reduce(total.to(accelerator.device), reduction="sum").cpu()
    model.train()
    return float(total[0] / max(total[1], 1)), int(total[1])


# ---------------------------------------------------------------------------------------------
# the training loop


def train(cfg: ScratchConfig, out_dir: Path, log: Callable[[str], None] = print,
          on_metrics: Callable[[int, dict], None] | None = None,
          on_step: Callable[[int], None] | None = None, dataset_dir: Path | None = None) -> TrainResult:
    """Train (or resume) into out_dir. `on_metrics(step, metrics)` is called on the main rank,
    `on_step(step)` on every rank once the step (and its checkpoint, if any) is done. `dataset_dir`: the
    tokenized dataset (default: the profile's), or an sft_dataset for a chat fine-tune (its packed rows,
    the loss on the assistant's tokens only; llm_core/chat/sft_dataset.py)."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    t = cfg.training
    out_dir = Path(out_dir)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    use_tensor_cores(device)
    precision, why = training_precision(cfg, out_dir, device)
    accelerator_state_for(precision)
    accelerator = Accelerator(gradient_accumulation_steps=t.grad_accum_steps, mixed_precision=precision,
                              step_scheduler_with_optimizer=False,
                              cpu=not torch.cuda.is_available())  # several CPU ranks: gloo
    if accelerator.num_processes != t.num_processes:
        raise RuntimeError(f"started with {accelerator.num_processes} processes but training.num_processes is "
                           f"{t.num_processes}: launch with `accelerate launch --num_processes {t.num_processes}`")
    main = accelerator.is_main_process
    if "OMP_NUM_THREADS" not in os.environ and accelerator.device.type == "cpu":
        torch.set_num_threads(max(1, available_cores() // accelerator.num_processes))
    dataset_dir = Path(dataset_dir or cfg.data_path / DATASET_DIR)
    manifest = read_json(dataset_dir / "manifest.json")
    if not manifest:
        raise FileNotFoundError(f"no tokenized dataset under {dataset_dir}: materialize `tokenized_dataset` first")
    chat = is_sft_dataset(dataset_dir)
    tokenizer_dir = dataset_dir / MODEL_TOKENIZER_SUBDIR if chat else cfg.data_path / TOKENIZER_DIR

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    peak_flops = t.peak_flops or (measure_peak_flops(dtype, device.type) if main else 1.0)  # before PeakMemory
    memory = PeakMemory(accelerator.device)
    set_seed(t.seed)  # the same initial weights on every rank
    args = model_args(cfg, manifest["vocab_size"])
    model = Transformer(args)
    warm = model_source.resolve_init_from(cfg)
    if warm:  # the weights only: the optimizer, the step and the schedule start fresh
        model_source.check_compatible(warm, args, tokenizer_dir, cfg)
        model_source.load_initial_weights(model, warm)
    model.activation_checkpointing = t.activation_checkpointing
    num_params = model.num_parameters()
    optimizers = make_optimizers(model, cfg)
    # Not prepared: accelerate would step a prepared scheduler once per process.
    schedulers = [torch.optim.lr_scheduler.LambdaLR(o, lambda step: lr_at(step, cfg)) for o in optimizers]
    # Each optimizer prepared on its own: accelerate then skips, scales and checkpoints every one of them.
    model, *optimizers = accelerator.prepare(model, *optimizers)
    compiling = compile_choice(cfg, out_dir, args, precision, device, log if main else lambda message: None)
    if compiling["compiled"]:
        compilation.use_cache(cfg.data_path)
        model = torch.compile(model)
    if t.mixture:
        check_mixture(cfg)  # on every rank, before the first step (the asset checked it before launching)
    if chat:
        loader = PackedRows(dataset_dir, "train", t.batch_size, t.seed, accelerator.process_index,
                            accelerator.num_processes)
    else:
        loader = TokenWindows(dataset_dir, "train", args.block_size, t.batch_size, t.seed,
                              accelerator.process_index, accelerator.num_processes, cfg.dataset.packing, t.mixture)
    progress = TrainingProgress(loader)
    accelerator.register_for_checkpointing(*schedulers, progress)

    if main:
        health.clear_divergence(out_dir)  # this attempt writes its own record if it diverges
    start_step = resume(accelerator, out_dir, log if main else lambda message: None)

    flops_per_token = accelerator.unwrap_model(model).flops_per_token()
    tokens_per_step = t.batch_size * args.block_size * t.grad_accum_steps * accelerator.num_processes
    if main:
        log(f"training {num_params / 1e6:.2f}M parameters on {accelerator.num_processes} process(es), "
            f"{tokens_per_step} tokens/step, steps {start_step}..{t.max_steps}, precision {precision} ({why}); "
            f"MFU against {peak_flops / 1e9:.0f} GFLOP/s, "
            + ("training.peak_flops" if t.peak_flops else f"the best {dtype} GEMM measured here")
            + f"; {'compiled' if compiling['compiled'] else 'eager'} ({compiling['why']})"
            + (f"; warm start from {warm.spec} ({warm.model_dir})" if warm else ""))

    model.train()
    # Throughput counts the training steps only: evaluations and checkpoints run between them.
    train_seconds, window_seconds, window_tokens = 0.0, 0.0, 0
    loop_start, print_every = time.perf_counter(), progress_every(cfg)
    last_loss = float("nan")
    val_loss = float("nan")
    step_times: list[float] = []  # of the training steps: the first one of a compiled model includes compiling
    iterator = iter(loader)
    for step in range(start_step, t.max_steps):
        step_start = time.perf_counter()
        step_loss = torch.zeros((), device=accelerator.device)
        for _ in range(t.grad_accum_steps):
            x, y = next(iterator)
            with accelerator.accumulate(model):
                with accelerator.autocast():
                    _, loss = model(*to_device(accelerator.device, x, y))
                accelerator.backward(loss)
                if accelerator.sync_gradients and t.grad_clip > 0:
                    accelerator.clip_grad_norm_(model.parameters(), t.grad_clip)
                for optimizer in optimizers:
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
            step_loss += loss.detach() / t.grad_accum_steps
        for scheduler in schedulers:
            scheduler.step()
        last_loss = float(accelerator.reduce(step_loss, reduction="mean"))  # the global batch's loss
        step_times.append(time.perf_counter() - step_start)
        train_seconds += step_times[-1]
        window_seconds += step_times[-1]
        window_tokens += tokens_per_step
        done = step + 1
        metrics = {"train_loss": last_loss, "lr": schedulers[0].get_last_lr()[0]}
        if not math.isfinite(last_loss):
            stop_diverged(accelerator, out_dir, done, f"the train loss is {last_loss}",
                          progress.history + [{"step": done, **metrics}])

        if done % t.eval_interval == 0 or done == t.max_steps:
            # Short (eval_batches) to the end: model_evaluation scores the final model once, in full.
            val_loss, _ = evaluate_loss(model, dataset_dir, cfg, accelerator, t.eval_batches)
            metrics["val_loss"] = val_loss
            if not math.isfinite(val_loss):
                stop_diverged(accelerator, out_dir, done, f"the validation loss is {val_loss}",
                              progress.history + [{"step": done, **metrics}])
        if done % t.log_interval == 0 or done == t.max_steps or "val_loss" in metrics:
            metrics["tokens_per_second"] = window_tokens / max(window_seconds, 1e-9)
            metrics["mfu"] = mfu(metrics["tokens_per_second"], flops_per_token, peak_flops)
            window_seconds, window_tokens = 0.0, 0
        # The first step, ~20 lines over the run, every evaluation and the last step.
        if main and (done == start_step + 1 or done % print_every == 0 or "val_loss" in metrics
                     or done == t.max_steps):
            seconds_per_step = (time.perf_counter() - loop_start) / (done - start_step)
            log(f"step {done}/{t.max_steps} ({done / t.max_steps:.0%}) loss {last_loss:.4f} lr {metrics['lr']:.2e}"
                + (f" {metrics['tokens_per_second']:.0f} tok/s mfu {metrics['mfu']:.1%}"
                   if "tokens_per_second" in metrics else "")
                + (f" val {metrics['val_loss']:.4f}" if "val_loss" in metrics else "")
                + (f" ETA {format_duration(seconds_per_step * (t.max_steps - done))}" if done < t.max_steps else ""))
        progress.history.append({"step": done, **metrics})
        if main and on_metrics:
            on_metrics(done, metrics)
        if done % t.checkpoint_interval == 0 or done == t.max_steps:
            if not weights_finite(model, accelerator):  # never save (nor resume from) non-finite weights
                stop_diverged(accelerator, out_dir, done, "the weights are not finite", progress.history)
            save_checkpoint(accelerator, out_dir, done, model_config(args, cfg))
        if on_step:
            on_step(done)

    if start_step >= t.max_steps and progress.history:  # nothing left to do: report the finished run
        last_loss = progress.history[-1]["train_loss"]
        val_loss = next((h["val_loss"] for h in reversed(progress.history) if "val_loss" in h), float("nan"))
    accelerator.wait_for_everyone()
    measured = sorted(h["tokens_per_second"] for h in progress.history if "tokens_per_second" in h)
    median_tokens_per_second = measured[len(measured) // 2] if measured else 0.0
    result = TrainResult(
        num_parameters=num_params, final_train_loss=last_loss, final_val_loss=val_loss,
        tokens_per_second=median_tokens_per_second,
        train_seconds=train_seconds, world_size=accelerator.num_processes,
        mfu=mfu(median_tokens_per_second, flops_per_token, peak_flops),
        steps=t.max_steps, resumed_from_step=start_step, peak_memory_mb=memory.peak_mb(), peak_flops=peak_flops,
        mixed_precision=precision, hardware=hardware(accelerator.device, accelerator.num_processes),
        tokens_per_source=loader.tokens_per_source(t.max_steps * t.grad_accum_steps) if main else {},
        compile=compile_report(compiling, step_times, cfg, args, precision, device) if main else compiling,
        history=progress.history, out_dir=out_dir)
    # The full weights: gathered from the shards under FSDP / ZeRO-3 (every rank takes part).
    state = accelerator.get_state_dict(model)
    if main:
        final = Transformer(args)
        # A compiled model's state dict names its weights `_orig_mod.*`.
        final.load_state_dict({k.removeprefix("_orig_mod."): v for k, v in state.items()})
        save_final(final, cfg, out_dir, result.summary())
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return result


def command_line(argv: list[str] | None, description: str) -> tuple[ScratchConfig, Path, str | None]:
    """(config, out_dir, dataset_dir or None) from `--config` or `--resolved-config`, `--out-dir`, `--dataset-dir`."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", help="YAML profile (deep-merged over default.yaml)")
    parser.add_argument("--resolved-config", help="a full config as JSON (what the Dagster asset passes)")
    parser.add_argument("--out-dir", help="default: <data_dir>/trained_model")
    parser.add_argument("--dataset-dir", help="default: <data_dir>/tokenized_dataset; an sft_dataset: a chat fine-tune")
    a = parser.parse_args(argv)
    cfg = validate_config(json.loads(Path(a.resolved_config).read_text())) if a.resolved_config \
        else load_config(a.config)
    return cfg, Path(a.out_dir) if a.out_dir else cfg.data_path / MODEL_DIR, a.dataset_dir


def main(argv: list[str] | None = None) -> None:
    # tests kill a training here, after a step and its checkpoint (llm_core/faults.py)
    cfg, out_dir, dataset_dir = command_line(argv, __doc__.split("\n")[0])
    train(cfg, out_dir, on_step=lambda step: hold_point(f"train_step:{step}"), dataset_dir=dataset_dir)


if __name__ == "__main__":
    main()
