"""What a bf16 training step costs on this CPU against fp32, and where the time goes.

    python benchmarks/bf16_step.py [--config assets_config/default.yaml] [--size ~10M] [--repeats 30] [--profile]

The profile's model and batch (or, with --size, the model benchmarks/train.py times at that nanoGPT shape),
forward + backward in one process: fp32, bf16 autocast with attention in
bf16 (plain SDPA), and bf16 autocast as the model runs it (attention in fp32 on a CPU, see `attention` in
llm_core/model.py); medians of `repeats`, the three interleaved so that the machine's drift hits each alike.
With --profile, torch.profiler's top operators of 10 steps of each, and their time split into matrix products
(with the GFLOP/s they ran at), attention and the rest.
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
from benchmarks.train import SIZES  # noqa: E402

GEMMS = ("aten::mm", "aten::bmm", "aten::addmm")
VARIANTS = {"fp32": (False, model_module.attention), "bf16, attention in bf16": (True, F.scaled_dot_product_attention),
            "bf16, attention in fp32 (the model's)": (True, model_module.attention)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=None)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--size", choices=list(SIZES), help="a nanoGPT shape instead of the profile's model and batch")
    a = parser.parse_args()
    s = SIZES.get(a.size)
    cfg = load_config(a.config, s and {"model": {"n_layer": s["n_layer"], "n_embd": s["d"], "n_head": s["n_head"],
                                                 "n_kv_head": s["n_head"], "block_size": s["block"], "qk_norm": False},
                                       "training": {"batch_size": s["batch"]}})
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

        shares = []
        for name, (bf16, model_module.attention) in VARIANTS.items():
            with profile(activities=[ProfilerActivity.CPU], with_flops=True) as prof:
                for _ in range(10):
                    step(bf16)
            events = prof.key_averages()
            print(f"\n{name}, 10 steps:")
            print(events.table(sort_by="self_cpu_time_total", row_limit=8, max_name_column_width=60))
            ms = {"matrix products": 0.0, "attention": 0.0, "the rest": 0.0}
            gemm_flops = 0
            for e in events:
                part = ("matrix products" if e.key in GEMMS else "attention" if "scaled_dot_product" in e.key
                        else "the rest")
                ms[part] += e.self_cpu_time_total / 1e3 / 10
                gemm_flops += e.flops if e.key in GEMMS else 0
            shares.append(f"| {name} | " + " | ".join(f"{v:.1f}" for v in ms.values())
                          + f" | {gemm_flops / 10 / (ms['matrix products'] / 1e3) / 1e9:.0f} |")
        model_module.attention = VARIANTS["fp32"][1]
        print("\nms a step under the profiler (self time):\n\n| step | matrix products | attention | the rest "
              "| matrix products' GFLOP/s |\n|---|---|---|---|---|\n" + "\n".join(shares))


if __name__ == "__main__":
    main()
