"""train_tokenizer on a small real corpus: files, vocab, special tokens, exact round trips,
the held-out split, the training-bytes cap and loading through `transformers`."""

from __future__ import annotations

import json
import random

import pyarrow.parquet as pq
import pytest
from helpers import MORE_TRICKY, QUIET, build_shards, make_config, random_unicode, write_jsonl
from tokenizers import Tokenizer

from llm_core.data.raw_corpus import build_raw_corpus, raw_parts
from llm_core.data.split import is_validation
from llm_core.data.tokenizer import (EOT, PAD, TRICKY_TEXTS, held_out_texts, iter_documents, load_tokenizer,
                                     train_tokenizer)

VOCAB = 512
VAL_WORD = "zqxvjwk"  # planted in validation documents only
TRAIN_WORD = VAL_WORD[::-1]  # "kwjvxqz": the control, planted as often in training documents


def interleave(text: str, word: str, every: int) -> tuple[str, int]:
    """`word` inserted after every `every` words of `text`; returns (text, number inserted)."""
    words, out, n = text.split(), [], 0
    for i, w in enumerate(words, 1):
        out.append(w)
        if i % every == 0:
            out.append(word)
            n += 1
    return " ".join(out), n


def trigrams(word: str) -> set[str]:
    return {word[i:i + 3] for i in range(len(word) - 2)}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, prose):
    """A tokenizer trained on prose whose validation docs carry VAL_WORD (and training docs TRAIN_WORD,
    no more often in total). Returns (cfg, shards, result, val texts, train texts)."""
    root = tmp_path_factory.mktemp("tokenizer")
    src = root / "src"
    src.mkdir()
    source = src / "prose.jsonl"
    write_jsonl(source, prose)
    cfg = make_config(root / "run", [src], tokenizer={"vocab_size": VOCAB}, dataset={"val_fraction": 0.15})
    # Pass 1 tells which record becomes a validation document (ids depend on the file and record index).
    build_raw_corpus(cfg, QUIET)
    ids = [r["id"] for p in raw_parts(cfg) for r in pq.read_table(p, columns=["id"]).to_pylist()]
    assert len(ids) == len(prose)
    val_rows = [i for i, doc_id in enumerate(ids) if is_validation(doc_id, 0.15, cfg.dataset.seed)]
    train_rows = [i for i in range(len(prose)) if i not in set(val_rows)]
    assert len(val_rows) >= 5 and len(train_rows) >= 50

    # Pass 2: same file, same record order, words planted.
    texts = list(prose)
    planted = 0
    for i in val_rows:
        texts[i], n = interleave(texts[i], VAL_WORD, every=3)
        planted += n
    per_doc = -(-planted // len(train_rows))  # the control word, about as often in total
    control = 0
    for i in train_rows:
        if control >= planted:
            break
        k = min(per_doc, planted - control)
        texts[i] = texts[i] + " " + " ".join(f"{TRAIN_WORD} {w}" for w in texts[i].split()[:k])
        control += k
    assert control <= planted
    write_jsonl(source, texts)
    shards = build_shards(cfg)
    docs = list(iter_documents(shards))
    val = [t for d, t in docs if is_validation(d, cfg.dataset.val_fraction, cfg.dataset.seed)]
    train = [t for d, t in docs if not is_validation(d, cfg.dataset.val_fraction, cfg.dataset.seed)]
    # Preconditions: the planted words survived cleaning and sit on the intended side only.
    assert sum(t.count(VAL_WORD) for t in val) >= 100
    assert all(VAL_WORD not in t for t in train)
    assert all(TRAIN_WORD not in t for t in val)
    assert 0 < sum(t.count(TRAIN_WORD) for t in train) <= sum(t.count(VAL_WORD) for t in val)
    result = train_tokenizer(cfg, shards, root / "tokenizer", log=QUIET)
    return cfg, shards, result, val, train


def test_files_vocab_and_special_tokens(trained):
    cfg, _, result, _, _ = trained
    out_dir = result.path.parent
    assert result.path == out_dir / "tokenizer.json" and result.path.is_file()
    config = json.loads((out_dir / "tokenizer_config.json").read_text())
    assert config["eos_token"] == EOT and config["pad_token"] == PAD
    tokenizer = load_tokenizer(out_dir)
    assert result.vocab_size == tokenizer.get_vocab_size() == cfg.tokenizer.vocab_size == VOCAB
    assert tokenizer.token_to_id(EOT) == 0 and tokenizer.token_to_id(PAD) == 1
    assert result.bytes_per_token > 1
    assert result.roundtrip_failures == []
    assert result.num_training_documents == len(trained[4])  # every training doc (the cap is 200 MB)


def test_load_without_a_tokenizer_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer"):
        load_tokenizer(tmp_path)


def test_lossless_round_trip(trained):
    _, shards, result, val, _ = trained
    tokenizer = load_tokenizer(result.path.parent)
    held_out = held_out_texts(shards, trained[0])
    assert held_out == val and held_out
    texts = held_out + TRICKY_TEXTS + MORE_TRICKY + random_unicode(random.Random(0), 300)
    for text in texts:
        ids = tokenizer.encode(text, add_special_tokens=False).ids
        assert tokenizer.decode(ids, skip_special_tokens=False) == text, repr(text)
        if text:
            assert all(0 <= i < VOCAB for i in ids)
    batch = tokenizer.encode_batch(texts, add_special_tokens=False)
    assert [tokenizer.decode(e.ids, skip_special_tokens=False) for e in batch] == texts


def test_validation_documents_are_not_trained_on(trained):
    _, _, result, _, train = trained
    tokenizer = load_tokenizer(result.path.parent)
    # The control word, trained on no more often than VAL_WORD appears in validation docs, got merged...
    assert tokenizer.encode(" " + TRAIN_WORD, add_special_tokens=False).ids == [tokenizer.token_to_id("Ġ" + TRAIN_WORD)]
    # ... while VAL_WORD is split, and no token holds even three of its letters in a row.
    assert len(tokenizer.encode(" " + VAL_WORD, add_special_tokens=False).ids) >= 3
    pieces = trigrams(VAL_WORD)
    assert not any(piece in t for t in train for piece in pieces)  # precondition: unseen in training text
    vocab = [tokenizer.decode([i]) for i in range(tokenizer.get_vocab_size())]
    assert not [v for v in vocab if any(piece in v for piece in pieces)]


def test_training_bytes_cap(trained, tmp_path):
    cfg, shards, _, _, train = trained
    cap_mb = 0.02
    capped = cfg.model_copy(update={"tokenizer": cfg.tokenizer.model_copy(update={"max_training_bytes_mb": cap_mb})})
    result = train_tokenizer(capped, shards, tmp_path / "capped", log=QUIET)
    cap = int(cap_mb * 1e6)
    sizes = [len(t.encode()) for t in train]
    assert cap <= result.num_training_bytes <= cap + max(sizes)
    assert result.num_training_documents < len(train)
    # Exactly the first training documents, in corpus order, until the cap was reached.
    assert result.num_training_bytes == sum(sizes[:result.num_training_documents])
    assert sum(sizes[:result.num_training_documents - 1]) < cap


def test_all_validation_corpus_is_refused(trained, tmp_path):
    cfg, shards, _, _, _ = trained
    all_val = cfg.model_copy(update={"dataset": cfg.dataset.model_copy(update={"val_fraction": 0.999999})})
    with pytest.raises(ValueError, match="no training documents"):
        train_tokenizer(all_val, shards, tmp_path / "none", log=QUIET)


def test_transformers_loads_it_with_the_same_ids(trained):
    transformers = pytest.importorskip("transformers")
    _, _, result, val, _ = trained
    out_dir = result.path.parent
    tokenizer = Tokenizer.from_file(str(result.path))
    hf = transformers.AutoTokenizer.from_pretrained(str(out_dir))
    assert hf.eos_token == EOT and hf.eos_token_id == 0 and hf.pad_token_id == 1
    assert len(hf) == VOCAB
    texts = val[:5] + TRICKY_TEXTS + MORE_TRICKY + random_unicode(random.Random(1), 50)
    for text in texts:
        ids = tokenizer.encode(text, add_special_tokens=False).ids
        assert hf(text, add_special_tokens=False)["input_ids"] == ids, repr(text)
        assert hf.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False) == text, repr(text)
        assert hf.decode(ids, skip_special_tokens=False) == text, repr(text)  # the saved default too
