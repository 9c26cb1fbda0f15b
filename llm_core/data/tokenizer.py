"""Train a byte-level BPE tokenizer (HF `tokenizers`) from the cleaned shards, streaming.

Byte-level means every string is representable and `decode(encode(x)) == x` exactly: no
normalizer, no prefix space, a ByteLevel decoder. Held-out (validation) documents are never
trained on; they measure bytes per token and the round trip.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Callable, Iterator

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from llm_core.config import ScratchConfig
from llm_core.data.shards import iter_batches
from llm_core.errors import DataError
from llm_core.files import atomic_path, copy_file
from llm_core.layout import TOKENIZER_DIR
from llm_core.data.split import Split, plan_split

EOT, PAD = "<|endoftext|>", "<|pad|>"
CHAT_TOKENS = ("<|user|>", "<|assistant|>", "<|end|>")  # the chat template's turns (llm_core/data/chat_template.py)
TOKENIZER_FILE = "tokenizer.json"
# Strings a tokenizer must round-trip besides real documents: unicode, emoji, CJK, whitespace runs.
TRICKY_TEXTS = [
    "Hello, world!", "  two leading spaces", "trailing spaces   ", "tabs\t\tand\ttabs", "\n\n\nnewlines\n\n",
    "emoji 😀👍🏽 family 👨‍👩‍👧", "漢字とかな、한국어", "Ünïcödé — “quotes” ‘’ …", "mixed\r\nline\rendings",
    "<|endoftext|> as plain text", "null\x00byte and \x7f", "a" * 300, "",
]


@dataclasses.dataclass
class TokenizerResult:
    path: Path
    vocab_size: int
    vocab_size_requested: int  # tokenizer.vocab_size; a small text supports fewer merges
    bytes_per_token: float  # on held-out documents
    num_training_bytes: int
    num_training_documents: int
    train_seconds: float
    examples: list[tuple[str, list[str]]]
    roundtrip_failures: list[str]


def new_tokenizer() -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def iter_documents(shards: list[Path], columns=("doc_id", "text")) -> Iterator[tuple]:
    """(doc_id, text) of every piece of the shards (or other `columns`), streamed batch by batch."""
    for shard in shards:
        for batch in iter_batches(shard, list(columns)):
            yield from zip(*(batch.column(i).to_pylist() for i in range(len(columns))))


def _training_texts(shards: list[Path], cfg: ScratchConfig, split: Split, counter: dict) -> Iterator[str]:
    cap = int(cfg.tokenizer.max_training_bytes_mb * 1e6)
    for piece_id, doc_id, text in iter_documents(shards, ("id", "doc_id", "text")):
        if split.is_validation(piece_id, doc_id):
            continue
        if counter["bytes"] >= cap:
            return
        counter["bytes"] += len(text.encode())
        counter["documents"] += 1
        yield text


def held_out_texts(shards: list[Path], cfg: ScratchConfig, max_bytes: int = 2_000_000) -> list[str]:
    """Validation documents (up to `max_bytes`): never seen by the tokenizer's training."""
    split = plan_split(cfg, shards).split
    texts, size = [], 0
    for piece_id, doc_id, text in iter_documents(shards, ("id", "doc_id", "text")):
        if size >= max_bytes:
            break
        if split.is_validation(piece_id, doc_id):
            texts.append(text)
            size += len(text.encode())
    return texts


def roundtrip_failures(tokenizer: Tokenizer, texts: list[str]) -> list[str]:
    """The texts that do not come back byte for byte from decode(encode(text))."""
    encoded = tokenizer.encode_batch(texts, add_special_tokens=False)
    return [t for t, e in zip(texts, encoded) if tokenizer.decode(e.ids, skip_special_tokens=False) != t]


def verify_roundtrip(cfg: ScratchConfig, shards: list[Path]) -> tuple[bool, str]:
    """The tokenizer_roundtrip check: decode(encode(x)) == x, byte for byte, on held-out documents of
    `shards` and on tricky unicode/whitespace. (passed, details)."""
    texts = held_out_texts(shards, cfg) + TRICKY_TEXTS
    failures = roundtrip_failures(load_tokenizer(cfg.data_path / TOKENIZER_DIR), texts)
    return not failures, f"{len(texts) - len(failures)} texts round-trip; failures: {[f[:60] for f in failures[:5]]}"


def bytes_per_token(tokenizer: Tokenizer, texts: list[str]) -> float:
    n_tokens = sum(len(e.ids) for e in tokenizer.encode_batch(texts, add_special_tokens=False))
    return sum(len(t.encode()) for t in texts) / max(n_tokens, 1)


def save_tokenizer(tokenizer: Tokenizer, out_dir: Path, model_max_length: int,
                   chat_template: str | None = None) -> Path:
    """tokenizer.json plus what `transformers.AutoTokenizer.from_pretrained(out_dir)` needs; a chat model's
    tokenizer also carries its chat template (what `apply_chat_template` renders)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_dir / TOKENIZER_FILE) as tmp:
        tokenizer.save(str(tmp))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": EOT, "eos_token": EOT, "unk_token": None,
              "pad_token": PAD, "model_max_length": model_max_length, "clean_up_tokenization_spaces": False,
              "add_prefix_space": False, **({"chat_template": chat_template} if chat_template else {})}
    special = {"bos_token": EOT, "eos_token": EOT, "pad_token": PAD}
    for name, payload in (("tokenizer_config.json", config), ("special_tokens_map.json", special)):
        with atomic_path(out_dir / name) as tmp:
            tmp.write_text(json.dumps(payload, indent=2))
    return out_dir / TOKENIZER_FILE


def chat_template_of(tokenizer_dir: Path) -> str | None:
    """The chat template a tokenizer directory carries (a chat model's), or None."""
    path = Path(tokenizer_dir) / "tokenizer_config.json"
    return json.loads(path.read_text()).get("chat_template") if path.is_file() else None


def load_tokenizer(out_dir: Path) -> Tokenizer:
    path = out_dir / TOKENIZER_FILE
    if not path.exists():
        raise FileNotFoundError(f"no tokenizer at {path}: materialize the `tokenizer` asset first")
    return Tokenizer.from_file(str(path))


def train_tokenizer(cfg: ScratchConfig, shards: list[Path], out_dir: Path, log: Callable[[str], None] = print,
                    keep: Path | None = None, warn: Callable[[str], None] | None = None) -> TokenizerResult:
    """A byte-level BPE trained on the training split of `shards`, saved to out_dir. `keep`: the
    tokenizer directory of a model that a training warm-starts from, copied instead (new data must
    not give the model other tokens)."""
    counter, seconds = {"bytes": 0, "documents": 0}, 0.0
    if keep is not None:
        tokenizer = load_tokenizer(keep)
        out_dir.mkdir(parents=True, exist_ok=True)
        for name in (TOKENIZER_FILE, "tokenizer_config.json", "special_tokens_map.json"):
            copy_file(keep / name, out_dir / name)
        path = out_dir / TOKENIZER_FILE
        log(f"tokenizer: kept the warm start's tokenizer ({keep}), vocab {tokenizer.get_vocab_size()}"
            + (f" (tokenizer.vocab_size {cfg.tokenizer.vocab_size} does not apply to a warm start)"
               if tokenizer.get_vocab_size() != cfg.tokenizer.vocab_size else ""))
    else:
        special = list(dict.fromkeys([EOT, PAD, *cfg.tokenizer.special_tokens]))
        trainer = trainers.BpeTrainer(
            vocab_size=cfg.tokenizer.vocab_size, special_tokens=special, min_frequency=2, show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: nothing is ever unknown
        )
        tokenizer = new_tokenizer()
        start = time.perf_counter()
        split = plan_split(cfg, shards).split
        tokenizer.train_from_iterator(_training_texts(shards, cfg, split, counter), trainer=trainer)
        seconds = time.perf_counter() - start
        if counter["documents"] == 0:
            raise DataError("no training documents for the tokenizer: every document is in the validation split",
                            next_step="lower dataset.val_fraction or add documents")
        log(f"tokenizer: trained on {counter['documents']} documents, {counter['bytes'] / 1e6:.1f} MB "
            f"in {seconds:.1f} s ({counter['bytes'] / 1e6 / max(seconds, 1e-9):.1f} MB/s), "
            f"vocab {tokenizer.get_vocab_size()}")
        if tokenizer.get_vocab_size() < cfg.tokenizer.vocab_size:
            (warn or log)(f"tokenizer: tokenizer.vocab_size {cfg.tokenizer.vocab_size} requested, but the training "
                          f"text ({counter['bytes'] / 1e3:.1f} KB) supports only {tokenizer.get_vocab_size()} tokens "
                          f"(no pair of tokens left that occurs twice); the vocabulary is that size")
        path = save_tokenizer(tokenizer, out_dir, cfg.model.block_size)

    held_out = held_out_texts(shards, cfg)
    failures = roundtrip_failures(tokenizer, held_out + TRICKY_TEXTS)
    examples = [(text, [tokenizer.id_to_token(i) for i in tokenizer.encode(text).ids])
                for text in ([held_out[0][:80]] if held_out else []) + TRICKY_TEXTS[:6]]
    return TokenizerResult(
        path=path, vocab_size=tokenizer.get_vocab_size(), vocab_size_requested=cfg.tokenizer.vocab_size,
        bytes_per_token=bytes_per_token(tokenizer, held_out),
        num_training_bytes=counter["bytes"], num_training_documents=counter["documents"], train_seconds=seconds,
        examples=examples, roundtrip_failures=failures,
    )
