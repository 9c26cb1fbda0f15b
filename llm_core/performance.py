"""What a training costs this machine: peak memory, the GEMM peak FLOP/s, model FLOPs utilization."""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch


def measure_peak_flops(dtype: torch.dtype, size: int = 1024, repeats: int = 5) -> float:
    """FLOP/s of a square GEMM in the training precision on this machine: the MFU denominator."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    a @ b  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    return 2 * size**3 / sorted(times)[len(times) // 2]


def mfu(tokens_per_second: float, flops_per_token: float, peak_flops: float) -> float:
    """Model FLOPs utilization: the model's FLOP/s (forward + backward) over the measured peak."""
    return tokens_per_second * flops_per_token / peak_flops


class PeakMemory:
    """This process's peak memory from now on, in MB: the CUDA allocator's peak on a GPU; on CPU the
    peak resident set (VmHWM, which Linux resets through /proc/self/clear_refs) minus the resident set
    at the start, i.e. what the model, its training state and its activations added."""

    def __init__(self, device: torch.device):
        self.device = device
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            self.start = torch.cuda.memory_allocated(device)
            return
        try:
            Path("/proc/self/clear_refs").write_text("5")  # "5": reset the peak RSS to the current RSS
        except OSError:  # not Linux: the lifetime peak is the best there is
            pass
        self.start = self._rss("VmRSS")

    @staticmethod
    def _rss(field: str) -> int:
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
        except OSError:
            pass
        import resource  # no /proc: ru_maxrss is KB on Linux, bytes on macOS

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if os.uname().sysname == "Darwin" else peak * 1024

    def peak_mb(self) -> float:
        peak = torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda" else self._rss("VmHWM")
        return (peak - self.start) / 2**20
