"""Muon with the matrices of one shape orthogonalized together.

torch.optim.Muon runs its Newton-Schulz iterations matrix by matrix: with small matrices (a 4-layer
model has 28 of 3 shapes) each iteration is a few tiny matrix products and the calls' overhead is most
of the time; on 2 CPU cores that made Muon's step a quarter of the training step. This optimizer is the
same algorithm with the same defaults and state (Nesterov momentum, the quintic Newton-Schulz iteration,
the learning rate scaled by sqrt(max(1, rows / cols)), decoupled weight decay), except that the
updates of all the matrices of one shape are stacked and iterated as one batch of matrix products. Its
state dict is torch.optim.Muon's, so checkpoints of either resume with the other.

The iteration runs in bf16 (as torch.optim.Muon's) where the hardware multiplies bf16 matrices natively: a
GPU with bf16, a CPU with AVX512_BF16 or AMX. Elsewhere it runs in fp32: on an AVX2-only CPU a bf16
matrix product is emulated, and the default profile's orthogonalization took 490 ms a step in bf16
against 20 ms in fp32 (measured; benchmarks/muon_share.py).
"""

from __future__ import annotations

import math

import torch
from torch.optim._muon import DEFAULT_A, DEFAULT_B, DEFAULT_C, DEFAULT_NS_STEPS

from llm_core.training.performance import cpu_has_bf16_units


def orthogonalization_dtype(device: torch.device) -> torch.dtype:
    """bf16 where matrix products run natively in it, fp32 where bf16 would be emulated."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    return torch.bfloat16 if cpu_has_bf16_units() else torch.float32


def orthogonalize(updates: torch.Tensor, ns_coefficients: tuple[float, float, float], ns_steps: int,
                  eps: float, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """The Newton-Schulz orthogonalization of a stack of matrices (batch, rows, cols), in `dtype`, each
    normalized by its own Frobenius norm: torch.optim.Muon's, batched."""
    a, b, c = ns_coefficients
    x = updates.to(dtype)
    wide = x.size(-2) > x.size(-1)
    if wide:
        x = x.mT
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)
    for _ in range(ns_steps):
        gram = x @ x.mT
        x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.mT if wide else x


class BatchedMuon(torch.optim.Optimizer):
    """torch.optim.Muon's algorithm and state, one batched orthogonalization per matrix shape."""

    def __init__(self, params, lr: float = 1e-3, weight_decay: float = 0.1, momentum: float = 0.95,
                 nesterov: bool = True, ns_coefficients: tuple[float, float, float] = (DEFAULT_A, DEFAULT_B, DEFAULT_C),
                 eps: float = 1e-7, ns_steps: int = DEFAULT_NS_STEPS, adjust_lr_fn: str | None = None,
                 ns_dtype: torch.dtype | None = None):
        if adjust_lr_fn not in (None, "original"):
            raise ValueError(f"adjust_lr_fn {adjust_lr_fn!r}: only torch.optim.Muon's original scaling is supported")
        defaults = {"lr": lr, "weight_decay": weight_decay, "momentum": momentum, "nesterov": nesterov,
                    "ns_coefficients": ns_coefficients, "eps": eps, "ns_steps": ns_steps, "adjust_lr_fn": adjust_lr_fn}
        super().__init__(params, defaults)
        self.ns_dtype = ns_dtype  # None: orthogonalization_dtype of the parameters' device (not in the state dict)
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim != 2:
                    raise ValueError(f"Muon takes 2D matrices only, got a parameter of shape {tuple(p.shape)}")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            by_shape: dict[torch.Size, list[torch.Tensor]] = {}
            for p in group["params"]:
                if p.grad is not None:
                    by_shape.setdefault(p.shape, []).append(p)
            momentum = group["momentum"]
            for shape, params in by_shape.items():
                grads = torch.stack([p.grad for p in params])
                bufs = torch.stack([self.state[p].get("momentum_buffer", torch.zeros_like(p)) for p in params])
                bufs.lerp_(grads, 1 - momentum)
                updates = grads.lerp(bufs, momentum) if group["nesterov"] else bufs
                dtype = self.ns_dtype or orthogonalization_dtype(updates.device)
                updates = orthogonalize(updates, group["ns_coefficients"], group["ns_steps"], group["eps"], dtype)
                lr = group["lr"] * math.sqrt(max(1, shape[0] / shape[1]))
                for p, buf, update in zip(params, bufs, updates):
                    self.state[p]["momentum_buffer"] = buf
                    p.mul_(1 - group["lr"] * group["weight_decay"])
                    p.add_(update, alpha=-lr)
        return loss
