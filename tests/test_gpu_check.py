"""benchmarks/gpu_check.py, the one-GPU check of the training path, runs end to end on CPU (`--device
cpu`, small sizes): the same script a GPU machine runs, minus the GPU."""

import json
import math
import subprocess
import sys

import pytest

from llm_core.config import PROJECT_ROOT


@pytest.mark.slow
def test_gpu_check_runs_end_to_end_on_cpu(tmp_path):
    out = tmp_path / "rows.json"
    done = subprocess.run([sys.executable, str(PROJECT_ROOT / "benchmarks" / "gpu_check.py"), "--device", "cpu",
                           "--modes", "eager", "--json", str(out)], cwd=tmp_path, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    [row] = json.loads(out.read_text())
    assert row["size"] == "tiny" and row["mode"] == "eager" and row["precision"] in ("no", "bf16")
    assert row["tokens_per_second"] > 0 and 0 < row["mfu"] <= 1 and row["planned_memory_mb"] > 0
    assert math.isfinite(row["loss"]) and row["loss"] < math.log(320)  # it learned from the bytes
    assert "| tiny | eager |" in done.stdout
