"""Training throughput of scratchllm's model against the textbook reference, in one run.

    python benchmarks/train.py [--steps 30] [--repeats 3]

For two sizes (~1M: 4 layers, 128 wide, block 64, batch 12; ~10M: 6 layers, 384 wide, block 256,
batch 8) it times full training steps (forward, backward, AdamW) of
  - reference: the textbook GPT (learned positions, separate q/k/v, masked-softmax attention,
    LayerNorm, GELU MLP, biases, fp32);
  - scratchllm: llm_core.model.Transformer (RoPE, GQA-ready SDPA attention, SwiGLU, RMSNorm) in
    fp32, and in what `training.mixed_precision: auto` chooses for that size on this machine
    (llm_core/performance.py: bf16 only with native bf16 units and a measured gain on a training step
    of the model),
and prints tokens/s (median of repeats), MFU against the best GEMM measured in this run in the same
precision, and the speed-up over the reference.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from llm_core.model import ModelArgs, Transformer  # noqa: E402
from llm_core.performance import choose_precision, measure_peak_flops  # noqa: E402
from llm_core.train import step_seconds  # noqa: E402

VOCAB = 2048  # the default profile's BPE vocabulary, for both models


class ReferenceBlock(nn.Module):
    def __init__(self, d: int, n_head: int, block: int):
        super().__init__()
        self.n_head = n_head
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.q, self.k, self.v, self.proj = (nn.Linear(d, d) for _ in range(4))
        self.fc, self.out = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)
        self.register_buffer("mask", torch.tril(torch.ones(block, block)).view(1, 1, block, block))

    def attention(self, x):
        B, T, C = x.shape
        q, k, v = (m(x).view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for m in (self.q, self.k, self.v))
        att = (q @ k.transpose(-2, -1)) / math.sqrt(k.size(-1))
        att = F.softmax(att.masked_fill(self.mask[:, :, :T, :T] == 0, float("-inf")), dim=-1)
        return self.proj((att @ v).transpose(1, 2).contiguous().view(B, T, C))

    def forward(self, x):
        x = x + self.attention(self.ln1(x))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class ReferenceGPT(nn.Module):
    """The textbook decoder (GPT-2 / minGPT), fp32."""

    def __init__(self, n_layer: int, d: int, n_head: int, block: int):
        super().__init__()
        self.tok, self.pos = nn.Embedding(VOCAB, d), nn.Embedding(block, d)
        self.blocks = nn.ModuleList(ReferenceBlock(d, n_head, block) for _ in range(n_layer))
        self.ln, self.head = nn.LayerNorm(d), nn.Linear(d, VOCAB, bias=False)

    def forward(self, idx, targets):
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1]))
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.ln(x))
        return logits, F.cross_entropy(logits.view(-1, VOCAB), targets.view(-1))


def flops_per_token(params_without_pos_and_tok: int, n_layer: int, d: int, block: int) -> float:
    return 6 * params_without_pos_and_tok + 12 * n_layer * d * block


def time_training(model, batch: int, block: int, steps: int, dtype: torch.dtype) -> float:
    """Tokens per second over `steps` training steps (after 3 warm-up steps)."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=False)
    x = torch.randint(0, VOCAB, (batch, block))
    y = torch.randint(0, VOCAB, (batch, block))

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            _, loss = model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * batch * block / (time.perf_counter() - start)


SIZES = {
    "~1M": dict(n_layer=4, d=128, n_head=4, block=64, batch=12),
    "~10M": dict(n_layer=6, d=384, n_head=6, block=256, batch=8),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    a = parser.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    peaks = {dt: measure_peak_flops(dt) for dt in (torch.float32, torch.bfloat16)}
    print(f"best GEMM on {a.threads} threads: fp32 {peaks[torch.float32] / 1e9:.0f} GFLOP/s, "
          f"bf16 {peaks[torch.bfloat16] / 1e9:.0f} GFLOP/s (MFU denominators)\n")
    print("| size | model | params | precision | tokens/s (median) | MFU | vs reference |")
    print("|---|---|---|---|---|---|---|")
    decisions = []
    for name, s in SIZES.items():
        args = ModelArgs(vocab_size=VOCAB, n_layer=s["n_layer"], n_head=s["n_head"], n_kv_head=s["n_head"],
                         n_embd=s["d"], block_size=s["block"])
        auto, why = choose_precision("auto", torch.device("cpu"), lambda dtype: step_seconds(args, s["batch"], dtype))
        decisions.append(f"{name}: auto chose {auto} ({why})")
        ours = Transformer(args)
        ref = ReferenceGPT(s["n_layer"], s["d"], s["n_head"], s["block"])
        ref_params = sum(p.numel() for p in ref.parameters())
        ref_flops = flops_per_token(ref_params - ref.tok.weight.numel() - ref.pos.weight.numel(),
                                    s["n_layer"], s["d"], s["block"])
        variants = [("reference", ref, torch.float32, ref_flops), ("scratchllm", ours, torch.float32,
                                                                     ours.flops_per_token())]
        if auto == "bf16":
            variants.append(("scratchllm auto", ours, torch.bfloat16, ours.flops_per_token()))
        runs = {label: [] for label, *_ in variants}
        for _ in range(a.repeats):  # interleaved, so all see the same machine conditions
            for label, model, dtype, _ in variants:
                runs[label].append(time_training(model, s["batch"], s["block"], a.steps, dtype))
        ref_tps = statistics.median(runs["reference"])
        for label, model, dtype, fpt in variants:
            tps = statistics.median(runs[label])
            params = sum(p.numel() for p in model.parameters())
            print(f"| {name} | {label} | {params / 1e6:.2f}M | {'bf16' if dtype == torch.bfloat16 else 'fp32'} "
                  f"| {tps:,.0f} | {tps * fpt / peaks[dtype]:.1%} | {tps / ref_tps:.2f}x |")
    print("\n" + "\n".join(decisions))

if __name__ == "__main__":
    main()
