"""training.compile: the auto decision both ways (a run too short to pay stays eager on an estimate; a
longer one measures the shape once and follows the numbers), compiled losses equal to eager ones and plain
weights saved, inductor's cache under data_dir reused by a resume, and the fallback to eager without a C++
compiler."""

from __future__ import annotations

import shutil

import pytest
import torch
from helpers import QUIET, config, losses

from llm_core.files import read_json
from llm_core.model_files import SUMMARY_FILE, load_model
from llm_core.training import compilation
from llm_core.training.checkpoint import checkpoint_dirs
from llm_core.training.train import model_args, train


def ci_args(cfg):
    return model_args(cfg, cfg.tokenizer.vocab_size)


def test_auto_leaves_a_run_too_short_to_pay_eager_on_an_estimate(data_dir):
    cfg = config(data_dir, compile="auto")
    decision = compilation.decide("auto", ci_args(cfg), 4, "no", "cpu", steps_left=20, data_path=data_dir, log=QUIET)
    assert decision["compiled"] is False
    assert "too short to pay" in decision["why"] and "(estimated)" in decision["why"]
    assert decision["eager_step_seconds"] > 0


@pytest.mark.parametrize("eager, compiled, steps, compiles", [(0.010, 0.004, 10_000, True), (0.010, 0.004, 100, False),
                                                              (0.010, 0.012, 10_000_000, False)])
def test_the_rule_compiles_when_the_measured_saving_exceeds_the_compile_time(eager, compiled, steps, compiles):
    record = {"eager_step_seconds": eager, "compiled_step_seconds": compiled, "compile_seconds": 30.0}
    decided, why = compilation.rule(record, steps)
    assert decided is compiles and why.startswith("compiles: " if compiles else "eager: ") and "(measured)" in why


def test_without_a_cpp_compiler_training_stays_eager_saying_so(data_dir, tmp_path, monkeypatch):
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path / "no-compilers-here"))
    lines = []
    cfg = config(data_dir, compile=True, max_steps=6, warmup_steps=2, checkpoint_interval=6, eval_interval=6)
    result = train(cfg, tmp_path / "out", log=lines.append)
    assert result.compile["compiled"] is False and "no C++ compiler" in result.compile["why"]
    assert any("eager (eager: no C++ compiler" in line for line in lines)


@pytest.mark.slow
def test_compiled_training_matches_eager_and_a_resume_compiles_from_the_cache(data_dir, reference_run, tmp_path):
    eager_cfg, eager = reference_run
    cfg = config(data_dir, compile=True)
    compiled = train(cfg, tmp_path / "compiled", log=QUIET)
    assert compiled.compile["compiled"] is True and compiled.compile["cache_misses"] > 0  # compiled here, cold
    assert list((data_dir / compilation.CACHE_DIR / "inductor").rglob("*")), "nothing cached under data_dir"
    for step, (a, b) in enumerate(zip(losses(compiled.history), losses(eager.history), strict=True), 1):
        assert abs(a - b) <= 2e-3, f"step {step}: compiled {a} vs eager {b}"
    # The weights under the model's own names (a compiled module's state dict says `_orig_mod.*`): they load.
    assert not any("_orig_mod" in name for name in load_model(tmp_path / "compiled").state_dict())

    # A resume (a new start of the run: nothing compiled in memory) compiles from the cache on disk.
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(tmp_path / "compiled", resumed_dir)
    (resumed_dir / SUMMARY_FILE).unlink()
    for checkpoint in checkpoint_dirs(resumed_dir)[1:]:  # back to step 10 of 20
        shutil.rmtree(checkpoint)
    torch._dynamo.reset()
    from torch._dynamo.utils import counters

    counters.clear()
    resumed = train(cfg, resumed_dir, log=QUIET)
    assert resumed.resumed_from_step == 10 and resumed.compile["compiled"] is True
    assert resumed.compile["cache_misses"] == 0 and resumed.compile["cache_hits"] > 0
    assert losses(resumed.history)[10:] == pytest.approx(losses(compiled.history)[10:], abs=1e-5)
    decided = compilation.COMPILE_FILE
    assert read_json(resumed_dir / decided) == read_json(tmp_path / "compiled" / decided)  # decided once per run

    # auto on a run long enough to repay a compile measures this shape once and follows the numbers.
    decision = compilation.decide("auto", ci_args(cfg), 4, "no", "cpu", steps_left=1_000_000, data_path=data_dir,
                                  log=QUIET)
    record = read_json(data_dir / compilation.CACHE_DIR / "records.json")[
        compilation.shape_key(ci_args(cfg), 4, "no", "cpu")]
    assert record["compile_seconds"] >= 0 and record["eager_step_seconds"] > 0
    assert (decision["compiled"], decision["why"]) == compilation.rule(record, 1_000_000)
