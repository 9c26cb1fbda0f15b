"""llm_core/training/performance.py: the MFU denominator and `training.mixed_precision: auto`, measured on this
machine's real CPU (only a CPU without bf16 units, which this one may not be, is simulated)."""

import re

import pytest
import torch

from llm_core.training import performance
from llm_core.model import ModelArgs
from llm_core.training.performance import choose_precision, gemm_flops, measure_peak_flops, mfu
from llm_core.training.train import step_timer

CPU = torch.device("cpu")


def test_mfu_is_never_reported_above_100_percent():
    peak = measure_peak_flops(torch.float32)
    assert peak >= gemm_flops(torch.float32, 1024, 1024, 1024, repeats=1) * 0.5  # the best of several, not a dip
    assert mfu(tokens_per_second=1e9, flops_per_token=1e6, peak_flops=peak) == 1.0
    assert mfu(tokens_per_second=10, flops_per_token=1e6, peak_flops=1e8) == pytest.approx(0.1)


TINY = ModelArgs(vocab_size=320, n_layer=1, n_head=2, n_kv_head=2, n_embd=32, block_size=16)


def test_a_configured_precision_is_kept():
    never = lambda dtype: pytest.fail("measured a precision that was configured")  # noqa: E731
    assert choose_precision("bf16", CPU, never) == ("bf16", "as configured")
    assert choose_precision("no", CPU, never) == ("no", "as configured")


def test_auto_on_a_cpu_without_bf16_units_trains_in_fp32(monkeypatch):
    monkeypatch.setattr(performance, "cpu_has_bf16_units", lambda: False)
    precision, why = choose_precision("auto", CPU, step_timer(TINY, 2))
    assert precision == "no" and "no bf16 matrix units" in why


def test_auto_times_both_precisions_in_alternating_rounds_so_a_burst_does_not_decide(monkeypatch):
    """A burst of other work during the one bf16 timing once made `auto` choose fp32 for a step 1.3x
    faster in bf16: the precisions are timed in turns and the best of each compared."""
    monkeypatch.setattr(performance, "cpu_has_bf16_units", lambda: True)
    calls = []

    def timed(dtype):  # fp32 always 100 ms; bf16 40 ms, but 200 ms the first time (the burst)
        calls.append(dtype)
        return 0.1 if dtype == torch.float32 else (0.2 if calls.count(torch.bfloat16) == 1 else 0.04)

    precision, why = choose_precision("auto", CPU, timed)
    assert calls == [torch.float32, torch.bfloat16] * performance.PRECISION_ROUNDS
    assert precision == "bf16" and "took 40 ms in bf16, 100 ms in fp32" in why


@pytest.mark.skipif(not performance.cpu_has_bf16_units(), reason="this CPU has no bf16 units")
@pytest.mark.parametrize("args, batch", [(TINY, 2), (ModelArgs(vocab_size=2048, n_layer=2, n_head=6, n_kv_head=6,
                                                                n_embd=384, block_size=256), 8)],
                         ids=["tiny", "10M-width"])
def test_auto_on_a_cpu_with_bf16_units_follows_what_it_measured(args, batch):
    precision, why = choose_precision("auto", CPU, step_timer(args, batch))
    bf16, fp32 = (float(x) for x in re.search(r"took (\d+) ms in bf16, (\d+) ms in fp32", why).groups())
    if abs(fp32 / max(bf16, 1) - performance.BF16_MIN_GAIN) > 0.1:  # clear cases only: ms are rounded
        assert precision == ("bf16" if fp32 >= performance.BF16_MIN_GAIN * bf16 else "no"), why
