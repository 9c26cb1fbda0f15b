"""RMSNorm and RoPE with a hand-written backward (llm_core/model.py) against autograd of their formulas
(nn.RMSNorm and the rotate-half expression, what torch.compile gets): forward + backward time of the
whole model, interleaved, and the activations a block saves for backward.

    python benchmarks/norm_and_rope.py [--steps 100] [--threads N]

Two shapes: the default profile's (4 x 128, QK-norm, batch 12 x 64) and nanoGPT's ~10M one (6 x 384,
batch 8 x 256). Prints a table; medians over the interleaved steps.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from pathlib import Path
from unittest import mock

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import llm_core.model as model_module  # noqa: E402
from llm_core.model import ModelArgs, RMSNorm, Transformer, rope_formula  # noqa: E402

SHAPES = {
    "default profile (4 x 128, B12 x T64)": (ModelArgs(vocab_size=2048, n_layer=4, n_head=4, n_kv_head=4, n_embd=128,
                                                       block_size=64, qk_norm=True), 12),
    "~10M (6 x 384, B8 x T256)": (ModelArgs(vocab_size=2048, n_layer=6, n_head=6, n_kv_head=6, n_embd=384,
                                            block_size=256), 8),
}


def autograd_formulas(model: Transformer) -> Transformer:
    """The same weights with every RMSNorm as nn.RMSNorm (autograd of its composite formula)."""
    for module in list(model.modules()):
        for name, child in module.named_children():
            if isinstance(child, RMSNorm):
                plain = torch.nn.RMSNorm(child.normalized_shape, eps=child.eps)
                plain.load_state_dict(child.state_dict())
                setattr(module, name, plain)
    return model


def plain_rope(x, cos, sin):
    return rope_formula(x, cos.to(x.dtype), sin.to(x.dtype))


def rope_of(formulas: bool):
    """While in force: RoPE as autograd of its formula (formulas) or as the model has it."""
    return mock.patch.object(model_module, "apply_rope", plain_rope) if formulas else contextlib.nullcontext()


def step_fn(model: Transformer, batch: int, formulas: bool):
    x = torch.randint(0, model.args.vocab_size, (batch, model.args.block_size))

    def step() -> float:
        start = time.perf_counter()
        with rope_of(formulas):
            _, loss = model(x, x)
            loss.backward()
        model.zero_grad(set_to_none=True)
        return time.perf_counter() - start
    return step


def saved_mb(model: Transformer, batch: int, formulas: bool) -> float:
    """Bytes that forward keeps for backward (autograd's saved tensors, distinct storages), in MB."""
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in weights:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    x = torch.randint(0, model.args.vocab_size, (batch, model.args.block_size))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), rope_of(formulas):
        model(x, x)
    return sum(storages.values()) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100, help="interleaved steps per variant (the 10M shape: a tenth)")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    a = parser.parse_args()
    torch.set_num_threads(a.threads)
    print(f"{a.threads} threads; forward + backward, medians\n")
    print("| shape | autograd of the formulas, ms | hand-written backward, ms | speed-up | saved for backward, MB |")
    print("|---|---|---|---|---|")
    for label, (args, batch) in SHAPES.items():
        torch.manual_seed(0)
        hand = Transformer(args)
        formulas = autograd_formulas(Transformer(args))
        formulas.load_state_dict(hand.state_dict())
        steps = {"formulas": step_fn(formulas, batch, True), "hand": step_fn(hand, batch, False)}
        times = {name: [] for name in steps}
        n = a.steps if args.n_embd < 256 else max(3, a.steps // 10)
        for _ in range(3):  # warm-up
            for step in steps.values():
                step()
        for _ in range(n):
            for name, step in steps.items():
                times[name].append(step())
        before, after = (1000 * statistics.median(times[k]) for k in ("formulas", "hand"))
        memory = f"{saved_mb(formulas, batch, True):.1f} -> {saved_mb(hand, batch, False):.1f}"
        print(f"| {label} | {before:.1f} | {after:.1f} | {before / after:.3f}x | {memory} |", flush=True)


if __name__ == "__main__":
    main()
