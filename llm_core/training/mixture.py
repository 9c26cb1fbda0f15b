"""training.mixture before a training starts: each source's share of the trained tokens, how many times
its training tokens would be seen, and a refusal when that is more than training.mixture_max_repetitions
allows (the loader itself is in loader.py)."""

from __future__ import annotations

import dataclasses

from llm_core.config import ScratchConfig, training_tokens
from llm_core.data.tokenized_dataset import source_totals
from llm_core.errors import DataError
from llm_core.files import read_json
from llm_core.layout import DATASET_DIR


@dataclasses.dataclass(frozen=True)
class SourcePlan:
    source: str
    weight: float  # normalized: the share of trained tokens
    train_tokens: int  # the source's tokens in the training split
    planned_tokens: int  # the tokens the training would draw from it
    max_repetitions: float

    @property
    def repetitions(self) -> float:
        return self.planned_tokens / max(self.train_tokens, 1)


def mixture_plan(cfg: ScratchConfig) -> list[SourcePlan]:
    """Per source of the tokenized dataset: its weight and what the training would take from it. Without
    a mixture, the natural shares (each source's share of the training split)."""
    totals = source_totals(read_json(cfg.data_path / DATASET_DIR / "manifest.json"))
    t, planned = cfg.training, training_tokens(cfg)
    train_tokens = {name: c["train_tokens"] for name, c in totals.items()}
    if t.mixture:
        weights = {name: t.mixture.get(name, 0.0) for name in {**train_tokens, **t.mixture}}
    else:
        weights = {name: float(n) for name, n in train_tokens.items()}
    total = sum(weights.values()) or 1.0
    return [SourcePlan(name, w / total, train_tokens.get(name, 0), round(planned * w / total),
                       t.max_repetitions(name)) for name, w in weights.items()]


def check_mixture(cfg: ScratchConfig) -> list[SourcePlan]:
    """The plan of a training with a mixture, refused (DataError naming the source and the numbers) when
    a weighted source has no training tokens or would repeat more than allowed within max_steps."""
    plan = mixture_plan(cfg)
    if not cfg.training.mixture:
        return plan
    for p in plan:
        if p.weight > 0 and p.train_tokens == 0:
            raise DataError(f"training.mixture: source {p.source!r} has weight {p.weight:.3f} but no tokens in the "
                            f"training split (all its documents were filtered, deduplicated or held out)",
                            next_step="give it weight 0, or check the per_source counts of the data stages")
        if p.repetitions > p.max_repetitions:
            raise DataError(
                f"training.mixture: source {p.source!r} would be seen {p.repetitions:.1f} times: weight "
                f"{p.weight:.3f} of the {cfg.training.max_steps} steps' {training_tokens(cfg):,} tokens is "
                f"{p.planned_tokens:,} tokens, from its {p.train_tokens:,} training tokens; "
                f"training.mixture_max_repetitions allows {p.max_repetitions:g}",
                next_step="lower its weight, raise training.mixture_max_repetitions (for it alone: "
                          f"{{{p.source}: {p.repetitions:.1f}}}), lower training.max_steps or add text to it")
    return plan
