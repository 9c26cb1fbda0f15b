"""The project's own model and training loop (llm_core.training.train, through accelerate) on one GPU, without
Dagster or MLflow: tokens/s, MFU, peak memory against `scratchllm plan`, and the loss after N steps,
eager vs torch.compile, for a ~10M and a GPT-2-small-shaped (~124M) model.

    python benchmarks/gpu_check.py                      # CUDA: both sizes, eager and compiled (< 8 min)
    python benchmarks/gpu_check.py --device cpu         # the same path on CPU, small sizes (the test suite)
    python benchmarks/gpu_check.py --dataset DIR        # a tokenized_dataset directory instead of bytes

Token data: without --dataset, the bundled tiny Shakespeare as bytes (ids 0-255, one document per
scene), written in the tokenized_dataset format, so the loss means something. On a bare GPU image
(torch, accelerate, tokenizers, pyarrow, safetensors, numpy) bring pydantic, pyyaml and xxhash as
wheels; nothing else of the project's dependencies is imported.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SIZES = {  # name: (model section, training section) per device
    "cuda": {
        "~10M": ({"n_layer": 6, "n_head": 6, "n_kv_head": 6, "n_embd": 384, "block_size": 256},
                 {"batch_size": 32, "max_steps": 300}),
        "~124M": ({"n_layer": 12, "n_head": 12, "n_kv_head": 12, "n_embd": 768, "block_size": 1024},
                  {"batch_size": 8, "max_steps": 150}),
    },
    "cpu": {
        "tiny": ({"n_layer": 2, "n_head": 2, "n_kv_head": 2, "n_embd": 64, "block_size": 64},
                 {"batch_size": 4, "max_steps": 6}),
    },
}
GPT2_VOCAB = 50304  # GPT-2's 50257 rounded up to a multiple of 64, as the speedruns do
BYTE_VOCAB = 320  # byte ids (0-255) in an embedding of at least the smallest vocabulary the config allows


def byte_dataset(out_dir: Path, vocab_size: int, val_fraction: float = 0.1) -> Path:
    """The bundled corpus as byte tokens, one document per blank-line-separated scene, split by document."""
    import numpy as np
    import pyarrow as pa

    from llm_core.data.tokenized_dataset import DOCS_SCHEMA, _write_ipc

    scenes = [s.encode() for s in (ROOT / "data" / "tinyshakespeare.txt").read_text().split("\n\n") if s.strip()]
    eot = 0  # NUL never occurs in the text
    counts = {}
    for split, docs in (("train", scenes[int(len(scenes) * val_fraction):]),
                        ("val", scenes[:int(len(scenes) * val_fraction)])):
        arrays = [np.frombuffer(d + b"\0", dtype=np.uint8).astype(np.uint16) for d in docs]
        starts = np.cumsum([0] + [len(a) for a in arrays[:-1]])
        tokens = np.concatenate(arrays)
        _write_ipc(out_dir / split / "bytes.tokens.arrow", pa.table({"tokens": pa.array(tokens)}))
        _write_ipc(out_dir / split / "bytes.docs.arrow", pa.table({
            "id": [str(i) for i in range(len(docs))], "doc_id": [str(i) for i in range(len(docs))],
            "start": starts.tolist(), "length": [len(a) for a in arrays], "num_bytes": [len(d) for d in docs],
            "source": ["plays"] * len(docs)}, schema=DOCS_SCHEMA))
        totals = {"tokens": len(tokens), "documents": len(docs), "bytes": sum(len(d) for d in docs)}
        counts[split] = {**totals, "max_id": int(tokens.max()), "sources": {"plays": totals}}
    manifest = {"shards": [{"name": "bytes.parquet", "key": "bytes", **counts}], "sources": ["plays"],
                "dtype": "uint16", "vocab_size": vocab_size, "eot_id": eot, "tokenizer_hash": "bytes"}
    (out_dir / "manifest.json").write_text(json.dumps(manifest))
    return out_dir


def run_one(data_dir: Path, out_dir: Path, model: dict, training: dict, vocab_size: int, compile_: bool) -> dict:
    from llm_core.config import load_config
    from llm_core.experiments.plan import planned_row
    from llm_core.training.train import train

    steps = training["max_steps"]
    cfg = load_config(overrides={
        "data_dir": str(data_dir), "tokenizer": {"vocab_size": vocab_size},
        "model": {**model, "tie_embeddings": True},
        "training": {**training, "compile": compile_, "mixed_precision": "auto",
                     "warmup_steps": max(1, steps // 10), "log_interval": max(1, steps // 10),
                     "eval_interval": steps, "eval_batches": 10, "checkpoint_interval": steps, "num_processes": 1}})
    start = time.perf_counter()
    result = train(cfg, out_dir, log=lambda line: print("   ", line, flush=True))
    return {"params": result.num_parameters, "precision": result.mixed_precision,
            "tokens_per_second": result.tokens_per_second, "mfu": result.mfu, "peak_flops": result.peak_flops,
            "peak_memory_mb": result.peak_memory_mb,
            "planned_memory_mb": planned_row(cfg, vocab_size).total / 2**20,
            "loss": result.final_train_loss, "val_loss": result.final_val_loss, "steps": steps,
            "wall_seconds": time.perf_counter() - start}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--dataset", type=Path, help="a tokenized_dataset directory (default: bundled bytes)")
    parser.add_argument("--modes", default="eager,compiled")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--one", nargs=5, metavar=("SIZE", "MODE", "DATA_DIR", "VOCAB", "OUT"), help=argparse.SUPPRESS)
    a = parser.parse_args(argv)
    if a.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # llm_core.training.train takes CUDA whenever it sees one
    import torch

    if a.one:
        name, mode, data_dir, vocab, out = a.one
        model, training = SIZES[a.device][name]
        row = run_one(Path(data_dir), Path(out), model, training, int(vocab), mode == "compiled")
        (Path(out) / "gpu_check.json").write_text(json.dumps(row))
        return 0
    if a.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device (use --device cpu)", file=sys.stderr)
        return 2
    device_name = torch.cuda.get_device_name(0) if a.device == "cuda" else "CPU"
    print(f"gpu_check on {device_name}, torch {torch.__version__}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as tmp:
        for name, (model, training) in SIZES[a.device].items():
            vocab = GPT2_VOCAB if name == "~124M" else BYTE_VOCAB
            data_dir = Path(tmp) / f"data-{vocab}"
            if a.dataset:
                data_dir = a.dataset.parent  # train() reads <data_dir>/tokenized_dataset
                vocab = json.loads((a.dataset / "manifest.json").read_text())["vocab_size"]
            elif not (data_dir / "tokenized_dataset").exists():
                byte_dataset(data_dir / "tokenized_dataset", vocab)
            for mode in a.modes.split(","):  # each in its own process: accelerate's state is per process
                print(f"{name} {mode}:", flush=True)
                out = Path(tmp) / f"{name}-{mode}"
                subprocess.run([sys.executable, __file__, "--device", a.device, "--one", name, mode, str(data_dir),
                                str(vocab), str(out)], check=True)
                rows.append({"size": name, "mode": mode, **json.loads((out / "gpu_check.json").read_text())})
    print("\n| size | mode | params | precision | tokens/s | MFU (peak) | peak memory MB (plan) | loss after N "
          "steps (val) | wall s |\n|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['size']} | {r['mode']} | {r['params'] / 1e6:.1f}M | {r['precision']} "
              f"| {r['tokens_per_second']:,.0f} | {r['mfu']:.1%} ({r['peak_flops'] / 1e12:.1f} TFLOP/s) "
              f"| {r['peak_memory_mb']:,.0f} "
              f"({r['planned_memory_mb']:,.0f}) | {r['loss']:.3f} after {r['steps']} ({r['val_loss']:.3f}) "
              f"| {r['wall_seconds']:.0f} |")
    if a.json:
        a.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
