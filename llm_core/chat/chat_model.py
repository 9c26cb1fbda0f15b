"""chat_model: the base model fine-tuned on sft_dataset's conversations by the same training loop, and
what judges it.

The fine-tune's config is the profile's, with the base's architecture (the model section it was trained
with), the sft section's steps, batch, learning rates and seed, and `training.init_from` the base's
directory: train() then starts from the base's weights (its architecture and tokenizer checked) and,
reading the packed rows of sft_dataset, learns the assistant's tokens only.

Judged on the held-out conversations, the base and the fine-tune alike:
- assistant bits per byte: the loss on the tokens the mask learns (the assistant's content and the <|end|>
  closing it), in bits, over the UTF-8 bytes of the assistant's content;
- turns ended: the share of held-out prompts (each conversation up to its last user turn, then
  <|assistant|>) whose greedy answer ends with <|end|> within the context.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Iterator

import torch

from llm_core.chat.template import END, render
from llm_core.config import ScratchConfig, deep_merge, validate_config
from llm_core.files import read_json
from llm_core.model import Transformer
from llm_core.model_files import MODEL_CONFIG_FILE
from llm_core.registry.generate import TextGenerator
from llm_core.training.loader import sequential_batches


def chat_training_config(cfg: ScratchConfig, base_dir: Path) -> ScratchConfig:
    """The training config of the fine-tune of the base model in `base_dir`."""
    s = cfg.sft
    base_model_section = read_json(Path(base_dir) / MODEL_CONFIG_FILE)["config"]["model"]
    return validate_config(deep_merge(cfg.model_dump(mode="json"), {
        "model": base_model_section,
        "training": {"max_steps": s.max_steps, "batch_size": s.batch_size, "learning_rate": s.learning_rate,
                     "muon_learning_rate": s.muon_learning_rate, "warmup_steps": s.warmup_steps,
                     "eval_interval": min(s.eval_interval, s.max_steps),
                     "checkpoint_interval": min(cfg.training.checkpoint_interval, s.max_steps),
                     "seed": s.seed, "init_from": str(base_dir), "mixture": None, "grad_accum_steps": 1},
        "sweep": {}}))


@torch.no_grad()
def assistant_bits_per_byte(model: Transformer, dataset_dir: Path, split: str = "val") -> dict:
    """{"bpb", "nats", "learned_tokens", "assistant_bytes"} of a model on a split of an sft_dataset."""
    model.eval()
    nats, tokens = 0.0, 0
    for x, y in sequential_batches(dataset_dir, split, 0, 32):
        logits, _ = model(x)
        losses = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=-100,
                                                   reduction="sum")
        nats += float(losses)
        tokens += int((y != -100).sum())
    assistant_bytes = read_json(Path(dataset_dir) / "manifest.json")["splits"][split]["assistant_bytes"]
    return {"bpb": nats / math.log(2) / max(assistant_bytes, 1), "nats": nats, "learned_tokens": tokens,
            "assistant_bytes": assistant_bytes}


def held_out_prompts(dataset_dir: Path, limit: int | None = None) -> list[list[dict]]:
    """Each held-out conversation up to its last user turn (what the assistant is asked last)."""
    prompts = []
    for line in (Path(dataset_dir) / "val_conversations.jsonl").read_text().splitlines()[:limit]:
        messages = json.loads(line)["messages"]
        prompts.append(messages[:max(i for i, m in enumerate(messages) if m["role"] == "user") + 1])
    return prompts


def reply(generator: TextGenerator, messages: list[dict], max_new_tokens: int = 200, temperature: float = 0.0,
          seed: int | None = 0) -> Iterator[str]:
    """The assistant's answer to `messages`, streamed, until <|end|> (temperature 0: greedy)."""
    ids = render(generator.tokenizer, messages, add_generation_prompt=True).ids
    yield from generator.stream_ids(ids, generator.tokenizer.token_to_id(END), max_new_tokens, temperature, None, seed)


@torch.no_grad()
def turns_ended(generator: TextGenerator, prompts: list[list[dict]]) -> float:
    """The share of `prompts` whose greedy answer ends with <|end|> before the context is full."""
    end = generator.tokenizer.token_to_id(END)
    ended = 0
    for messages in prompts:
        ids = render(generator.tokenizer, messages, add_generation_prompt=True).ids
        room = generator.model.args.block_size - len(ids)
        if room <= 0:
            continue  # no room to answer: counts as not ended
        tokens = [int(t) for t in generator.model.generate(torch.tensor([ids]), room, temperature=0, stop_token=end)]
        ended += end in tokens
    return ended / max(len(prompts), 1)
