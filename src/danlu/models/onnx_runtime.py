"""An exported ONNX model behind danlu's model interface: `model(x)` runs ONNX Runtime.

    model = OnnxModel("runs/x-onnx/model.onnx", threads=2)
    logits = model(x)                       # a torch tensor in, a float32 torch tensor out

The input crosses to numpy (cast to the dtype the graph expects, so ids given as int32 or
features under autocast work), the session runs, and the first output comes back as float32
on the input's device. The CUDA provider is used when ONNX Runtime has it and torch sees a
GPU; otherwise the CPU provider with `threads` intra-op threads (torch's count by default).

The module holds no parameters or buffers: `.to(device)` and `.eval()` change nothing,
`next(model.parameters(), None)` is None, and there is no autograd through the session.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from danlu.errors import CheckpointError, ConfigError

DTYPES = {
    "tensor(float)": torch.float32,
    "tensor(double)": torch.float64,
    "tensor(float16)": torch.float16,
    "tensor(int64)": torch.int64,
    "tensor(int32)": torch.int32,
    "tensor(uint8)": torch.uint8,
    "tensor(bool)": torch.bool,
}


def _onnxruntime() -> Any:
    try:
        import onnxruntime
    except ImportError:
        raise ConfigError(
            "running an ONNX model needs onnxruntime", fix="pip install 'danlu[compress]'"
        ) from None
    return onnxruntime


def providers(ort: Any) -> list[str]:
    """CUDA first when both ONNX Runtime and torch can use a GPU, then the CPU."""
    cuda = "CUDAExecutionProvider" in ort.get_available_providers() and torch.cuda.is_available()
    return ["CUDAExecutionProvider", "CPUExecutionProvider"] if cuda else ["CPUExecutionProvider"]


class OnnxModel(nn.Module):
    """(N, ...) input → the exported model's first output, as float32 on the input's device."""

    def __init__(self, path: str | Path, threads: int | None = None) -> None:
        super().__init__()
        ort = _onnxruntime()
        self.path = Path(path)
        if not self.path.is_file():
            raise CheckpointError(
                f"ONNX model '{self.path}' not found",
                fix="export the model first (`danlu export RUN --format onnx`)",
            )
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.inter_op_num_threads = 1
        options.log_severity_level = 3  # errors only
        try:
            self.session = ort.InferenceSession(str(self.path), options, providers=providers(ort))
        except Exception as e:  # ONNX Runtime raises its own Fail / InvalidGraph / ...
            raise CheckpointError(
                f"ONNX Runtime cannot load '{self.path}' ({str(e).splitlines()[0][:300]})",
                fix="export the model again",
            ) from e
        first = self.session.get_inputs()[0]
        self.input_name, self.input_dtype = first.name, DTYPES.get(first.type, torch.float32)
        self.cpu_only = "CUDAExecutionProvider" not in self.session.get_providers()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feed = x.detach().to("cpu", self.input_dtype).contiguous().numpy()
        try:
            out = self.session.run(None, {self.input_name: feed})[0]
        except Exception as e:
            raise ConfigError(
                f"ONNX Runtime cannot run '{self.path.name}' on an input of shape "
                f"{tuple(x.shape)} ({str(e).splitlines()[0][:300]})",
                fix="give inputs like the ones the model was exported with (features, image "
                "size, sequence length ≤ model.context)",
            ) from e
        return torch.from_numpy(out).to(device=x.device, dtype=torch.float32)

    def extra_repr(self) -> str:
        return f"path={str(self.path)!r}, providers={self.session.get_providers()}"
