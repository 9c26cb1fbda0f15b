"""Training health: is a loss history sane, and did a training stop because it diverged?

`assess` is the `training_health` check on `trained_model`: every loss finite, and no sustained
spike far above the running median. A divergence (a non-finite loss or weights during training)
stops llm_core.training.train at once; it leaves `diverged.json` in the run directory, so the caller can
tell a divergence (retrying cannot help) from a crash (a retry resumes).
"""

from __future__ import annotations

import dataclasses
import heapq
import math
from pathlib import Path

from llm_core.config import TrainingConfig
from llm_core.files import read_json, write_json

DIVERGED_FILE = "diverged.json"
LOSS_KEYS = ("train_loss", "val_loss", "val_bpb")


@dataclasses.dataclass
class Health:
    passed: bool
    description: str
    bad_step: int | None = None  # the step where the history went wrong
    max_train_loss: float | None = None
    final_train_loss: float | None = None


class RunningMedian:
    """The median of every value added so far: two heaps, O(log n) per value."""

    def __init__(self):
        self.low: list[float] = []  # max-heap (negated) of the lower half
        self.high: list[float] = []  # min-heap of the upper half

    def add(self, value: float) -> None:
        heapq.heappush(self.low, -heapq.heappushpop(self.high, value))
        if len(self.low) > len(self.high):
            heapq.heappush(self.high, -heapq.heappop(self.low))

    def median(self) -> float:
        if len(self.high) > len(self.low):
            return self.high[0]
        return (self.high[0] - self.low[0]) / 2


def assess(history: list[dict], training: TrainingConfig) -> Health:
    """Every loss of the history (`{"step", "train_loss", ...}` per step) is finite, and the train
    loss never stays above `health_spike_factor` x the median of the earlier losses for
    `health_spike_steps` consecutive steps (a single-step blip is fine)."""
    factor, needed = training.health_spike_factor, training.health_spike_steps
    train = [(h["step"], h["train_loss"]) for h in history if "train_loss" in h]
    if not train:
        return Health(False, "no training step recorded")
    for h in history:
        for key in LOSS_KEYS:
            if key in h and not math.isfinite(h[key]):
                return Health(False, f"{key} is {h[key]} at step {h['step']}", bad_step=h["step"])
    median, spike_start, spike_length = RunningMedian(), None, 0
    for step, loss in train:
        reference = median.median() if median.high else None
        if reference is not None and loss > factor * reference:
            spike_start, spike_length = (spike_start or step), spike_length + 1
            if spike_length >= needed:
                return Health(False, f"train_loss stayed above {factor:g}x its running median for {needed} "
                                     f"step{'s' * (needed != 1)} "
                                     f"from step {spike_start} (loss {loss:.4f} at step {step}, median "
                                     f"{reference:.4f})", bad_step=spike_start,
                              max_train_loss=max(v for _, v in train), final_train_loss=train[-1][1])
        else:
            spike_start, spike_length = None, 0
        median.add(loss)
    return Health(True, f"{len(train)} steps, every loss finite, no spike above {factor:g}x the running median "
                        f"lasting {needed} steps", max_train_loss=max(v for _, v in train),
                  final_train_loss=train[-1][1])


def record_divergence(out_dir: Path, step: int, message: str, details: dict) -> None:
    """Write `diverged.json` (atomically): what the caller reads to refuse a pointless retry."""
    write_json(Path(out_dir) / DIVERGED_FILE, {"step": step, "message": message, **details})


def divergence(out_dir: Path) -> dict:
    """The divergence recorded by the last training in out_dir, or {} if it did not diverge."""
    return read_json(Path(out_dir) / DIVERGED_FILE)


def clear_divergence(out_dir: Path) -> None:
    """A new attempt starts: the old record no longer describes the run directory."""
    (Path(out_dir) / DIVERGED_FILE).unlink(missing_ok=True)
