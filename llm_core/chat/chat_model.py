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

import torch

from llm_core.data.chat_template import CHAT_TEMPLATE, END, render
from llm_core.config import ScratchConfig, deep_merge, validate_config
from llm_core.files import read_json, write_json
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
        "engine": {"kind": "local"},  # a fine-tune is small: it trains on this machine whatever the engine
        "sweep": {}}))


def add_chat_template(tokenizer_dir: Path) -> None:
    """A chat model's tokenizer carries the template (tokenizer_config.json's `chat_template`): the
    registered version and its Hugging Face export then chat as `scratchllm chat` does."""
    config_file = Path(tokenizer_dir) / "tokenizer_config.json"
    write_json(config_file, {**read_json(config_file), "chat_template": CHAT_TEMPLATE})


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


def judge(cfg: ScratchConfig, base_dir: Path, chat_dir: Path, sft_dir: Path, tokenizer_dir: Path,
          num_prompts: int = 100, num_samples: int = 5) -> dict:
    """The base and the fine-tune side by side on the held-out conversations (assistant bits per byte,
    turns ended) and on the profile's multiple-choice tasks (acc_norm: what the fine-tune cost), with a few
    of the fine-tune's answers. What chat_model reports and registers."""
    from llm_core.data import task_items
    from llm_core.data.tokenized_dataset import task_files
    from llm_core.evaluation import multiple_choice
    from llm_core.registry.generate import load_generator

    items_of = {name: task_items.load_task(path) for name, path in task_files(cfg).items()}
    prompts = held_out_prompts(sft_dir, num_prompts)
    held_out = read_json(Path(sft_dir) / "manifest.json")["splits"]["val"]["conversations"]
    report: dict = {"held_out_conversations": held_out, "prompts_judged": len(prompts)}
    for name, model_dir in (("base", base_dir), ("chat", chat_dir)):
        generator = load_generator(model_dir, tokenizer_dir)
        report[name] = {
            "assistant_bpb": assistant_bits_per_byte(generator.model, sft_dir)["bpb"],
            "turns_ended": turns_ended(generator, prompts),
            "tasks": {task: multiple_choice.score_task(task, items, generator.model, generator.tokenizer).acc_norm
                      for task, items in items_of.items()}}
    report["samples"] = [{"prompt": p[-1]["content"], "answer": "".join(generator.reply(p, max_new_tokens=60))}
                         for p in prompts[:num_samples]]  # the fine-tune's (the last generator)
    return report


def model_card(cfg: ScratchConfig, base_version: str, report: dict) -> str:
    """The README.md of a registered chat version: where it comes from and how it compares to its base."""
    base, chat = report["base"], report["chat"]
    rows = [f"| assistant bits per byte ({report['held_out_conversations']} held-out conversations) | "
            f"{base['assistant_bpb']:.4f} | {chat['assistant_bpb']:.4f} |",
            f"| answers ending their turn ({report['prompts_judged']} held-out prompts, greedy) | "
            f"{base['turns_ended']:.0%} | {chat['turns_ended']:.0%} |"]
    rows += [f"| task `{task}` acc_norm | {base['tasks'][task]:.3f} | {chat['tasks'][task]:.3f} |"
             for task in base["tasks"]]
    samples = "\n".join(f"- **user:** {s['prompt']}\n  **assistant:** {s['answer']}" for s in report["samples"])
    return (f"# {cfg.registry.model_name}-chat\n\nA chat fine-tune of `{base_version}` (its parent: tag "
            f"`scratchllm.parent`) on {', '.join(cfg.sft.sources)}, {cfg.sft.max_steps} steps, the loss on the "
            f"assistant's tokens only. Conversations use the chat template of `llm_core/data/chat_template.py` "
            f"(`<|user|>...<|end|><|assistant|>...<|end|>`).\n\n| | base | chat |\n|---|---|---|\n"
            + "\n".join(rows) + f"\n\nHeld-out answers:\n\n{samples}\n")
