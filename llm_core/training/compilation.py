"""`training.compile: auto | true | false`: whether a training runs torch.compile'd, decided from
measurements, with inductor's compiled kernels cached under data_dir.

`auto` compiles when it pays for this run: the step time it saves times the steps left must exceed
the time compiling takes. Both come from a record of this shape (model, batch, precision, device,
torch) measured once on this machine, in data_dir/compile_cache/records.json. Without a record, a
run too short to pay even at the best saving seen (COMPILE_BEST_SAVING of the step) against a typical
compile (ESTIMATED_COMPILE_SECONDS) stays eager on that estimate; a longer one measures first: one
eager and one compiled step of a fresh model (the compile fills the cache, so the training's own
compile is then a cache hit), and decides on the numbers. The decision, and why, is written in the run
directory once (every rank and every resume of the run use it) and reported with the run.

Without a C++ compiler (inductor builds its CPU kernels with one) the training stays eager, saying so.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import torch

from llm_core.files import read_json, short_hash, write_json
from llm_core.model import ModelArgs, Transformer

COMPILE_FILE = "compile.json"  # in the run directory: this run's decision
CACHE_DIR = "compile_cache"  # under data_dir: inductor's cache and the records of measured shapes
ESTIMATED_COMPILE_SECONDS = 60.0  # a first compile of a small model on 2 CPU cores took 25-90 s here
COMPILE_BEST_SAVING = 0.6  # the largest share of a step compiling has saved here (bf16, 2.6x)


def cpp_compiler() -> str | None:
    """The C++ compiler inductor would use on CPU ($CXX, else g++, c++ or clang++ on PATH)."""
    for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def use_cache(data_path: Path) -> Path:
    """Point inductor's cache at data_dir (before anything compiles): a resume, a retrain or the next sweep
    variant of the same shape reuses the kernels compiled before."""
    cache = Path(data_path) / CACHE_DIR / "inductor"
    cache.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache)
    return cache


def shape_key(args: ModelArgs, batch_size: int, precision: str, device: str) -> str:
    return short_hash([vars(args), batch_size, precision, device, torch.__version__])


def _step(model: torch.nn.Module, x: torch.Tensor, autocast: bool, device: str) -> float:
    start = time.perf_counter()
    with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
        _, loss = model(x, x)
    loss.backward()
    model.zero_grad(set_to_none=True)
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def measure(args: ModelArgs, batch_size: int, precision: str, device: str, eager_step: float,
            repeats: int = 3) -> dict:
    """Compiled step seconds of a fresh model (forward + backward, best of `repeats`) and the seconds the
    first compiled step took beyond a compiled step: the compile; with `eager_step` (measure_eager)."""
    x = torch.randint(0, args.vocab_size, (batch_size, args.block_size), device=device)
    compiled = torch.compile(Transformer(args).to(device))
    first = _step(compiled, x, precision == "bf16", device)
    compiled_step = min(_step(compiled, x, precision == "bf16", device) for _ in range(repeats))
    torch._dynamo.reset()  # the training compiles its own model (from the cache this filled)
    return {"eager_step_seconds": eager_step, "compiled_step_seconds": compiled_step,
            "compile_seconds": max(first - compiled_step, 0.0)}


def rule(record: dict, steps_left: int) -> tuple[bool, str]:
    """Compile when the measured saving over the steps left exceeds the compile time."""
    saving = (record["eager_step_seconds"] - record["compiled_step_seconds"]) * steps_left
    cost = record.get("warm_compile_seconds", record["compile_seconds"])
    numbers = (f"{record['eager_step_seconds'] * 1e3:.1f} ms eager vs {record['compiled_step_seconds'] * 1e3:.1f} ms "
               f"compiled a step, x {steps_left} steps = {saving:.1f} s saved vs {cost:.1f} s compiling (measured)")
    return saving > cost, ("compiles: " if saving > cost else "eager: ") + numbers


def decide(mode: bool | str, args: ModelArgs, batch_size: int, precision: str, device: str, steps_left: int,
           data_path: Path, log=print) -> dict:
    """{"compiled", "why", and the timings it went by} for a training of `steps_left` steps."""
    if mode is False:
        return {"compiled": False, "why": "training.compile: false"}
    if device == "cpu" and cpp_compiler() is None:
        return {"compiled": False, "why": "eager: no C++ compiler (inductor needs g++ or clang++ on CPU; set $CXX)"}
    if mode is True:
        return {"compiled": True, "why": "training.compile: true"}
    records_path = Path(data_path) / CACHE_DIR / "records.json"
    key = shape_key(args, batch_size, precision, device)
    record = read_json(records_path).get(key)
    if record is None:
        eager_step = measure_eager(args, batch_size, precision, device)
        best_saving = COMPILE_BEST_SAVING * eager_step * steps_left
        if best_saving < ESTIMATED_COMPILE_SECONDS:
            return {"compiled": False, "eager_step_seconds": eager_step,
                    "why": f"eager: too short to pay: at best {best_saving:.1f} s saved ({COMPILE_BEST_SAVING:.0%} of "
                           f"{eager_step * 1e3:.1f} ms x {steps_left} steps) vs ~{ESTIMATED_COMPILE_SECONDS:.0f} s "
                           f"compiling (estimated)"}
        log(f"training.compile: auto: measuring a compiled step of this shape once ({steps_left} steps could repay "
            f"~{ESTIMATED_COMPILE_SECONDS:.0f} s of compiling)")
        record = measure(args, batch_size, precision, device, eager_step)
        records = read_json(records_path)
        records[key] = record
        write_json(records_path, records)
    compiled, why = rule(record, steps_left)
    return {"compiled": compiled, "why": why, **record}


def measure_eager(args: ModelArgs, batch_size: int, precision: str, device: str, repeats: int = 2) -> float:
    """Eager step seconds of a fresh model: the best of `repeats` after a warm-up."""
    x = torch.randint(0, args.vocab_size, (batch_size, args.block_size), device=device)
    model = Transformer(args).to(device)
    _step(model, x, precision == "bf16", device)
    return min(_step(model, x, precision == "bf16", device) for _ in range(repeats))


def remember_warm_compile(data_path: Path, key: str, seconds: float) -> None:
    """What compiling took with the cache warm (the training's own compile): what a next run pays."""
    records_path = Path(data_path) / CACHE_DIR / "records.json"
    records = read_json(records_path)
    if key in records:
        records[key]["warm_compile_seconds"] = seconds
        write_json(records_path, records)
