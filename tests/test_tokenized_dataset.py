"""build_tokenized_dataset on a small real corpus: dtypes, EOT boundaries, the split by document,
byte accounting, the verify functions against corrupted files, and incremental re-encoding."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from helpers import QUIET, build_shards, make_config, write_jsonl

from llm_core.data.cleaned_shards import build_cleaned_shards
from llm_core.data.raw_corpus import build_raw_corpus
from llm_core.layout import DATASET_DIR
from llm_core.training.loader import TokenWindows
from llm_core.data.split import is_validation
from llm_core.data.tokenized_dataset import (
    build_tokenized_dataset,
    token_dtype,
    verify_token_accounting,
    verify_token_ids,
)
from llm_core.data.tokenizer import EOT, held_out_texts, iter_documents, load_tokenizer, train_tokenizer

VOCAB = 300
LITERAL = "<|endoftext|>"


def read_ipc(path: Path) -> pa.Table:
    return pa.ipc.open_file(pa.memory_map(str(path))).read_all()


def write_tokens(path: Path, tokens: np.ndarray) -> None:
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, pa.schema([("tokens", pa.from_numpy_dtype(
            tokens.dtype))])) as writer:
        writer.write_table(pa.table({"tokens": pa.array(tokens)}))


def setup_corpus(root: Path, prose: list[str], vocab: int = VOCAB, files: int = 3):
    """`files` jsonl sources of prose (one has a literal <|endoftext|> in a document), several small shards,
    a trained tokenizer. Returns (cfg, src dir, tokenizer dir)."""
    src = root / "src"
    src.mkdir(parents=True)
    docs = list(prose[:60])
    docs[7] = docs[7][:200] + f" the marker {LITERAL} sits here as text " + docs[7][200:]
    per_file = len(docs) // files
    for k in range(files):
        write_jsonl(src / f"f{k}.jsonl", docs[k * per_file:(k + 1) * per_file])
    cfg = make_config(root / "run", [src], corpus={"shard_size_mb": 0.008}, tokenizer={"vocab_size": vocab},
                      dataset={"val_fraction": 0.25})
    shards = build_shards(cfg)
    assert len(shards) >= 4
    tok_dir = root / "tokenizer"
    train_tokenizer(cfg, shards, tok_dir, log=QUIET)
    return cfg, src, tok_dir


def tokenize_corpus(cfg, tok_dir: Path):
    """The data stages, a tokenizer trained in `tok_dir`, the tokenized dataset: (shards, tok_dir, result)."""
    shards = build_shards(cfg)
    train_tokenizer(cfg, shards, tok_dir, log=QUIET)
    return shards, tok_dir, build_tokenized_dataset(cfg, load_tokenizer(tok_dir), tok_dir, log=QUIET)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, prose):
    root = tmp_path_factory.mktemp("tokenize")
    cfg, src, tok_dir = setup_corpus(root, prose)
    result = build_tokenized_dataset(cfg, load_tokenizer(tok_dir), tok_dir, log=QUIET)
    return cfg, tok_dir, result


def split_docs(out_dir: Path, split: str, with_doc_ids: bool = False):
    """[(piece id, tokens of the piece, num_bytes)] of a split, over every shard in manifest order
    (with the piece's doc_id after its id if asked)."""
    manifest = json.loads((out_dir / "manifest.json").read_text())
    out = []
    for entry in manifest["shards"]:
        stem = Path(entry["name"]).stem
        tokens = read_ipc(out_dir / split / f"{stem}.tokens.arrow").column("tokens").to_numpy()
        docs = read_ipc(out_dir / split / f"{stem}.docs.arrow").to_pylist()
        for d in docs:
            ids = (d["id"], d["doc_id"]) if with_doc_ids else (d["id"],)
            out.append((*ids, tokens[d["start"]:d["start"] + d["length"]], d["num_bytes"]))
        assert sum(d["length"] for d in docs) == len(tokens)  # documents tile the file
    return out


def test_token_dtype():
    assert token_dtype(300) == np.uint16
    assert token_dtype(2**16) == np.uint16
    assert token_dtype(2**16 + 1) == np.uint32
    assert token_dtype(2**32) == np.uint32
    with pytest.raises(ValueError, match="uint32"):
        token_dtype(2**32 + 1)


def test_files_are_uint16_and_docs_end_with_eot(dataset):
    cfg, tok_dir, result = dataset
    tokenizer = load_tokenizer(tok_dir)
    eot = tokenizer.token_to_id(EOT)
    manifest = json.loads((result.out_dir / "manifest.json").read_text())
    assert result.dtype == manifest["dtype"] == "uint16" and manifest["eot_id"] == eot == 0
    assert manifest["vocab_size"] == VOCAB
    for split in ("train", "val"):
        files = sorted((result.out_dir / split).glob("*.tokens.arrow"))
        assert len(files) == len(manifest["shards"])
        for f in files:
            assert read_ipc(f).schema.field("tokens").type == pa.uint16()
        for doc_id, tokens, _ in split_docs(result.out_dir, split):
            assert len(tokens) >= 2 and tokens[-1] == eot
            assert np.count_nonzero(tokens == eot) == 1, doc_id  # the boundary only at the end
            assert int(tokens.max()) < VOCAB


def test_split_by_document_and_byte_accounting(dataset):
    cfg, tok_dir, result = dataset
    cleaned = {piece_id: text for piece_id, text in iter_documents(sorted(
        (cfg.data_path / "cleaned_shards" / "shards").glob("*.parquet")), columns=("id", "text"))}
    tokenizer = load_tokenizer(tok_dir)
    tokenizer.encode_special_tokens = True
    seen = {}
    for split in ("train", "val"):
        docs = split_docs(result.out_dir, split, with_doc_ids=True)
        for piece_id, doc_id, tokens, num_bytes in docs:
            assert is_validation(doc_id, cfg.dataset.val_fraction, cfg.dataset.seed) == (split == "val")
            assert num_bytes == len(cleaned[piece_id].encode())
            assert tokenizer.decode(tokens[:-1].tolist(), skip_special_tokens=False) == cleaned[piece_id]
            seen[piece_id] = split
        assert sum(len(t) for *_, t, _ in docs) == getattr(result, f"num_{split}_tokens")
        assert len(docs) == getattr(result, f"num_{split}_documents")
    assert set(seen) == set(cleaned)  # every cleaned document, once
    val_texts = [t for d, t in cleaned.items() if seen[d] == "val"]
    assert result.num_val_documents >= 5 and result.num_train_documents >= 30
    assert result.val_bytes == sum(len(t.encode()) for t in val_texts)
    assert result.num_bytes == sum(len(t.encode()) for t in cleaned.values())


def test_all_pieces_of_a_source_document_are_on_one_side_of_the_split(tmp_path, prose):
    """Long .txt documents, each cut into several pieces: the tokenizer's held-out text and the dataset
    put all pieces of a document on the side its doc_id says."""
    src = tmp_path / "src"
    src.mkdir()
    for i in range(16):  # 16 documents at val_fraction 0.5: both sides get some
        (src / f"doc_{i:02d}.txt").write_text("\n\n".join(prose[i * 10:(i + 1) * 10]))
    cfg = make_config(tmp_path / "run", [src], corpus={"max_document_bytes": 1024}, tokenizer={"vocab_size": VOCAB},
                      dataset={"val_fraction": 0.5})
    shards, tok_dir, result = tokenize_corpus(cfg, tmp_path / "tokenizer")

    source_of = dict(iter_documents(shards, columns=("id", "source")))
    pieces = Counter(source_of.values())
    assert len(pieces) == 16 and min(pieces.values()) >= 3  # every document was cut
    sides: dict[str, set[str]] = {}  # source file (one document) -> the splits its pieces are in
    for split in ("train", "val"):
        for piece_id, doc_id, *_ in split_docs(result.out_dir, split, with_doc_ids=True):
            sides.setdefault(source_of[piece_id], set()).add(split)
            assert is_validation(doc_id, cfg.dataset.val_fraction, cfg.dataset.seed) == (split == "val")
    assert all(len(s) == 1 for s in sides.values()), {Path(k).name: v for k, v in sides.items() if len(v) > 1}
    assert {"train", "val"} == set().union(*sides.values())
    val_text = {t for d, t in iter_documents(shards) if is_validation(d, cfg.dataset.val_fraction, cfg.dataset.seed)}
    assert set(held_out_texts(shards, cfg)) <= val_text  # what the tokenizer did not train on


def test_literal_endoftext_in_a_document_is_text(dataset):
    cfg, tok_dir, result = dataset
    eot = load_tokenizer(tok_dir).token_to_id(EOT)
    hits = [(doc_id, tokens) for split in ("train", "val") for doc_id, tokens, _ in split_docs(result.out_dir, split)
            if LITERAL in load_tokenizer(tok_dir).decode(tokens[:-1].tolist(), skip_special_tokens=False)]
    assert len(hits) == 1
    doc_id, tokens = hits[0]
    assert tokens[-1] == eot and np.count_nonzero(tokens == eot) == 1
    # Without encode_special_tokens the same text would have contained the EOT id inside.
    plain = load_tokenizer(tok_dir)
    text = plain.decode(tokens[:-1].tolist(), skip_special_tokens=False)
    assert eot in plain.encode(text, add_special_tokens=False).ids


def test_verify_passes_on_a_good_dataset(dataset):
    cfg, tok_dir, _ = dataset
    ok, message = verify_token_ids(cfg)
    assert ok, message
    ok, message = verify_token_accounting(cfg, load_tokenizer(tok_dir))
    assert ok, message


@pytest.fixture
def copy_of(dataset, tmp_path):
    """A private copy of the dataset's data_dir (to corrupt)."""
    cfg, tok_dir, _ = dataset
    shutil.copytree(cfg.data_path, tmp_path / "run")
    copy = cfg.model_copy(update={"data_dir": str(tmp_path / "run")})
    out_dir = copy.data_path / DATASET_DIR
    first = Path(json.loads((out_dir / "manifest.json").read_text())["shards"][0]["name"]).stem
    return copy, tok_dir, out_dir / "train" / f"{first}.tokens.arrow"


def test_verify_token_ids_catches_an_out_of_range_id(copy_of):
    cfg, tok_dir, path = copy_of
    tokens = read_ipc(path).column("tokens").to_numpy().copy()
    tokens[len(tokens) // 2] = VOCAB  # fits uint16, not the vocabulary
    write_tokens(path, tokens)
    ok, message = verify_token_ids(cfg)
    assert not ok and f">= vocab size {VOCAB}" in message


def test_verify_token_ids_catches_a_wrong_dtype(copy_of):
    cfg, tok_dir, path = copy_of
    write_tokens(path, read_ipc(path).column("tokens").to_numpy().astype(np.uint32))
    ok, message = verify_token_ids(cfg)
    assert not ok and "uint32" in message


def test_verify_accounting_catches_dropped_tokens(copy_of):
    cfg, tok_dir, path = copy_of
    write_tokens(path, read_ipc(path).column("tokens").to_numpy()[:-3].copy())
    ok, message = verify_token_accounting(cfg, load_tokenizer(tok_dir))
    assert not ok and path.name in message


def test_verify_accounting_catches_changed_tokens(copy_of):
    cfg, tok_dir, path = copy_of
    tokens = read_ipc(path).column("tokens").to_numpy().copy()
    tokens[1] = (int(tokens[1]) + 1) % VOCAB or 2  # a valid id, but not what the tokenizer gives
    write_tokens(path, tokens)
    assert verify_token_ids(cfg)[0]  # ids are all in range...
    ok, message = verify_token_accounting(cfg, load_tokenizer(tok_dir))
    assert not ok and "differ" in message  # ... yet not the document's tokens


def test_incremental_reencoding(tmp_path, prose):
    cfg, src, tok_dir = setup_corpus(tmp_path, prose)
    first = build_tokenized_dataset(cfg, load_tokenizer(tok_dir), tok_dir, log=QUIET)
    n = first.num_shards_encoded
    assert n >= 4 and first.num_shards_reused == 0

    again = build_tokenized_dataset(cfg, load_tokenizer(tok_dir), tok_dir, log=QUIET)
    assert (again.num_shards_encoded, again.num_shards_reused) == (0, n)
    assert again.data_version == first.data_version and again.num_train_tokens == first.num_train_tokens

    # Another tokenizer (another vocab size): every shard again.
    other_dir = tmp_path / "tokenizer-320"
    shards = sorted((cfg.data_path / "cleaned_shards" / "shards").glob("*.parquet"))
    cfg320 = cfg.model_copy(update={"tokenizer": cfg.tokenizer.model_copy(update={"vocab_size": 320})})
    train_tokenizer(cfg320, shards, other_dir, log=QUIET)
    retok = build_tokenized_dataset(cfg320, load_tokenizer(other_dir), other_dir, log=QUIET)
    assert (retok.num_shards_encoded, retok.num_shards_reused) == (n, 0)
    assert retok.data_version != first.data_version
    assert json.loads((retok.out_dir / "manifest.json").read_text())["vocab_size"] == 320
    assert verify_token_accounting(cfg320, load_tokenizer(other_dir))[0]

    # A new source file: only its shard(s) are encoded.
    write_jsonl(src / "new.jsonl", prose[60:70])
    build_raw_corpus(cfg320, QUIET)
    cleaned = build_cleaned_shards(cfg320, QUIET)
    new_parts = len(cleaned.parts) - n
    assert new_parts >= 1
    grown = build_tokenized_dataset(cfg320, load_tokenizer(other_dir), other_dir, log=QUIET)
    assert (grown.num_shards_encoded, grown.num_shards_reused) == (new_parts, n)
    assert grown.num_train_documents + grown.num_val_documents == \
        retok.num_train_documents + retok.num_val_documents + 10
    assert verify_token_ids(cfg320)[0] and verify_token_accounting(cfg320, load_tokenizer(other_dir))[0]


def test_large_vocab_writes_uint32(tmp_path, prose):
    """A vocabulary above 2^16 (padded with added tokens) is stored as uint32, and verified as such."""
    cfg, src, tok_dir = setup_corpus(tmp_path, prose)
    tokenizer = load_tokenizer(tok_dir)
    tokenizer.add_tokens([f"\ue000{i}\ue001" for i in range(2**16 + 10 - VOCAB)])
    big_dir = tmp_path / "big"
    big_dir.mkdir()
    tokenizer.save(str(big_dir / "tokenizer.json"))
    big = cfg.model_copy(update={"tokenizer": cfg.tokenizer.model_copy(update={"vocab_size": 2**16 + 10})})
    result = build_tokenized_dataset(big, load_tokenizer(big_dir), big_dir, log=QUIET)
    assert result.dtype == "uint32"
    for f in (result.out_dir / "train").glob("*.tokens.arrow"):
        assert read_ipc(f).schema.field("tokens").type == pa.uint32()
    assert verify_token_ids(big)[0]
    assert verify_token_accounting(big, load_tokenizer(big_dir))[0]


def test_missing_cleaned_shards_is_a_clear_error(tmp_path, dataset):
    cfg, tok_dir, _ = dataset
    empty = cfg.model_copy(update={"data_dir": str(tmp_path / "nothing")})
    with pytest.raises(FileNotFoundError, match="cleaned_shards"):
        build_tokenized_dataset(empty, load_tokenizer(tok_dir), tok_dir, log=QUIET)


def test_a_shard_whose_documents_were_all_removed(tmp_path, prose):
    """A cleaned shard left empty by the filters gives empty token files; the rest still verifies and loads."""
    src = tmp_path / "src"
    src.mkdir()
    write_jsonl(src / "a.jsonl", prose[:30])
    write_jsonl(src / "b.jsonl", ["too short to keep", "also far too short"])
    cfg = make_config(tmp_path / "run", [src], corpus={"shard_size_mb": 0.008}, tokenizer={"vocab_size": VOCAB},
                      dataset={"val_fraction": 0.25})
    shards, tok_dir, result = tokenize_corpus(cfg, tmp_path / "tokenizer")
    manifest = json.loads((result.out_dir / "manifest.json").read_text())
    empty = [e for e in manifest["shards"] if e["train"]["documents"] + e["val"]["documents"] == 0]
    assert len(empty) == 1 and empty[0]["train"]["tokens"] == empty[0]["val"]["tokens"] == 0
    stem = Path(empty[0]["name"]).stem
    assert read_ipc(result.out_dir / "train" / f"{stem}.tokens.arrow").num_rows == 0
    assert verify_token_ids(cfg)[0] and verify_token_accounting(cfg, load_tokenizer(tok_dir))[0]
    x, y = TokenWindows(result.out_dir, "train", block_size=32, batch_size=2, seed=0).batch_at(0)
    assert x.shape == (2, 32)
