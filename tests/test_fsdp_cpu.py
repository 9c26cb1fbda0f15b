"""The sharded path on CPU: 2 gloo ranks of FSDP2 (torch's fully_shard) with the transformer block as
the wrap unit, a sharded checkpoint (torch.distributed.checkpoint, one file per rank) and a resume.

accelerate cannot run this on CPU: it enables FSDP only for GPU-like devices; with `use_cpu` (and
Accelerator(cpu=True), what train() passes without CUDA) an FSDP profile silently becomes plain
MULTI_CPU DDP, and with cpu=False each rank trains alone (DistributedType.NO). So this test drives
torch's FSDP directly, the engine under accelerate's `fsdp_version: 2`, to check that the model
shards, trains like one process with the same global batch, and resumes from sharded state dicts.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import free_port

from llm_core.model import ModelArgs, Transformer

ARGS = ModelArgs(vocab_size=64, n_layer=2, n_head=2, n_kv_head=1, n_embd=32, block_size=16)
STEPS, SAVE_AT, BATCH = 6, 3, 2  # BATCH sequences per rank


def batch(step: int, ranks: int = 2) -> torch.Tensor:
    """The global batch of a step: ranks x BATCH sequences."""
    return torch.randint(0, ARGS.vocab_size, (ranks * BATCH, ARGS.block_size),
                         generator=torch.Generator().manual_seed(step))


def build(shard: bool):
    torch.manual_seed(0)
    model = Transformer(ARGS)
    if shard:
        from torch.distributed.fsdp import fully_shard

        for block in model.layers:  # the wrap unit, as in the fsdp*.yaml profiles
            fully_shard(block)
        fully_shard(model)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def step_loss(model, optimizer, x: torch.Tensor) -> torch.Tensor:
    _, loss = model(x, x)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    return loss.detach()


def worker(rank: int, port: int, checkpoint: str, out: str, resume: bool) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    model, optimizer = build(shard=True)
    start = 0
    if resume:
        model_state, optim_state = get_state_dict(model, optimizer)
        state = {"model": model_state, "optim": optim_state}
        dcp.load(state, checkpoint_id=checkpoint)  # each rank reads its own shards
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        start = SAVE_AT
    losses = []
    for step in range(start, STEPS if resume else SAVE_AT):
        loss = step_loss(model, optimizer, batch(step)[rank * BATCH:(rank + 1) * BATCH])
        dist.all_reduce(loss, op=dist.ReduceOp.AVG)
        losses.append(loss.item())
    if not resume:
        model_state, optim_state = get_state_dict(model, optimizer)
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=checkpoint)
    weight = model.layers[0].mlp.up_proj.weight
    if rank == 0:
        with open(out, "w") as f:
            json.dump({"losses": losses, "local_rows": weight.to_local().shape[0], "rows": weight.shape[0]}, f)
    dist.destroy_process_group()


def launch(tmp_path, resume: bool) -> dict:
    port = free_port()
    out = tmp_path / f"{'resume' if resume else 'first'}.json"
    mp.spawn(worker, args=(port, str(tmp_path / "checkpoint"), str(out), resume), nprocs=2, join=True)
    return json.loads(out.read_text())


@pytest.mark.skipif(not dist.is_gloo_available(), reason="needs the gloo backend")
def test_fsdp_on_two_cpu_ranks_trains_saves_shards_and_resumes(tmp_path):
    first = launch(tmp_path, resume=False)
    assert first["local_rows"] * 2 == first["rows"]  # each rank holds half of every weight
    shards = sorted(p.name for p in (tmp_path / "checkpoint").glob("*.distcp"))
    assert len(shards) == 2  # one file per rank
    resumed = launch(tmp_path, resume=True)

    torch.set_num_threads(1)
    model, optimizer = build(shard=False)  # one process, the same global batches
    reference = [step_loss(model, optimizer, batch(step)).item() for step in range(STEPS)]
    sharded = first["losses"] + resumed["losses"]
    assert sharded == pytest.approx(reference, abs=1e-5)
    assert sharded[-1] < sharded[0]
