"""sft_dataset: the conversations of `sft.sources`, rendered through the chat template with the base
model's tokenizer, split by conversation and packed into rows for the fine-tune.

    sft_dataset/
      manifest.json                       counts, the row layout, the tokenizer's hash, the base model
      tokenizer/                          the base model's tokenizer (what the rows' ids mean)
      {train,val}.tokens.npy              (rows, block_size + 1) int32: packed conversations, padded
      {train,val}.mask.npy                (rows, block_size + 1) uint8: 1 where the token is learned
      val_conversations.jsonl             the held-out conversations ({"id", "messages"}): evaluation prompts
    quarantine/sft_dataset/<source>.jsonl conversations not used, each with its reason

A row holds whole conversations one after another (a conversation is never cut in two; one longer than
a row is quarantined) and is padded with <|pad|> (mask 0). The split is by conversation, from a hash of
its messages and sft.seed: the same conversation is on the same side in every build. Exact duplicates
are kept once and counted.
"""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path
from typing import Callable

import numpy as np

from llm_core.chat.conversations import read_conversations
from llm_core.data.chat_template import missing_chat_tokens, render
from llm_core.config import ScratchConfig, resolve_path
from llm_core.data.tokenizer import PAD, load_tokenizer
from llm_core.errors import DataError
from llm_core.files import Quarantine, read_json, save_npy, short_hash, write_json, write_text
from llm_core.model_files import MODEL_CONFIG_FILE, copy_tokenizer
from llm_core.training.model_source import tokenizer_dir_of

SPLITS = ("train", "val")


@dataclasses.dataclass
class Conversation:
    id: str
    source: str
    messages: list[dict]
    ids: list[int]
    mask: list[int]
    assistant_bytes: int


def is_validation(conversation_id: str, cfg: ScratchConfig) -> bool:
    return int(short_hash([cfg.sft.seed, conversation_id]), 16) / 16 ** 16 < cfg.sft.val_fraction


def pack(conversations: list[Conversation], row_length: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows of `row_length` tokens holding whole conversations in order, each row padded at its end."""
    rows: list[tuple[list[int], list[int]]] = []
    for c in conversations:
        if not rows or len(rows[-1][0]) + len(c.ids) > row_length:
            rows.append(([], []))
        rows[-1][0].extend(c.ids)
        rows[-1][1].extend(c.mask)
    tokens = np.full((len(rows), row_length), pad_id, dtype=np.int32)
    mask = np.zeros((len(rows), row_length), dtype=np.uint8)
    for i, (ids, learned) in enumerate(rows):
        tokens[i, :len(ids)] = ids
        mask[i, :len(learned)] = learned
    return tokens, mask


def source_paths(cfg: ScratchConfig) -> list[Path]:
    if not cfg.sft.sources:
        raise DataError("sft.sources is empty: no conversations to fine-tune on",
                        next_step='list JSONL files of {"messages": [...]} in sft.sources '
                                  "(data/conversations.jsonl ships with the project)")
    paths = [resolve_path(p) for p in cfg.sft.sources]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise DataError(f"sft.sources: no such file: {', '.join(missing)}")
    return paths


def build_sft_dataset(cfg: ScratchConfig, base_dir: Path, base_model: str, out_dir: Path, quarantine_dir: Path,
                      log: Callable[[str], None] = print) -> dict:
    """Render, check, split and pack the conversations into out_dir with the tokenizer and context of the
    base model in `base_dir` (`base_model`: what sft.base_model named); the manifest (also written there)."""
    paths = source_paths(cfg)
    tokenizer_dir = tokenizer_dir_of(base_dir, cfg)
    tokenizer = load_tokenizer(tokenizer_dir)
    block_size = read_json(base_dir / MODEL_CONFIG_FILE)["model"]["block_size"]
    missing = missing_chat_tokens(tokenizer)
    if missing:
        raise DataError(f"sft.base_model {base_model!r}: its tokenizer has no {', '.join(missing)} token(s), so it "
                        f"cannot hold the chat template",
                        next_step="train the base with the chat tokens in tokenizer.special_tokens (the default "
                                  "profile's) and register it, then fine-tune that one")
    row_length = block_size + 1  # a row's inputs are its first block_size tokens, its targets the last
    seen: set[str] = set()
    kept: list[Conversation] = []
    counts = {"read": 0, "duplicates": 0, "too_long": 0, "quarantined": 0}
    quarantine_dir.mkdir(parents=True, exist_ok=True)
    for path in paths:
        quarantine = Quarantine(quarantine_dir, short_hash(str(path), 8) + "-" + path.stem)
        for conversation_id, messages in read_conversations(path, quarantine):
            counts["read"] += 1
            if conversation_id in seen:
                counts["duplicates"] += 1
                continue
            seen.add(conversation_id)
            rendered = render(tokenizer, messages)
            if len(rendered.ids) > row_length:
                quarantine.add_record(str(path), f"longer than the context: {len(rendered.ids)} tokens, a row holds "
                                      f"{row_length} (model.block_size + 1)", json.dumps({"messages": messages}))
                counts["too_long"] += 1
                continue
            kept.append(Conversation(conversation_id, path.name, messages, rendered.ids, rendered.mask,
                                     rendered.assistant_bytes))
        counts["quarantined"] += len(quarantine)
        quarantine.commit()
    splits = {name: [c for c in kept if is_validation(c.id, cfg) == (name == "val")] for name in SPLITS}
    for name in SPLITS:
        if not splits[name]:
            raise DataError(f"sft_dataset: no {name} conversations ({len(kept)} usable of {counts['read']} read)",
                            next_step="add conversations to sft.sources or change sft.val_fraction")
    random.Random(cfg.sft.seed).shuffle(splits["train"])  # rows mix the sources and kinds of conversations
    splits["val"].sort(key=lambda c: c.id)

    out_dir.mkdir(parents=True, exist_ok=True)
    copy_tokenizer(tokenizer_dir, out_dir)  # what the rows' ids mean, beside them
    pad_id = tokenizer.token_to_id(PAD)
    manifest = {"kind": "sft", "block_size": block_size, "row_length": row_length, "pad_id": pad_id,
                "vocab_size": tokenizer.get_vocab_size(), "base_model": base_model, "base_dir": str(base_dir),
                "tokenizer_hash": short_hash(tokenizer.to_str().encode()), "counts": counts, "splits": {}}
    for name, conversations in splits.items():
        tokens, mask = pack(conversations, row_length, pad_id)
        save_npy(out_dir / f"{name}.tokens.npy", tokens)
        save_npy(out_dir / f"{name}.mask.npy", mask)
        num_tokens = sum(len(c.ids) for c in conversations)
        manifest["splits"][name] = {
            "conversations": len(conversations), "rows": len(tokens), "tokens": num_tokens,
            "learned_tokens": int(mask.sum()), "assistant_bytes": sum(c.assistant_bytes for c in conversations),
            "fill": num_tokens / max(tokens.size, 1)}
    write_text(out_dir / "val_conversations.jsonl",
               "".join(json.dumps({"id": c.id, "messages": c.messages}) + "\n" for c in splits["val"]))
    write_json(out_dir / "manifest.json", manifest)
    train, val = manifest["splits"]["train"], manifest["splits"]["val"]
    log(f"sft_dataset: {counts['read']} conversations read, {len(kept)} kept ({counts['duplicates']} duplicates, "
        f"{counts['quarantined']} quarantined, of which {counts['too_long']} longer than the context); "
        f"train {train['conversations']} in {train['rows']} rows ({train['fill']:.0%} filled), "
        f"val {val['conversations']}; {train['learned_tokens']} learned tokens")
    return manifest
