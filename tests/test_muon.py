"""BatchedMuon is torch.optim.Muon batched by matrix shape: the same parameters step for step (bit for bit),
the same state dict both ways, and its settings (Newton-Schulz iterations, Nesterov, weight decay) honoured;
it iterates in fp32 where bf16 would be emulated."""

from __future__ import annotations

import pytest
import torch

from llm_core.training import muon
from llm_core.training.muon import BatchedMuon

SHAPES = [(64, 32), (64, 32), (32, 96), (48, 48), (32, 96), (48, 48), (64, 32)]  # tall, wide, square; repeated


def matrices(seed: int) -> list[torch.nn.Parameter]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(shape, generator=generator)) for shape in SHAPES]


def step(params, optimizer, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=generator)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


@pytest.mark.parametrize("settings", [{}, {"ns_steps": 2, "weight_decay": 0.1}, {"nesterov": False, "momentum": 0.8}])
def test_the_same_parameters_as_torch_muon_step_for_step(settings):
    ours, theirs = matrices(0), matrices(0)
    a = BatchedMuon(ours, lr=0.02, ns_dtype=torch.bfloat16, **settings)  # torch.optim.Muon's is always bf16
    b = torch.optim.Muon(theirs, lr=0.02, **settings)
    for i in range(4):
        step(ours, a, seed=i)
        step(theirs, b, seed=i)
        for p, q in zip(ours, theirs):
            assert torch.equal(p, q), f"step {i}: parameters differ"
    assert not torch.equal(ours[0], matrices(0)[0])  # they moved


def test_a_checkpoint_of_either_resumes_with_the_other():
    ours, theirs = matrices(1), matrices(1)
    b = torch.optim.Muon(theirs, lr=0.02)
    step(theirs, b, seed=0)
    a = BatchedMuon(ours, lr=0.02, ns_dtype=torch.bfloat16)
    with torch.no_grad():
        for p, q in zip(ours, theirs):
            p.copy_(q)
    a.load_state_dict(b.state_dict())  # torch.optim.Muon's checkpoint into ours
    step(ours, a, seed=1)
    step(theirs, b, seed=1)
    assert all(torch.equal(p, q) for p, q in zip(ours, theirs))
    again = torch.optim.Muon(theirs, lr=0.02)
    again.load_state_dict(a.state_dict())  # and ours into torch.optim.Muon
    step(ours, a, seed=2)
    step(theirs, again, seed=2)
    assert all(torch.equal(p, q) for p, q in zip(ours, theirs))


def test_vectors_are_refused():
    with pytest.raises(ValueError, match="2D matrices only"):
        BatchedMuon([torch.nn.Parameter(torch.zeros(4))])


@pytest.mark.parametrize("bf16_units", [True, False])
def test_the_iteration_runs_in_bf16_only_where_the_cpu_has_bf16_units(monkeypatch, bf16_units):
    monkeypatch.setattr(muon, "cpu_has_bf16_units", lambda: bf16_units)
    expected = torch.bfloat16 if bf16_units else torch.float32
    assert muon.orthogonalization_dtype(torch.device("cpu")) == expected
    chosen, explicit, other = matrices(2), matrices(2), matrices(2)
    optimizers = [BatchedMuon(chosen, lr=0.02), BatchedMuon(explicit, lr=0.02, ns_dtype=expected),
                  BatchedMuon(other, lr=0.02, ns_dtype=torch.float32 if bf16_units else torch.bfloat16)]
    for i in range(3):
        for params, optimizer in zip((chosen, explicit, other), optimizers):
            step(params, optimizer, seed=i)
    assert all(torch.equal(p, q) for p, q in zip(chosen, explicit))  # the default is the hardware's precision
    for p, q in zip(chosen, other):  # and the other precision the same algorithm, to bf16's rounding
        assert not torch.equal(p, q)
        torch.testing.assert_close(p, q, atol=3 * 0.02 * 0.02, rtol=0)  # 3 steps of lr 0.02, 2% apart at most
