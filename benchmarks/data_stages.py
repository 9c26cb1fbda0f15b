"""Benchmark the data stages (ingest -> raw_corpus, then clean + dedup -> cleaned_shards) at several
corpus sizes, each run in a fresh process (fresh data_dir) so that peak memory is measured per size.

    python benchmarks/data_stages.py [--sizes 10,100,300] [--repeats 1] [--dup-rate 0.1] [--workers 2]
                                     [--engine local,ray] [--work-dir /tmp/scratchllm-bench] [--keep]

`--engine local,ray` runs each size on both engines in one run: the local engine (cleaning.num_workers
processes), then `engine.kind: ray` on a 2-node Ray cluster started on loopback for the benchmark (1 CPU
per node: the same cores), whose start and stop times are reported; the Ray rows' RSS includes every
process of the cluster, and their outputs (kept shards, removed ledgers, manifests) are compared byte
for byte with the local engine's.

Corpora come from make_corpus.make_sized_corpus (real prose recombined into distinct documents, with
planted exact and near duplicate pairs) and are cached in the work dir. Reported per size (median
run by wall time when --repeats > 1): documents, seconds, MB/s end to end and per stage (MB of
document text), peak RSS of the stage process ("parent") and of the largest cleaning worker
(getrusage of reaped children), peak RSS of the whole process tree (sampled every 50 ms), CPU
seconds used, how busy the machine was with other work, and the planted duplicates found.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # import benchmarks.* from the root

import psutil

DEFAULT_WORK_DIR = Path("/tmp/scratchllm-bench")


# ----------------------------------------------------------------------------------------------
# The measured process


def worker(corpus: str, data_dir: str, workers: int, engine: str) -> None:
    """Run both stages once and print one JSON line of measurements."""
    from llm_core.config import load_config
    from llm_core.data.cleaned_shards import build_cleaned_shards
    from llm_core.data.raw_corpus import build_raw_corpus

    shutil.rmtree(data_dir, ignore_errors=True)
    cfg = load_config(overrides={"data_dir": data_dir, "corpus": {"sources": [corpus]},
                                 "cleaning": {"num_workers": workers}, "engine": json.loads(engine)})
    phases: dict[str, float] = {}  # progress line of each phase's last job -> when it was logged

    def log(message: str) -> None:
        done = re.match(r"^(.+): (\d+)/(\d+)\b", message)
        if done and done.group(2) == done.group(3):
            phases[done.group(1)] = time.monotonic()

    t0 = time.monotonic()
    raw = build_raw_corpus(cfg, log)
    t1 = time.monotonic()
    cleaned = build_cleaned_shards(cfg, log)
    t2 = time.monotonic()
    # Each phase's seconds: from the end of the one before (or the start of its stage) to its last job.
    phase_seconds, previous = {}, t0
    for t, name in sorted((t, name) for name, t in phases.items()):
        if previous < t1 < t:  # the first phase of cleaned_shards starts with the stage
            previous = t1
        phase_seconds[name], previous = t - previous, t
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    print(json.dumps({
        "documents": raw.num_documents, "text_bytes": raw.num_bytes, "source_bytes": raw.num_source_bytes,
        "raw_seconds": t1 - t0, "clean_seconds": t2 - t1, "raw_parts": len(raw.parts),
        "parts_seconds": phases.get("cleaning parts", t1) - t1, "dedup_seconds": t2 - phases.get("cleaning parts", t1),
        "phase_seconds": phase_seconds,
        "kept": cleaned.num_kept, "filtered": cleaned.num_filtered, "exact": cleaned.num_exact_duplicates,
        "near": cleaned.num_near_duplicates, "quarantined": cleaned.num_quarantined,
        "filtered_by_rule": cleaned.filtered_by_rule, "invariant": cleaned.invariant_holds(),
        "rss_parent_mb": me.ru_maxrss / 1024, "rss_worker_mb": kids.ru_maxrss / 1024,  # Linux: KiB
        "cpu_seconds": me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime,
    }))


# ----------------------------------------------------------------------------------------------
# The driver


def _busy_seconds() -> float:
    t = psutil.cpu_times()
    return t.user + t.system + t.nice + getattr(t, "irq", 0) + getattr(t, "softirq", 0)


def measure(corpus: Path, data_dir: Path, workers: int, cluster=None) -> dict:
    """Run the worker in a fresh process; sample the RSS of its whole process tree (and of the Ray
    cluster's processes, when given one) meanwhile."""
    engine = {"kind": "ray", "address": cluster.address} if cluster else {"kind": "local"}
    busy0, start = _busy_seconds(), time.monotonic()
    proc = subprocess.Popen([sys.executable, __file__, "--worker", str(corpus), str(data_dir), str(workers),
                             json.dumps(engine)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(cluster.env() if cluster else {})})
    peak_tree = 0
    ps = psutil.Process(proc.pid)
    while proc.poll() is None:
        try:
            pids = {ps.pid, *(p.pid for p in ps.children(recursive=True)), *(cluster.pids() if cluster else ())}
            rss = 0
            for pid in pids:
                try:
                    rss += psutil.Process(pid).memory_info().rss
                except psutil.Error:
                    pass
            peak_tree = max(peak_tree, rss)
        except psutil.Error:
            pass
        time.sleep(0.05)
    out, err = proc.communicate()
    wall, busy = time.monotonic() - start, _busy_seconds() - busy0
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark worker failed ({proc.returncode}):\n{err[-3000:]}")
    result = json.loads(out.strip().splitlines()[-1])
    result["rss_tree_mb"] = peak_tree / 2**20
    result["engine"] = engine["kind"]
    result["wall_seconds"] = wall
    # CPU time of other processes on the machine during the run, as a share of all cores.
    result["others_busy"] = max(0.0, busy - result["cpu_seconds"]) / (wall * (os.cpu_count() or 1))
    return result


def corpus_for(work_dir: Path, size_mb: float, dup_rate: float, seed: int) -> tuple[Path, dict]:
    from benchmarks.make_corpus import make_sized_corpus

    out = work_dir / f"corpus-{size_mb:g}mb-dup{dup_rate:g}-seed{seed}"
    truth_path = out / "ground_truth.json"
    if not truth_path.exists():
        start = time.monotonic()
        truth = make_sized_corpus(out, size_mb, dup_rate, seed)
        print(f"generated {size_mb:g} MB corpus: {truth['num_documents']} documents in {truth['num_files']} files, "
              f"{truth['num_exact_pairs']} exact + {truth['num_near_pairs']} near planted pairs "
              f"({time.monotonic() - start:.1f} s)", flush=True)
    return out / "corpus", json.loads(truth_path.read_text())


def score(data_dir: Path, corpus: Path, truth: dict) -> dict:
    from benchmarks.outcomes import Outcomes, score_pairs

    return score_pairs(Outcomes(data_dir, corpus), truth["pairs"])


def output_fingerprint(data_dir: Path) -> str:
    """One hash of every output file of the two stages (shards, ledgers, manifests, quarantine)."""
    digest = hashlib.sha256()
    for name in ("raw_corpus", "cleaned_shards/shards", "cleaned_shards/removed", "cleaned_shards/manifest.json",
                 "quarantine"):
        paths = [data_dir / name] if (data_dir / name).is_file() else sorted((data_dir / name).rglob("*"))
        for path in (p for p in paths if p.is_file()):
            digest.update(str(path.relative_to(data_dir)).encode() + path.read_bytes())
    return digest.hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10,100,300", help="corpus sizes in MB, comma-separated")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--dup-rate", type=float, default=0.1, help="share of documents that are planted duplicates")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2, help="cleaning.num_workers")
    parser.add_argument("--engine", default="local", help="engines to run each size on: local, ray or local,ray")
    parser.add_argument("--work-dir", type=Path, default=DEFAULT_WORK_DIR)
    parser.add_argument("--keep", action="store_true", help="keep the data dirs of the runs")
    parser.add_argument("--worker", nargs=4, metavar=("CORPUS", "DATA_DIR", "WORKERS", "ENGINE"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        corpus, data_dir, workers, engine = args.worker
        worker(corpus, data_dir, int(workers), engine)
        return

    sizes = [float(s) for s in args.sizes.split(",")]
    engines = args.engine.split(",")
    args.work_dir.mkdir(parents=True, exist_ok=True)
    print(f"work dir {args.work_dir}; {os.cpu_count()} CPUs; cleaning.num_workers={args.workers}; "
          f"engines {engines}; load average {os.getloadavg()[0]:.1f}", flush=True)
    cluster, cluster_times = None, {}
    if "ray" in engines:
        from tests.ray_cluster import RayCluster

        start = time.monotonic()
        cluster = RayCluster.start()
        cluster_times["start"] = time.monotonic() - start
        print(f"Ray cluster at {cluster.address} (2 nodes, 1 CPU each) started in {cluster_times['start']:.1f} s",
              flush=True)
    rows = []
    try:
        for size in sizes:
            corpus, truth = corpus_for(args.work_dir, size, args.dup_rate, args.seed)
            fingerprints = {}
            for engine in engines:
                data_dir = args.work_dir / f"run-{size:g}mb-{engine}"
                runs = []
                for r in range(args.repeats):
                    run = measure(corpus, data_dir, args.workers, cluster if engine == "ray" else None)
                    if r == 0:
                        run["score"] = score(data_dir, corpus, truth)
                        fingerprints[engine] = output_fingerprint(data_dir)
                    runs.append(run)
                    mb = run["text_bytes"] / 1e6
                    print(f"  {size:g} MB {engine} run {r + 1}/{args.repeats}: {run['wall_seconds']:.1f} s wall, "
                          f"raw {run['raw_seconds']:.1f} s + clean {run['clean_seconds']:.1f} s "
                          f"(parts {run['parts_seconds']:.1f} s, dedup + write {run['dedup_seconds']:.1f} s), "
                          f"{mb / (run['raw_seconds'] + run['clean_seconds']):.2f} MB/s, "
                          f"others busy {100 * run['others_busy']:.0f}%", flush=True)
                median_time = statistics.median_low([r["raw_seconds"] + r["clean_seconds"] for r in runs])
                row = next(r for r in runs if r["raw_seconds"] + r["clean_seconds"] == median_time)
                row["score"] = runs[0]["score"]
                row["size"] = size
                row["identical"] = fingerprints[engine] == fingerprints[engines[0]] if engine != engines[0] else None
                rows.append(row)
            if not args.keep:
                for engine in engines:
                    shutil.rmtree(args.work_dir / f"run-{size:g}mb-{engine}", ignore_errors=True)
    finally:
        if cluster:
            start = time.monotonic()
            cluster.stop()
            cluster_times["stop"] = time.monotonic() - start

    print()
    head = (f"{'size MB':>8} {'engine':>6} {'docs':>7} {'seconds':>8} {'MB/s':>6} {'vs first':>8} {'raw MB/s':>9} "
            f"{'clean MB/s':>10} "
            f"{'RSS parent':>10} {'RSS worker':>10} {'RSS tree':>9} {'CPU s':>6} {'others':>6} "
            f"{'exact found':>13} {'near found':>13} {'unplanted dups':>14}")
    print(head)
    print("-" * len(head))
    for row in rows:
        mb = row["text_bytes"] / 1e6
        seconds = row["raw_seconds"] + row["clean_seconds"]
        s = row["score"]
        unplanted = sum(s["unplanted_removals"].values())
        first = next(r for r in rows if r["size"] == row["size"])
        ratio = (mb / seconds) / (first["text_bytes"] / 1e6 / (first["raw_seconds"] + first["clean_seconds"]))
        print(f"{mb:8.1f} {row['engine']:>6} {row['documents']:7d} {seconds:8.1f} {mb / seconds:6.2f} {ratio:7.2f}x "
              f"{mb / row['raw_seconds']:9.1f} "
              f"{mb / row['clean_seconds']:10.2f} {row['rss_parent_mb']:10.0f} "
              f"{(format(row['rss_worker_mb'], '.0f') if row['rss_worker_mb'] else '-'):>10} "
              f"{row['rss_tree_mb']:9.0f} {row['cpu_seconds']:6.1f} {100 * row['others_busy']:5.0f}% "
              f"{s['found']['exact']:>6}/{s['total']['exact']:<6} {s['found']['near']:>6}/{s['total']['near']:<6} "
              f"{unplanted:>14}")
        if not row["invariant"]:
            print(f"  !! invariant does not hold at {row['size']:g} MB")
        if row["identical"] is not None:
            print(f"  {row['engine']} outputs {'byte-identical to' if row['identical'] else 'DIFFER FROM'} "
                  f"{first['engine']}'s at {row['size']:g} MB")
    print("(RSS in MB, worker '-' = one raw part, cleaned in the stage process; "
          "'others' = CPU used by other processes during the run, as a share of all cores; "
          "found = planted pairs with one removed as a duplicate of the other, among pairs where no quality "
          "rule removed a document first; 'unplanted dups' = duplicate removals outside the planted pairs; "
          "'vs first' = MB/s against the first engine's at the same size; ray rows' RSS includes the cluster)")
    if cluster_times:
        print(f"Ray cluster: start {cluster_times['start']:.1f} s, stop {cluster_times.get('stop', 0):.1f} s "
              f"(not in the stages' seconds)")
    for row in rows:
        s = row["score"]
        notes = []
        if any(s["filtered"].values()):
            notes.append(f"planted pairs not scored because a quality rule removed a document: {s['filtered']}")
        for pair in s["missed"]:
            notes.append(f"missed {pair['kind']} pair {pair['file']} ~ {pair['of']} "
                         f"({pair.get('jaccard', pair.get('variant'))})")
        if s["unplanted"]:
            js = ", ".join(f"{j:.3f}" for *_, j in s["unplanted"][:10])
            notes.append(f"unplanted duplicate removals, word 5-gram Jaccard with the kept doc: {js}")
        for note in notes:
            print(f"  {row['size']:g} MB: {note}")
    print("\nper phase at the largest size (seconds, MB/s of document text; a phase runs from the end of the one "
          "before to its last job):")
    largest = [r for r in rows if r["size"] == rows[-1]["size"]]
    names = list(dict.fromkeys(name for r in largest for name in r["phase_seconds"]))
    print(f"{'phase':>40} " + " ".join(f"{r['engine'] + ' s':>9} {'MB/s':>7}" for r in largest))
    for name in names:
        cells = []
        for r in largest:
            sec = r["phase_seconds"].get(name)
            cells.append(f"{sec:9.1f} {r['text_bytes'] / 1e6 / sec:7.1f}" if sec else f"{'-':>9} {'-':>7}")
        print(f"{name:>40} " + " ".join(cells))
    first_engine = [r for r in rows if r["engine"] == engines[0]]
    if len(first_engine) >= 2:
        small, large = first_engine[0], first_engine[-1]
        rate = lambda r: r["text_bytes"] / 1e6 / (r["raw_seconds"] + r["clean_seconds"])  # noqa: E731
        t_small, t_large = (r["raw_seconds"] + r["clean_seconds"] for r in (small, large))
        exponent = math.log(t_large / t_small) / math.log(large["text_bytes"] / small["text_bytes"])
        ratio = rate(large) / rate(small)
        verdict = "linear (or better)" if ratio >= 0.8 else "SLOWER THAN LINEAR"
        print(f"scaling: {rate(large):.2f} MB/s at {large['size']:g} MB vs {rate(small):.2f} MB/s at "
              f"{small['size']:g} MB (ratio {ratio:.2f}); time ~ size^{exponent:.2f} -> {verdict}")


if __name__ == "__main__":
    main()
