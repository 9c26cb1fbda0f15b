"""Scaling fits: validation loss as a power law of training compute, over the variants of a sweep
that varies the model's size (or its steps), to size the next run.

    L(C) = a * C^-b + c        C = training FLOPs (flops_per_token x tokens), L = val bits per byte

fitted by least squares (scipy) on every healthy evaluated variant, with a bootstrap over the points
for the uncertainty of the exponent and of predictions. A budget C is split into a model size N and a
token count D with the tokens-per-parameter ratio r of the sweep's points (C ~ 6 N D, D = r N), so
the recommendation stays where the fit has data; the predicted loss carries the bootstrap interval.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np

from llm_core.model_files import MODEL_CONFIG_FILE, SUMMARY_FILE
from llm_core.files import atomic_path, read_json

FIT_FILE = "scaling_fit.json"
MIN_POINTS = 3
BOOTSTRAP = 200


@dataclasses.dataclass
class Point:
    variant: str
    params: int
    tokens: int
    flops: float
    val_bpb: float


@dataclasses.dataclass
class Fit:
    a: float
    b: float  # the exponent: loss falls as C^-b towards c
    c: float  # the irreducible loss of this setup
    b_low: float
    b_high: float
    tokens_per_param: float
    points: list[Point]
    samples: list[list[float]]  # bootstrap (a, b, c): the prediction intervals

    def predict(self, flops: float) -> float:
        return self.a * (flops / self.scale) ** -self.b + self.c

    @property
    def scale(self) -> float:  # compute is fitted in units of the smallest point's (keeps a sane)
        return min(p.flops for p in self.points)

    def recommend(self, budget_flops: float) -> dict:
        """Model size, tokens and predicted val bpb (with its bootstrap interval) for a compute budget."""
        params = math.sqrt(budget_flops / (6 * self.tokens_per_param))
        predictions = sorted(a * (budget_flops / self.scale) ** -b + c for a, b, c in self.samples)
        low, high = (float(predictions[int(q * (len(predictions) - 1))]) for q in (0.05, 0.95))
        return {"flops": budget_flops, "params": params, "tokens": self.tokens_per_param * params,
                "val_bpb": float(self.predict(budget_flops)), "val_bpb_low": low, "val_bpb_high": high,
                "extrapolation": budget_flops / max(p.flops for p in self.points)}


def points(record: dict, reports: dict[str, dict]) -> list[Point]:
    """One point per evaluated variant: parameters, training tokens, training FLOPs, val bpb."""
    from llm_core.model import ModelArgs, Transformer

    out = []
    for name, report in reports.items():
        run = Path(record["variants"][name]["path"])
        saved, summary = read_json(run / MODEL_CONFIG_FILE), read_json(run / SUMMARY_FILE)
        training = saved["config"]["training"]
        model = Transformer(ModelArgs(**saved["model"]))
        tokens = (summary["steps"] * training["batch_size"] * training["grad_accum_steps"]
                  * saved["model"]["block_size"] * summary.get("world_size", 1))
        out.append(Point(name, model.num_parameters(), tokens, model.flops_per_token() * tokens, report["val_bpb"]))
    return out


def _least_squares(flops: np.ndarray, loss: np.ndarray) -> tuple[float, float, float]:
    from scipy.optimize import curve_fit

    x = flops / flops.min()
    spread = float(loss.max() - loss.min()) or 1.0
    (a, b, c), _ = curve_fit(lambda x, a, b, c: a * x ** -b + c, x, loss,
                             p0=(spread, 0.3, float(loss.min()) * 0.9),
                             bounds=([0, 0, 0], [np.inf, 3, float(loss.min())]), maxfev=20000)
    return float(a), float(b), float(c)


def fit(pts: list[Point], seed: int = 0) -> Fit | None:
    """The power law over the points (None with fewer than MIN_POINTS distinct compute values)."""
    if len({p.flops for p in pts}) < MIN_POINTS:
        return None
    flops, loss = np.array([p.flops for p in pts]), np.array([p.val_bpb for p in pts])
    a, b, c = _least_squares(flops, loss)
    rng, samples = np.random.default_rng(seed), []
    for _ in range(BOOTSTRAP):
        rows = rng.integers(0, len(pts), len(pts))
        if len(set(flops[rows])) < MIN_POINTS:
            continue
        try:  # rescaled to the full fit's unit of compute, so that every sample predicts alike
            sa, sb, sc = _least_squares(flops[rows], loss[rows])
        except RuntimeError:  # no convergence on this resample
            continue
        samples.append([sa * (flops.min() / flops[rows].min()) ** -sb, sb, sc])
    exponents = sorted(s[1] for s in samples) or [b]
    ratio = float(np.median([p.tokens / p.params for p in pts]))
    return Fit(a, b, c, exponents[int(0.05 * (len(exponents) - 1))], exponents[int(0.95 * (len(exponents) - 1))],
               ratio, pts, samples or [[a, b, c]])


def plot(f: Fit, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    xs = np.geomspace(f.scale, max(p.flops for p in f.points) * 10, 100)
    ax.plot(xs, [f.predict(x) for x in xs], label=f"fit: {f.a:.3g}·(C/{f.scale:.2g})^-{f.b:.3f} + {f.c:.3f}")
    ax.scatter([p.flops for p in f.points], [p.val_bpb for p in f.points], color="C1", zorder=3, label="variants")
    for p in f.points:
        ax.annotate(f"{p.variant} ({p.params / 1e6:.2f}M)", (p.flops, p.val_bpb), fontsize=7,
                    textcoords="offset points", xytext=(4, 4))
    ax.set_xscale("log")
    ax.set_xlabel("training compute C (FLOPs)")
    ax.set_ylabel("val bits per byte")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def save(f: Fit, path: Path) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(dataclasses.asdict(f), indent=1))
    return path


def load(path: Path) -> Fit:
    raw = json.loads(Path(path).read_text())
    return Fit(**{**raw, "points": [Point(**p) for p in raw["points"]]})
