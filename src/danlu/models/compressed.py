"""Loading a compressed run: its `compression.json` says how the saved weights differ from the
model its config builds, and `load` turns the freshly built model into the saved one.

    compression.json  {"method": "int4_weight", "kind": "quantize", "format": "quantized", ...}

Formats:
- plain: ordinary weights (distilled students, tied weights, magnitude-pruned zeros);
- bf16: weights stored and run in bfloat16 (half the size; fast where the CPU or GPU has
  native bf16 matmuls), float inputs cast on the way in and outputs back to float32;
- pruned: module sizes shrink first (models.pruned.restore), then the weights load;
- quantized: modules are swapped for int8/int4 ones holding the saved tensors
  (models.quantized.restore) — no calibration, no fp32 copy, so it loads fast;
- onnx: the model runs in ONNX Runtime (models.onnx_runtime.OnnxModel).

Quantized and ONNX models run on the CPU kernels they were built for: `cpu_only` says so, and
`device_of` finds where a model without parameters lives.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from danlu.errors import CheckpointError

META = "compression.json"
FILES = {"onnx": "model.onnx", "torchscript": "model.torchscript.pt"}


def weights_file(path: Path, meta: dict[str, Any] | None) -> Path:
    """The file holding a run's weights: model.onnx for an ONNX variant, else model.safetensors."""
    return path / FILES.get((meta or {}).get("format", ""), "model.safetensors")


def load(model: nn.Module, path: Path, meta: dict[str, Any]) -> nn.Module:
    """The compressed model of the run at `path`, from `model` built by its config."""
    from danlu import models

    fmt = meta.get("format", "plain")
    file = weights_file(path, meta)
    if not file.is_file():
        raise CheckpointError(
            f"compressed run '{path}' has no {file.name}",
            fix="compress the parent run again (`danlu compress PARENT`)",
        )
    if fmt == "onnx":
        from danlu.models.onnx_runtime import OnnxModel

        out: nn.Module = OnnxModel(file)
        out.cpu_only = True
        return out
    if fmt == "quantized":
        from safetensors.torch import load_file

        from danlu.models.quantized import restore

        out = restore(model, load_file(str(file)), meta)
        out.cpu_only = True
        return out
    if fmt == "bf16":
        return BF16(models.load_weights(model.to(torch.bfloat16), file))
    if fmt == "pruned":
        from danlu.models.pruned import restore

        model = restore(model, meta)
    if fmt not in ("plain", "pruned"):
        raise CheckpointError(
            f"compressed run '{path}' has format '{fmt}', which this danlu cannot load",
            fix="upgrade danlu, or compress the parent run again",
        )
    return models.load_weights(model, file)


class BF16(nn.Module):
    """A model whose weights are bfloat16: float inputs go in as bf16, outputs come out fp32."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_floating_point():
            x = x.to(torch.bfloat16)
        return self.model(x).float()

    def __getattr__(self, name: str) -> Any:  # pad_id, context, generate ... of the wrapped model
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["model"], name)


def device_of(model: nn.Module) -> torch.device:
    """Where the model's tensors are (CPU for a model without any, e.g. ONNX Runtime)."""
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")


def place(model: nn.Module, device: torch.device) -> torch.device:
    """Move the model to `device` unless it only runs on the CPU; returns where it is."""
    if getattr(model, "cpu_only", False):
        return torch.device("cpu")
    model.to(device)
    return device
