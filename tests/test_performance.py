"""llm_core/performance.py: the MFU denominator and `training.mixed_precision: auto`, measured on this
machine's real CPU (only a CPU without bf16 units, which this one may not be, is simulated)."""

import re

import pytest
import torch

from llm_core import performance
from llm_core.performance import choose_precision, gemm_flops, measure_peak_flops, mfu

CPU = torch.device("cpu")


def test_mfu_is_never_reported_above_100_percent():
    peak = measure_peak_flops(torch.float32)
    assert peak >= gemm_flops(torch.float32, 1024, 1024, 1024, repeats=1) * 0.5  # the best of several, not a dip
    assert mfu(tokens_per_second=1e9, flops_per_token=1e6, peak_flops=peak) == 1.0
    assert mfu(tokens_per_second=10, flops_per_token=1e6, peak_flops=1e8) == pytest.approx(0.1)


def test_a_configured_precision_is_kept():
    assert choose_precision("bf16", CPU, 64, 32, 64) == ("bf16", "as configured")
    assert choose_precision("no", CPU, 64, 32, 64) == ("no", "as configured")


def test_auto_on_a_cpu_without_bf16_units_trains_in_fp32(monkeypatch):
    monkeypatch.setattr(performance, "cpu_has_bf16_units", lambda: False)
    precision, why = choose_precision("auto", CPU, 768, 384, 1024)
    assert precision == "no" and "no bf16 matrix units" in why


@pytest.mark.skipif(not performance.cpu_has_bf16_units(), reason="this CPU has no bf16 units")
@pytest.mark.parametrize("shape", [(8, 16, 64), (2048, 384, 1024)], ids=["tiny", "10M-model-mlp"])
def test_auto_on_a_cpu_with_bf16_units_follows_what_it_measured(shape):
    precision, why = choose_precision("auto", CPU, *shape)
    bf16, fp32 = (float(x) for x in re.search(r"at (\d+) GFLOP/s in bf16, (\d+) in fp32", why).groups())
    assert precision == ("bf16" if bf16 >= performance.BF16_MIN_GAIN * fp32 else "no"), why
