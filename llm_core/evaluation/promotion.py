"""Promotion that survives noise: does a new model beat the champion, on the same documents?

Both models' per-document scores (model_evaluation/<key>/per_document.parquet) are joined on the
document id. The difference in bits per byte, new minus champion over the shared documents, gets a
paired bootstrap interval (documents resampled with replacement, BOOTSTRAP_SAMPLES times, seeded).
`champion` moves only when the whole interval is below -registry.promotion_margin_bpb, i.e. the new
model is better by more than the margin at registry.promotion_confidence. The interval measures the
noise of the evaluation documents, not of training: two trainings that differ only in their seed can
still differ beyond it (measured on the default profile: 1 pair of 3), which a margin of about twice
the seed-to-seed spread absorbs.

The downstream tasks veto: if, on a task both models answered, the new model's accuracy
(length-normalized, paired by item) is lower with its whole interval below zero, it is not promoted.
So do the sources of registry.protected_sources: if, on a protected source's shared documents, the new
model's bits per byte are higher with the whole paired interval above zero, it is not promoted.

When the champion has no per-document scores on any of these documents (evaluated before they were
kept, or on another corpus), the comparison falls back to the two means, and says so.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

BOOTSTRAP_SAMPLES = 1000
CHUNK = 50  # resamples drawn at once: memory stays at CHUNK x documents


@dataclasses.dataclass
class TaskDelta:
    task: str
    items: int  # answered by both models
    delta: float  # accuracy (acc_norm) new minus champion
    low: float
    high: float


@dataclasses.dataclass
class SourceDelta:
    source: str
    documents: int  # scored for both models
    delta: float  # bits per byte, new minus champion: above zero is worse
    low: float
    high: float


@dataclasses.dataclass
class Verdict:
    promote: bool
    delta_bpb: float  # new minus champion: negative is better
    low: float  # the interval of delta_bpb at `confidence`
    high: float
    confidence: float
    margin: float
    num_documents: int  # paired documents (0: means compared, unpaired)
    task_deltas: list[TaskDelta]
    reason: str
    source_deltas: list[SourceDelta] = dataclasses.field(default_factory=list)  # registry.protected_sources

    def tags(self) -> dict[str, str]:
        """MLflow model version tags."""
        return {"promotion.delta_bpb": f"{self.delta_bpb:+.5f}",
                "promotion.interval": f"[{self.low:+.5f}, {self.high:+.5f}] at {self.confidence:.0%}",
                "promotion.documents": str(self.num_documents), "promotion.reason": self.reason,
                **{f"promotion.task.{t.task}": f"{t.delta:+.4f} [{t.low:+.4f}, {t.high:+.4f}]"
                   for t in self.task_deltas},
                **{f"promotion.source.{d.source}": f"{d.delta:+.5f} [{d.low:+.5f}, {d.high:+.5f}]"
                   for d in self.source_deltas}}


def bootstrap_interval(values: np.ndarray, weights: np.ndarray | None, confidence: float,
                       seed: int = 0) -> tuple[float, float]:
    """The percentile interval of sum(values) / sum(weights) (the mean when weights is None) over
    resamples of the rows with replacement."""
    n = len(values)
    weights = np.ones(n) if weights is None else weights
    rng = np.random.default_rng(seed)
    stats = []
    for start in range(0, BOOTSTRAP_SAMPLES, CHUNK):
        rows = rng.integers(0, n, size=(min(CHUNK, BOOTSTRAP_SAMPLES - start), n))
        stats.append(values[rows].sum(axis=1) / weights[rows].sum(axis=1))
    tail = (1 - confidence) / 2
    low, high = np.quantile(np.concatenate(stats), [tail, 1 - tail])
    return float(low), float(high)


def bits(table: pa.Table) -> dict[str, tuple[float, int, str]]:
    """id -> (bits, bytes, source) of a per-document table."""
    ids = table.column("id").to_pylist()
    nats, num_bytes = table.column("nats").to_numpy(), table.column("bytes").to_numpy()
    sources = table.column("source").to_pylist() if "source" in table.column_names else ["corpus"] * len(ids)
    return {i: (n / math.log(2), b, s) for i, n, b, s in zip(ids, nats, num_bytes, sources)}


def paired_bpb(new: dict, old: dict, ids: list[str], confidence: float) -> tuple[float, float, float]:
    """(delta, low, high): bits per byte new minus champion over documents `ids`, with its paired interval."""
    diff = np.array([new[i][0] - old[i][0] for i in ids])
    num_bytes = np.array([new[i][1] for i in ids], dtype=np.float64)
    return float(diff.sum() / num_bytes.sum()), *bootstrap_interval(diff, num_bytes, confidence)


def task_deltas(new_items: pa.Table, champion_items: pa.Table, confidence: float) -> list[TaskDelta]:
    """Per task both answered: the paired difference in acc_norm over the items both answered."""
    def by_key(table):
        return {(t, i): c for t, i, c in zip(*(table.column(k).to_pylist() for k in ("task", "id", "correct_norm")))}

    new, old = by_key(new_items), by_key(champion_items)
    out = []
    for task in sorted({t for t, _ in new} & {t for t, _ in old}):
        keys = [k for k in new if k[0] == task and k in old]
        diff = np.array([float(new[k]) - float(old[k]) for k in keys])
        low, high = bootstrap_interval(diff, None, confidence)
        out.append(TaskDelta(task, len(keys), float(diff.mean()), low, high))
    return out


def compare(new_dir: Path, champion_dir: Path | None, new_bpb: float, champion_bpb: float, *,
            margin: float, confidence: float, protected_sources: list[str] = ()) -> Verdict:
    """The verdict for a new model against the champion, from their evaluation directories
    (per_document.parquet and task_items.parquet in each; champion_dir None: not available)."""
    from llm_core.evaluation.evaluate import PER_DOCUMENT_FILE, TASK_ITEMS_FILE

    new = bits(pq.read_table(new_dir / PER_DOCUMENT_FILE))
    old = bits(pq.read_table(champion_dir / PER_DOCUMENT_FILE)) if champion_dir else {}
    tasks = task_deltas(pq.read_table(new_dir / TASK_ITEMS_FILE), pq.read_table(champion_dir / TASK_ITEMS_FILE),
                        confidence) if champion_dir and (champion_dir / TASK_ITEMS_FILE).exists() else []
    return verdict(new, old, new_bpb, champion_bpb, tasks, margin=margin, confidence=confidence,
                   protected_sources=protected_sources)


def verdict(new: dict, old: dict, new_bpb: float, champion_bpb: float, tasks: list[TaskDelta] = (), *,
            margin: float, confidence: float, protected_sources: list[str] = ()) -> Verdict:
    """The verdict from both models' per-document scores (`bits`' shape: id -> (bits, bytes, source)) and
    the task deltas: paired over the documents both scored, else the two means."""
    shared = [i for i in new if i in old]
    if not shared:
        delta = new_bpb - champion_bpb
        why = "the champion has no per-document scores on these documents: means compared, no interval"
        return Verdict(delta <= -margin, delta, delta, delta, confidence, margin, 0, [], why)
    delta, low, high = paired_bpb(new, old, shared, confidence)
    sources = []
    for source in protected_sources:
        ids = [i for i in shared if new[i][2] == source]
        if ids:
            sources.append(SourceDelta(source, len(ids), *paired_bpb(new, old, ids, confidence)))
    worse = [t.task for t in tasks if t.high < 0] + [f"source {d.source}" for d in sources if d.low > 0]
    if high >= -margin:
        reason = (f"not better beyond the margin: {delta:+.4f} bits/byte, interval [{low:+.4f}, {high:+.4f}] "
                  f"reaches above -{margin:g}")
    elif worse:
        reason = f"better in bits/byte ({delta:+.4f}) but worse beyond noise on {', '.join(worse)}"
    else:
        reason = f"better: {delta:+.4f} bits/byte, interval [{low:+.4f}, {high:+.4f}] below -{margin:g}"
    return Verdict(high < -margin and not worse, delta, low, high, confidence, margin, len(shared), list(tasks),
                   reason, sources)


def against_champion(cfg, tracking_uri: str, key: str, val_bpb: float) -> Verdict | None:
    """The verdict for training `key` (evaluated: model_evaluation/<key>/) against the current champion
    of registry.model_name; None when there is no champion yet or it is this very training."""
    from llm_core.registry import versions
    from llm_core import tracking
    from llm_core.evaluation.evaluate import PER_DOCUMENT_FILE
    from llm_core.layout import EVALUATION_DIR

    version = versions.champion_version(tracking.client(tracking_uri), cfg.registry.model_name)
    if version is None or version.tags.get(versions.KEY_TAG) == key:
        return None
    evaluations = cfg.data_path / EVALUATION_DIR
    champion_dir = evaluations / version.tags.get(versions.KEY_TAG, "unknown")
    if not (champion_dir / PER_DOCUMENT_FILE).exists():  # trained elsewhere: its run kept the scores
        champion_dir = tracking.download_evaluation(tracking_uri, version.run_id, champion_dir)
    return compare(evaluations / key, champion_dir, val_bpb, float(version.tags.get(versions.BPB_TAG, "inf")),
                   margin=cfg.registry.promotion_margin_bpb, confidence=cfg.registry.promotion_confidence,
                   protected_sources=cfg.registry.protected_sources)
