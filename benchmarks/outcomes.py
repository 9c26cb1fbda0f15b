"""Read what the data stages did to each document, to score it against a generated corpus's ground truth.

Ground-truth locations are paths relative to the corpus directory, `path` for a whole file (all of
its documents) or `path#k` for the k-th record of a .jsonl file (0-based line; a raw document id is
`<xxh3(uri)[:12]>-<index>` where index counts the records read, bad ones included, and the pieces of
a record cut at max_document_bytes have ids `<that id>#<piece>`).
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from pathlib import Path

import pyarrow.parquet as pq

from llm_core.layout import CLEANED_SHARDS_DIR, QUARANTINE_DIR, RAW_CORPUS_DIR


class Outcomes:
    def __init__(self, data_dir: str | Path, corpus_dir: str | Path):
        data_dir, corpus_dir = Path(data_dir), Path(corpus_dir)
        self.data_dir = data_dir
        self.ids: dict[str, list[str]] = defaultdict(list)  # location -> raw document ids
        for part in sorted((data_dir / RAW_CORPUS_DIR / "shards").glob("*.parquet")):
            table = pq.read_table(part, columns=["id", "source"])
            for doc_id, source in zip(table.column("id").to_pylist(), table.column("source").to_pylist()):
                rel = os.path.relpath(source, corpus_dir)
                self.ids[rel].append(doc_id)
                self.ids[f"{rel}#{int(doc_id.split('#')[0].rsplit('-', 1)[1])}"].append(doc_id)
        self.removed: dict[str, tuple[str, str | None]] = {}  # id -> (reason, duplicate_of)
        for part in sorted((data_dir / CLEANED_SHARDS_DIR / "removed").glob("*.parquet")):
            for row in pq.read_table(part).to_pylist():
                self.removed[row["id"]] = (row["reason"], row["duplicate_of"])
        self.kept: set[str] = set()
        for part in sorted((data_dir / CLEANED_SHARDS_DIR / "shards").glob("*.parquet")):
            self.kept.update(pq.read_table(part, columns=["id"]).column("id").to_pylist())
        self.quarantine: list[dict] = []  # raw_corpus quarantine entries, with `rel` added
        for log in sorted((data_dir / QUARANTINE_DIR / RAW_CORPUS_DIR).glob("*.jsonl")):
            for line in log.read_text().splitlines():
                entry = json.loads(line)
                entry["rel"] = os.path.relpath(entry["source"], corpus_dir) if entry.get("source") else None
                self.quarantine.append(entry)

    def status(self, location: str) -> list[str]:
        """'kept' or the removal reason, for each document at `location` ([] if none was read)."""
        return ["kept" if i in self.kept else self.removed.get(i, ("missing", None))[0] for i in self.ids[location]]

    def pair_removed(self, location: str, of: str, reason: str) -> bool:
        """One of two single-document locations was removed as `reason`, pointing at the other."""
        a, b = self.ids.get(location, []), self.ids.get(of, [])
        if len(a) != 1 or len(b) != 1:
            return False
        (a,), (b,) = a, b
        ra, rb = self.removed.get(a), self.removed.get(b)
        return (ra == (reason, b) and b in self.kept) or (rb == (reason, a) and a in self.kept)

    def texts(self, ids: set[str]) -> dict[str, str]:
        """Raw text of some documents."""
        out = {}
        for part in sorted((self.data_dir / RAW_CORPUS_DIR / "shards").glob("*.parquet")):
            table = pq.read_table(part, columns=["id", "text"])
            for doc_id, text in zip(table.column("id").to_pylist(), table.column("text").to_pylist()):
                if doc_id in ids:
                    out[doc_id] = text
        return out

    def duplicate_removals(self) -> dict[str, set[str]]:
        """reason -> ids removed as exact or near duplicates."""
        out: dict[str, set[str]] = defaultdict(set)
        for doc_id, (reason, _) in self.removed.items():
            if reason in ("exact_duplicate", "near_duplicate"):
                out[reason].add(doc_id)
        return out


def score_pairs(outcomes: Outcomes, pairs: list[dict]) -> dict:
    """Planted exact/near pairs found (one removed as a duplicate of the other, which is kept);
    pairs where a quality rule removed a document first are not scored ("filtered"). Duplicate
    removals outside the planted pairs are listed with the exact word 5-gram Jaccard of the two
    texts (>= the threshold: a natural duplicate; below it: a false positive)."""
    from benchmarks.make_corpus import jaccard

    found = {"exact": 0, "near": 0}
    total = {"exact": 0, "near": 0}
    filtered = {"exact": 0, "near": 0}
    missed: list[dict] = []
    planted_ids: set[str] = set()
    not_a_rule = ("kept", "missing", "exact_duplicate", "near_duplicate")
    for pair in pairs:
        kind = pair["kind"]
        planted_ids.update(outcomes.ids.get(pair["file"], []) + outcomes.ids.get(pair["of"], []))
        if any(s not in not_a_rule for s in outcomes.status(pair["file"]) + outcomes.status(pair["of"])):
            filtered[kind] += 1
            continue
        total[kind] += 1
        reason = "exact_duplicate" if kind == "exact" else "near_duplicate"
        if outcomes.pair_removed(pair["file"], pair["of"], reason):
            found[kind] += 1
        else:
            missed.append(pair)
    unplanted = [(doc_id, reason, outcomes.removed[doc_id][1]) for reason, ids in
                 outcomes.duplicate_removals().items() for doc_id in sorted(ids - planted_ids)]
    texts = outcomes.texts({i for i, _, _ in unplanted} | {d for _, _, d in unplanted}) if unplanted else {}
    unplanted = [(i, reason, d, jaccard(texts[i], texts[d])) for i, reason, d in unplanted]
    return {"found": found, "total": total, "filtered": filtered, "missed": missed, "unplanted": unplanted,
            "unplanted_removals": {r: sum(1 for u in unplanted if u[1] == r)
                                   for r in ("exact_duplicate", "near_duplicate")}}
