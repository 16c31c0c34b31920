"""Where and in which precision models run: device "auto" and precision "auto".

precision "auto" picks bf16 autocast on CUDA GPUs with bf16 support, fp16 autocast with a
grad scaler (`grad_scaler`) on older CUDA GPUs, and bf16 on CPUs where bf16 matmuls are
measurably faster than fp32; fp32 everywhere else. fp16 is CUDA-only: asked for on a CPU it is
refused (bf16 is the CPU's half precision). A CPU flag is not enough: without AVX512-BF16 or AMX
bf16 is emulated (12× slower than fp32 on an AVX2 EPYC), and even with AVX512-BF16 but no
AMX the matmul library can run bf16 at half the fp32 speed (measured on a 2-core Xeon:
154 vs 313 GFLOP/s). So on a CPU with the flags, `auto` times one 1024² matmul in each
precision (≈ 0.1 s, once per process) and takes bf16 only if it is at least 1.2× faster.
"""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path

import torch

from danlu.errors import ConfigError


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(
            f"train.device is '{name}' but no CUDA GPU is available",
            fix="use train.device: auto (or cpu)",
        )
    if name == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("train.device is 'mps' but MPS is not available", fix="use auto or cpu")
    return torch.device(name)


@functools.cache
def cpu_bf16_native() -> bool:
    """True when the CPU has AVX512-BF16 or AMX-BF16 (bf16 matmuls run natively)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(precision: str, device: torch.device) -> str:
    """ "auto" → what this device runs best; an explicit choice is checked against the device."""
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError(
            f"train.precision: fp16 needs a CUDA GPU, and this run is on {device.type}",
            fix="use train.precision: bf16 (half precision on CPUs) or fp32, or auto",
        )
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if device.type == "cpu":
        return "bf16" if cpu_bf16_native() and cpu_bf16_faster() else "fp32"
    return "fp32"


@functools.cache
def cpu_bf16_faster(size: int = 1024, margin: float = 1.2) -> bool:
    """Whether a bf16 matmul beats an fp32 one by `margin` on this CPU (best of 3 each)."""
    import time

    def best(dtype: torch.dtype) -> float:
        a = torch.randn(size, size).to(dtype)
        b = torch.randn(size, size).to(dtype)
        a @ b  # warm-up: library initialisation, packing
        times = []
        for _ in range(3):
            t = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - t)
        return min(times)

    return best(torch.bfloat16) * margin < best(torch.float32)


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if precision == "fp16":
        return torch.autocast(device.type, dtype=torch.float16)
    return contextlib.nullcontext()


def grad_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler | None:
    """fp16 training needs loss scaling (small gradients underflow in fp16); bf16 and fp32 do
    not. The scaler's state (scale, growth tracker) is part of every checkpoint."""
    if precision != "fp16":
        return None
    return torch.amp.GradScaler(device.type)
