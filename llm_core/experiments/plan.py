"""How much memory and time a training needs, before renting the GPUs: `scratchllm plan`.

    scratchllm plan --config assets_config/default.yaml
    scratchllm plan --config assets_config/sweeps/size_ladder.yaml --budget 1e15   # from a sweep's scaling fit
    scratchllm plan --layers 12 --width 768 --heads 12 --vocab 50304 --seq-len 1024 --batch 16 \\
        --precision bf16 --gpu H100-80GB --gpus 8

Memory per device is the sum of four terms (N parameters, G devices sharing the state):

- weights, gradients, optimizer state, in bytes per parameter: fp32 training 4 + 4 + 8 (AdamW's two
  moments); mixed precision 2 + 2 + 12 (half-precision weights and gradients, an fp32 master copy
  and the two moments: the accounting of the ZeRO paper, Rajbhandari et al. 2020). torch autocast
  under plain DDP keeps fp32 weights and gradients instead (4 + 4 + 8, plus 2 for the bf16 copies).
- sharding: ZeRO-1 divides the optimizer state by G, ZeRO-2 (= FSDP SHARD_GRAD_OP) also the
  gradients, ZeRO-3 (= FSDP FULL_SHARD) also the weights, plus two gathered blocks in flight (the
  one computing and the prefetched next). HYBRID_SHARD is FULL_SHARD inside a node, replicated
  across nodes. CPU offload moves the optimizer state (and with ZeRO-3 the weights) to host memory.
- activations, not sharded (each rank has its own micro-batch), per token of a micro-batch. A
  block saves for backward (counted on this model's autograd graph, tests/test_plan.py checks it):
      s = 6 C + 2 Hkv D + 4 I + H + 2  elements
  (C: RMSNorm's normalized input and output, q, the attention output and the same two for the MLP's
  norm, k and v, the SwiGLU's gate, up, silu(gate) and product of width I, the attention's
  log-sum-exp per head and two RMSNorm scales; SDPA's flash kernels keep no T x T matrix; no dropout
  masks). The switches change it: a relu2 MLP saves 2 I instead of 4 I; QK-norm adds its normalized
  queries and keys and their scales, (H + Hkv) D + H + Hkv; fused projections keep the whole q/k/v
  product alive through v's view, + (H + Hkv) D, and in fp32 a concatenated
  copy of the q/k/v and gate/up weights per block (under autocast the half-precision copies of the
  weights exist either way). On top of what is stored, backward needs a working set: at the loss
  head the logits, log-softmax and their two gradients in fp32 (4 V floats) plus the final norm
  (3 C), in a block the gradients through the MLP and the residual (3 I + 2 C). So
      without checkpointing: L s + max(head, block gradients)
      with checkpointing:    L C + max(head, s + block gradients)  (block inputs kept; one block
                                                                     recomputed at a time)
  with the activations in 4 bytes (fp32) or 2 (mixed precision; the head stays in fp32).
- everything above is counted as live at once: true with gradient accumulation (gradients persist
  while the next micro-batch runs forward); without it the peak is up to 4 N bytes lower.

"Fits" means the total stays under 90% of the device memory (CUDA context, allocator fragmentation,
communication buffers). Time is the compute-optimal run of ~20 tokens per parameter (Hoffmann et
al. 2022) at 6 N + attention FLOPs per token (Transformer.flops_per_token), on G devices at the
given MFU of their dense peak; activation checkpointing recomputes the forward (+1/3 compute).
CPU offload also costs the optimizer step on the host, which this estimate does not include.

With several devices (--gpus, spread over --nodes), it also prints each step's communication on
paper, per device, for ring collectives of the gradients (and weights) in the training precision
(2 bytes per value in mixed precision, 4 in fp32): DDP and ZeRO-1/2 all-reduce (or reduce-scatter +
all-gather) the gradients, 2 (G-1)/G N values; FSDP FULL_SHARD / ZeRO-3 also gathers the weights once
more, 3 (G-1)/G N (1.5x DDP); HYBRID_SHARD shards within a node and all-reduces across nodes. Its time
at a link's bandwidth, counted without overlap with the compute (an upper bound on its share of
the step), is given for 1 GbE (0.125 GB/s), 100 GbE (12.5 GB/s) and NVLink (~450 GB/s per direction
on an H100): across nodes the network's, within one node NVLink's.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch
import yaml

from llm_core.model import ModelArgs, Transformer

GiB = 2**30
TOKENS_PER_PARAMETER = 20  # compute-optimal (Chinchilla)
USABLE_MEMORY = 0.9
RECOMPUTE = 4 / 3  # activation checkpointing: forward + backward (3 units) plus one more forward
STATE_BYTES = {"fp32": (4, 4, 8), "mixed": (2, 2, 12)}  # weights, gradients, optimizer per parameter


@dataclasses.dataclass(frozen=True)
class GPU:
    name: str
    memory_gib: float
    peak_flops: dict[str, float]  # dense peak FLOP/s by precision (no sparsity, no TF32)


GPUS = {g.name: g for g in [
    GPU("L4-24GB", 24, {"bf16": 121e12, "fp16": 121e12, "fp32": 30.3e12}),
    GPU("A100-40GB", 40, {"bf16": 312e12, "fp16": 312e12, "fp32": 19.5e12}),
    GPU("A100-80GB", 80, {"bf16": 312e12, "fp16": 312e12, "fp32": 19.5e12}),
    GPU("H100-80GB", 80, {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12}),  # SXM
]}


@dataclasses.dataclass(frozen=True)
class Strategy:
    name: str
    shard_weights: bool = False
    shard_grads: bool = False
    shard_optimizer: bool = False
    offload: bool = False  # optimizer state (and sharded weights) in host memory
    hybrid: bool = False  # shard inside a node only


STRATEGIES = [
    Strategy("DDP"),
    Strategy("ZeRO-1", shard_optimizer=True),
    Strategy("ZeRO-2 / FSDP SHARD_GRAD_OP", shard_grads=True, shard_optimizer=True),
    Strategy("ZeRO-2 + CPU offload", shard_grads=True, shard_optimizer=True, offload=True),
    Strategy("ZeRO-3 / FSDP FULL_SHARD", shard_weights=True, shard_grads=True, shard_optimizer=True),
    Strategy("ZeRO-3 + CPU offload", shard_weights=True, shard_grads=True, shard_optimizer=True, offload=True),
    Strategy("FSDP HYBRID_SHARD", shard_weights=True, shard_grads=True, shard_optimizer=True, hybrid=True),
]


@dataclasses.dataclass
class Setup:
    """What is planned: a model shape, a micro-batch per device, a precision and the devices."""

    args: ModelArgs
    batch_size: int = 1  # sequences per device per micro-step
    precision: str = "bf16"  # fp32, bf16 or fp16
    gpu: GPU = GPUS["A100-80GB"]
    gpus: int = 1
    gpus_per_node: int = 8
    mfu: float = 0.4
    num_parameters: int | None = None  # overrides the count of args' model (another architecture)


@dataclasses.dataclass
class Row:
    strategy: str
    checkpointing: bool
    weights: float  # bytes per device
    grads: float
    optimizer: float
    activations: float
    host: float  # bytes per device offloaded to CPU memory
    fits: bool
    seconds: float

    @property
    def total(self) -> float:
        return self.weights + self.grads + self.optimizer + self.activations


@dataclasses.dataclass
class ModelCounts:
    """The counts the estimate needs, taken from a Transformer built on the meta device (no memory)."""

    num_parameters: int
    non_embedding: int
    block_parameters: int
    flops_per_token: float


def count(setup: Setup) -> ModelCounts:
    with torch.device("meta"):
        model = Transformer(setup.args)
    n = model.num_parameters()
    extra = (setup.num_parameters or n) - n  # --params: another architecture of about this shape
    return ModelCounts(n + extra, model.num_parameters(non_embedding=True) + extra,
                       sum(p.numel() for p in model.layers[0].parameters()), model.flops_per_token() + 6 * extra)


def activation_bytes_per_token(args: ModelArgs, precision: str, checkpointing: bool) -> float:
    """Peak activation memory per token of a micro-batch (see the module docstring)."""
    a, b = args, 4 if precision == "fp32" else 2
    C, F, H, Hkv, D = a.n_embd, a.intermediate_size, a.n_head, a.n_kv_head, a.head_dim
    saved = 6 * C + 2 * Hkv * D + (4 * F if a.mlp == "swiglu" else 2 * F) + H + 2
    if a.qk_norm:
        saved += (H + Hkv) * D + H + Hkv
    if a.fused_projections:
        saved += (H + Hkv) * D
    block_grads = 3 * F + 2 * C
    head = 4 * a.vocab_size * 4 + 3 * C * b  # the loss is computed in fp32
    if checkpointing:
        return a.n_layer * C * b + max(head, (saved + block_grads) * b)
    return a.n_layer * saved * b + max(head, block_grads * b)


def fused_weight_copies(args: ModelArgs, precision: str) -> float:
    """Bytes of the concatenated q/k/v and gate/up weights that fp32 fused projections save for backward."""
    if not args.fused_projections or precision != "fp32":
        return 0.0
    qkv = (args.n_head + 2 * args.n_kv_head) * args.head_dim * args.n_embd
    gate_up = 2 * args.intermediate_size * args.n_embd if args.mlp == "swiglu" else 0
    return args.n_layer * (qkv + gate_up) * 4


def plan(setup: Setup) -> list[Row]:
    """Memory per device and time of every strategy, without and with activation checkpointing."""
    model = count(setup)
    n = model.num_parameters
    w, g, o = STATE_BYTES["fp32" if setup.precision == "fp32" else "mixed"]
    run_seconds = TOKENS_PER_PARAMETER * n * model.flops_per_token / (
        setup.gpus * setup.gpu.peak_flops[setup.precision] * setup.mfu)
    rows = []
    for s in STRATEGIES:
        if s.hybrid and setup.gpus <= setup.gpus_per_node:
            continue  # the same as FULL_SHARD on one node
        shards = min(setup.gpus, setup.gpus_per_node) if s.hybrid else setup.gpus
        weights = n * w / shards if s.shard_weights else n * w
        optimizer = n * o / shards if s.shard_optimizer else n * o
        host = 0.0
        if s.offload:  # to host memory: the optimizer state, and the weight shards with ZeRO-3
            host, optimizer = optimizer + (weights if s.shard_weights else 0), 0.0
            weights = 0.0 if s.shard_weights else weights
        if s.shard_weights and (shards > 1 or s.offload):
            weights += 2 * model.block_parameters * w  # gathered blocks: computing + prefetched
        for ckpt in (False, True):
            activations = setup.batch_size * setup.args.block_size * activation_bytes_per_token(
                setup.args, setup.precision, ckpt) + fused_weight_copies(setup.args, setup.precision)
            row = Row(s.name, ckpt, weights, n * g / shards if s.shard_grads else n * g, optimizer, activations,
                      host, False, run_seconds * (RECOMPUTE if ckpt else 1))
            row.fits = row.total <= USABLE_MEMORY * setup.gpu.memory_gib * GiB
            rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------
# communication, when the devices are several


LINKS = {"1 GbE": 0.125e9, "100 GbE": 12.5e9, "NVLink": 450e9}  # bytes/s per direction of one device's link
COMMUNICATED = {"DDP": 2.0, "ZeRO-2 / FSDP SHARD_GRAD_OP": 2.0, "ZeRO-3 / FSDP FULL_SHARD": 3.0}  # x (G-1)/G N


@dataclasses.dataclass
class Communication:
    strategy: str
    bytes_per_step: float  # sent (= received) by each device per optimizer step
    compute_seconds: float  # the step's compute at the planned MFU
    seconds: dict[str, float]  # link -> the bytes' time at its bandwidth

    def share(self, link: str) -> float:
        """Communication's share of the step when nothing overlaps it."""
        return self.seconds[link] / (self.seconds[link] + self.compute_seconds)


def communication(setup: Setup, nodes: int = 1) -> list[Communication]:
    """Per device and optimizer step (micro-batch = the step), for DDP, ZeRO-2 and FULL_SHARD on
    `setup.gpus` devices over `nodes` machines: volumes of ring collectives (module docstring)."""
    model, g = count(setup), setup.gpus
    value_bytes = 4 if setup.precision == "fp32" else 2
    compute = setup.batch_size * setup.args.block_size * model.flops_per_token / (
        setup.gpu.peak_flops[setup.precision] * setup.mfu)
    links = LINKS if nodes > 1 else {"NVLink": LINKS["NVLink"]}  # one node: no network in the path
    return [Communication(name, volume, compute, {link: volume / bandwidth for link, bandwidth in links.items()})
            for name, factor in COMMUNICATED.items()
            for volume in [factor * (g - 1) / g * model.num_parameters * value_bytes]]


def format_communication(setup: Setup, nodes: int) -> str:
    rows = communication(setup, nodes)
    links = list(rows[0].seconds)
    lines = [f"communication per step and device, {setup.gpus} devices on {nodes} node(s) (ring collectives in "
             f"{setup.precision}, not overlapped: an upper bound on the share of the step; compute "
             f"{rows[0].compute_seconds * 1e3:.1f} ms at MFU {setup.mfu:.0%})", ""]
    header = ["strategy", "sent/step", *(f"{link}: time (share)" for link in links)]
    table = [[r.strategy, f"{r.bytes_per_step / 2**20:,.0f} MiB",
              *(f"{r.seconds[link] * 1e3:,.1f} ms ({r.share(link):.0%})" for link in links)] for r in rows]
    return "\n".join(lines + text_table(header, table, left=1))


# ---------------------------------------------------------------------------------------------
# from a scratchllm profile


def config_strategy(cfg) -> Strategy:
    """The strategy a training config runs with: its accelerate profile's FSDP or DeepSpeed settings."""
    path = cfg.training.accelerate_config
    profile = yaml.safe_load(Path(path).read_text()) if path else {}
    kind = profile.get("distributed_type", "MULTI_CPU")
    by_name = {s.name: s for s in STRATEGIES}
    if kind == "FSDP":
        fsdp = profile.get("fsdp_config", {})
        sharding = str(fsdp.get("fsdp_sharding_strategy", "FULL_SHARD"))
        if fsdp.get("fsdp_offload_params"):
            return by_name["ZeRO-3 + CPU offload"]
        return next(s for s in STRATEGIES if s.name.endswith(sharding)) if "HYBRID" not in sharding \
            else by_name["FSDP HYBRID_SHARD"]
    if kind == "DEEPSPEED":
        ds = profile.get("deepspeed_config", {})
        stage = int(ds.get("zero_stage", 0))
        offload = ds.get("offload_optimizer_device", "none") not in ("none", None)
        if stage == 0:
            return by_name["DDP"]
        return by_name[f"ZeRO-{stage} + CPU offload"] if offload and stage > 1 else \
            next(s for s in STRATEGIES if s.name.startswith(f"ZeRO-{stage}"))
    return by_name["DDP"]


def plan_precision(mixed_precision: str) -> str:
    """The plan's name for accelerate's mixed_precision ("no" is fp32; `auto` is bf16 on GPUs, which this
    plans for)."""
    return {"no": "fp32", "auto": "bf16"}.get(mixed_precision, mixed_precision)


def setup_from_config(cfg, vocab_size: int | None = None, **overrides) -> Setup:
    """A Setup for a scratchllm config: its model, batch, precision and number of processes."""
    from llm_core.training.train import model_args

    t = cfg.training
    fields = {"batch_size": t.batch_size, "precision": plan_precision(t.mixed_precision), "gpus": t.num_processes,
              **overrides}
    return Setup(model_args(cfg, vocab_size or cfg.tokenizer.vocab_size), **fields)


def planned_row(cfg, vocab_size: int | None = None, **overrides) -> Row:
    """The row of the plan this config trains with (its strategy, its activation checkpointing)."""
    name = config_strategy(cfg).name
    rows = [r for r in plan(setup_from_config(cfg, vocab_size, **overrides))
            if r.checkpointing == cfg.training.activation_checkpointing]
    return next((r for r in rows if r.strategy == name), None) or \
        next(r for r in rows if r.strategy == "ZeRO-3 / FSDP FULL_SHARD")  # HYBRID_SHARD on one node


def plan_vs_measured(cfg, run: dict, vocab_size: int, mfu: float = 0.4) -> dict[str, tuple[float, float]]:
    """{quantity: (planned, measured)} for a finished training (`run`: its TrainResult as a dict).
    Planned throughput is `mfu` of the peak FLOP/s train() measured on its own device."""
    row = planned_row(cfg, vocab_size, precision=plan_precision(run["mixed_precision"]))  # what `auto` chose
    flops_per_token = count(setup_from_config(cfg, vocab_size)).flops_per_token
    return {"peak memory per device (MB)": (row.total / 2**20, run["peak_memory_mb"]),
            "tokens per second": (run["world_size"] * run["peak_flops"] * mfu / flops_per_token,
                                  run["tokens_per_second"])}


# ---------------------------------------------------------------------------------------------
# printing


def human(x: float, unit: str = "") -> str:
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{suffix}{unit}"
    return f"{x:.3g}{unit}"


def duration(seconds: float) -> str:
    for scale, suffix in ((86400, "d"), (3600, "h"), (60, "min")):
        if seconds >= scale:
            return f"{seconds / scale:.1f} {suffix}"
    return f"{seconds:.0f} s"


def format_plan(setup: Setup, rows: list[Row]) -> str:
    a, model = setup.args, count(setup)
    n, fpt = model.num_parameters, model.flops_per_token
    peak = setup.gpu.peak_flops[setup.precision]
    tokens = TOKENS_PER_PARAMETER * n
    lines = [
        (f"model       {human(n)} parameters ({human(model.non_embedding)} without the embedding), {a.n_layer} layers "
        f"x {a.n_embd} wide, {a.n_head} heads ({a.n_kv_head} kv), MLP {a.intermediate_size}, vocab {a.vocab_size}"),
        (f"compute     {human(fpt)}FLOP per token (6N + attention at seq {a.block_size}); compute-optimal run "
        f"{human(tokens)} tokens ({TOKENS_PER_PARAMETER}/parameter) = {tokens * fpt:.2e} FLOP"),
        (f"devices     {setup.gpus} x {setup.gpu.name} ({human(peak)}FLOP/s {setup.precision} peak) at MFU "
        f"{setup.mfu:.0%}: {human(setup.gpus * peak * setup.mfu / fpt)} tokens/s"),
        (f"per device  micro-batch {setup.batch_size} x {a.block_size} tokens, {setup.precision}"
        f"{' mixed precision' if setup.precision != 'fp32' else ''}; fits = total <= "
        f"{USABLE_MEMORY:.0%} of {setup.gpu.memory_gib:g} GiB"),
        "",
    ]
    header = ["strategy", "act. ckpt", "weights", "grads", "optimizer", "activations", "total/GPU", "fits",
              "CPU/GPU", "time"]
    table = [[r.strategy, "yes" if r.checkpointing else "no",
              *(f"{v / GiB:.2f}" for v in (r.weights, r.grads, r.optimizer, r.activations, r.total)),
              "yes" if r.fits else "NO", f"{r.host / GiB:.2f}" if r.host else "-", duration(r.seconds)]
             for r in rows]
    header_line, *rest = text_table(header, table, left=2)
    return "\n".join(lines + [header_line + "   (GiB)", *rest])


def text_table(header: list[str], rows: list[list[str]], left: int) -> list[str]:
    """Lines of an aligned text table: the first `left` columns to the left, the rest to the right."""
    widths = [max(len(str(x)) for x in column) for column in zip(header, *rows)]
    return ["  ".join(c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
            for cells in [header, ["-" * w for w in widths], *rows]]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scratchllm plan", description=__doc__.split("\n")[0])
    parser.add_argument("--config", help="a scratchllm profile: its model, batch, precision and processes "
                                         "(default: the profile in force, $SCRATCHLLM_CONFIG or default.yaml)")
    for flag, kind, what in [
        ("--params", float, "parameter count to plan for (overrides the count of the shape below)"),
        ("--layers", int, "transformer blocks"), ("--width", int, "n_embd"), ("--heads", int, "attention heads"),
        ("--kv-heads", int, "key/value heads (default: --heads)"), ("--vocab", int, "vocabulary size"),
        ("--seq-len", int, "tokens per sequence"), ("--batch", int, "sequences per GPU per micro-step"),
        ("--gpus", int, "data-parallel devices"), ("--gpu-memory-gb", float, "memory per device (GiB)"),
        ("--nodes", int, "machines the devices are spread over (default 1; with a profile on engine.kind: ray, "
                         "one per worker)")]:
        parser.add_argument(flag, type=kind, help=what)
    parser.add_argument("--precision", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--gpu", default="A100-80GB", choices=sorted(GPUS), help="peak FLOP/s and memory")
    parser.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilization to assume")
    parser.add_argument("--budget", help="a compute budget (FLOPs, e.g. 1e15, or GPU hours of --gpu, e.g. 2gpu-h): "
                                         "the model size and tokens a sweep's scaling fit recommends")
    parser.add_argument("--fit", help="the scaling fit to use (default: <data_dir>/model_evaluation/scaling_fit.json "
                                      "of --config, written by a sweep over model sizes)")
    a = parser.parse_args(argv)

    from llm_core.config import ConfigError, load_config

    try:  # the profile in force: --config, else $SCRATCHLLM_CONFIG, else default.yaml; flags override it
        cfg = load_config(a.config)
        setup = setup_from_config(cfg)
    except ConfigError as exc:
        print(f"scratchllm plan: {exc}", file=sys.stderr)
        return 2
    m = setup.args
    args = ModelArgs(vocab_size=a.vocab or m.vocab_size, n_layer=a.layers or m.n_layer, n_head=a.heads or m.n_head,
                     n_kv_head=a.kv_heads or (a.heads if a.heads else m.n_kv_head), n_embd=a.width or m.n_embd,
                     block_size=a.seq_len or m.block_size, tie_embeddings=m.tie_embeddings)
    gpu = GPUS[a.gpu]
    if a.gpu_memory_gb:
        gpu = dataclasses.replace(gpu, name=f"{gpu.name} ({a.gpu_memory_gb:g} GiB)", memory_gib=a.gpu_memory_gb)
    setup = dataclasses.replace(setup, args=args, gpu=gpu, mfu=a.mfu, batch_size=a.batch or setup.batch_size,
                                precision=a.precision or setup.precision, gpus=a.gpus or setup.gpus,
                                num_parameters=int(a.params) if a.params else None)
    if args.n_embd % args.n_head or args.n_head % args.n_kv_head or not 0 < setup.mfu <= 1:
        parser.error("--heads must divide --width, --kv-heads must divide --heads, 0 < --mfu <= 1")
    if a.budget:
        recommendation = recommend(a, setup, parser)
        print(recommendation["text"] + "\n")
        setup = dataclasses.replace(setup, num_parameters=int(recommendation["params"]))
    print(format_plan(setup, plan(setup)))
    nodes = a.nodes or (setup.gpus if cfg.engine.kind == "ray" and not a.gpus else 1)  # Ray SPREADs the workers
    if setup.gpus > 1:
        print("\n" + format_communication(dataclasses.replace(setup, gpus_per_node=-(-setup.gpus // nodes)), nodes))
    return 0


def budget_flops(budget: str, setup: Setup) -> float:
    """"1e15" (FLOPs) or "2gpu-h" (hours of the planned GPU at its peak for the precision, times the MFU)."""
    text = budget.lower().replace(" ", "")
    for suffix in ("gpu-hours", "gpu-h", "h"):
        if text.endswith(suffix):
            hours = float(text[:-len(suffix)])
            return hours * 3600 * setup.gpu.peak_flops[setup.precision] * setup.mfu * setup.gpus
    return float(text)


def recommend(a: argparse.Namespace, setup: Setup, parser: argparse.ArgumentParser) -> dict:
    """The scaling fit's recommendation for --budget, as text and numbers."""
    from llm_core.experiments import scaling

    if a.fit:
        path = Path(a.fit)
    else:
        from llm_core.config import load_config
        from llm_core.layout import EVALUATION_DIR

        path = load_config(a.config).data_path / EVALUATION_DIR / scaling.FIT_FILE
    if not path.is_file():
        parser.error(f"--budget: no scaling fit at {path}: run a sweep over model sizes first "
                     f"(e.g. scratchllm run --config assets_config/sweeps/size_ladder.yaml) or name one with --fit")
    try:
        flops = budget_flops(a.budget, setup)
    except (ValueError, KeyError):
        parser.error(f"--budget: {a.budget!r} is neither FLOPs (1e15) nor GPU hours (2gpu-h)")
    fit = scaling.load(path)
    r = fit.recommend(flops)
    r["text"] = (f"budget {flops:.3g} FLOPs: about {r['params'] / 1e6:.2f}M parameters on {r['tokens'] / 1e6:.1f}M "
                 f"tokens ({fit.tokens_per_param:.0f} tokens per parameter, as the sweep's points); predicted val "
                 f"{r['val_bpb']:.3f} bits/byte, 90% interval [{r['val_bpb_low']:.3f}, {r['val_bpb_high']:.3f}] "
                 f"(fit over {len(fit.points)} variants, exponent {fit.b:.3f} [{fit.b_low:.3f}, {fit.b_high:.3f}]"
                 + (f"; {r['extrapolation']:.0f}x the largest point's compute: an extrapolation"
                    if r["extrapolation"] > 1 else "") + f"; {path})")
    return r


if __name__ == "__main__":
    raise SystemExit(main())
