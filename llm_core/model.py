"""A Llama-style decoder in one file.

    tokens -> embed_tokens -> N x [ x + attn(RMSNorm(x)), x + mlp(RMSNorm(x)) ] -> RMSNorm -> lm_head

- attention: rotary position embeddings (RoPE, the Llama "rotate half" layout), grouped-query
  attention (n_kv_head key/value heads shared by n_head query heads), PyTorch SDPA kernels;
- mlp: SwiGLU, down(silu(gate(x)) * up(x));
- no biases; optionally the LM head shares the embedding matrix;
- RMSNorm and RoPE are autograd Functions with their backward written out (fewer elementwise kernels
  and less saved for backward than autograd of the formulas, which is what torch.compile gets).

Parameter names follow Hugging Face's LlamaForCausalLM (minus its `model.` prefix) so the export
to transformers is a rename. Shapes in comments: B batch, T time, C n_embd, H heads, D head size.

Switches (ModelArgs; what each bought is measured in the README's ablation table):
- fused_projections: q/k/v, and gate/up, computed as one matrix product each (the weights stay
  separate tensors, concatenated per step): fewer, larger GEMMs, the same model;
- qk_norm: RMSNorm over each head's queries and keys before RoPE (as in Qwen3; exported as such);
- mlp "relu2": down(relu(up(x))^2) with a 4x hidden layer (the speedrun MLP; no transformers
  architecture has it with the rest of this model, so such a model is not exported);
- zero_init_output: the attention and MLP output projections start at zero (each block starts as
  the identity), instead of GPT-2's scaled-down normal init.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


@dataclasses.dataclass
class ModelArgs:
    vocab_size: int
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int = 4
    n_embd: int = 128
    block_size: int = 64
    tie_embeddings: bool = True
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    dropout: float = 0.0
    intermediate_size: int = 0  # 0: swiglu ~8/3 * n_embd rounded up to a multiple of 64 (Llama); relu2 4 * n_embd
    fused_projections: bool = True
    qk_norm: bool = False
    mlp: str = "swiglu"  # or "relu2"
    zero_init_output: bool = False

    def __post_init__(self):
        if self.intermediate_size == 0:  # either way about 8 * n_embd^2 MLP weights
            swiglu = 64 * math.ceil(8 * self.n_embd / 3 / 64)
            self.intermediate_size = 4 * self.n_embd if self.mlp == "relu2" else swiglu

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


# Fields that change how a model trains or computes, not what its weights mean: a model trained with
# other values of these loads, resumes and warm-starts as the same architecture.
COMPUTE_ONLY_FIELDS = ("dropout", "fused_projections", "zero_init_output")


def linear_fused(x: torch.Tensor, *layers: nn.Linear) -> list[torch.Tensor]:
    """[layer(x) for layer in layers] as one matrix product with the weights side by side: one large
    GEMM is faster than several small ones; autograd splits the gradient back to each weight."""
    weight = torch.cat([layer.weight for layer in layers])  # (sum of outputs, in)
    return list(F.linear(x, weight).split([layer.out_features for layer in layers], dim=-1))


def rope_cache(args: ModelArgs, length: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of shape (length, D) for positions 0..length-1."""
    inv_freq = 1.0 / (args.rope_theta ** (torch.arange(0, args.head_dim, 2, device=device).float() / args.head_dim))
    angles = torch.outer(torch.arange(length, device=device).float(), inv_freq)  # (T, D/2)
    angles = torch.cat([angles, angles], dim=-1)  # (T, D), the "rotate half" layout
    return angles.cos(), angles.sin()


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE's rotation, x: (B, H, T, D); cos, sin: (T, D), their two halves equal. Each pair
    (x1[i], x2[i]) = (x[i], x[i + D/2]) turns by its angle: (x1 cos - x2 sin, x2 cos + x1 sin),
    written into one output with no rotated copy of x (four half-width passes)."""
    half = x.shape[-1] // 2
    x1, x2, cos, sin = x[..., :half], x[..., half:], cos[:, :half], sin[:, :half]
    out = torch.empty_like(x)
    out1, out2 = out[..., :half], out[..., half:]
    torch.mul(x1, cos, out=out1).addcmul_(x2, sin, value=-1)
    torch.mul(x2, cos, out=out2).addcmul_(x1, sin)
    return out


class RotaryEmbedding(torch.autograd.Function):
    """RoPE with its backward by hand: a rotation's gradient is the rotation back (sin -> -sin), where
    autograd of the cat/neg/slice formula runs ~10 kernels, zero-filled slice gradients among them."""

    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return rotate(x, cos, sin)

    @staticmethod
    def backward(ctx, grad):
        cos, sin = ctx.saved_tensors
        return rotate(grad, cos, -sin), None, None


def rope_formula(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The same rotation as one expression (for torch.compile, which fuses it into one kernel)."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, H, T, D); cos, sin: (T, D), the "rotate half" layout (Llama, Hugging Face)."""
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    if torch.compiler.is_compiling():
        return rope_formula(x, cos, sin)
    return RotaryEmbedding.apply(x, cos, sin)


class RMSNormFunction(torch.autograd.Function):
    """y = x / sqrt(mean(x^2) + eps) * weight with its backward by hand. nn.RMSNorm is composite on a
    CPU (~15 elementwise kernels, forward and backward, and it keeps its input for backward); this
    keeps only the normalized input xhat and the per-row scale rstd."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        # (..., C) -> rstd (..., 1), in fp32 (or x's wider type)
        wide = torch.promote_types(x.dtype, torch.float32)
        mean_square = torch.linalg.vector_norm(x, dim=-1, keepdim=True, dtype=wide).square_() / x.shape[-1]
        rstd = mean_square.add_(eps).rsqrt_()
        xhat = (x * rstd).to(x.dtype)
        ctx.save_for_backward(xhat, rstd, weight)
        return (xhat * weight).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        xhat, rstd, weight = ctx.saved_tensors
        grad_weight = (grad * xhat).flatten(0, -2).sum(0)
        grad_xhat = grad * weight
        # d xhat / d x = rstd (I - xhat xhat^T / C): remove the gradient's component along xhat
        along_xhat = (grad_xhat * xhat).mean(-1, keepdim=True)
        grad_x = torch.addcmul(grad_xhat, xhat, along_xhat, value=-1).mul_(rstd)
        return grad_x.to(xhat.dtype), grad_weight.to(weight.dtype), None


class RMSNorm(nn.RMSNorm):
    """nn.RMSNorm (the same parameter and state dict) computed by RMSNormFunction outside torch.compile."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return super().forward(x)
        return RMSNormFunction.apply(x, self.weight, self.eps)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kwargs) -> torch.Tensor:
    """Scaled dot-product attention (SDPA). On a CPU under bf16 autocast it runs in fp32: there the CPU
    flash-attention kernel's backward took 5x its fp32 time, more than bf16 saved in every matrix product
    of the step (docs/benchmarks.md, "bf16 on a CPU")."""
    if q.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
        with torch.autocast("cpu", enabled=False):
            return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), **kwargs)
    return F.scaled_dot_product_attention(q, k, v, **kwargs)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = args.n_head, args.n_kv_head, args.head_dim
        self.q_proj = nn.Linear(args.n_embd, args.n_head * args.head_dim, bias=False)
        self.k_proj = nn.Linear(args.n_embd, args.n_kv_head * args.head_dim, bias=False)
        self.v_proj = nn.Linear(args.n_embd, args.n_kv_head * args.head_dim, bias=False)
        self.o_proj = nn.Linear(args.n_head * args.head_dim, args.n_embd, bias=False)
        if args.qk_norm:
            self.q_norm = RMSNorm(args.head_dim, eps=args.norm_eps)
            self.k_norm = RMSNorm(args.head_dim, eps=args.norm_eps)
        self.fused, self.qk_norm, self.dropout = args.fused_projections, args.qk_norm, args.dropout

    def forward(self, x, cos, sin, cache: dict | None = None):
        B, T, C = x.shape
        projections = (self.q_proj, self.k_proj, self.v_proj)
        q, k, v = linear_fused(x, *projections) if self.fused else (proj(x) for proj in projections)
        q = q.view(B, T, self.n_head, self.head_dim)  # (B, T, H, D)
        k = k.view(B, T, self.n_kv_head, self.head_dim)  # (B, T, Hkv, D)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # (B, H, T, D), (B, Hkv, T, D)
        v = v.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:  # generation: append to the keys/values of earlier positions
            if "k" in cache:
                k, v = torch.cat([cache["k"], k], dim=2), torch.cat([cache["v"], v], dim=2)
            cache["k"], cache["v"] = k, v
        # A query at position i sees keys 0..i; with a cache, the T new queries are the last T positions.
        causal = T > 1
        if causal and k.shape[2] != T:
            mask = torch.ones(T, k.shape[2], dtype=torch.bool, device=x.device).tril(k.shape[2] - T)
            y = attention(q, k, v, attn_mask=mask, enable_gqa=self.n_kv_head != self.n_head)
        else:
            y = attention(q, k, v, is_causal=causal, enable_gqa=self.n_kv_head != self.n_head,
                          dropout_p=self.dropout if self.training else 0.0)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, C))  # (B, T, C)


class MLP(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.kind, self.fused = args.mlp, args.fused_projections
        if args.mlp == "swiglu":
            self.gate_proj = nn.Linear(args.n_embd, args.intermediate_size, bias=False)
        self.up_proj = nn.Linear(args.n_embd, args.intermediate_size, bias=False)
        self.down_proj = nn.Linear(args.intermediate_size, args.n_embd, bias=False)

    def forward(self, x):  # (B, T, C) -> (B, T, I) -> (B, T, C)
        if self.kind == "relu2":
            return self.down_proj(F.relu(self.up_proj(x)).square())
        gate, up = linear_fused(x, self.gate_proj, self.up_proj) if self.fused else (self.gate_proj(x), self.up_proj(x))
        return self.down_proj(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.input_layernorm = RMSNorm(args.n_embd, eps=args.norm_eps)
        self.self_attn = Attention(args)
        self.post_attention_layernorm = RMSNorm(args.n_embd, eps=args.norm_eps)
        self.mlp = MLP(args)
        self.dropout = nn.Dropout(args.dropout)

    def forward(self, x, cos, sin, cache=None):
        x = x + self.dropout(self.self_attn(self.input_layernorm(x), cos, sin, cache))
        return x + self.dropout(self.mlp(self.post_attention_layernorm(x)))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.embed_tokens = nn.Embedding(args.vocab_size, args.n_embd)
        self.layers = nn.ModuleList(Block(args) for _ in range(args.n_layer))
        self.norm = RMSNorm(args.n_embd, eps=args.norm_eps)
        self.lm_head = nn.Linear(args.n_embd, args.vocab_size, bias=False)
        if args.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        cos, sin = rope_cache(args, args.block_size)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        # Recompute each block's activations in backward instead of storing them (set by train()).
        self.activation_checkpointing = False
        self.apply(self._init_weights)
        # Residual projections scaled by 1/sqrt(2 * n_layer): the residual stream's variance stays
        # flat with depth (GPT-2 / nanoGPT); or zero, so that every block starts as the identity.
        for name, p in self.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                if args.zero_init_output:
                    nn.init.zeros_(p)
                else:
                    nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * args.n_layer))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_parameters(self, non_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.embed_tokens.weight.numel()
        return n

    def flops_per_token(self) -> float:
        """Training FLOPs per token (forward + backward): 6 N + attention (PaLM, appendix B), where N
        counts every matrix a token is multiplied by: the blocks and the LM head (tied or not)."""
        a = self.args
        matmul_params = self.num_parameters(non_embedding=True) + (a.vocab_size * a.n_embd if a.tie_embeddings else 0)
        return 6 * matmul_params + 12 * a.n_layer * a.n_embd * a.block_size

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, caches: list | None = None,
                start_pos: int = 0):
        """idx: (B, T) token ids. Returns logits (B, T, V) and, with targets, the mean cross-entropy
        over targets != -100."""
        B, T = idx.shape
        if start_pos + T > self.args.block_size:
            raise ValueError(f"sequence of {start_pos + T} tokens is longer than block_size {self.args.block_size}")
        cos, sin = self.rope_cos[start_pos:start_pos + T], self.rope_sin[start_pos:start_pos + T]
        x = self.embed_tokens(idx)  # (B, T, C)
        for i, layer in enumerate(self.layers):
            if self.activation_checkpointing and self.training and caches is None:
                # Only the block's input is kept; non-reentrant checkpointing also replays the RNG
                # state, so dropout masks and the loss are the same as without it.
                x = checkpoint(layer, x, cos, sin, use_reentrant=False)
            else:
                x = layer(x, cos, sin, None if caches is None else caches[i])
        logits = self.lm_head(self.norm(x))  # (B, T, V)
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100)
        return logits, loss

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 seed: int | None = None, stop_token: int | list[int] | None = None):
        """Yield (B, 1) next tokens one at a time, with a KV cache; temperature 0 means greedy; stops after
        a stop token (one id or several). The context is cropped to the last block_size tokens when it grows."""
        generator = torch.Generator(device=idx.device).manual_seed(seed) if seed is not None else None
        block = self.args.block_size
        caches, pos = None, 0
        for _ in range(max_new_tokens):
            if caches is None or pos + 1 > block:  # (re)fill the cache from the last block - 1 tokens
                idx = idx[:, -(block - 1):] if idx.shape[1] >= block else idx
                caches = [{} for _ in self.layers]
                logits, _ = self(idx, caches=caches, start_pos=0)
                pos = idx.shape[1]
            else:
                logits, _ = self(idx[:, -1:], caches=caches, start_pos=pos)
                pos += 1
            logits = logits[:, -1, :].float()
            if temperature == 0:
                next_token = logits.argmax(dim=-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None:
                    kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                next_token = torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator)
            idx = torch.cat([idx, next_token], dim=1)
            yield next_token
            if stop_token is not None and bool(torch.isin(next_token, torch.tensor(stop_token)).all()):
                return
