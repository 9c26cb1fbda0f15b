"""Muon's cost at small batches: its share of a training step, and what fewer Newton-Schulz iterations buy
at equal wall time.

    python benchmarks/muon_share.py [--config assets_config/default.yaml] [--repeats 30] [--skip-ablation]

1. The profile's model and batch, one process: the median time of forward + backward, of AdamW's step
   and of Muon's step (its orthogonalization: `training.muon_ns_steps` Newton-Schulz iterations of each
   hidden matrix's update, in bf16), for torch.optim.Muon (matrix by matrix) and for the project's
   BatchedMuon (llm_core/training/muon.py: the matrices of one shape at once) at 5, 3 and 2 iterations,
   and Muon's share of the step.
2. Val bits/byte at equal wall time: the profile as it is (5 iterations) sets the time; every other
   variant (3 and 2 iterations, AdamW alone) trains the number of steps its measured speed fits in that
   time, from scratch on the same dataset, each in its own process (benchmarks/ablation.py's trainer).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchmarks.ablation import ensure_dataset, train_variant  # noqa: E402
from llm_core.config import deep_merge, load_config, validate_config  # noqa: E402
from llm_core.model import Transformer  # noqa: E402
from llm_core.training.performance import available_cores  # noqa: E402
from llm_core.training.train import make_optimizers, model_args  # noqa: E402

NS_STEPS = (5, 3, 2)
TIME_TOLERANCE = 0.05  # a variant's training time within 5% of the budget counts as equal


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def step_parts(cfg, ns_steps: int, repeats: int, torch_muon: bool = False) -> dict[str, float]:
    """Median seconds of forward + backward, AdamW's step and Muon's step (the project's, or torch.optim.Muon
    on the same matrices)."""
    torch.manual_seed(0)
    args = model_args(cfg, cfg.tokenizer.vocab_size)
    model = Transformer(args)
    with_ns = validate_config(deep_merge(cfg.model_dump(mode="json"), {"training": {"muon_ns_steps": ns_steps}}))
    adamw, muon = make_optimizers(model, with_ns)
    if torch_muon:
        muon = torch.optim.Muon([p for group in muon.param_groups for p in group["params"]],
                                lr=with_ns.training.muon_learning_rate, momentum=with_ns.training.muon_momentum,
                                weight_decay=0.0, ns_steps=ns_steps)
    x = torch.randint(0, args.vocab_size, (cfg.training.batch_size, args.block_size))
    parts: dict[str, list[float]] = {"forward + backward": [], "AdamW step": [], "Muon step": []}

    def forward_backward():
        _, loss = model(x, x)
        loss.backward()

    for i in range(repeats + 3):  # 3 warm-up steps
        times = [timed(forward_backward), timed(adamw.step), timed(muon.step)]
        model.zero_grad(set_to_none=True)
        if i >= 3:
            for name, seconds in zip(parts, times):
                parts[name].append(seconds)
    return {name: statistics.median(values) for name, values in parts.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=None)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--skip-ablation", action="store_true")
    a = parser.parse_args()
    cfg = load_config(a.config)
    torch.set_num_threads(available_cores())
    print(f"model {cfg.model.n_layer} layers x {cfg.model.n_embd}, batch {cfg.training.batch_size} x "
          f"{cfg.model.block_size}, {torch.get_num_threads()} threads, median of {a.repeats}\n")
    print("| Muon | Newton-Schulz iterations | forward + backward ms | AdamW step ms | Muon step ms | Muon share |")
    print("|---|---|---|---|---|---|")
    for name, ns, torch_muon in [("torch.optim.Muon", 5, True)] + [("batched (ours)", ns, False) for ns in NS_STEPS]:
        p = step_parts(cfg, ns, a.repeats, torch_muon)
        total = sum(p.values())
        print(f"| {name} | {ns} | {p['forward + backward'] * 1e3:.2f} | {p['AdamW step'] * 1e3:.2f} | "
              f"{p['Muon step'] * 1e3:.2f} | {p['Muon step'] / total:.1%} |", flush=True)
    if a.skip_ablation:
        return

    ensure_dataset(cfg, a.config)
    base = cfg.model_dump(mode="json")
    variants = {f"Muon, {ns} iterations": {"training": {"muon_ns_steps": ns}} for ns in NS_STEPS}
    variants["AdamW only"] = {"training": {"optimizer": "adamw"}}
    print("\n| variant | steps | train s | tokens/s | val bpb |\n|---|---|---|---|---|")
    with tempfile.TemporaryDirectory(prefix="muon-") as tmp:
        budget = None
        for name, values in variants.items():
            merged = deep_merge(base, values)
            if budget is None:  # the profile as it is sets the wall time
                steps = cfg.training.max_steps
            else:  # a short probe for this variant's speed, then the steps that fit the budget
                probe = deep_merge(merged, {"training": {"max_steps": 200, "checkpoint_interval": 200,
                                                         "eval_interval": 200}})
                speed = train_variant(probe, Path(tmp) / "probe")["tokens_per_second"]
                tokens_per_step = cfg.training.batch_size * cfg.model.block_size * cfg.training.grad_accum_steps
                steps = max(200, round(budget * speed / tokens_per_step))
            r = train_variant(deep_merge(merged, {"training": {"max_steps": steps, "checkpoint_interval": steps}}),
                              Path(tmp) / "variant")
            if budget is not None and abs(r["train_seconds"] / budget - 1) > TIME_TOLERANCE:
                # The short probe misjudged the speed (the machine drifts): once more, with the steps that
                # this run's own speed fits in the budget.
                steps = round(steps * budget / r["train_seconds"])
                r = train_variant(deep_merge(merged, {"training": {"max_steps": steps, "checkpoint_interval": steps}}),
                                  Path(tmp) / "variant")
            budget = budget or r["train_seconds"]
            print(f"| {name} | {steps} | {r['train_seconds']:.1f} | {r['tokens_per_second']:,.0f} | "
                  f"{r['val_bpb']:.4f} |", flush=True)


if __name__ == "__main__":
    main()
