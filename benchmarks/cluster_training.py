"""Training on a Ray cluster (Ray Train, 2 workers on 2 nodes) against a local 2-rank DDP launch, same cores.

    python benchmarks/cluster_training.py [--steps 60] [--repeats 3] [--shapes default,10m] [--work-dir DIR]

A 2-node Ray cluster on loopback (127.0.0.2 and 127.0.0.3, 1 CPU each: the machine's 2 cores) is
started once. For each shape (the default profile's model, and nanoGPT's ~10M shakespeare_char shape:
6 layers, 384 wide, block 256, batch 8), each repeat trains the same config twice, interleaved:
  - local: `accelerate launch --multi_gpu --num_processes 2` of llm_core.training.train (gloo, 1 thread
    per rank), what `trained_model` runs with engine.kind: local;
  - ray: `python -m llm_core.training.cluster` (the driver; 2 Ray Train workers, 1 CPU each, one per
    node), what `trained_model` runs with engine.kind: ray.
It prints tokens/s once started (the median of the training's log windows, as the asset reports it),
the step time, the start-up cost (wall time of the command minus its training steps: process and
cluster start, process group, data, final save) and the peak RSS of every process (the command's tree;
for ray, plus the cluster's processes, whose idle RSS is printed apart), and ray's ratio to local.
The dataset is the default profile's (bundled corpus, 2,048-token BPE), built once under --work-dir.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from llm_core.config import DEFAULT_PROFILE, load_config  # noqa: E402

SHAPES = {  # name -> model and per-rank batch overrides
    "default": {"model": {}, "training": {}},
    "10m": {"model": {"n_layer": 6, "n_head": 6, "n_kv_head": 6, "n_embd": 384, "block_size": 256},
            "training": {"batch_size": 8}},
}


def dataset(work_dir: Path) -> Path:
    """The default profile's data stages, once: raw corpus, cleaned shards, tokenizer, token files."""
    from llm_core.data import tokenizer as tok
    from llm_core.data.cleaned_shards import build_cleaned_shards
    from llm_core.data.raw_corpus import build_raw_corpus
    from llm_core.data.tokenized_dataset import build_tokenized_dataset

    data_dir = work_dir / "data"
    if (data_dir / "tokenized_dataset" / "manifest.json").exists():
        return data_dir
    cfg = load_config(DEFAULT_PROFILE, {"data_dir": str(data_dir)})
    quiet = lambda line: None  # noqa: E731
    build_raw_corpus(cfg, quiet)
    cleaned = build_cleaned_shards(cfg, quiet)
    shards = [cleaned.shards_dir / part["name"] for part in cleaned.parts]
    tok.train_tokenizer(cfg, shards, data_dir / "tokenizer", log=quiet)
    build_tokenized_dataset(cfg, tok.load_tokenizer(data_dir / "tokenizer"), data_dir / "tokenizer", log=quiet)
    return data_dir


def config_file(work_dir: Path, data_dir: Path, shape: str, steps: int, engine: dict) -> Path:
    s = SHAPES[shape]
    cfg = load_config(DEFAULT_PROFILE, {
        "data_dir": str(data_dir), "model": s["model"], "engine": engine,
        "training": {"num_processes": 2, "max_steps": steps, "warmup_steps": 5, "log_interval": 10,
                     "eval_interval": 10 * steps, "checkpoint_interval": 10 * steps, "peak_flops": 1e12,
                     **s["training"]}})
    path = work_dir / f"{shape}-{engine['kind']}.json"
    path.write_text(json.dumps(cfg.model_dump(mode="json")))
    return path


def tree_rss(root: psutil.Process, extra: set[int]) -> int:
    total = 0
    for pid in {root.pid, *(p.pid for p in root.children(recursive=True)), *extra}:
        try:
            total += psutil.Process(pid).memory_info().rss
        except psutil.Error:
            pass
    return total


def measure(command: list[str], out_dir: Path, env: dict, cluster_pids=lambda: set()) -> dict:
    """Run one training from scratch; its wall time, what its summary says, the peak RSS of its processes."""
    shutil.rmtree(out_dir, ignore_errors=True)  # a finished run in out_dir would be reported, not trained
    start, peak = time.monotonic(), 0
    proc = subprocess.Popen([*command, "--out-dir", str(out_dir)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    root = psutil.Process(proc.pid)
    while proc.poll() is None:  # once a second: listing the cluster's processes costs CPU the trainings share
        try:
            peak = max(peak, tree_rss(root, cluster_pids()))
        except psutil.Error:
            pass
        time.sleep(1.0)
    output = proc.stdout.read()
    wall = time.monotonic() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{command} failed ({proc.returncode}):\n{output[-3000:]}")
    summary = json.loads((out_dir / "training_summary.json").read_text())
    return {"wall": wall, "tokens_per_second": summary["tokens_per_second"],
            "step_ms": 1000 * summary["train_seconds"] / summary["steps"],
            "startup": wall - summary["train_seconds"], "rss_mb": peak / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--shapes", default="default,10m")
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/scratchllm-bench-cluster"))
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "tests"))
    from ray_cluster import RayCluster

    args.work_dir.mkdir(parents=True, exist_ok=True)
    data_dir = dataset(args.work_dir)
    print(f"{os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.1f}; {args.steps} steps x {args.repeats} "
          f"repeats per shape", flush=True)
    start = time.monotonic()
    cluster = RayCluster.start()
    idle_mb = sum(psutil.Process(pid).memory_info().rss for pid in cluster.pids()) / 2**20
    print(f"Ray cluster at {cluster.address} (2 nodes, 1 CPU each) started in {time.monotonic() - start:.1f} s; "
          f"idle RSS of its processes {idle_mb:,.0f} MB", flush=True)
    base_env = {k: v for k, v in os.environ.items() if k != "SCRATCHLLM_CONFIG"}
    local_env = {**base_env, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    ray_env = {**base_env, **cluster.env()}
    rows = []
    try:
        for shape in args.shapes.split(","):
            local_cfg = config_file(args.work_dir, data_dir, shape, args.steps, {"kind": "local"})
            ray_cfg = config_file(args.work_dir, data_dir, shape, args.steps,
                                  {"kind": "ray", "address": cluster.address})
            local_cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                         "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                         "--main_process_port", "0", "-m", "llm_core.training.train",
                         "--resolved-config", str(local_cfg)]
            ray_cmd = [sys.executable, "-m", "llm_core.training.cluster", "--resolved-config", str(ray_cfg)]
            runs = {"local": [], "ray": []}
            for repeat in range(args.repeats):
                runs["local"].append(measure(local_cmd, args.work_dir / f"out-{shape}-local-{repeat}", local_env))
                runs["ray"].append(measure(ray_cmd, args.work_dir / f"out-{shape}-ray-{repeat}", ray_env,
                                           cluster.pids))
                print(f"{shape} repeat {repeat + 1}: local {runs['local'][-1]['tokens_per_second']:,.0f} tok/s, "
                      f"ray {runs['ray'][-1]['tokens_per_second']:,.0f} tok/s", flush=True)
            medians = {kind: {k: statistics.median(r[k] for r in results) for k in results[0]}
                       for kind, results in runs.items()}
            for kind, m in medians.items():
                rows.append((shape, kind, m, m["tokens_per_second"] / medians["local"]["tokens_per_second"]))
    finally:
        cluster.stop()
    print(f"\nmedians of {args.repeats} (2 ranks / 2 workers, 1 CPU each; 'vs local' = tokens/s once started):")
    print(f"{'shape':8} {'launch':6} {'tokens/s':>9} {'step ms':>8} {'start-up s':>10} {'peak RSS MB':>11} "
          f"{'vs local':>8}")
    for shape, kind, m, ratio in rows:
        print(f"{shape:8} {kind:6} {m['tokens_per_second']:9,.0f} {m['step_ms']:8.1f} {m['startup']:10.1f} "
              f"{m['rss_mb']:11,.0f} {ratio:8.2f}x")


if __name__ == "__main__":
    main()
