"""What every model benchmark prints first: which processor, which number format ``auto`` chose
there and why, and the matmul peak of float32 and bfloat16 measured in this process — so a
reader sees which regime a figure comes from (bfloat16 is ~2x faster than float32 on CPUs with
AVX512-BF16/AMX and ~60x slower on CPUs without them)."""
from __future__ import annotations

import os
import platform
import time


def processor() -> str:
    """The CPU's model name (``lscpu``'s "Model name"), else what the platform module says."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def matmul_peak(dtype=None, n: int = 2048, reps: int = 5, seconds: float = 3.0) -> float:
    """FLOP/s of an ``n``² ``torch.matmul`` in ``dtype`` with this process's threads: best of
    ``reps`` (fewer when one takes long, as emulated bfloat16 does: a smaller ``n`` then)."""
    import torch

    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    t = time.perf_counter()
    torch.matmul(a, b)
    if time.perf_counter() - t > seconds / reps and n > 512:  # emulated: measure a smaller one
        return matmul_peak(dtype, n // 2, reps, seconds)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        torch.matmul(a, b)
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best


def number_formats(requested: str = "auto") -> dict:
    """The processor, ``requested`` resolved on it (with the reason), and both matmul peaks."""
    import torch

    from actors.precision import choose_dtype, cpu_native_bf16

    choice = choose_dtype(requested, "cpu")
    return {"processor": processor(), "cores": os.cpu_count(), "threads": torch.get_num_threads(),
            "native_bf16": cpu_native_bf16(), "dtype": choice.name, "dtype_reason": choice.reason,
            "fp32_peak_gflops": round(matmul_peak(torch.float32) / 1e9, 1),
            "bf16_peak_gflops": round(matmul_peak(torch.bfloat16) / 1e9, 1)}


def formats_line(f: dict) -> str:
    ratio = f["bf16_peak_gflops"] / max(f["fp32_peak_gflops"], 1e-9)
    return (f"processor: {f['processor']} ({f['cores']} cores, {f['threads']} threads); matmul peak float32 "
            f"{f['fp32_peak_gflops']} GFLOP/s, bfloat16 {f['bf16_peak_gflops']} GFLOP/s ({ratio:.2f}x); "
            f"engines run {f['dtype']} ({f['dtype_reason']})")
