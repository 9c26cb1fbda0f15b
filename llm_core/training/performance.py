"""What a training costs this machine: peak memory, the GEMM peak FLOP/s, model FLOPs utilization,
and the precision `training.mixed_precision: auto` trains in."""

from __future__ import annotations

import functools

import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:  # torch is imported by what measures: a process that only sizes its threads needs none
    import torch


def gemm_flops(dtype: torch.dtype, m: int, k: int, n: int, repeats: int = 5, device: str = "cpu") -> float:
    """FLOP/s of (m x k) @ (k x n) products: the fastest of `repeats` timings of enough products to
    take ~10 ms (one small product is microseconds: all noise). Noise (another process, a frequency
    dip) only ever slows a timing down, so the best one is closest to what the hardware does."""
    import torch

    a, b = torch.randn(m, k, dtype=dtype, device=device), torch.randn(k, n, dtype=dtype, device=device)

    def timed(count: int) -> float:
        if device != "cpu":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(count):
            a @ b
        if device != "cpu":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    timed(1)  # warm-up
    count = max(1, min(10_000, int(0.01 / max(min(timed(1) for _ in range(3)), 1e-7))))
    return 2 * m * k * n * count / min(timed(count) for _ in range(repeats))


PEAK_SIZES = (1024, 2048)


def measure_peak_flops(dtype: torch.dtype, device: str = "cpu") -> float:
    """The MFU denominator: the best square GEMM in the training precision on this machine, over a
    few sizes and repeats (a single timing on a busy machine once gave "mfu 162%")."""
    return max(gemm_flops(dtype, n, n, n, device=device) for n in PEAK_SIZES)


def mfu(tokens_per_second: float, flops_per_token: float, peak_flops: float) -> float:
    """Model FLOPs utilization: the model's FLOP/s (forward + backward) over the peak, at most 1 (a peak
    measured while the machine was busy can fall below what training reaches later)."""
    return min(1.0, tokens_per_second * flops_per_token / peak_flops)


def available_cores() -> int:
    """The cores this process may run on: its CPU affinity (taskset, a container's cpuset, a batch
    scheduler's allocation), not every core of the machine."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def thread_environment(threads: int) -> dict[str, str]:
    """The variables that hold a training process to `threads` threads (torch's, MKL's; tokenizers' to one)."""
    return {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}


def hardware(device: torch.device, processes: int) -> str:
    """What trained: e.g. "2 x NVIDIA H200" or "AMD EPYC (2 cores), 1 process"."""
    if device.type == "cuda":
        import torch

        return f"{processes} x {torch.cuda.get_device_name(device)}"
    try:
        names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("model name")]
    except OSError:
        names = []
    import platform

    return (f"{names[0] if names else platform.processor() or platform.machine()} ({available_cores()} cores), "
            f"{processes} process{'es' if processes > 1 else ''}")


@functools.cache
def cpu_has_bf16_units() -> bool:
    """AVX512_BF16 or AMX: native bf16 matrix instructions (without them bf16 is emulated, ~5x slower)."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


BF16_MIN_GAIN = 1.15  # a bf16 training step must be this much faster than an fp32 one
PRECISION_ROUNDS = 3  # timings of each precision, alternating


def choose_precision(setting: str, device: torch.device,
                     step_seconds: Callable[[torch.dtype], float]) -> tuple[str, str]:
    """(accelerate's mixed_precision, why) for `training.mixed_precision`. `auto`: bf16 on CUDA (fp16
    where bf16 is missing); on CPU bf16 only with native bf16 units and when a training step of the
    model itself, `step_seconds(dtype)` (train.step_timer), is BF16_MIN_GAIN times faster in bf16 (a
    small model can lose: a matmul alone was 2.2x faster in bf16 at the default model's shape while its
    step with bf16 attention was 11% slower); fp32 otherwise."""
    if setting != "auto":
        return setting, "as configured"
    import torch

    if device.type == "cuda":
        return ("bf16", "CUDA with bf16") if torch.cuda.is_bf16_supported() else ("fp16", "CUDA without bf16")
    if not cpu_has_bf16_units():
        return "no", "this CPU has no bf16 matrix units (avx512_bf16 / amx_bf16)"
    # Alternating rounds, the best of each: a burst of other work on the machine (a server starting
    # beside the run) once made a single bf16 timing 51 ms where the step takes 40, and auto chose fp32.
    times: dict[torch.dtype, list[float]] = {torch.float32: [], torch.bfloat16: []}
    for _ in range(PRECISION_ROUNDS):
        for dtype, seconds in times.items():
            seconds.append(step_seconds(dtype))
    fp32, bf16 = min(times[torch.float32]), min(times[torch.bfloat16])
    measured = f"a training step of this model took {bf16 * 1e3:.0f} ms in bf16, {fp32 * 1e3:.0f} ms in fp32"
    return ("bf16" if fp32 >= BF16_MIN_GAIN * bf16 else "no"), measured


class PeakMemory:
    """This process's peak memory from now on, in MB: the CUDA allocator's peak on a GPU; on CPU the
    peak resident set (VmHWM, which Linux resets through /proc/self/clear_refs) minus the resident set
    at the start, i.e. what the model, its training state and its activations added."""

    def __init__(self, device: torch.device):
        self.device = device
        if device.type == "cuda":
            import torch

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
        if self.device.type == "cuda":
            import torch

            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            peak = self._rss("VmHWM")
        return (peak - self.start) / 2**20
