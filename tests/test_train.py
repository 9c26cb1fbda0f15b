"""Training with accelerate on the tokenized tiny-Shakespeare dataset: the learning-rate schedule,
reproducibility, 2-rank CPU DDP against 1 rank, progress lines, divergence, config refusals,
cancelling a launch. Checkpoints, resuming and reloading: test_checkpoint.py."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from helpers import (CI_PROFILE, QUIET, SUBPROCESS_TIMEOUT, config, free_port, losses, run, subprocess_env, summary,
                     train_command)

from llm_core.model_files import SUMMARY_FILE, load_model
from llm_core.training.checkpoint import checkpoint_dirs
from llm_core.config import PROJECT_ROOT, ConfigError, load_config
from llm_core.training.health import DIVERGED_FILE
from llm_core.training.train import TrainingDiverged, lr_at, train

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------------
# the learning-rate schedule


def test_lr_cosine_warmup_then_decay_to_min_ratio():
    cfg = load_config(CI_PROFILE, {"training": {"max_steps": 100, "warmup_steps": 10, "min_lr_ratio": 0.1,
                                                "lr_schedule": "cosine"}})
    warmup = [lr_at(s, cfg) for s in range(10)]
    assert warmup == pytest.approx([(s + 1) / 10 for s in range(10)])  # linear, reaching 1 at the last warmup step
    assert lr_at(10, cfg) == pytest.approx(1.0)
    assert lr_at(55, cfg) == pytest.approx(0.1 + 0.9 * 0.5)  # halfway: the cosine's midpoint
    assert lr_at(100, cfg) == pytest.approx(0.1)
    assert lr_at(150, cfg) == pytest.approx(0.1)  # stays at the floor past max_steps
    decay = [lr_at(s, cfg) for s in range(10, 101)]
    assert all(a > b for a, b in zip(decay, decay[1:]))  # strictly decreasing after warmup
    assert min(decay) == pytest.approx(0.1)
    # cosine shape: symmetric around the midpoint
    assert lr_at(10 + 20, cfg) - 0.55 == pytest.approx(0.55 - lr_at(100 - 20, cfg))


def test_lr_wsd_flat_then_linear_decay():
    cfg = load_config(CI_PROFILE, {"training": {"max_steps": 100, "warmup_steps": 10, "min_lr_ratio": 0.1,
                                                "lr_schedule": "wsd", "wsd_decay_fraction": 0.2}})
    assert [lr_at(s, cfg) for s in range(10)] == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert all(lr_at(s, cfg) == 1.0 for s in range(10, 81))  # stable until the last 20% of steps
    decay = [lr_at(s, cfg) for s in range(80, 101)]
    steps = [a - b for a, b in zip(decay, decay[1:])]
    assert steps == pytest.approx([0.9 / 20] * 20)  # linear
    assert lr_at(90, cfg) == pytest.approx(0.55)
    assert lr_at(100, cfg) == pytest.approx(0.1)


# ---------------------------------------------------------------------------------------------
# training runs


def test_training_writes_outputs_and_learns(reference_run):
    cfg, result = reference_run
    out = result.out_dir
    assert [h["step"] for h in result.history] == list(range(1, 21))
    assert (out / "model.safetensors").exists() and (out / "model_config.json").exists()
    assert [d.name for d in checkpoint_dirs(out)] == ["step_10", "step_20"]
    assert summary(out)["history"] == json.loads(json.dumps(result.history))
    assert result.world_size == 1 and result.steps == 20 and result.resumed_from_step == 0
    assert result.peak_flops == cfg.training.peak_flops == 1e12  # set in the profile: no GEMM timed
    vocab = 512
    assert result.history[0]["train_loss"] == pytest.approx(math.log(vocab), abs=0.5)
    assert result.final_train_loss < result.history[0]["train_loss"] - 0.1
    assert [h["step"] for h in result.history if "val_loss" in h] == [10, 20]
    assert math.isfinite(result.final_val_loss) and result.final_val_loss < math.log(vocab)
    assert result.history[-1]["lr"] == pytest.approx(cfg.training.learning_rate * cfg.training.min_lr_ratio)


def test_same_seed_same_loss_curve(reference_run, tmp_path):
    cfg, first = reference_run
    second = train(cfg, tmp_path / "again", log=QUIET)
    assert losses(second.history) == losses(first.history)  # exact
    assert losses(second.history, "val_loss") == losses(first.history, "val_loss")
    other = train(config(cfg.data_path, seed=7, max_steps=6, eval_interval=100), tmp_path / "other", log=QUIET)
    assert losses(other.history) != losses(first.history)[:6]


def test_process_count_mismatch_is_refused(data_dir, tmp_path):
    cfg = config(data_dir, num_processes=2)
    with pytest.raises(RuntimeError, match=r"started with 1 processes but training\.num_processes is 2") as info:
        train(cfg, tmp_path / "out", log=QUIET)
    assert "accelerate launch --num_processes 2" in str(info.value)
    assert not (tmp_path / "out" / "checkpoints").exists()


LAUNCH_FLAGS = {  # "--main_process_port 0": a free port, other runs may hold 29500
    "cli-flags": ["--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
                  "--dynamo_backend", "no", "--main_process_port", "0"],
    "cpu_2proc-profile": ["--config_file", str(PROJECT_ROOT / "assets_config" / "accelerate" / "cpu_2proc.yaml"),
                          "--main_process_port", "0"],
}


@pytest.mark.parametrize("launch_flags", LAUNCH_FLAGS.values(), ids=LAUNCH_FLAGS.keys())
def test_two_cpu_ranks_match_one_rank_with_the_same_global_batch(data_dir, reference_run, tmp_path, launch_flags):
    _, one_rank = reference_run
    cfg = config(data_dir, num_processes=2, batch_size=2)
    out = tmp_path / "ddp"
    launch = [sys.executable, "-m", "accelerate.commands.launch", *launch_flags]
    proc = run(launch + train_command(cfg, out))
    assert "on 2 process(es)" in proc.stdout + proc.stderr
    two = summary(out)
    one = summary(one_rank.out_dir)
    assert two["world_size"] == 2 and one["world_size"] == 1
    assert [h["step"] for h in two["history"]] == list(range(1, 21))
    for a, b in zip(losses(two["history"]), losses(one["history"]), strict=True):
        assert abs(a - b) < 1e-3, (losses(two["history"]), losses(one["history"]))
    # evaluation: the ranks' interleaved slices cover the same windows as one rank
    for a, b in zip(losses(two["history"], "val_loss"), losses(one["history"], "val_loss"), strict=True):
        assert abs(a - b) < 1e-3
    assert [h["lr"] for h in two["history"]] == pytest.approx([h["lr"] for h in one["history"]])


@pytest.mark.slow
def test_the_multi_node_profile_on_two_loopback_machines_matches_one_rank(data_dir, reference_run, tmp_path):
    """assets_config/accelerate/multi_node.yaml as its header says: the same command on every machine with
    its own --machine_rank; here two "machines" on this one, 1 process each, the main process at
    127.0.0.2 and gloo on the loopback interface: the losses of one rank with the same global batch."""
    _, one_rank = reference_run
    cfg = config(data_dir, num_processes=2, batch_size=2)  # the processes of every machine together
    out = tmp_path / "multi_node"  # shared storage: every machine writes the same run directory
    port, env = str(free_port()), {**subprocess_env(), "GLOO_SOCKET_IFNAME": "lo"}
    machines = [subprocess.Popen(
        [sys.executable, "-m", "accelerate.commands.launch",
         "--config_file", str(PROJECT_ROOT / "assets_config" / "accelerate" / "multi_node.yaml"),
         "--num_processes", "2", "--machine_rank", str(rank), "--main_process_ip", "127.0.0.2",
         "--main_process_port", port, "--mixed_precision", "no", *train_command(cfg, out)],
        cwd=PROJECT_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True) for rank in (0, 1)]
    try:
        outputs = [machine.communicate(timeout=SUBPROCESS_TIMEOUT)[0] for machine in machines]
    finally:
        for machine in machines:
            if machine.poll() is None:
                os.killpg(machine.pid, signal.SIGKILL)
    assert [m.returncode for m in machines] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    two = summary(out)
    assert two["world_size"] == 2
    for a, b in zip(losses(two["history"]), losses(one_rank.history), strict=True):
        assert abs(a - b) < 1e-3, (losses(two["history"]), losses(one_rank.history))


def test_progress_prints_about_20_step_lines_with_percent_and_eta(data_dir, tmp_path):
    """A short run prints its first step, every 5% and the last one; MLflow still gets every
    log_interval's metrics."""
    cfg = config(data_dir, max_steps=100, warmup_steps=None, log_interval=1, eval_interval=50,
                 checkpoint_interval=100)
    lines, sent = [], []
    train(cfg, tmp_path / "out", log=lines.append, on_metrics=lambda step, metrics: sent.append(metrics))
    step_lines = [line for line in lines if line.startswith("step ")]
    assert [int(line.split()[1].split("/")[0]) for line in step_lines] == [1, *range(5, 101, 5)]
    assert step_lines[9].startswith("step 45/100 (45%) loss ")
    assert all(" ETA " in line for line in step_lines[:-1]) and " ETA " not in step_lines[-1]
    assert " val " in step_lines[10] and " val " in step_lines[-1]  # steps 50 and 100 evaluate
    assert len(sent) == 100 and all("tokens_per_second" in m and "train_loss" in m for m in sent)


def test_throughput_excludes_evaluation_and_checkpoint_time(data_dir, tmp_path, monkeypatch):
    """Evaluations and checkpoints made 0.5 s slower each: counted, a pause would make the step after it
    last over 0.5 s, and the run's 12 steps over 3.5 s (7 pauses); a tiny step takes milliseconds. (Not a
    ratio to the median step: the first step after a pause can be several times slower, cold caches.)"""
    import time

    from llm_core.training import train as train_module

    pause = 0.5

    def slow(original):
        def wrapper(*args, **kwargs):
            time.sleep(pause)
            return original(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(train_module, "evaluate_loss", slow(train_module.evaluate_loss))
    monkeypatch.setattr(train_module, "save_checkpoint", slow(train_module.save_checkpoint))
    cfg = config(data_dir, max_steps=12, warmup_steps=None, log_interval=1, eval_interval=4, checkpoint_interval=3)
    result = train(cfg, tmp_path / "out", log=lambda line: None)
    tokens_per_step = cfg.training.batch_size * cfg.model.block_size
    step_seconds = {h["step"]: tokens_per_step / h["tokens_per_second"] for h in result.history}
    after_pauses = [step_seconds[s + 1] for s in (3, 4, 6, 8, 9)]  # right after a checkpoint or an evaluation
    assert max(after_pauses) < pause / 2, after_pauses
    assert 12 * tokens_per_step / result.tokens_per_second < 7 * pause / 2


def test_a_diverging_training_stops_at_the_first_non_finite_value(data_dir, tmp_path):
    """lr 1e6: the run stops with an error naming the step and the last good checkpoint, writes
    diverged.json, never saves non-finite weights, and a second start diverges the same way."""
    cfg = config(data_dir, learning_rate=1.0e6, warmup_steps=0, checkpoint_interval=1)
    out = tmp_path / "out"
    with pytest.raises(TrainingDiverged) as info:
        train(cfg, out, log=QUIET)
    record = json.loads((out / DIVERGED_FILE).read_text())
    good = checkpoint_dirs(out)
    assert good, "the first steps are finite: checkpoints before the divergence"
    assert str(info.value) == record["message"]
    assert str(info.value).startswith(f"training diverged at step {record['step']}: ")
    assert f"the last good checkpoint is {good[-1]} (step {int(good[-1].name.split('_')[1])})" in str(info.value)
    assert int(good[-1].name.split("_")[1]) < record["step"] and record["last_good_checkpoint"] == str(good[-1])
    for checkpoint in good:
        assert all(torch.isfinite(p).all() for p in load_model(checkpoint).state_dict().values()), checkpoint
    assert not (out / SUMMARY_FILE).exists() and not (out / "model.safetensors").exists()

    with pytest.raises(TrainingDiverged) as again:  # resumes from the last good checkpoint: same end
        train(cfg, out, log=QUIET)
    assert str(again.value) == str(info.value)


# ---------------------------------------------------------------------------------------------
# configs


@pytest.mark.parametrize("overrides,field", [
    ({"model": {"n_head": 3}}, ("model", "n_head (3) must divide n_embd (32)")),
    ({"model": {"n_head": 4, "n_kv_head": 3}}, ("model", "n_kv_head (3) must divide n_head (4)")),
    ({"model": {"n_embd": 36, "n_head": 4, "n_kv_head": 4}}, ("model", "head size")),
    ({"training": {"mixed_precision": "fp8"}}, ("training.mixed_precision", "fp8")),
    ({"training": {"warmup_steps": 30, "max_steps": 30}}, ("training.warmup_steps", "must be below max_steps (30)")),
    ({"model": {"n_layer": 0}}, ("model.n_layer", "greater than or equal to 1")),
    ({"model": {"n_layers": 2}}, ("model.n_layers", "unknown field")),
], ids=["n_head-divides-n_embd", "n_kv_head-divides-n_head", "odd-head-size", "fp8", "warmup>=max_steps",
        "n_layer-0", "typo"])
def test_invalid_configs_are_refused_with_the_field_named(overrides, field):
    with pytest.raises(ConfigError) as info:
        load_config(CI_PROFILE, overrides)
    where, what = field
    lines = [line.strip() for line in str(info.value).splitlines()]
    assert any(line.startswith(f"{where}:") and what in line for line in lines), str(info.value)


@pytest.mark.parametrize("ranks_wanted", [1, 2])
def test_cancelling_the_launch_stops_every_rank(data_dir, tmp_path, ranks_wanted):
    """What Dagster Pipes does when a run is cancelled: SIGINT to the process it started (the
    process-group wrapper around `accelerate launch`, or around the one rank). No rank may keep training
    afterwards (accelerate's launcher alone would leave its child running)."""
    import psutil

    from pipelines.process_group import GRACE_SECONDS
    from pipelines.resources import launch_command

    cfg = config(data_dir, num_processes=ranks_wanted, batch_size=2, max_steps=100_000,
                 checkpoint_interval=100_000, eval_interval=100_000, log_interval=1)
    command = launch_command(cfg, "llm_core.training.train", train_command(cfg, tmp_path / "cancel")[2:])
    if os.environ.get("SCRATCHLLM_TEST_WITHOUT_PROCESS_GROUP"):  # to see this test fail without the wrapper
        command = command[command.index("--") + 1:]
    proc = subprocess.Popen(command, cwd=PROJECT_ROOT, env=subprocess_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + SUBPROCESS_TIMEOUT
        while "step 1/" not in (proc.stdout.readline() or "step 1/"):  # both ranks reduced a loss
            assert time.monotonic() < deadline
        ranks = [p for p in psutil.Process(proc.pid).children(recursive=True)
                 if "llm_core.training.train" in p.cmdline() and "accelerate.commands.launch" not in p.cmdline()]
        assert len(ranks) == ranks_wanted
        proc.send_signal(signal.SIGINT)
        # As soon as its ranks are gone, not after the grace period that ranks ignoring SIGTERM get.
        proc.wait(timeout=GRACE_SECONDS / 2)
        gone, alive = psutil.wait_procs(ranks, timeout=15)
        assert not alive, [p.cmdline() for p in alive]
    finally:
        for leftover in psutil.Process(proc.pid).children(recursive=True) if proc.poll() is None else []:
            leftover.kill()
        if proc.poll() is None:
            proc.kill()


def test_one_process_trains_in_fp32_and_then_in_bf16(data_dir, tmp_path):
    """accelerate allows one precision per process; a second training in another one (the default
    profile's `auto` choosing bf16 after an fp32 training, in a notebook or this suite) must still run."""
    fp32 = train(config(data_dir, mixed_precision="no", max_steps=2, warmup_steps=1), tmp_path / "fp32", log=QUIET)
    bf16 = train(config(data_dir, mixed_precision="bf16", max_steps=2, warmup_steps=1), tmp_path / "bf16", log=QUIET)
    assert (fp32.mixed_precision, bf16.mixed_precision) == ("no", "bf16")
    assert math.isfinite(bf16.history[-1]["train_loss"])


def test_auto_precision_is_decided_once_per_run_and_kept_on_resume(data_dir, tmp_path):
    """`mixed_precision: auto` is decided by the first start of a run and written in the run directory;
    every later start (a resume, another rank) reads it instead of measuring again."""
    cfg = config(data_dir, mixed_precision="auto", max_steps=10, checkpoint_interval=5)
    lines = []
    first = train(cfg, tmp_path / "run", log=lines.append)
    decided = json.loads((tmp_path / "run" / "precision.json").read_text())
    assert first.mixed_precision == decided["mixed_precision"] in ("no", "bf16")
    assert any(f"precision {decided['mixed_precision']} ({decided['why']})" in line for line in lines)
    assert all(h["mfu"] <= 1.0 for h in first.history if "mfu" in h)

    other = tmp_path / "other"  # a run whose first start chose fp32: its resumes stay in fp32
    other.mkdir()
    (other / "precision.json").write_text(json.dumps({"mixed_precision": "no", "why": "auto: chosen before"}))
    assert train(cfg, other, log=QUIET).mixed_precision == "no"
