"""The Llama-style Transformer on its own: shapes and initial loss, attention variants (MHA, GQA, MQA),
weight tying and initialisation, causality, overfitting one batch, KV-cached generation against a
cache-free reference, and the parameter / FLOP accounting."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from llm_core.model import (ModelArgs, RMSNorm, RMSNormFunction, RotaryEmbedding, Transformer, rope_cache,
                             rope_formula)

pytestmark = pytest.mark.usefixtures("one_thread")
VOCAB = 97




def make_model(seed: int = 0, **kw) -> Transformer:
    args = dict(vocab_size=VOCAB, n_layer=2, n_head=4, n_kv_head=2, n_embd=64, block_size=32)
    args.update(kw)
    torch.manual_seed(seed)
    return Transformer(ModelArgs(**args)).eval()


def tokens(batch: int, length: int, vocab: int = VOCAB, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------
# shapes, attention variants, initialisation


@pytest.mark.parametrize("n_head,n_kv_head", [(4, 4), (4, 2), (4, 1)], ids=["MHA", "GQA", "MQA"])
def test_forward_shapes_and_initial_loss(n_head, n_kv_head):
    model = make_model(n_head=n_head, n_kv_head=n_kv_head)
    attn = model.layers[0].self_attn
    head_dim = 64 // n_head
    assert attn.k_proj.weight.shape == (n_kv_head * head_dim, 64)
    assert attn.q_proj.weight.shape == (n_head * head_dim, 64)
    x = tokens(3, 32)
    logits, loss = model(x, tokens(3, 32, seed=2))
    assert logits.shape == (3, 32, VOCAB)
    assert torch.isfinite(logits).all()
    assert loss is not None and math.isfinite(loss.item())
    assert abs(loss.item() - math.log(VOCAB)) < 0.5  # near-uniform predictions at init
    logits_only, no_loss = model(x[:, :5])
    assert no_loss is None and logits_only.shape == (3, 5, VOCAB)
    # loss backpropagates to every parameter
    model.train()
    model(x, tokens(3, 32, seed=2))[1].backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_grouped_query_attention_equals_mha_with_repeated_kv_heads():
    """GQA is MHA whose key/value heads are shared: copy each kv head into its query group."""
    gqa = make_model(n_head=4, n_kv_head=2)
    mha = make_model(n_head=4, n_kv_head=4)
    state = gqa.state_dict()
    D = 64 // 4
    for name, value in list(state.items()):
        # (Hkv*D, C) -> (H*D, C): kv head j serves q heads 2j and 2j+1
        if name.endswith(("k_proj.weight", "v_proj.weight")):
            state[name] = value.view(2, D, 64).repeat_interleave(2, dim=0).reshape(4 * D, 64)
    mha.load_state_dict(state)
    x = tokens(2, 32)
    torch.testing.assert_close(mha(x)[0], gqa(x)[0], rtol=1e-5, atol=1e-5)


def test_longer_than_block_size_is_refused():
    model = make_model(block_size=16)
    with pytest.raises(ValueError, match="block_size"):
        model(tokens(1, 17))


def test_tied_embeddings_share_one_tensor():
    tied, untied = make_model(tie_embeddings=True), make_model(tie_embeddings=False)
    assert tied.lm_head.weight is tied.embed_tokens.weight
    assert untied.lm_head.weight is not untied.embed_tokens.weight
    assert untied.lm_head.weight.data_ptr() != untied.embed_tokens.weight.data_ptr()
    with torch.no_grad():  # a change to the embedding is a change to the head, tied only
        tied.embed_tokens.weight[0, 0] += 1.0
        before = untied.lm_head.weight[0, 0].item()
        untied.embed_tokens.weight[0, 0] += 1.0
    assert tied.lm_head.weight[0, 0] == tied.embed_tokens.weight[0, 0]
    assert untied.lm_head.weight[0, 0].item() == before


def test_no_biases_anywhere():
    model = make_model(tie_embeddings=False)
    assert not [n for n, _ in model.named_parameters() if "bias" in n]
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            assert module.bias is None
    # RMSNorm: a gain only
    assert all(not hasattr(m, "bias") or m.bias is None for m in model.modules() if isinstance(m, torch.nn.RMSNorm))


def test_residual_projections_start_smaller():
    n_layer = 4
    model = make_model(n_layer=n_layer, n_embd=128, n_head=4, n_kv_head=4, vocab_size=512)
    expected_residual = 0.02 / math.sqrt(2 * n_layer)
    for layer in model.layers:
        q_std = layer.self_attn.q_proj.weight.std().item()
        o_std = layer.self_attn.o_proj.weight.std().item()
        down_std = layer.mlp.down_proj.weight.std().item()
        assert q_std == pytest.approx(0.02, rel=0.1)
        assert o_std == pytest.approx(expected_residual, rel=0.1)
        assert down_std == pytest.approx(expected_residual, rel=0.1)
        assert o_std < 0.75 * q_std and down_std < 0.75 * q_std
        assert layer.mlp.gate_proj.weight.std().item() == pytest.approx(0.02, rel=0.1)
        torch.testing.assert_close(layer.input_layernorm.weight, torch.ones(128))
    assert model.embed_tokens.weight.std().item() == pytest.approx(0.02, rel=0.1)


def test_zero_init_output_starts_every_block_as_the_identity():
    model = make_model(zero_init_output=True)
    for layer in model.layers:
        assert not layer.self_attn.o_proj.weight.any() and not layer.mlp.down_proj.weight.any()
        assert layer.self_attn.q_proj.weight.std().item() == pytest.approx(0.02, rel=0.1)
    x = tokens(2, 32)
    logits, _ = model(x)
    expected = model.lm_head(model.norm(model.embed_tokens(x)))  # the blocks add nothing yet
    torch.testing.assert_close(logits, expected)


@pytest.mark.parametrize("switches", [{}, {"qk_norm": True}, {"mlp": "relu2"}, {"n_kv_head": 1}],
                         ids=["swiglu", "qk_norm", "relu2", "MQA"])
def test_fused_projections_compute_the_same_model(switches):
    """Fusing q/k/v and gate/up is one matrix product over the same weights: the same loss and gradients."""
    fused, separate = make_model(**switches), make_model(**switches, fused_projections=False)
    separate.load_state_dict(fused.state_dict())
    assert fused.state_dict().keys() == separate.state_dict().keys()
    x, y = tokens(2, 32), tokens(2, 32, seed=2)
    losses = [model.train()(x, y)[1] for model in (fused, separate)]
    for loss in losses:
        loss.backward()
    torch.testing.assert_close(losses[0], losses[1], rtol=0, atol=1e-6)
    for (name, a), b in zip(fused.named_parameters(), separate.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-7, msg=name)


def test_hand_written_rmsnorm_and_rope_are_the_plain_formulas_with_their_gradients():
    """RMSNorm and RoPE run forward and backward by hand (fewer kernels on a CPU): the outputs are
    F.rms_norm's and the rotate-half formula's (what torch.compile gets), and autograd's gradcheck
    (float64) confirms the backward, on a transposed (non-contiguous) input as attention gives it."""
    torch.manual_seed(0)
    x = torch.randn(2, 5, 3, 8, dtype=torch.float64).transpose(1, 2).requires_grad_()  # (B, H, T, D)
    weight = torch.randn(8, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(RMSNormFunction.apply(x, weight, 1e-5), F.rms_norm(x, (8,), weight, 1e-5))
    assert torch.autograd.gradcheck(lambda x, w: RMSNormFunction.apply(x, w, 1e-5), (x, weight))
    cos, sin = (t.double() for t in rope_cache(ModelArgs(vocab_size=8, n_head=1, n_embd=8, block_size=5), 5))
    torch.testing.assert_close(RotaryEmbedding.apply(x, cos, sin), rope_formula(x, cos, sin))
    assert torch.autograd.gradcheck(lambda x: RotaryEmbedding.apply(x, cos, sin), (x,))
    # bf16 in (queries under autocast): bf16 out and back, the gain's gradient in its own fp32
    norm, half = RMSNorm(8, eps=1e-5), torch.randn(4, 8, dtype=torch.bfloat16, requires_grad=True)
    norm(half).sum().backward()
    assert norm(half).dtype == half.grad.dtype == torch.bfloat16 and norm.weight.grad.dtype == torch.float32


def test_qk_norm_and_relu2_change_the_architecture():
    qk = make_model(qk_norm=True)
    attn = qk.layers[0].self_attn
    assert attn.q_norm.weight.shape == attn.k_norm.weight.shape == (16,)  # one gain per head dimension
    assert qk.num_parameters() == make_model().num_parameters() + 2 * 2 * 16
    relu2 = make_model(mlp="relu2")
    assert relu2.args.intermediate_size == 4 * 64 and not hasattr(relu2.layers[0].mlp, "gate_proj")
    x = tokens(2, 32)
    assert not torch.allclose(relu2(x)[0], make_model()(x)[0])


def test_intermediate_size_follows_llama_rule():
    assert ModelArgs(vocab_size=10, n_embd=64).intermediate_size == 192  # 8/3*64 = 170.7 -> 192
    assert ModelArgs(vocab_size=10, n_embd=96).intermediate_size == 256
    assert ModelArgs(vocab_size=10, n_embd=64, intermediate_size=100).intermediate_size == 100


# ---------------------------------------------------------------------------------------------
# causality and learning


@pytest.mark.parametrize("n_kv_head", [4, 1])
def test_causality_later_tokens_never_change_earlier_logits(n_kv_head):
    model = make_model(n_kv_head=n_kv_head)
    x = tokens(2, 32)
    base, _ = model(x)
    for t in (0, 1, 7, 16, 31):
        changed = x.clone()
        changed[:, t] = (changed[:, t] + 1 + torch.arange(2)) % VOCAB
        logits, _ = model(changed)
        assert torch.equal(logits[:, :t], base[:, :t]), f"changing token {t} changed earlier logits"
        if t < 31:
            assert not torch.equal(logits[:, t:], base[:, t:])  # ...and it does change its own position onward


@pytest.mark.parametrize("switches", [{}, {"qk_norm": True, "mlp": "relu2", "zero_init_output": True}],
                         ids=["llama", "qk_norm-relu2-zero_init"])
def test_overfits_a_single_batch(switches):
    model = make_model(n_layer=1, n_embd=32, n_head=2, n_kv_head=1, vocab_size=64, **switches).train()
    batch = tokens(4, 33, vocab=64, seed=3)
    x, y = batch[:, :-1], batch[:, 1:]
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(150):
        _, loss = model(x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(math.log(64), abs=0.5)
    assert losses[-1] < 0.5, losses[::10]


def test_ignore_index_targets_do_not_count():
    model = make_model()
    x, y = tokens(2, 16), tokens(2, 16, seed=5)
    masked = y.clone()
    masked[:, 8:] = -100
    _, loss_masked = model(x, masked)
    logits, _ = model(x)
    expected = torch.nn.functional.cross_entropy(logits[:, :8].reshape(-1, VOCAB), y[:, :8].reshape(-1))
    torch.testing.assert_close(loss_masked, expected)


# ---------------------------------------------------------------------------------------------
# generation


def sharpened(model: Transformer) -> Transformer:
    """Larger weights: well separated logits, so a greedy comparison is not decided by rounding."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(8.0)
    return model


@torch.no_grad()
def greedy_reference(model: Transformer, prompt: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
    """Greedy decoding without a KV cache: a full forward of the context at every step.

    The context follows generate()'s window: the first forward (and every refill) sees the last
    block_size - 1 tokens when the sequence has reached block_size tokens; the window then grows by
    one token per step until it would exceed block_size, when it is refilled. Positions start at 0
    at the window start.
    """
    block = model.args.block_size
    seq = prompt.clone()
    start = None
    out = []
    for _ in range(max_new_tokens):
        if start is None or seq.shape[1] - start > block:
            start = seq.shape[1] - (block - 1) if seq.shape[1] >= block else 0
        logits, _ = model(seq[:, start:])
        next_token = logits[:, -1, :].argmax(dim=-1, keepdim=True)
        out.append(next_token)
        seq = torch.cat([seq, next_token], dim=1)
    return torch.cat(out, dim=1)


def generate(model, prompt, n, **kw) -> torch.Tensor:
    return torch.cat(list(model.generate(prompt, n, **kw)), dim=1)


@pytest.mark.parametrize("prompt_len,n_new", [(5, 10), (3, 40), (40, 30)],
                         ids=["short", "grows-past-block", "prompt-longer-than-block"])
@pytest.mark.parametrize("n_kv_head", [4, 2])
def test_kv_cached_greedy_equals_full_recompute(prompt_len, n_new, n_kv_head):
    model = sharpened(make_model(n_kv_head=n_kv_head, block_size=16))
    prompt = tokens(2, prompt_len, seed=7)
    cached = generate(model, prompt, n_new, temperature=0)
    assert cached.shape == (2, n_new)
    torch.testing.assert_close(cached, greedy_reference(model, prompt, n_new), rtol=0, atol=0)


def test_cached_logits_match_full_forward():
    """Feeding tokens one by one through the cache gives the same logits as one forward pass."""
    model = make_model(n_kv_head=2)
    x = tokens(2, 20)
    full, _ = model(x)
    caches = [{} for _ in model.layers]
    first, _ = model(x[:, :8], caches=caches, start_pos=0)
    steps = [first]
    for pos in range(8, 20):
        logits, _ = model(x[:, pos:pos + 1], caches=caches, start_pos=pos)
        steps.append(logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)
    assert caches[0]["k"].shape == (2, 2, 20, 16)  # (B, Hkv, T, D)


def test_sampling_seeds_temperature_and_top_k():
    model = make_model()
    prompt = tokens(1, 4, seed=9)
    a = generate(model, prompt, 25, temperature=1.0, seed=123)
    b = generate(model, prompt, 25, temperature=1.0, seed=123)
    c = generate(model, prompt, 25, temperature=1.0, seed=456)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)  # near-uniform over 97 tokens: 25 equal draws has probability ~0
    assert int(a.min()) >= 0 and int(a.max()) < VOCAB

    greedy = generate(model, prompt, 25, temperature=0)
    assert torch.equal(greedy, greedy_reference(model, prompt, 25))
    assert torch.equal(generate(model, prompt, 25, temperature=1.0, top_k=1, seed=5), greedy)
    assert torch.equal(generate(model, prompt, 25, temperature=0.7, top_k=1, seed=6), greedy)


def test_top_k_restricts_to_the_k_most_likely():
    model = make_model()
    prompt = tokens(1, 6, seed=4)
    logits, _ = model(prompt)
    allowed = set(torch.topk(logits[0, -1], 3).indices.tolist())
    seen = {int(generate(model, prompt, 1, temperature=1.0, top_k=3, seed=s)) for s in range(40)}
    assert seen <= allowed and len(seen) >= 2


def test_stop_token_ends_generation():
    model = sharpened(make_model())
    prompt = tokens(1, 5, seed=11)
    greedy = generate(model, prompt, 10, temperature=0)
    stop = int(greedy[0, 3])
    first = int((greedy[0] == stop).nonzero()[0])
    stopped = generate(model, prompt, 10, temperature=0, stop_token=stop)
    assert torch.equal(stopped, greedy[:, :first + 1])


# ---------------------------------------------------------------------------------------------
# accounting


@pytest.mark.parametrize("n_kv_head", [4, 1])
def test_num_parameters_and_flops_per_token(n_kv_head):
    V, C, L, T, H = VOCAB, 64, 2, 32, 4
    tied = make_model(tie_embeddings=True, n_kv_head=n_kv_head)
    untied = make_model(tie_embeddings=False, n_kv_head=n_kv_head)
    D, F = C // H, tied.args.intermediate_size
    per_layer = (C * H * D + 2 * C * n_kv_head * D + H * D * C  # q, k, v, o
                 + 3 * C * F  # gate, up, down
                 + 2 * C)  # two RMSNorm gains
    blocks = L * per_layer + C  # + final norm
    assert untied.num_parameters() == blocks + 2 * V * C
    assert tied.num_parameters() == blocks + V * C  # the shared matrix counted once
    assert untied.num_parameters() - tied.num_parameters() == V * C
    assert tied.num_parameters() == sum(p.numel() for p in set(tied.parameters()))
    assert tied.num_parameters(non_embedding=True) == blocks
    assert untied.num_parameters(non_embedding=True) == blocks + V * C
    # Every matrix a token meets (blocks + LM head), tied or not: the same compute.
    expected_flops = 6 * (blocks + V * C) + 12 * L * C * T
    assert tied.flops_per_token() == expected_flops
    assert untied.flops_per_token() == expected_flops
    assert untied.flops_per_token() == 6 * untied.num_parameters(non_embedding=True) + 12 * L * C * T
