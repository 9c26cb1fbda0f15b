"""Scaling fits (llm_core/experiments/scaling.py) and `scratchllm plan --budget`: a known power law is recovered with
an interval that holds its exponent; a budget is split into parameters and tokens at the points' ratio."""

import subprocess
import sys

import numpy as np
import pytest
from helpers import subprocess_env

from llm_core.experiments import scaling


def law(flops):
    return 2.0 * (flops / 1e12) ** -0.3 + 1.5


@pytest.fixture
def points():
    rng = np.random.default_rng(0)
    sizes = [1e5 * 2 ** i for i in range(5)]
    return [scaling.Point(f"v{i}", int(n), int(20 * n), 6 * n * 20 * n, law(6 * n * 20 * n) + rng.normal(0, 0.003))
            for i, n in enumerate(sizes)]


def test_a_known_power_law_is_recovered_with_its_interval(points):
    fit = scaling.fit(points)
    assert fit.b_low <= 0.3 <= fit.b_high and fit.b == pytest.approx(0.3, abs=0.03)
    assert fit.c == pytest.approx(1.5, abs=0.05) and fit.tokens_per_param == pytest.approx(20)
    for p in points:
        assert fit.predict(p.flops) == pytest.approx(p.val_bpb, abs=0.01)
    assert scaling.fit(points[:2]) is None  # two compute values: no fit


def test_a_budget_becomes_a_size_and_tokens_with_a_predicted_loss(points, tmp_path):
    fit = scaling.fit(points)
    budget = 4 * max(p.flops for p in points)
    r = fit.recommend(budget)
    assert 6 * r["params"] * r["tokens"] == pytest.approx(budget) and r["tokens"] / r["params"] == pytest.approx(20)
    assert r["val_bpb_low"] <= r["val_bpb"] <= r["val_bpb_high"] and r["val_bpb"] == pytest.approx(law(budget),
                                                                                                   abs=0.02)
    assert r["extrapolation"] == pytest.approx(4)
    assert scaling.load(scaling.save(fit, tmp_path / "fit.json")).recommend(budget) == r

    done = subprocess.run([sys.executable, "-m", "pipelines.cli", "plan", "--fit", str(tmp_path / "fit.json"),
                           "--budget", f"{budget:g}"], capture_output=True, text=True, env=subprocess_env(),
                          cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert f"about {r['params'] / 1e6:.2f}M parameters on {r['tokens'] / 1e6:.1f}M tokens" in done.stdout
    assert "an extrapolation" in done.stdout and "total/GPU" in done.stdout  # and the memory plan of that size
    hours = subprocess.run([sys.executable, "-m", "pipelines.cli", "plan", "--fit", str(tmp_path / "fit.json"),
                            "--budget", "0.5gpu-h", "--gpu", "H100-80GB", "--precision", "bf16"],
                           capture_output=True, text=True, env=subprocess_env(), cwd=tmp_path)
    assert hours.returncode == 0 and f"budget {0.5 * 3600 * 989e12 * 0.4:.3g} FLOPs" in hours.stdout
    missing = subprocess.run([sys.executable, "-m", "pipelines.cli", "plan", "--fit", str(tmp_path / "none.json"),
                              "--budget", "1e15"], capture_output=True, text=True, env=subprocess_env(), cwd=tmp_path)
    assert missing.returncode == 2 and "no scaling fit at" in missing.stderr
