"""Checkpoints (llm_core/training/checkpoint.py) on real trainings of the ci profile: kill -9 and resume on
the uninterrupted curve, a truncated or half-loading checkpoint set aside, and reloading the
trained model (and a checkpoint's weights) with its exact validation loss."""

from __future__ import annotations

import math
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import QUIET, SUBPROCESS_TIMEOUT, config, losses, run, subprocess_env, summary, train_command

from llm_core.training.checkpoint import FILE_SIZES, checkpoint_dirs
from llm_core.model_files import SUMMARY_FILE, load_model
from llm_core.config import PROJECT_ROOT, ScratchConfig
from llm_core.layout import DATASET_DIR
from llm_core.training.loader import sequential_batches
from llm_core.model import Transformer
from llm_core.training.train import model_args, train

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------------
# resuming


def test_kill_9_then_resume_matches_an_uninterrupted_run(data_dir, tmp_path):
    steps = 80
    cfg = config(data_dir, max_steps=steps, checkpoint_interval=5, eval_interval=20)
    out = tmp_path / "killed"
    cmd = [sys.executable, *train_command(cfg, out)]

    proc = subprocess.Popen(cmd, cwd=PROJECT_ROOT, env=subprocess_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + SUBPROCESS_TIMEOUT
    try:
        while not any(int(d.name.split("_")[1]) >= 10 for d in checkpoint_dirs(out)):
            if proc.poll() is not None:
                pytest.fail(f"training ended before it could be killed ({proc.returncode}):\n{proc.stderr.read()}")
            if time.monotonic() > deadline:
                pytest.fail("no checkpoint step_10 in time")
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / SUMMARY_FILE).exists(), "the run finished before the kill: the test proved nothing"
    survived = checkpoint_dirs(out)
    last = int(survived[-1].name.split("_")[1])
    assert 10 <= last < steps

    # A killed save leaves `step_N.tmp`: never a checkpoint, even the newest.
    junk = out / "checkpoints" / "step_999.tmp"
    junk.mkdir()
    (junk / "model.safetensors").write_bytes(b"half-written")
    assert all(not d.name.endswith(".tmp") for d in checkpoint_dirs(out))
    assert checkpoint_dirs(out)[-1].name == f"step_{last}"

    resumed = run(cmd)
    assert f"resumed from {out / 'checkpoints' / f'step_{last}'} (step {last})" in resumed.stdout
    got = summary(out)
    assert got["resumed_from_step"] == last
    assert [h["step"] for h in got["history"]] == list(range(1, steps + 1))  # history carried in the checkpoint

    reference = train(cfg, tmp_path / "uninterrupted", log=QUIET)
    assert len(losses(reference.history)) == steps
    for step, (a, b) in enumerate(zip(losses(got["history"]), losses(reference.history), strict=True), 1):
        assert abs(a - b) <= 1e-6, f"step {step}: resumed {a} vs uninterrupted {b}"
    for a, b in zip(losses(got["history"], "val_loss"), losses(reference.history, "val_loss"), strict=True):
        assert abs(a - b) <= 1e-6
    assert [h["lr"] for h in got["history"]] == pytest.approx([h["lr"] for h in reference.history], abs=1e-12)
    assert got["final_val_loss"] == pytest.approx(reference.final_val_loss, abs=1e-6)
    # the final weights agree too
    a, b = load_model(out), load_model(reference.out_dir)
    for (name, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-5, msg=name)


# ---------------------------------------------------------------------------------------------
# damaged checkpoints


def truncate(path: Path) -> int:
    """Cut a file in half for real, as a full disk or a killed copy leaves it; returns the new size."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return len(data) // 2


def copy_of(run_dir: Path, to: Path) -> Path:
    """A finished run's directory without its final outputs: what a killed run leaves behind."""
    shutil.copytree(run_dir, to)
    for name in (SUMMARY_FILE, "model.safetensors"):
        (to / name).unlink()
    return to


@pytest.mark.parametrize("damaged, sizes_recorded", [("model.safetensors", True), ("optimizer.bin", False)],
                         ids=["weights-truncated", "optimizer-truncated-no-size-record"])
def test_a_truncated_newest_checkpoint_is_set_aside_and_the_one_before_resumes(reference_run, tmp_path, damaged,
                                                                               sizes_recorded):
    """step_20 cut in half: the run resumes from step_10 with a warning naming step_20, keeps the bad
    one as step_20.corrupt, and ends on the uninterrupted run's losses. Without a size record (a
    checkpoint of an older version) the load fails after the weights were read: step_10 must
    replace them completely."""
    cfg, reference = reference_run
    out = copy_of(reference.out_dir, tmp_path / "out")
    newest = checkpoint_dirs(out)[-1]
    assert newest.name == "step_20"
    if not sizes_recorded:
        (newest / FILE_SIZES).unlink()
    cut = truncate(newest / damaged)

    lines = []
    result = train(cfg, out, log=lines.append)
    warning = next(line for line in lines if line.startswith("WARNING"))
    assert f"checkpoint {newest} does not load" in warning and "set aside as step_20.corrupt" in warning
    assert f"resumed from {out / 'checkpoints' / 'step_10'} (step 10)" in lines
    assert result.resumed_from_step == 10
    assert ((out / "checkpoints" / "step_20.corrupt" / damaged).stat().st_size == cut)  # kept, not deleted
    assert [d.name for d in checkpoint_dirs(out)] == ["step_10", "step_20"]  # step_20 saved anew
    for step, (a, b) in enumerate(zip(losses(result.history), losses(reference.history), strict=True), 1):
        assert abs(a - b) <= 1e-6, f"step {step}: resumed {a} vs uninterrupted {b}"
    assert result.final_val_loss == pytest.approx(reference.final_val_loss, abs=1e-6)

    again = []  # the bad one is not retried: the next start finds the new step_20
    train(cfg, out, log=again.append)
    assert not [line for line in again if line.startswith("WARNING")]
    assert f"resumed from {out / 'checkpoints' / 'step_20'} (step 20)" in again


def test_muon_checkpoints_both_optimizers_and_resumes_exactly(data_dir, tmp_path):
    """training.optimizer: muon prepares AdamW (embeddings, head, gains) and Muon (hidden matrices) each
    on its own: every checkpoint holds both states, and a run killed after step_10 resumes onto the
    uninterrupted run's losses."""
    cfg = config(data_dir, optimizer="muon")
    full = train(cfg, tmp_path / "full", log=QUIET)
    for checkpoint in checkpoint_dirs(full.out_dir):
        assert {"optimizer.bin", "optimizer_1.bin"} <= {f.name for f in checkpoint.iterdir()}
    out = copy_of(full.out_dir, tmp_path / "killed")
    shutil.rmtree(out / "checkpoints" / "step_20")
    resumed = train(cfg, out, log=QUIET)
    assert resumed.resumed_from_step == 10
    for step, (a, b) in enumerate(zip(losses(resumed.history), losses(full.history), strict=True), 1):
        assert abs(a - b) <= 1e-6, f"step {step}: resumed {a} vs uninterrupted {b}"
    assert resumed.final_val_loss == pytest.approx(full.final_val_loss, abs=1e-6)
    # The two files are the two optimizers: AdamW's moments and Muon's momentum, one state per tensor.
    last = checkpoint_dirs(full.out_dir)[-1]
    adamw, muon = (torch.load(last / name, weights_only=False) for name in ("optimizer.bin", "optimizer_1.bin"))
    assert "betas" in adamw["param_groups"][0] and "ns_steps" in muon["param_groups"][0]
    assert {"exp_avg", "exp_avg_sq"} <= set(next(iter(adamw["state"].values())))
    assert all(set(state) == {"momentum_buffer"} and state["momentum_buffer"].dim() == 2
               for state in muon["state"].values())


def test_when_no_checkpoint_loads_the_next_start_trains_from_scratch(reference_run, tmp_path):
    """The only checkpoint failed half-way through loading (its weights may be in the model): this
    start refuses to train on them; the next one trains from step 0, exactly as a fresh run."""
    cfg, reference = reference_run
    out = copy_of(reference.out_dir, tmp_path / "out")
    shutil.rmtree(out / "checkpoints" / "step_10")
    (out / "checkpoints" / "step_20" / FILE_SIZES).unlink()
    truncate(out / "checkpoints" / "step_20" / "optimizer.bin")
    with pytest.raises(RuntimeError, match="failed half-way through loading.*run again to train from step 0"):
        train(cfg, out, log=QUIET)
    assert (out / "checkpoints" / "step_20.corrupt").is_dir() and not checkpoint_dirs(out)
    result = train(cfg, out, log=QUIET)
    assert result.resumed_from_step == 0 and losses(result.history) == losses(reference.history)


# ---------------------------------------------------------------------------------------------
# reloading


def val_loss(model: Transformer, cfg: ScratchConfig) -> float:
    """evaluate_loss on one rank, without accelerate: mean loss per token over the first eval_batches."""
    total, count = 0.0, 0
    with torch.no_grad():
        batches = sequential_batches(cfg.data_path / DATASET_DIR, "val", cfg.model.block_size, cfg.training.batch_size)
        for _, (x, y) in zip(range(cfg.training.eval_batches), batches):
            _, loss = model(x, y)
            n = int((y != -100).sum())
            total, count = total + float(loss) * n, count + n
    return total / count


def test_load_model_reproduces_the_trained_val_loss(reference_run):
    cfg, result = reference_run
    model = load_model(result.out_dir)
    assert not model.training
    assert model.args == model_args(cfg, 512)
    assert model.lm_head.weight is model.embed_tokens.weight  # tying survives the reload
    # the val batches of training's evaluations: exactly what training measured at its last step
    assert val_loss(model, cfg) == pytest.approx(result.final_val_loss, rel=0, abs=1e-9)

    # and one fixed val batch: the same logits as the weights of the last checkpoint
    from safetensors.torch import load_model as load_weights

    from_checkpoint = Transformer(model_args(cfg, 512)).eval()
    load_weights(from_checkpoint, str(checkpoint_dirs(result.out_dir)[-1] / "model.safetensors"))
    x, y = next(iter(sequential_batches(cfg.data_path / DATASET_DIR, "val", cfg.model.block_size, 4)))
    with torch.no_grad():
        logits_a, loss_a = model(x, y)
        logits_b, loss_b = from_checkpoint(x, y)
    assert torch.equal(logits_a, logits_b) and loss_a.item() == loss_b.item()
    assert loss_a.item() < math.log(512)  # trained: better than uniform
