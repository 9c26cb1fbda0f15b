"""Training throughput of scratchllm's model against nanoGPT's, in one run, same shapes.

    python benchmarks/train.py [--steps 30] [--repeats 3] [--nanogpt PATH/TO/nanoGPT]

For two sizes (~1M: 4 layers, 128 wide, block 64, batch 12; ~10M: nanoGPT's shakespeare_char shape,
6 layers, 384 wide, block 256, batch 8) it times full training steps (forward, backward, AdamW) of
  - nanoGPT: with --nanogpt, the GPT of that checkout's model.py and its configure_optimizers; without,
    a stand-in of the same architecture (learned positions, fused q/k/v with biases, SDPA causal
    attention, LayerNorm with biases, GELU 4x MLP, tied head, decay groups, unfused AdamW on CPU);
    at its shakespeare_char vocabulary of 65 characters, and at our 2,048 BPE tokens;
  - scratchllm: llm_core.model.Transformer (RoPE, SDPA attention, SwiGLU, RMSNorm, vocabulary 2,048)
    in fp32, in what `training.mixed_precision: auto` chooses for that size on this machine
    (llm_core/training/performance.py: bf16 only with native bf16 units and a measured gain on a training step
    of the model), and compiled in that precision when `training.compile: auto` would compile a training of
    nanoGPT's length at that size (llm_core/training/compilation.py: measured once, cache in a fresh folder,
    so the compile time printed is a cold one),
and prints tokens/s (median of repeats, interleaved), MFU against the best GEMM measured in this run
in the same precision, and the ratio to nanoGPT at 65 characters (nanoGPT's shakespeare_char baseline).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from llm_core.model import ModelArgs, Transformer  # noqa: E402
from llm_core.training import compilation  # noqa: E402
from llm_core.training.performance import choose_precision, measure_peak_flops  # noqa: E402
from llm_core.training.train import step_timer  # noqa: E402

VOCAB = 2048  # the default profile's BPE vocabulary
CHAR_VOCAB = 65  # nanoGPT's shakespeare_char


class StandInBlock(nn.Module):
    """nanoGPT's Block: x + attn(ln_1(x)), x + mlp(ln_2(x)), biases everywhere."""

    def __init__(self, d: int, n_head: int):
        super().__init__()
        self.n_head = n_head
        self.ln_1, self.ln_2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.c_attn, self.c_proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.c_fc, self.mlp_proj = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
                   for t in self.c_attn(self.ln_1(x)).split(C, dim=2))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x))))


class StandInGPT(nn.Module):
    """nanoGPT's GPT (model.py) in architecture: token + learned position embeddings, blocks, LayerNorm,
    a head tied to the token embedding."""

    def __init__(self, n_layer: int, d: int, n_head: int, block: int, vocab: int):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(block, d)
        self.h = nn.ModuleList(StandInBlock(d, n_head) for _ in range(n_layer))
        self.ln_f, self.lm_head = nn.LayerNorm(d), nn.Linear(d, vocab, bias=False)
        self.wte.weight = self.lm_head.weight

    def forward(self, idx, targets):
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
        for block in self.h:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        return logits, F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=device_type == "cuda")


def nanogpt_model(path: str | None, n_layer: int, d: int, n_head: int, block: int, vocab: int) -> nn.Module:
    """nanoGPT's own GPT from a checkout's model.py, or the stand-in."""
    if not path:
        return StandInGPT(n_layer, d, n_head, block, vocab)
    spec = importlib.util.spec_from_file_location("nanogpt_model", Path(path) / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.GPTConfig(block_size=block, vocab_size=vocab, n_layer=n_layer, n_head=n_head, n_embd=d,
                              dropout=0.0, bias=True)
    return module.GPT(config)


def nanogpt_flops_per_token(model: nn.Module, n_layer: int, d: int, block: int) -> float:
    """6 x the matrices a token is multiplied by (its blocks and the tied head) + attention."""
    blocks = sum(p.numel() for name, p in model.named_parameters() if p.dim() == 2 and ".h." in f".{name}")
    head = model.lm_head.weight.numel()
    return 6 * (blocks + head) + 12 * n_layer * d * block


def adamw(model: nn.Module) -> torch.optim.Optimizer:
    """nanoGPT's optimizer setup, for both models: decayed matrices, undecayed gains and biases."""
    if hasattr(model, "configure_optimizers"):
        return model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu")
    return StandInGPT.configure_optimizers(model, 0.1, 1e-3, (0.9, 0.95), "cpu")


def time_training(model, batch: int, block: int, vocab: int, steps: int, dtype: torch.dtype) -> float:
    """Tokens per second over `steps` training steps (after 3 warm-up steps)."""
    opt = adamw(model)
    x = torch.randint(0, vocab, (batch, block))
    y = torch.randint(0, vocab, (batch, block))

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


SIZES = {  # steps: the length of nanoGPT's own recipe at that shape (CPU recipe; shakespeare_char)
    "~1M": dict(n_layer=4, d=128, n_head=4, block=64, batch=12, steps=2000),
    "~10M": dict(n_layer=6, d=384, n_head=6, block=256, batch=8, steps=5000),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--nanogpt", help="a nanoGPT checkout: time its own model.py instead of the stand-in")
    parser.add_argument("--sizes", default=",".join(SIZES), help=f"comma-separated, of {list(SIZES)}")
    a = parser.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    peaks = {dt: measure_peak_flops(dt) for dt in (torch.float32, torch.bfloat16)}
    print(f"best GEMM on {a.threads} threads: fp32 {peaks[torch.float32] / 1e9:.0f} GFLOP/s, "
          f"bf16 {peaks[torch.bfloat16] / 1e9:.0f} GFLOP/s (MFU denominators)")
    print(f"nanoGPT: {a.nanogpt + '/model.py' if a.nanogpt else 'the stand-in of its architecture'}\n")
    print("| size | model | vocab | params | precision | tokens/s (median) | MFU | vs nanoGPT (65 chars) |")
    print("|---|---|---|---|---|---|---|---|")
    decisions = []
    for name in a.sizes.split(","):
        s = SIZES[name]
        shape = (s["n_layer"], s["d"], s["n_head"], s["block"])
        args = ModelArgs(vocab_size=VOCAB, n_layer=s["n_layer"], n_head=s["n_head"], n_kv_head=s["n_head"],
                         n_embd=s["d"], block_size=s["block"])
        auto, why = choose_precision("auto", torch.device("cpu"), step_timer(args, s["batch"]))
        decisions.append(f"{name}: auto chose {auto} ({why})")
        ours = Transformer(args)
        variants = []  # (label, model, vocab, dtype, FLOPs per token)
        for vocab in (CHAR_VOCAB, VOCAB):
            ref = nanogpt_model(a.nanogpt, *shape, vocab)
            variants.append(("nanoGPT", ref, vocab, torch.float32, nanogpt_flops_per_token(ref, s["n_layer"], s["d"],
                                                                                          s["block"])))
        variants.append(("scratchllm", ours, VOCAB, torch.float32, ours.flops_per_token()))
        auto_dtype = torch.bfloat16 if auto == "bf16" else torch.float32
        if auto == "bf16":
            variants.append(("scratchllm, auto precision", ours, VOCAB, auto_dtype, ours.flops_per_token()))
        cache = Path(tempfile.mkdtemp(prefix="compile-cache-"))  # cold: the compile time is a first one
        compilation.use_cache(cache)
        compile_auto = compilation.decide("auto", args, s["batch"], auto, "cpu", s["steps"], cache)
        decisions.append(f"{name}: compile auto for {s['steps']} steps: {compile_auto['why']}")
        if compile_auto["compiled"]:
            variants.append(("scratchllm, auto precision + compile", torch.compile(ours), VOCAB, auto_dtype,
                             ours.flops_per_token()))
        runs = [[] for _ in variants]
        for _ in range(a.repeats):  # interleaved, so all see the same machine conditions
            for i, (_, model, vocab, dtype, _) in enumerate(variants):
                runs[i].append(time_training(model, s["batch"], s["block"], vocab, a.steps, dtype))
        baseline = statistics.median(runs[0])
        for (label, model, vocab, dtype, fpt), tps in zip(variants, map(statistics.median, runs)):
            params = sum(p.numel() for p in model.parameters())
            precision = "bf16" if dtype == torch.bfloat16 else "fp32"
            print(f"| {name} | {label} | {vocab:,} | {params / 1e6:.2f}M | {precision} | {tps:,.0f} "
                  f"| {tps * fpt / peaks[dtype]:.1%} | {tps / baseline:.2f}x |")
    print("\n" + "\n".join(decisions))


if __name__ == "__main__":
    main()
