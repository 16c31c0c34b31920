"""Where and in which precision models run: device "auto" and precision "auto".

precision "auto" picks bf16 autocast where the hardware runs bf16 matmuls natively (CPUs with
AVX512-BF16 or AMX, CUDA GPUs with bf16 support) and fp32 elsewhere: on a CPU without those
instructions bf16 is emulated and several times slower than fp32.
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
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    if device.type == "cpu":
        return "bf16" if cpu_bf16_native() else "fp32"
    return "fp32"


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
