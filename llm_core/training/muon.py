"""Muon with the matrices of one shape orthogonalized together.

torch.optim.Muon runs its Newton-Schulz iterations matrix by matrix: with small matrices (a 4-layer
model has 28 of 3 shapes) each iteration is a few tiny matrix products and the calls' overhead is most
of the time; on 2 CPU cores that made Muon's step a quarter of the training step. This optimizer is the
same algorithm with the same defaults and state (Nesterov momentum, the quintic Newton-Schulz iteration in
bf16, the learning rate scaled by sqrt(max(1, rows / cols)), decoupled weight decay), except that the
updates of all the matrices of one shape are stacked and iterated as one batch of matrix products. Its
state dict is torch.optim.Muon's, so checkpoints of either resume with the other.
"""

from __future__ import annotations

import math

import torch
from torch.optim._muon import DEFAULT_A, DEFAULT_B, DEFAULT_C, DEFAULT_NS_STEPS


def orthogonalize(updates: torch.Tensor, ns_coefficients: tuple[float, float, float], ns_steps: int,
                  eps: float) -> torch.Tensor:
    """The Newton-Schulz orthogonalization of a stack of matrices (batch, rows, cols), in bf16, each
    normalized by its own Frobenius norm: torch.optim.Muon's, batched."""
    a, b, c = ns_coefficients
    x = updates.bfloat16()
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
                 eps: float = 1e-7, ns_steps: int = DEFAULT_NS_STEPS, adjust_lr_fn: str | None = None):
        if adjust_lr_fn not in (None, "original"):
            raise ValueError(f"adjust_lr_fn {adjust_lr_fn!r}: only torch.optim.Muon's original scaling is supported")
        defaults = {"lr": lr, "weight_decay": weight_decay, "momentum": momentum, "nesterov": nesterov,
                    "ns_coefficients": ns_coefficients, "eps": eps, "ns_steps": ns_steps, "adjust_lr_fn": adjust_lr_fn}
        super().__init__(params, defaults)
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
                updates = orthogonalize(updates, group["ns_coefficients"], group["ns_steps"], group["eps"])
                lr = group["lr"] * math.sqrt(max(1, shape[0] / shape[1]))
                for p, buf, update in zip(params, bufs, updates):
                    self.state[p]["momentum_buffer"] = buf
                    p.mul_(1 - group["lr"] * group["weight_decay"])
                    p.add_(update, alpha=-lr)
        return loss
