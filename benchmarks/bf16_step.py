"""What a bf16 training step costs on this CPU against fp32, and where the time goes.

    python benchmarks/bf16_step.py [--config assets_config/default.yaml] [--repeats 30] [--profile]

The profile's model and batch, forward + backward in one process: fp32, bf16 autocast with attention in
bf16 (plain SDPA), and bf16 autocast as the model runs it (attention in fp32 on a CPU, see `attention` in
llm_core/model.py); medians of `repeats`, the three interleaved so that the machine's drift hits each alike.
With --profile, torch.profiler's top operators of 10 steps in fp32 and in bf16 with bf16 attention.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import llm_core.model as model_module  # noqa: E402
from llm_core.config import load_config  # noqa: E402
from llm_core.training.train import model_args  # noqa: E402

VARIANTS = {"fp32": (False, model_module.attention), "bf16, attention in bf16": (True, F.scaled_dot_product_attention),
            "bf16, attention in fp32 (the model's)": (True, model_module.attention)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=None)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--profile", action="store_true")
    a = parser.parse_args()
    cfg = load_config(a.config)
    torch.manual_seed(0)
    model = model_module.Transformer(model_args(cfg, cfg.tokenizer.vocab_size))
    x = torch.randint(0, cfg.tokenizer.vocab_size, (cfg.training.batch_size, cfg.model.block_size))

    def step(bf16: bool) -> float:
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            _, loss = model(x, x)
        loss.backward()
        model.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for i in range(a.repeats + 3):  # 3 warm-up rounds
        for name, (bf16, attention) in VARIANTS.items():
            model_module.attention = attention
            seconds = step(bf16)
            if i >= 3:
                times[name].append(seconds)
    model_module.attention = VARIANTS["fp32"][1]
    fp32 = statistics.median(times["fp32"])
    print(f"{cfg.model.n_layer} layers x {cfg.model.n_embd}, batch {cfg.training.batch_size} x {cfg.model.block_size}, "
          f"{torch.get_num_threads()} threads, median of {a.repeats}\n")
    print("| step | ms | vs fp32 |\n|---|---|---|")
    for name, values in times.items():
        print(f"| {name} | {statistics.median(values) * 1e3:.1f} | {fp32 / statistics.median(values):.2f}x |")
    if a.profile:
        from torch.profiler import ProfilerActivity, profile

        for name in ("fp32", "bf16, attention in bf16"):
            bf16, model_module.attention = VARIANTS[name]
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(10):
                    step(bf16)
            print(f"\n{name}, 10 steps:")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=8, max_name_column_width=60))
        model_module.attention = VARIANTS["fp32"][1]


if __name__ == "__main__":
    main()
