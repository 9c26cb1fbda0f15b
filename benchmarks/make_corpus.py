"""Generate "unseen" test corpora from real English prose that is available offline.

The text pool (built once, cached under the temp dir) is prose paragraphs from:
  - the Python language reference shipped with the interpreter (`pydoc_data.topics`),
  - docstrings of the standard library and of a few well-documented installed packages
    (read with `ast`, nothing is imported),
  - /usr/share/common-licenses/* when present.
Paragraphs that look like code, tables or lists are dropped, and a paragraph is dropped when 10% or
more of its word 5-grams already appeared in an earlier one, so that corpora built from distinct
paragraphs share almost no 5-grams by construction (what a near-duplicate detector looks at).

Two corpora:
  make_planted_corpus(out_dir, n_files, seed): a few hundred prose files (2-20 KB) with planted exact
      duplicates (also with other whitespace/case/format), planted near duplicates (word 5-gram
      Jaccard measured exactly, in [0.8, 0.97]), low-quality files and broken files; writes
      `<out_dir>/ground_truth.json` (outside the corpus directory `<out_dir>/corpus`).
  make_sized_corpus(out_dir, megabytes, dup_rate, seed): many files (.txt, .txt.gz, .jsonl) of
      distinct documents recombined from runs of real sentences, with planted exact and near
      duplicate pairs; streamed to disk, ~300 MB in well under a minute.

CLI:  python benchmarks/make_corpus.py planted OUT_DIR [--files 300] [--seed 0]
      python benchmarks/make_corpus.py sized OUT_DIR --mb 100 [--dup-rate 0.1] [--seed 0]
"""

from __future__ import annotations

import argparse
import ast
import gzip
import importlib.util
import json
import math
import os
import random
import re
import shutil
import sys
import sysconfig
import tempfile
import textwrap
import time
from pathlib import Path


import numpy as np
import xxhash

POOL_VERSION = 1
# Installed packages with plenty of English docstrings; used when present.
PACKAGES = ("sqlalchemy", "networkx", "sklearn", "pandas", "scipy", "matplotlib", "numpy", "sympy", "torch",
            "transformers", "mlflow", "dagster")
LICENSE_DIR = Path("/usr/share/common-licenses")
MAX_DOC_BYTES = 8000  # below the default corpus.max_document_bytes (8192): one file or record = one document
GROUND_TRUTH = "ground_truth.json"

# ----------------------------------------------------------------------------------------------
# Measuring similarity exactly (the definition the ground truth uses)


def shingles(text: str, n: int = 5) -> set[tuple[str, ...]]:
    """Word n-grams of the lower-cased, whitespace-split text (the whole text if shorter)."""
    words = text.lower().split()
    if len(words) < n:
        return {tuple(words)}
    return {tuple(words[i: i + n]) for i in range(len(words) - n + 1)}


def jaccard(a: str, b: str, n: int = 5) -> float:
    sa, sb = shingles(a, n), shingles(b, n)
    return len(sa & sb) / len(sa | sb) if sa | sb else 1.0


# ----------------------------------------------------------------------------------------------
# The text pool

_BAD_MARKS = (">>>", "::", "|", "---", "===", "***", "$ ", "{", "}", "\\", "`")
_CODE_CHARS = set("=[]_;")
_SENTENCE_END = re.compile(r"(?<=[a-z0-9)][.!?])\s+(?=[A-Z])")
_BULLET = re.compile(r"^(?:[*\-\u2022]|\(?\d{1,2}[.)]|\([a-z]\))\s+")
_UNDERLINE = re.compile(r"^[-=~^*#+]{3,}$")
# reST markup around names: :func:`os.path.join`, ``literal``, `text <url>`_
_ROLE = re.compile(r":[a-z]+(?::[a-z]+)?:`~?([^`<]+?)(?:\s*<[^>]*>)?`")
_LITERAL = re.compile(r"``([^`]+)``")
_REF = re.compile(r"`([^`<]+?)(?:\s*<[^>]*>)?`_{0,2}")


def _blocks(text: str) -> list[str]:
    """Runs of lines with one indentation (a bullet's hanging indent counts as the same), one line
    each; headings, their underlines and blank lines separate runs. Docstrings nest prose under
    parameter names and headings, which this separates out."""
    lines = text.expandtabs().split("\n")
    blocks, block, cont = [], [], -1

    def flush():
        if block:
            blocks.append(" ".join(block))
            block.clear()

    for k, line in enumerate(lines):
        stripped = line.strip()
        indent = len(line) - len(line.lstrip())
        heading = k + 1 < len(lines) and _UNDERLINE.match(lines[k + 1].strip())
        if not stripped or _UNDERLINE.match(stripped) or heading:
            flush()
            continue
        bullet = _BULLET.match(stripped)
        if block and (bullet or indent != cont):
            flush()
        if not block:
            cont = indent + (len(bullet.group()) if bullet else 0)
            stripped = stripped[len(bullet.group()):] if bullet else stripped
        block.append(stripped)
    flush()
    return blocks


def _prose(block: str) -> str | None:
    """The block with reST markup removed if it reads as English prose, else None."""
    text = _REF.sub(r"\1", _LITERAL.sub(r"\1", _ROLE.sub(r"\1", block)))
    text = re.sub(r"\s+", " ", text).strip()
    words = text.split()
    if not 20 <= len(words) <= 400 or any(mark in text for mark in _BAD_MARKS):
        return None
    if not (text[0].isupper() and text[-1] in ".!?") or text.count("(") > len(words) / 12:
        return None
    if sum(ch in _CODE_CHARS for ch in text) > len(text) / 200:
        return None
    alpha = sum(any(c.isalpha() for c in w) for w in words)
    mean_len = sum(map(len, words)) / len(words)
    if alpha < 0.9 * len(words) or not 3.5 <= mean_len <= 8.5:
        return None
    # Identifiers (snake_case, dotted names, CamelCase) in more than 8% of words: API reference, not prose.
    code_like = sum(("_" in w or "." in w.rstrip(".,;:") or (w[:1].islower() and any(c.isupper() for c in w[1:])))
                    for w in words)
    if code_like > 0.08 * len(words):
        return None
    return text


def _docstrings(root: Path, label: str) -> list[tuple[str, str]]:
    out = []
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).parts
        if any(p in ("test", "tests", "testing", "site-packages", "idlelib", "lib2to3", "_vendor", "externals")
               for p in parts):
            continue
        try:
            tree = ast.parse(path.read_bytes())
        except (SyntaxError, ValueError):
            continue
        name = ".".join([label] + list(parts[:-1]) + [path.stem])
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc:
                    out.append((name, doc))
    return out


def _raw_texts(packages: tuple[str, ...] = PACKAGES) -> list[tuple[str, str]]:
    """(label, text) of every source, in a stable order: the Python reference, the licenses, the
    standard library's docstrings and those of `packages`."""
    import pydoc_data.topics

    texts = [(f"pyref-{key}", pydoc_data.topics.topics[key]) for key in sorted(pydoc_data.topics.topics)]
    if packages and LICENSE_DIR.is_dir():
        seen = set()
        for path in sorted(LICENSE_DIR.iterdir()):
            real = path.resolve()
            if real.is_file() and real not in seen:
                seen.add(real)
                texts.append((f"license-{path.name}", real.read_text(errors="replace")))
    texts += _docstrings(Path(sysconfig.get_paths()["stdlib"]), "stdlib")
    for package in packages:
        spec = importlib.util.find_spec(package)  # locates the package without importing it
        if spec and spec.submodule_search_locations:
            texts += _docstrings(Path(list(spec.submodule_search_locations)[0]), package)
    return texts


def _gram_keys(text: str) -> list[int]:
    words = text.lower().split()
    return [xxhash.xxh3_64_intdigest(" ".join(words[i: i + 5]).encode()) for i in range(max(len(words) - 4, 1))]


def build_pool(packages: tuple[str, ...] = PACKAGES) -> list[tuple[str, str]]:
    """(label, paragraph) pairs of distinct prose paragraphs, one line each, in source order."""
    seen: set[int] = set()
    pool = []
    for label, text in _raw_texts(packages):
        for block in _blocks(text):
            prose = _prose(block)
            if prose is None:
                continue
            keys = _gram_keys(prose)
            # Drop paragraphs that repeat earlier text (license variants, inherited docstrings, ...).
            if sum(k in seen for k in keys) >= 0.1 * len(keys):
                continue
            seen.update(keys)
            pool.append((label, prose))
    return pool


def text_pool(cache_dir: str | Path | None = None, packages: tuple[str, ...] = PACKAGES) -> list[tuple[str, str]]:
    """The pool, built once per set of packages and cached (all of PACKAGES: a few thousand source
    files, ~1 min; the standard library alone, packages=(): ~2,000 paragraphs in ~3 s, for tests
    that need realistic documents, not a benchmark's variety)."""
    label = "-".join(packages) if packages != PACKAGES else "all"
    cache = Path(cache_dir or tempfile.gettempdir()) / (
        f"scratchllm-textpool-v{POOL_VERSION}-{label or 'stdlib'}-py{sys.version_info[0]}{sys.version_info[1]}.json.gz")
    if cache.exists():
        return [tuple(item) for item in json.loads(gzip.decompress(cache.read_bytes()))]
    pool = build_pool(packages)
    tmp = cache.with_name(f"{cache.name}.tmp-{os.getpid()}")
    tmp.write_bytes(gzip.compress(json.dumps(pool).encode(), compresslevel=6))
    os.replace(tmp, cache)
    return pool


def sentences_of(pool: list[tuple[str, str]]) -> list[str]:
    """The pool's sentences in order (runs of consecutive sentences read coherently)."""
    out = []
    for _, paragraph in pool:
        out += [s for s in _SENTENCE_END.split(paragraph) if len(s.split()) >= 4]
    return out


# ----------------------------------------------------------------------------------------------
# Variants: exact duplicates in another form, near duplicates by word edits


def exact_variant(text: str, kind: str) -> str:
    """The same words (after lower-casing) with other whitespace or case."""
    if kind == "identical":
        return text
    if kind == "uppercase":
        upper = text.upper()
        return upper if upper.lower() == text.lower() else text  # 'ß'.upper() == 'SS' would change the words
    if kind == "crlf_trailing_spaces":
        return "\r\n".join(line + "  " for line in text.split("\n")) + "\r\n"
    if kind == "extra_spaces":
        return text.replace(". ", ".   ").replace(", ", ",\t").replace(" the ", "  the ")
    if kind == "rewrapped":  # one sentence per line instead of the original line breaks
        return re.sub(r"(?<=[.!?]) ", "\n", re.sub(r"(?<!\n)\n(?!\n)", " ", text))
    raise ValueError(kind)


EXACT_KINDS = ("identical", "uppercase", "crlf_trailing_spaces", "extra_spaces", "rewrapped")


def _edit_words(text: str, num_edits: int, vocab: list[str], rng: random.Random) -> str:
    """Substitute, insert or delete `num_edits` words at random places, keeping the layout."""
    tokens = re.split(r"(\s+)", text)  # words at even indices, whitespace at odd ones
    word_slots = [i for i in range(0, len(tokens), 2) if tokens[i]]
    for i in rng.sample(word_slots, min(num_edits, len(word_slots))):
        op = rng.random()
        if op < 0.5:
            tokens[i] = rng.choice(vocab)
        elif op < 0.8:
            tokens[i] = f"{tokens[i]} {rng.choice(vocab)}"
        else:
            tokens[i] = ""
    return re.sub(r"[ \t]{2,}", " ", "".join(tokens))


def near_variant(text: str, vocab: list[str], rng: random.Random, low: float = 0.8,
                 high: float = 0.97) -> tuple[str, float, int] | None:
    """(edited text, its exact 5-gram Jaccard with `text`, edits) with the Jaccard in [low, high]."""
    n = max(len(text.split()) - 4, 1)
    target = rng.uniform(low, high)
    # Each isolated edit changes ~5 shingles on each side: J ~ (n - 5k) / (n + 5k).
    k = max(1, round(n * (1 - target) / (5 * (1 + target))))
    for _ in range(30):
        edited = _edit_words(text, k, vocab, rng)
        j = jaccard(text, edited)
        if low <= j <= high:
            return edited, j, k
        k = max(k + 1, round(k * 1.2)) if j > high else max(1, min(k - 1, round(k * 0.8)))
    return None


# ----------------------------------------------------------------------------------------------
# The planted corpus


def _slug(label: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-")[:40]


def _planted_documents(pool, n: int, rng: random.Random) -> list[tuple[str, str]]:
    """n (name, text) documents of 2-20 KB, each made of consecutive paragraphs of one source
    chunk, no paragraph used twice. Small documents are favoured so that many can be duplicated."""
    chunks: dict[str, list[tuple[str, str]]] = {}
    for label, paragraph in pool:  # one chunk per reference topic or license, per package's docstrings
        group = label.split(".")[0] if label.startswith(PACKAGES + ("stdlib",)) else label
        chunks.setdefault(group, []).append((label, paragraph))
    order = sorted(chunks)
    rng.shuffle(order)  # interleave sources: reference docs, docstrings and licenses mix
    streams = {k: iter(chunks[k]) for k in order}
    docs: list[tuple[str, str]] = []
    while len(docs) < n and streams:
        for key in list(streams):
            if len(docs) >= n:
                break
            target = int(math.exp(rng.uniform(math.log(2000), math.log(20000))))
            paragraphs, size, first_label = [], 0, None
            for label, paragraph in streams[key]:
                wrapped = textwrap.fill(paragraph, width=rng.choice((72, 76, 79)))
                if size + len(wrapped) + 2 > 20000:
                    break
                first_label = first_label or label
                paragraphs.append(wrapped)
                size += len(wrapped) + 2
                if size >= target:
                    break
            else:
                del streams[key]  # this source is used up
            if size >= 2000:
                docs.append((f"{len(docs):04d}-{_slug(first_label)}", "\n\n".join(paragraphs) + "\n"))
    if len(docs) < n:
        raise RuntimeError(f"the text pool only has enough distinct prose for {len(docs)} documents")
    return docs


def _write(path: Path, data: bytes | str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)


def make_planted_corpus(out_dir: str | Path, n_files: int = 300, seed: int = 0, pool=None) -> dict:
    """Write `<out_dir>/corpus/**` and `<out_dir>/ground_truth.json`; returns the ground truth.

    About 80% of the files are clean originals, ~8% exact duplicates of originals (identical, other
    name, extension, gzip, a JSONL record, other whitespace or case), ~8% near duplicates of other
    originals, plus low-quality files and broken files. Paths in the ground truth are relative to
    the corpus directory; a JSONL record is `path#line` (0-based)."""
    out_dir = Path(out_dir)
    corpus = out_dir / "corpus"
    if corpus.exists():
        shutil.rmtree(corpus)
    rng = random.Random(seed)
    pool = pool if pool is not None else text_pool()
    vocab = sorted({w.strip(".,;:()").lower() for _, p in pool[:3000] for w in p.split() if w.isalpha()})
    n_exact = max(2, n_files * 8 // 100)
    n_near = max(2, n_files * 8 // 100)
    n_junk = 3
    n_jsonl_records = 6
    n_broken_files = 5
    n_orig = n_files - n_exact - n_near - n_junk - n_broken_files - 1 + n_jsonl_records  # jsonl: 1 file
    docs = _planted_documents(pool, n_orig, rng)
    truth: dict = {"seed": seed, "originals": [], "exact_duplicates": [], "near_duplicates": [],
                   "low_quality": [], "broken": [], "jaccard": "word 5-grams of lower-cased, whitespace-split text"}

    # Originals: most as .txt, some as .md and .txt.gz, a few as records of one .jsonl file.
    # JSONL records stay below max_document_bytes: one line, one document (a longer one is cut in pieces).
    small_docs = [d for d in docs if len(d[1].encode()) <= MAX_DOC_BYTES * 0.85][:n_jsonl_records]
    jsonl_docs, file_docs = small_docs, [d for d in docs if d not in small_docs]
    text_of: dict[str, str] = {}
    for name, text in file_docs:
        r = rng.random()
        if r < 0.08:
            rel = f"notes/{name}.md"
            _write(corpus / rel, text)
        elif r < 0.16:
            rel = f"archive/{name}.txt.gz"
            _write(corpus / rel, gzip.compress(text.encode(), mtime=0))
        else:
            rel = f"docs/{name}.txt"
            _write(corpus / rel, text)
        text_of[rel] = text
        truth["originals"].append(rel)
    lines = []
    for k, (name, text) in enumerate(jsonl_docs):
        lines.append(json.dumps({"id": name, "text": text}, ensure_ascii=False))
        truth["originals"].append(f"records/export.jsonl#{len(lines) - 1}")
        text_of[f"records/export.jsonl#{len(lines) - 1}"] = text
        if k == 1:
            lines.append('{"id": "broken", "text": "this line was cut off')
            truth["broken"].append({"file": f"records/export.jsonl#{len(lines) - 1}", "problem": "malformed JSON line",
                                    "expect": "record"})
        if k == 3:
            lines.append(json.dumps({"id": "no-text", "body": "a record without the text field"}))
            truth["broken"].append({"file": f"records/export.jsonl#{len(lines) - 1}",
                                    "problem": "record without the 'text' field", "expect": "record"})
    _write(corpus / "records/export.jsonl", "\n".join(lines) + "\n")

    # Duplicates are made of single-document originals (≤ MAX_DOC_BYTES, so not cut into pieces).
    small = [rel for rel in text_of if "#" not in rel and len(text_of[rel].encode()) <= MAX_DOC_BYTES * 0.85]
    rng.shuffle(small)
    if len(small) < n_exact + n_near:
        raise RuntimeError("not enough small originals to duplicate")
    for k, rel in enumerate(small[:n_exact]):
        kind = EXACT_KINDS[k % len(EXACT_KINDS)]
        text = exact_variant(text_of[rel], kind)
        stem = Path(rel.split(".")[0]).name
        where = k % 4
        if where == 0:
            copy = f"mirror/{stem}.txt"
            _write(corpus / copy, text)
        elif where == 1:
            copy = f"mirror/copy-of-{stem}.md"
            _write(corpus / copy, text)
        elif where == 2:
            copy = f"mirror/{stem}.txt.gz"
            _write(corpus / copy, gzip.compress(text.encode(), mtime=0))
        else:
            copy = f"mirror/{stem}.jsonl"
            _write(corpus / copy, json.dumps({"text": text}, ensure_ascii=False) + "\n")
            copy += "#0"
        truth["exact_duplicates"].append({"file": copy, "of": rel, "variant": kind})
    for rel in small[n_exact:]:
        if len(truth["near_duplicates"]) == n_near:
            break
        made = near_variant(text_of[rel], vocab, rng)
        if made is None:  # rare: word edits kept missing the Jaccard range; take another original
            continue
        text, j, edits = made
        copy = f"drafts/{Path(rel.split('.')[0]).name}-draft.txt"
        _write(corpus / copy, text)
        truth["near_duplicates"].append({"file": copy, "of": rel, "jaccard": round(j, 4), "edits": edits})
    if len(truth["near_duplicates"]) < n_near:
        raise RuntimeError("could not make enough near duplicates in the Jaccard range")

    # Low-quality files that the quality rules should filter.
    junk_text = {
        "junk/repeated-lines.txt": "\n".join(["Click here to subscribe to our newsletter today!"] * 40),
        "junk/numbers.txt": "\n".join(" ".join(str(rng.randint(0, 99999)) for _ in range(12)) for _ in range(30)),
        "junk/hashtags.txt": " ".join(f"#tag{i} ... #more{i}" for i in range(80)),
    }
    for rel, text in list(junk_text.items())[:n_junk]:
        _write(corpus / rel, text + "\n")
        truth["low_quality"].append(rel)

    # Broken files.
    sample = docs[0][1]
    bad_utf8 = sample[:1500].encode() + b"\xff\xfe caf\xe9 na\xefve \xc3" + sample[1500:3000].encode()
    _write(corpus / "broken/latin1-mixed.txt", bad_utf8)
    truth["broken"].append({"file": "broken/latin1-mixed.txt", "problem": "invalid UTF-8", "expect": "record"})
    gz = gzip.compress((sample * 3).encode(), mtime=0)
    _write(corpus / "broken/truncated.txt.gz", gz[: len(gz) // 2])
    truth["broken"].append({"file": "broken/truncated.txt.gz", "problem": "truncated gzip stream",
                            "expect": "file or record"})
    _write(corpus / "broken/binary.txt", b"\x7fELF\x02\x01\x01\x00" + bytes(range(256)) * 8)
    truth["broken"].append({"file": "broken/binary.txt", "problem": "binary (NUL bytes)", "expect": "file"})
    _write(corpus / "broken/empty.txt", b"")
    truth["broken"].append({"file": "broken/empty.txt", "problem": "empty file", "expect": "file"})
    import pyarrow as pa
    import pyarrow.parquet as pq

    (corpus / "broken").mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"id": ["a", "b"], "body": [sample[:500], sample[500:1000]]}),
                   corpus / "broken/no-text-column.parquet")
    truth["broken"].append({"file": "broken/no-text-column.parquet", "problem": "parquet without a 'text' column",
                            "expect": "file"})

    truth["num_files"] = sum(1 for p in corpus.rglob("*") if p.is_file())
    truth["corpus_dir"] = str(corpus)
    (out_dir / GROUND_TRUTH).write_text(json.dumps(truth, indent=1))
    return truth


# ----------------------------------------------------------------------------------------------
# The sized corpus (benchmarks)


class _DocMaker:
    """Document i is a deterministic function of (seed, i): duplicates regenerate their source."""

    def __init__(self, sentences: list[str], seed: int):
        self.sentences, self.seed = sentences, seed
        self.n = len(sentences)

    def original(self, i: int) -> str:
        rng = np.random.default_rng([self.seed, i])
        target = int(np.exp(rng.uniform(np.log(1200), np.log(MAX_DOC_BYTES))))
        runs = rng.integers(2, 7, size=64)  # sentences per paragraph
        starts = rng.integers(0, self.n - 8, size=64)
        paragraphs, size = [], 0
        for k in range(64):
            p = " ".join(self.sentences[starts[k]: starts[k] + runs[k]])
            if size + len(p) + 2 > MAX_DOC_BYTES - 300 and paragraphs:  # ~300 bytes of UTF-8 headroom
                break
            paragraphs.append(p)
            size += len(p) + 2
            if size >= target:
                break
        text = "\n\n".join(paragraphs)
        while len(text.encode()) > MAX_DOC_BYTES and len(paragraphs) > 1:
            paragraphs.pop()
            text = "\n\n".join(paragraphs)
        return text


def make_sized_corpus(out_dir: str | Path, megabytes: float, dup_rate: float = 0.1, seed: int = 0,
                      pool=None, txt_share: float = 0.3, gzip_share: float = 0.2) -> dict:
    """Write about `megabytes` MB of documents under `<out_dir>/corpus` and the planted pairs to
    `<out_dir>/ground_truth.json`. A share `dup_rate` of the documents are planted duplicates of an
    earlier original (half exact, in varied whitespace/case, half near with Jaccard in [0.8, 0.97]);
    each original is the source of at most one duplicate. `txt_share` of the documents are single
    .txt files (`gzip_share` of them .txt.gz); the rest are records of ~4 MB .jsonl files."""
    out_dir = Path(out_dir)
    corpus = out_dir / "corpus"
    if corpus.exists():
        shutil.rmtree(corpus)
    corpus.mkdir(parents=True)
    pool = pool if pool is not None else text_pool()
    maker = _DocMaker(sentences_of(pool), seed)
    vocab = sorted({w.lower() for _, p in pool[:3000] for w in p.split() if w.isalpha()})
    rng = random.Random(seed)
    target = int(megabytes * 1e6)
    location: list[str] = []  # doc index -> "relpath" or "relpath#line"
    is_original: list[bool] = []
    used_as_source: set[int] = set()
    pairs: list[dict] = []
    jsonl_fh, jsonl_lines, jsonl_bytes, jsonl_count = None, 0, 0, 0
    written = 0
    start = time.monotonic()
    try:
        while written < target:
            i = len(location)
            text, source = None, None
            if i > 50 and rng.random() < dup_rate:
                for _ in range(20):  # an earlier original not yet duplicated
                    j = rng.randrange(i)
                    if is_original[j] and j not in used_as_source:
                        source = j
                        break
            if source is not None:
                original = maker.original(source)
                if rng.random() < 0.5:
                    kind = EXACT_KINDS[rng.randrange(len(EXACT_KINDS))]
                    text = exact_variant(original, kind)
                    pair = {"kind": "exact", "variant": kind}
                else:
                    made = near_variant(original, vocab, rng)
                    if made is not None:
                        text, j_value, _ = made
                        pair = {"kind": "near", "jaccard": round(j_value, 4)}
                if text is not None:
                    used_as_source.add(source)
            if text is None:
                text, source = maker.original(i), None
            data = text.encode()
            if rng.random() < txt_share:
                gz = rng.random() < gzip_share
                rel = f"txt/{i // 1000:04d}/{i:08d}.txt" + (".gz" if gz else "")
                (corpus / rel).parent.mkdir(parents=True, exist_ok=True)
                (corpus / rel).write_bytes(gzip.compress(data, compresslevel=6, mtime=0) if gz else data)
                loc = rel
            else:
                if jsonl_fh is None or jsonl_bytes >= 4_000_000:
                    if jsonl_fh is not None:
                        jsonl_fh.close()
                    (corpus / "jsonl").mkdir(exist_ok=True)
                    jsonl_fh = open(corpus / f"jsonl/part-{jsonl_count:05d}.jsonl", "w", encoding="utf-8")
                    jsonl_count, jsonl_lines, jsonl_bytes = jsonl_count + 1, 0, 0
                line = json.dumps({"id": i, "text": text}, ensure_ascii=False) + "\n"
                jsonl_fh.write(line)
                loc = f"jsonl/part-{jsonl_count - 1:05d}.jsonl#{jsonl_lines}"
                jsonl_lines += 1
                jsonl_bytes += len(line)
            location.append(loc)
            is_original.append(source is None)
            if source is not None:
                pairs.append({**pair, "file": loc, "of": location[source]})
            written += len(data)
    finally:
        if jsonl_fh is not None:
            jsonl_fh.close()
    truth = {"seed": seed, "megabytes": megabytes, "dup_rate": dup_rate, "num_documents": len(location),
             "num_text_bytes": written, "num_files": sum(1 for p in corpus.rglob("*") if p.is_file()),
             "num_exact_pairs": sum(p["kind"] == "exact" for p in pairs),
             "num_near_pairs": sum(p["kind"] == "near" for p in pairs),
             "seconds": round(time.monotonic() - start, 1), "corpus_dir": str(corpus), "pairs": pairs}
    (out_dir / GROUND_TRUTH).write_text(json.dumps(truth))
    return truth


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("planted", help="a few hundred files with planted duplicates and broken files")
    p.add_argument("out_dir")
    p.add_argument("--files", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    s = sub.add_parser("sized", help="a corpus of a given size with planted duplicate pairs")
    s.add_argument("out_dir")
    s.add_argument("--mb", type=float, required=True)
    s.add_argument("--dup-rate", type=float, default=0.1)
    s.add_argument("--seed", type=int, default=0)
    sub.add_parser("pool", help="build the text pool and print its size")
    args = parser.parse_args(argv)
    start = time.monotonic()
    if args.command == "planted":
        truth = make_planted_corpus(args.out_dir, args.files, args.seed)
        print(f"{truth['num_files']} files in {truth['corpus_dir']}: {len(truth['originals'])} originals, "
              f"{len(truth['exact_duplicates'])} exact and {len(truth['near_duplicates'])} near duplicates, "
              f"{len(truth['low_quality'])} low-quality, {len(truth['broken'])} broken "
              f"({time.monotonic() - start:.1f} s)")
    elif args.command == "sized":
        truth = make_sized_corpus(args.out_dir, args.mb, args.dup_rate, args.seed)
        print(f"{truth['num_documents']} documents, {truth['num_text_bytes'] / 1e6:.1f} MB in {truth['num_files']} "
              f"files, {truth['num_exact_pairs']} exact + {truth['num_near_pairs']} near planted pairs "
              f"({time.monotonic() - start:.1f} s)")
    else:
        pool = text_pool()
        sents = sentences_of(pool)
        print(f"{len(pool)} paragraphs, {sum(len(p) for _, p in pool) / 1e6:.2f} MB, {len(sents)} sentences "
              f"({time.monotonic() - start:.1f} s)")


if __name__ == "__main__":
    main()
