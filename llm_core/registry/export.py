"""Export a trained model to the Hugging Face transformers format (LlamaForCausalLM, or
Qwen3ForCausalLM for a model trained with `model.qk_norm`).

    scratchllm export-hf --model data/trained_model/runs/<key> --out my_model

    config.json               LlamaConfig: sizes, heads (GQA), RoPE theta, norm eps, tying, special token ids
    model.safetensors         the weights under transformers' names
    generation_config.json    bos/eos/pad token ids (generation stops at <|endoftext|>)
    tokenizer.json, tokenizer_config.json, special_tokens_map.json     for AutoTokenizer
    README.md                 the model card (llm_core/registry/model_card.py), as the hf_export asset writes it

Our model is a Llama (RMSNorm pre-norm, rotate-half RoPE, GQA, SwiGLU, no biases) whose parameter
names already follow LlamaForCausalLM minus its `model.` prefix, so the export is a rename and
transformers computes the same logits. With QK-norm it is a Qwen3 (the same blocks plus an RMSNorm of
each head's queries and keys before RoPE, `q_norm`/`k_norm`). A relu2 MLP has no transformers
architecture around it: such a model is refused, never written as a config that would load with
other outputs. transformers is not needed to export, only to load.
"""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path

import torch

from llm_core.registry import model_card
from llm_core.data.tokenizer import (CHAT_TOKENS, EOT, PAD, TOKENIZER_FILE, chat_template_of, load_tokenizer,
                                     save_tokenizer)
from llm_core.model_files import MODEL_CONFIG_FILE, WEIGHTS_FILE, load_model
from llm_core.config import ScratchConfig
from llm_core.files import TMP_MARK, write_json
from llm_core.model import ModelArgs, Transformer

CONFIG_FILE = "config.json"
GENERATION_CONFIG_FILE = "generation_config.json"


def hf_architecture(args: ModelArgs) -> str:
    """The transformers class that computes what our model computes, or ValueError naming the field."""
    if args.mlp != "swiglu":
        raise ValueError(f"model.mlp: {args.mlp} has no transformers architecture (Llama and Qwen3 use a SwiGLU MLP): "
                         "this model cannot be exported; train with model.mlp: swiglu to export it")
    return "Qwen3ForCausalLM" if args.qk_norm else "LlamaForCausalLM"


def hf_config(args: ModelArgs, eos_id: int, pad_id: int, dtype: torch.dtype) -> dict:
    """config.json of LlamaForCausalLM (or Qwen3ForCausalLM) for a model of these dimensions."""
    dtype_name = str(dtype).removeprefix("torch.")
    architecture = hf_architecture(args)
    qwen3 = {"use_sliding_window": False, "sliding_window": None, "max_window_layers": args.n_layer,
             "layer_types": ["full_attention"] * args.n_layer}
    return {
        "architectures": [architecture], "model_type": "qwen3" if args.qk_norm else "llama",
        "vocab_size": args.vocab_size, "hidden_size": args.n_embd, "intermediate_size": args.intermediate_size,
        "num_hidden_layers": args.n_layer, "num_attention_heads": args.n_head,
        "num_key_value_heads": args.n_kv_head, "head_dim": args.head_dim,
        "max_position_embeddings": args.block_size, "hidden_act": "silu", "rms_norm_eps": args.norm_eps,
        # transformers 5 reads `rope_parameters`; 4.x reads the top-level `rope_theta` (5 accepts it too).
        "rope_parameters": {"rope_type": "default", "rope_theta": args.rope_theta}, "rope_theta": args.rope_theta,
        "attention_bias": False, "mlp_bias": False, "attention_dropout": 0.0,
        "tie_word_embeddings": args.tie_embeddings,
        # Documents are separated by <|endoftext|>, which is also what a sequence starts after.
        "bos_token_id": eos_id, "eos_token_id": eos_id, "pad_token_id": pad_id,
        "dtype": dtype_name, "torch_dtype": dtype_name,  # `dtype` in transformers 5, `torch_dtype` before
        "use_cache": True,
        **(qwen3 if args.qk_norm else {}),
    }


def hf_state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    """Our weights under LlamaForCausalLM's names: `model.` + ours, except `lm_head.weight`. A tied
    head is left out, as transformers' own save_pretrained does: with tie_word_embeddings it ties
    lm_head to model.embed_tokens on load (a stored copy would load too, but untied in memory)."""
    weights = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight":
            if not model.args.tie_embeddings:
                weights[name] = tensor
        else:
            weights["model." + name] = tensor
    return {name: tensor.detach().contiguous() for name, tensor in weights.items()}


def check_export_inputs(model_dir: Path, tokenizer_dir: Path, out_dir: Path, overwrite: bool) -> None:
    """Refuse, with the reason, what would give a broken or surprising export."""
    for path in (model_dir / WEIGHTS_FILE, model_dir / MODEL_CONFIG_FILE, tokenizer_dir / TOKENIZER_FILE):
        if not path.is_file():
            raise FileNotFoundError(f"missing {path}: expected a trained model directory ({WEIGHTS_FILE} + "
                                    f"{MODEL_CONFIG_FILE}) and a tokenizer directory ({TOKENIZER_FILE})")
    out = out_dir.resolve()
    for source in (model_dir.resolve(), tokenizer_dir.resolve()):
        if out == source or out in source.parents:  # overwrite would delete the model being exported
            raise ValueError(f"the export directory {out_dir} must not be or contain {source}")
    if out_dir.is_file():
        raise FileExistsError(f"{out_dir} is a file, not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"{out_dir} exists and is not empty: choose another directory, or replace its "
                              "contents with overwrite=True (--overwrite on the command line)")


def export_hf(model_dir: Path, tokenizer_dir: Path, out_dir: Path, overwrite: bool = False,
              cfg: ScratchConfig | None = None) -> Path:
    """Write the trained model of `model_dir` and the tokenizer of `tokenizer_dir` as a transformers
    directory `out_dir`, built in a temporary directory and renamed into place. Its README.md is the
    model directory's own card if it has one (a registered version's, with its promotion verdict), else,
    given the profile `cfg`, the card of the model's lineage in cfg's data_dir, with its evaluation when
    it was evaluated (model_card.evaluation_report)."""
    model_dir, tokenizer_dir, out_dir = Path(model_dir), Path(tokenizer_dir), Path(out_dir)
    check_export_inputs(model_dir, tokenizer_dir, out_dir, overwrite)
    model = load_model(model_dir)
    hf_architecture(model.args)  # refused before anything is written
    tokenizer = load_tokenizer(tokenizer_dir)
    args = model.args
    if tokenizer.get_vocab_size() != args.vocab_size:
        raise ValueError(f"the tokenizer in {tokenizer_dir} has {tokenizer.get_vocab_size()} tokens but the model "
                         f"was trained with a vocabulary of {args.vocab_size}: not the tokenizer it was trained with")
    eos_id, pad_id = tokenizer.token_to_id(EOT), tokenizer.token_to_id(PAD)
    if eos_id is None or pad_id is None:
        raise ValueError(f"the tokenizer in {tokenizer_dir} lacks {EOT} or {PAD}")
    own_card = model_dir / model_card.CARD_FILE  # a registered version's: it has the promotion verdict
    card = own_card.read_text(encoding="utf-8") if own_card.is_file() else \
        model_card.render(cfg, model_dir, model_card.evaluation_report(cfg, model_dir)) if cfg else None

    from safetensors.torch import save_file

    tmp = out_dir.with_name(f"{out_dir.name}{TMP_MARK}{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        weights = hf_state_dict(model)
        save_file(weights, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})  # transformers 4.x wants "format"
        write_json(tmp / CONFIG_FILE, hf_config(args, eos_id, pad_id, weights["model.embed_tokens.weight"].dtype))
        # No max_length: transformers warns on every generate(max_new_tokens=...) when one is set.
        # A chat model ends its turn with <|end|> (or, failing that, a document): generate stops at either.
        chat_template = chat_template_of(tokenizer_dir)
        end_id = tokenizer.token_to_id(CHAT_TOKENS[-1]) if chat_template else None
        write_json(tmp / GENERATION_CONFIG_FILE, {"bos_token_id": eos_id, "pad_token_id": pad_id,
                                                  "eos_token_id": [end_id, eos_id] if end_id is not None else eos_id})
        save_tokenizer(tokenizer, tmp, model_max_length=args.block_size, chat_template=chat_template)
        if card is not None:
            model_card.write_card(card, tmp)
        replace_dir(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def replace_dir(new: Path, target: Path) -> None:
    """Rename directory `new` to `target`, replacing an existing `target` (which os.replace cannot do)."""
    if target.exists():
        old = target.with_name(f"{target.name}.old{TMP_MARK}{os.getpid()}")
        os.replace(target, old)
        os.replace(new, target)
        shutil.rmtree(old)
    else:
        os.replace(new, target)


def num_parameters(export_dir: Path) -> int:
    """Parameters stored in an export (a tied head counted once), read from the safetensors header."""
    from safetensors import safe_open

    with safe_open(str(Path(export_dir) / WEIGHTS_FILE), framework="pt") as f:
        names = f.keys()  # a safe_open handle is not iterable
        return sum(math.prod(f.get_slice(name).get_shape()) for name in names)
