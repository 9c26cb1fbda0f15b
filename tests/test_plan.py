"""The memory/compute planner (`scratchllm plan`) and activation checkpointing, checked against
real CPU trainings.

Measured memory: train() records the growth of the peak resident set from before the model is built
(`peak_memory_mb`). Each run is a fresh process with MALLOC_MMAP_THRESHOLD_ fixed, so glibc returns
every freed tensor to the OS and the resident set follows the live tensors (what
torch.cuda.max_memory_allocated reports on a GPU; glibc's default caches freed blocks, adding
20-60% of allocator slack here). What any training adds besides its tensors (code pages of
libtorch, the autograd threads) is the peak of a 33K-parameter run, subtracted from the others.
The runs use 2 micro-steps of gradient accumulation: the gradients then live through the next
micro-batch's forward, and weights, gradients, optimizer state and activations are all live at
once, as the planner counts them.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest
import torch
from helpers import config, losses, subprocess_env, summary, train_command

from llm_core.experiments import plan as planner
from llm_core.config import CONFIG_DIR
from llm_core.model import Block, ModelArgs, Transformer

GPT2_SMALL = ModelArgs(vocab_size=50304, n_layer=12, n_head=12, n_kv_head=12, n_embd=768, block_size=1024)
VOCAB = 512  # the ci tokenizer
RUNS = {  # name: (model, training)
    "fixed cost": ({"n_layer": 1, "n_head": 2, "n_kv_head": 2, "n_embd": 32, "block_size": 16}, {"batch_size": 1}),
    # activations dominate: 0.9M parameters, 4096 tokens per micro-batch
    "activations": ({"n_layer": 4, "n_head": 4, "n_kv_head": 4, "n_embd": 128, "block_size": 256},
                    {"batch_size": 16}),
    "activations, checkpointed": ({"n_layer": 4, "n_head": 4, "n_kv_head": 4, "n_embd": 128, "block_size": 256},
                                  {"batch_size": 16, "activation_checkpointing": True}),
    # parameters dominate: 3.7M parameters, 256 tokens per micro-batch
    "parameters": ({"n_layer": 2, "n_head": 6, "n_kv_head": 6, "n_embd": 384, "block_size": 64}, {"batch_size": 4}),
}


@pytest.fixture(scope="module")
def measured(data_dir, tmp_path_factory):
    """{name: (config, training summary)} of 3 optimizer steps of every RUNS entry, run side by side
    (memory is not disturbed by sharing the cores)."""
    root = tmp_path_factory.mktemp("plan")
    env = {**subprocess_env(), "MALLOC_MMAP_THRESHOLD_": "65536"}
    procs = {}
    for name, (model, training) in RUNS.items():
        cfg = config(data_dir, max_steps=3, warmup_steps=1, grad_accum_steps=2, eval_interval=100,
                     checkpoint_interval=100, **training)
        cfg.model = {**cfg.model.model_dump(), **model}  # validated on assignment
        out = root / name.replace(" ", "_").replace(",", "")
        procs[name] = cfg, out, subprocess.Popen([sys.executable, *train_command(cfg, out)], env=env,
                                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    results = {}
    for name, (cfg, out, proc) in procs.items():
        output, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, output[-3000:]
        results[name] = cfg, summary(out)
    return results


def net_peak_mb(measured, name: str) -> float:
    return measured[name][1]["peak_memory_mb"] - measured["fixed cost"][1]["peak_memory_mb"]


# ---------------------------------------------------------------------------------------------
# activation checkpointing


@pytest.mark.slow  # the `measured` runs: ~30 s
def test_activation_checkpointing_same_loss_less_memory(measured):
    (_, plain), (_, ckpt) = measured["activations"], measured["activations, checkpointed"]
    for a, b in zip(losses(plain["history"]), losses(ckpt["history"]), strict=True):
        assert abs(a - b) <= 1e-6
    assert plain["final_val_loss"] == pytest.approx(ckpt["final_val_loss"], abs=1e-6)
    before, after = net_peak_mb(measured, "activations"), net_peak_mb(measured, "activations, checkpointed")
    print(f"activation checkpointing: {before:.0f} MB -> {after:.0f} MB ({1 - after / before:.0%} less)")
    assert after < 0.6 * before


def test_checkpointing_is_off_in_eval_and_generation():
    torch.manual_seed(0)
    model = Transformer(ModelArgs(vocab_size=64, n_layer=2, n_embd=32, block_size=16, dropout=0.1))
    x = torch.randint(0, 64, (2, 16))
    torch.manual_seed(1)
    _, plain = model(x, x)
    plain.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.activation_checkpointing = True
    torch.manual_seed(1)
    _, ckpt = model(x, x)  # dropout 0.1: the same masks are replayed in the recomputation
    ckpt.backward()
    assert ckpt.item() == plain.item()
    for g, p in zip(grads, model.parameters()):
        torch.testing.assert_close(p.grad, g)
    model.eval()
    assert len(list(model.generate(x[:, :4], 3, temperature=0))) == 3


# ---------------------------------------------------------------------------------------------
# the planner's terms


@pytest.mark.parametrize("switches", [{"fused_projections": False}, {}, {"qk_norm": True},
                                      {"qk_norm": True, "fused_projections": False}, {"mlp": "relu2"},
                                      {"mlp": "relu2", "fused_projections": False}],
                         ids=["separate", "fused", "qk_norm", "qk_norm-separate", "relu2", "relu2-separate"])
def test_saved_activations_per_block_match_the_autograd_graph(switches):
    """The planner's s = 6C + 2 Hkv D + 4I + H + 2 elements per token (and its terms for the switches)
    is what a Block saves for backward."""
    args = ModelArgs(vocab_size=64, n_layer=1, n_head=4, n_kv_head=2, n_embd=64, block_size=32, **switches)
    block, model = Block(args), Transformer(args)
    weights = {p.data_ptr() for p in [*block.parameters(), model.rope_cos, model.rope_sin]}
    saved = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in weights and t.data_ptr() not in weights:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        block(torch.randn(3, 32, 64, requires_grad=True), model.rope_cos, model.rope_sin)
    tokens, hidden = 3 * 32, args.intermediate_size
    elements = 6 * 64 + 2 * 2 * 16 + (2 if args.mlp == "relu2" else 4) * hidden + 4 + 2
    if args.qk_norm:
        elements += (4 + 2) * 16 + 4 + 2
    if args.fused_projections:
        elements += (4 + 2) * 16
    assert sum(saved.values()) == tokens * elements * 4 + planner.fused_weight_copies(args, "fp32")
    plain = planner.activation_bytes_per_token(args, "fp32", checkpointing=False)
    assert plain == elements * 4 + max(4 * 64 * 4 + 3 * 64 * 4, (3 * hidden + 2 * 64) * 4)


def test_parameters_and_flops_come_from_the_model():
    model = planner.count(planner.Setup(GPT2_SMALL))
    real = Transformer(dataclasses.replace(GPT2_SMALL, n_layer=1))  # one block: small enough to build
    block = sum(p.numel() for p in real.layers[0].parameters())
    assert model.block_parameters == block
    assert model.num_parameters == real.num_parameters() + 11 * block
    assert 123e6 < model.num_parameters < 125e6
    assert model.flops_per_token == pytest.approx(6 * (model.num_parameters) + 12 * 12 * 768 * 1024)


def test_sharding_divides_the_state_and_offload_moves_it_to_the_host():
    setup = planner.Setup(GPT2_SMALL, batch_size=8, precision="bf16", gpu=planner.GPUS["A100-80GB"], gpus=8)
    rows = {(r.strategy, r.checkpointing): r for r in planner.plan(setup)}
    n = planner.count(setup).num_parameters
    ddp, z1 = rows["DDP", False], rows["ZeRO-1", False]
    z2, z3 = rows["ZeRO-2 / FSDP SHARD_GRAD_OP", False], rows["ZeRO-3 / FSDP FULL_SHARD", False]
    assert (ddp.weights, ddp.grads, ddp.optimizer) == (2 * n, 2 * n, 12 * n)  # 16 bytes per parameter
    assert (z1.grads, z1.optimizer) == (2 * n, 12 * n / 8)
    assert (z2.weights, z2.grads, z2.optimizer) == (2 * n, 2 * n / 8, 12 * n / 8)
    assert z3.weights == pytest.approx(2 * n / 8 + 2 * 2 * 7_079_424)  # + two gathered blocks
    offload = rows["ZeRO-3 + CPU offload", False]
    assert offload.optimizer == 0 and offload.host == 12 * n / 8 + 2 * n / 8
    assert len({r.activations for r in rows.values()}) == 2  # activations are never sharded
    assert rows["DDP", True].activations < ddp.activations
    assert rows["DDP", True].seconds == pytest.approx(ddp.seconds * 4 / 3)
    tokens, flops = 20 * n, planner.count(setup).flops_per_token
    assert ddp.seconds == pytest.approx(tokens * flops / (8 * 312e12 * 0.4))
    assert not any(r.strategy == "FSDP HYBRID_SHARD" for r in rows.values())  # one node: = FULL_SHARD
    hybrid = [r for r in planner.plan(planner.Setup(GPT2_SMALL, gpus=32)) if r.strategy == "FSDP HYBRID_SHARD"]
    assert hybrid[0].optimizer == 12 * n / 8


def test_fits_against_device_memory():
    big = planner.Setup(ModelArgs(vocab_size=50304, n_layer=32, n_head=32, n_kv_head=8, n_embd=4096,
                                  block_size=4096), batch_size=1, gpu=planner.GPUS["A100-80GB"], gpus=8)
    rows = {(r.strategy, r.checkpointing): r for r in planner.plan(big)}
    assert not rows["DDP", True].fits  # ~7B parameters x 16 bytes > 80 GB
    assert rows["ZeRO-3 / FSDP FULL_SHARD", True].fits
    for r in rows.values():
        assert r.fits == (r.total <= 0.9 * 80 * 2**30)


@pytest.mark.parametrize("profile,strategy", [
    (None, "DDP"), ("ddp", "DDP"), ("fsdp", "ZeRO-3 / FSDP FULL_SHARD"),
    ("fsdp_shard_grad_op", "ZeRO-2 / FSDP SHARD_GRAD_OP"), ("fsdp_hybrid", "FSDP HYBRID_SHARD"),
    ("deepspeed_zero1", "ZeRO-1"), ("deepspeed_zero2", "ZeRO-2 / FSDP SHARD_GRAD_OP"),
    ("deepspeed_zero3", "ZeRO-3 / FSDP FULL_SHARD"), ("deepspeed_zero3_offload", "ZeRO-3 + CPU offload"),
])
def test_a_config_is_planned_with_the_strategy_of_its_accelerate_profile(profile, strategy):
    path = str(CONFIG_DIR / "accelerate" / f"{profile}.yaml") if profile else None
    cfg = config(CONFIG_DIR, accelerate_config=path, num_processes=8 if profile else 1, optimizer="adamw")
    assert planner.config_strategy(cfg).name == strategy
    on_one_node = "ZeRO-3 / FSDP FULL_SHARD" if profile == "fsdp_hybrid" else strategy
    assert planner.planned_row(cfg).strategy == on_one_node
    assert planner.planned_row(cfg.model_copy(update={"training": cfg.training.model_copy(
        update={"num_processes": 16})})).strategy == strategy


def test_cli_prints_the_table(capsys):
    from pipelines.cli import main

    assert main(["plan", "--layers", "12", "--width", "768", "--heads", "12", "--vocab", "50304", "--seq-len",
                 "1024", "--batch", "16", "--gpus", "8", "--gpu", "H100-80GB", "--precision", "bf16"]) == 0
    out = capsys.readouterr().out
    assert "124M parameters" in out and "8 x H100-80GB" in out and "2.47B tokens" in out
    assert out.count("ZeRO-3 / FSDP FULL_SHARD") == 3 and "fits" in out  # memory (x2 checkpointing) and network
    assert "8 devices on 1 node(s)" in out and "NVLink: time (share)" in out and "GbE" not in out
    with pytest.raises(SystemExit):
        main(["plan", "--width", "100", "--heads", "3"])


# ---------------------------------------------------------------------------------------------
# planned vs measured


@pytest.mark.slow
def test_plan_vs_measured_of_a_run(measured):
    cfg, run = measured["parameters"]
    compared = planner.plan_vs_measured(cfg, run, VOCAB)
    planned, got = compared["peak memory per device (MB)"]
    assert planned == planner.planned_row(cfg, VOCAB).total / 2**20 and got == run["peak_memory_mb"]
    planned, got = compared["tokens per second"]
    assert got == run["tokens_per_second"] and planned > 0
    # `mixed_precision: auto` (the default profile's) is planned in the precision the run chose, here fp32
    auto = cfg.model_copy(update={"training": cfg.training.model_copy(update={"mixed_precision": "auto"})})
    fp32 = planner.planned_row(cfg, VOCAB).total
    assert run["mixed_precision"] == "no" and planner.planned_row(auto, VOCAB).total != fp32  # bf16 otherwise
    assert planner.plan_vs_measured(auto, run, VOCAB)["peak memory per device (MB)"][0] == fp32 / 2**20


@pytest.mark.slow
@pytest.mark.parametrize("name", ["activations", "parameters", "activations, checkpointed"])
def test_plan_matches_measured_peak_memory_within_25_percent(measured, name):
    cfg, _ = measured[name]
    planned = planner.planned_row(cfg, vocab_size=VOCAB).total / 2**20
    got = net_peak_mb(measured, name)
    print(f"{name}: planned {planned:.0f} MB, measured {got:.0f} MB ({planned / got - 1:+.0%})")
    assert abs(planned / got - 1) <= 0.25


def test_communication_per_step_across_nodes_ddp_against_full_shard():
    """Ring collectives: DDP sends 2 (G-1)/G of the gradients per device and step, FULL_SHARD 1.5x that
    (the weights gathered once more); the same bytes take 100x longer on 1 GbE than on 100 GbE; one
    node has no network in the path."""
    setup = planner.Setup(GPT2_SMALL, batch_size=16, precision="bf16", gpu=planner.GPUS["H100-80GB"], gpus=16)
    rows = {r.strategy: r for r in planner.communication(setup, nodes=2)}
    n = planner.count(setup).num_parameters
    assert rows["DDP"].bytes_per_step == pytest.approx(2 * 15 / 16 * n * 2)
    assert rows["ZeRO-3 / FSDP FULL_SHARD"].bytes_per_step == pytest.approx(1.5 * rows["DDP"].bytes_per_step)
    ddp = rows["DDP"]
    assert ddp.seconds["1 GbE"] == pytest.approx(100 * ddp.seconds["100 GbE"])
    assert ddp.share("1 GbE") > 0.9 > ddp.share("100 GbE") > ddp.share("NVLink")
    assert ddp.compute_seconds == pytest.approx(16 * 1024 * planner.count(setup).flops_per_token / (989e12 * 0.4))
    assert list(planner.communication(setup, nodes=1)[0].seconds) == ["NVLink"]
