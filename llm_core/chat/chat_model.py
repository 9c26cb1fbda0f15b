"""chat_model: the base model fine-tuned on sft_dataset's conversations by the same training loop, and
what judges it.

The fine-tune's config is the profile's, with the base's architecture (the model section it was trained
with), the sft section's steps, batch, learning rates and seed, and `training.init_from` the base's
directory: train() then starts from the base's weights (its architecture and tokenizer checked) and,
reading the packed rows of sft_dataset, learns the assistant's tokens only.

Judged on the held-out conversations, the base and the fine-tune alike:
- assistant bits per byte: the loss on the tokens the mask learns (the assistant's content and the <|end|>
  closing it), in bits, over the UTF-8 bytes of the assistant's content; each conversation scored alone;
- turns ended: the share of held-out prompts (each conversation up to its last user turn, then
  <|assistant|>) whose greedy answer ends with <|end|> within the context.
The chat champion is gated as base models are: a new fine-tune takes `champion` when its assistant bits per
byte beat the current chat champion's, paired over the same held-out conversations, beyond the noise.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from tokenizers import Tokenizer

from llm_core.config import ScratchConfig, deep_merge, validate_config
from llm_core.data.chat_template import CHAT_TEMPLATE, END, render
from llm_core.evaluation import promotion
from llm_core.evaluation.promotion import Verdict
from llm_core.files import read_json, write_json
from llm_core.model import Transformer
from llm_core.model_files import MODEL_CONFIG_FILE
from llm_core.registry.generate import TextGenerator


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


def held_out_conversations(dataset_dir: Path) -> list[dict]:
    """{"id", "messages"} of each held-out conversation of an sft_dataset."""
    return [json.loads(line) for line in (Path(dataset_dir) / "val_conversations.jsonl").read_text().splitlines()]


@torch.no_grad()
def conversation_bits(model: Transformer, tokenizer: Tokenizer, dataset_dir: Path,
                      batch_size: int = 32) -> dict[str, tuple[float, int, str]]:
    """id -> (bits, assistant bytes, "chat") of each held-out conversation, scored alone: the loss on the
    tokens its mask learns (the assistant's content and the <|end|> closing it), in bits; the UTF-8 bytes
    of the assistant's content. The per-document shape that promotion pairs two models on."""
    model.eval()
    conversations = held_out_conversations(dataset_dir)
    scores = {}
    for start in range(0, len(conversations), batch_size):
        batch = conversations[start:start + batch_size]
        rendered = [render(tokenizer, c["messages"]) for c in batch]
        width = max(len(r.ids) for r in rendered) - 1  # at most block_size: longer ones were quarantined
        x = torch.zeros((len(batch), width), dtype=torch.long)  # padded at the end: causal, so harmless
        y = torch.full((len(batch), width), -100, dtype=torch.long)
        for row, r in enumerate(rendered):
            targets = [t if learned else -100 for t, learned in zip(r.ids[1:], r.mask[1:])]
            x[row, :len(targets)], y[row, :len(targets)] = torch.tensor(r.ids[:-1]), torch.tensor(targets)
        logits, _ = model(x)
        nats = torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), y, ignore_index=-100,
                                                 reduction="none").sum(dim=1)
        for c, r, n in zip(batch, rendered, nats.tolist()):
            scores[c["id"]] = (n / math.log(2), r.assistant_bytes, "chat")
    return scores


def bits_per_byte(scores: dict[str, tuple[float, int, str]]) -> float:
    return sum(b for b, _, _ in scores.values()) / max(sum(n for _, n, _ in scores.values()), 1)


def held_out_prompts(dataset_dir: Path, limit: int | None = None) -> list[list[dict]]:
    """Each held-out conversation up to its last user turn (what the assistant is asked last)."""
    prompts = []
    for conversation in held_out_conversations(dataset_dir)[:limit]:
        messages = conversation["messages"]
        prompts.append(messages[:max(i for i, m in enumerate(messages) if m["role"] == "user") + 1])
    return prompts


@torch.no_grad()
def turns_ended(generator: TextGenerator, prompts: list[list[dict]]) -> float:
    """The share of `prompts` whose greedy answer ends with <|end|> before the context is full."""
    end = generator.tokenizer.token_to_id(END)
    ended = 0
    for messages in prompts:
        ids, _ = generator.chat_prompt(messages)
        room = generator.model.args.block_size - len(ids)
        if room <= 0:
            continue  # no room to answer: counts as not ended
        tokens = [int(t) for t in generator.model.generate(torch.tensor([ids]), room, temperature=0, stop_token=end)]
        ended += end in tokens
    return ended / max(len(prompts), 1)


def judge(cfg: ScratchConfig, base_dir: Path, chat_dir: Path, sft_dir: Path, tokenizer_dir: Path,
          num_prompts: int = 100, num_samples: int = 5) -> tuple[dict, dict]:
    """The base and the fine-tune side by side on the held-out conversations (assistant bits per byte,
    turns ended) and on the profile's multiple-choice tasks (acc_norm: what the fine-tune cost), with a few
    of the fine-tune's answers: what chat_model reports and registers; and the fine-tune's per-conversation
    scores (conversation_bits), which its promotion pairs with the champion's."""
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
        scores = conversation_bits(generator.model, generator.tokenizer, sft_dir)
        report[name] = {
            "assistant_bpb": bits_per_byte(scores),
            "turns_ended": turns_ended(generator, prompts),
            "tasks": {task: multiple_choice.score_task(task, items, generator.model, generator.tokenizer).acc_norm
                      for task, items in items_of.items()}}
    report["samples"] = [{"prompt": p[-1]["content"], "answer": "".join(generator.reply(p, max_new_tokens=60))}
                         for p in prompts[:num_samples]]  # the fine-tune's (the last generator, as `scores`)
    return report, scores


def against_champion(cfg: ScratchConfig, tracking_uri: str, name: str, key: str, scores: dict,
                     sft_dir: Path) -> Verdict | None:
    """The verdict for the fine-tune `key` (its per-conversation `scores`) against the current champion of
    `name`, scored now on the same held-out conversations (with its own tokenizer: bits per byte compare
    across tokenizers), paired as base models are (registry.promotion_margin_bpb, promotion_confidence);
    None before the first champion, or when it is this very fine-tune."""
    from llm_core import tracking
    from llm_core.layout import REGISTRY_CACHE_DIR
    from llm_core.registry import versions
    from llm_core.registry.generate import load_generator

    champion = versions.champion_version(tracking.client(tracking_uri), name)
    if champion is None or champion.tags.get(versions.KEY_TAG) == key:
        return None
    champion_dir = versions.download(f"{name}/{champion.version}", tracking_uri, cfg.data_path / REGISTRY_CACHE_DIR)
    generator = load_generator(champion_dir)
    champion_scores = conversation_bits(generator.model, generator.tokenizer, sft_dir)
    return promotion.verdict(scores, champion_scores, bits_per_byte(scores), bits_per_byte(champion_scores),
                             margin=cfg.registry.promotion_margin_bpb, confidence=cfg.registry.promotion_confidence)


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
