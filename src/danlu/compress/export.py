"""Export a model to a file other runtimes load: ONNX, TorchScript or safetensors.

    path = export(model, "onnx", out_dir, example)          # out_dir / "model.onnx"

The parity check and ONNX Runtime's int8 quantization of an export are in onnx_check.py.

ONNX goes through `torch.onnx.export(dynamo=True)` (torch.export, then ONNX translation) with a
dynamic batch axis and, for token ids (int64, 2-D), a dynamic sequence axis; the weights stay
in the one .onnx file below 2 GB. TorchScript is `torch.jit.trace` in eval mode (deprecated in
torch 2.13, still working); safetensors is the state dict. Files are written under a temporary
name and renamed, so a crash never leaves a half-written file under the final name.

danlu's sequence models skip the padding mask when a batch has none (`if bool(mask.all())`).
That is control flow on tensor values, which torch.export refuses and tracing freezes on the
example's branch. The general (masked) branch is exact for every batch, so both run under
`GeneralPath`, which answers False to `bool()` of an `.all()` result. Other value-dependent
`if`s still fail, with a ConfigError naming the line or operator and suggesting torchscript.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import os
import re
import shutil
import tempfile
import traceback
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from danlu.errors import ConfigError, DanluError
from danlu.models.compressed import device_of

FORMATS = ("onnx", "torchscript", "safetensors")
FILES = {
    "onnx": "model.onnx",
    "torchscript": "model.torchscript.pt",
    "safetensors": "model.safetensors",
}
EXTERNAL_DATA_ABOVE = 2**31 - 2**26  # protobuf's 2 GB limit, less room for the graph
INSTALL = "pip install 'danlu[compress]'"
TORCHSCRIPT_FIX = (
    "use --format torchscript instead (it records the operations the example runs; parity "
    "checks them on other batches)"
)


class GeneralPath(TorchFunctionMode):
    """Inside: `bool(t.all())` is False without looking at `t`, so a model that skips work when
    a batch has no padding takes its general branch (the one valid for every batch)."""

    def __init__(self) -> None:
        super().__init__()
        self._alls: list[torch.Tensor] = []  # results of .all(); compared by identity

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.Tensor.__bool__ and any(t is args[0] for t in self._alls):
            return False
        out = func(*args, **(kwargs or {}))
        if func in (torch.Tensor.all, torch.all) and isinstance(out, torch.Tensor):
            self._alls.append(out)
        return out


class OneInput(nn.Module):
    """`forward(x)`: one positional input for the exporter, whatever the model's signature
    (a PEFT wrapper takes *args, **kwargs; text models also take an attention mask)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


# ------------------------------------------------------------------------------- export


def export(model: nn.Module, fmt: str, out_dir: Path, example: torch.Tensor) -> Path:
    """Write out_dir / FILES[fmt] atomically and return its path. `example` is one input batch
    (its batch size and sequence length are not baked into an ONNX file)."""
    if fmt not in FORMATS:
        raise ConfigError(f"export format '{fmt}' is not known", fix=f"use {', '.join(FORMATS)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    example = example.to(device_of(model))
    was_training = model.training
    model.eval()
    try:
        _check_runs(model, example)
        with staging(out_dir, FILES[fmt]) as tmp:
            WRITERS[fmt](model, example, tmp / FILES[fmt])
    finally:
        model.train(was_training)
    return out_dir / FILES[fmt]


@torch.no_grad()
def _check_runs(model: nn.Module, example: torch.Tensor) -> None:
    """One eager call first: the model's own errors (a sequence longer than model.context)
    come with real sizes rather than the exporter's symbols."""
    try:
        model(example)
    except DanluError:
        raise
    except Exception as e:
        raise ConfigError(
            f"the model cannot run on the export example of shape {tuple(example.shape)}: "
            f"{first_line(e)}",
            fix="export with an example batch from the run's data",
        ) from e


@contextlib.contextmanager
def staging(out_dir: Path, name: str) -> Iterator[Path]:
    """A temporary folder inside out_dir; its files move to out_dir when the block succeeds,
    the main file `name` last (an ONNX external-data file is in place before the model)."""
    tmp = Path(tempfile.mkdtemp(dir=out_dir, prefix=f".{name}.", suffix=".tmp"))
    try:
        yield tmp
        for f in sorted(tmp.iterdir(), key=lambda p: p.name == name):
            os.replace(f, out_dir / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _write_onnx(model: nn.Module, example: torch.Tensor, path: Path) -> None:
    from torch.export import Dim

    onnx = require("onnx")
    require("onnxscript")
    axes = (0, 1) if example.dtype == torch.int64 and example.dim() == 2 else (0,)  # ids: (N, T)
    size = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    try:
        with GeneralPath(), quiet():
            program = torch.onnx.export(
                OneInput(model),
                (example,),
                dynamo=True,
                input_names=["input"],
                output_names=["output"],
                dynamic_shapes=({a: Dim.DYNAMIC for a in axes},),
                external_data=False,
            )
    except Exception as e:
        what = describe_failure(e)
        raise ConfigError(f"cannot export the model to ONNX: {what}", fix=TORCHSCRIPT_FIX) from e
    proto = program.model_proto  # a serialized copy of program.model
    _check_axes(proto, axes, example)
    if size > EXTERNAL_DATA_ABOVE:  # model.onnx + model.onnx.data
        program.save(path, external_data=True)
        return
    _refresh_output_shapes(onnx, proto)
    _name_axes(proto, axes)
    onnx.save(proto, str(path))


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """The exporter's and quantizer's prints, warnings and log lines below ERROR off (e.g.
    "torchvision is not installed"); their errors still raise."""
    disabled = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(disabled)


def _check_axes(proto: Any, axes: tuple[int, ...], example: torch.Tensor) -> None:
    """Refuse a file whose dynamic input axes were fixed (the model's code needed that size)."""
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    fixed = ", ".join(f"axis {a} = {example.shape[a]}" for a in axes if dims[a].dim_value)
    if fixed:
        raise ConfigError(
            f"cannot export the model to ONNX with a variable batch/sequence size: the model's "
            f"code fixed input {fixed}",
            fix=TORCHSCRIPT_FIX,
        )


def _refresh_output_shapes(onnx: Any, proto: Any) -> None:
    """Drop the recorded intermediate shapes and correct the outputs': the exporter can record
    a dynamic axis as the example's size (an LSTM's sequence axis), which makes ONNX Runtime
    warn on every call, and stale shapes make the int8 quantizer fail. An output axis fixed
    by the exporter takes what shape inference finds instead."""
    del proto.graph.value_info[:]
    bare = copy.deepcopy(proto)
    for o in bare.graph.output:
        o.type.tensor_type.ClearField("shape")
    try:
        inferred = onnx.shape_inference.infer_shapes(bare, data_prop=True).graph.output
    except Exception:  # an operator the checker does not know: keep the exporter's shapes
        return
    for mine, found in zip(proto.graph.output, inferred, strict=True):
        dims, new = mine.type.tensor_type.shape.dim, found.type.tensor_type.shape.dim
        if len(dims) != len(new):
            continue
        for d, n in zip(dims, new, strict=True):
            if d.HasField("dim_value") and not (
                n.HasField("dim_value") and n.dim_value == d.dim_value
            ):
                d.CopyFrom(n)


def _name_axes(proto: Any, axes: tuple[int, ...]) -> None:
    """Call the exporter's symbols for the dynamic input axes "batch" and "sequence"."""
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    names = {dims[a].dim_param: n for a, n in zip(axes, ("batch", "sequence"), strict=False)}
    for value in (*proto.graph.input, *proto.graph.output):
        for d in value.type.tensor_type.shape.dim:
            if d.dim_param in names:
                d.dim_param = names[d.dim_param]


def _write_torchscript(model: nn.Module, example: torch.Tensor, path: Path) -> None:
    try:
        with GeneralPath(), torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            traced = torch.jit.trace(model, (example,), check_trace=False)
    except DanluError:
        raise
    except Exception as e:
        raise ConfigError(
            f"cannot trace the model to TorchScript: {describe_failure(e)}",
            fix="export with --format onnx or safetensors",
        ) from e
    torch.jit.save(traced, str(path))


def _write_safetensors(model: nn.Module, example: torch.Tensor, path: Path) -> None:
    from danlu.models import state_for_saving
    from danlu.rundir import save_safetensors

    del example
    save_safetensors(path, state_for_saving(model))


WRITERS = {"onnx": _write_onnx, "torchscript": _write_torchscript}
WRITERS["safetensors"] = _write_safetensors


# ------------------------------------------------------------------- why an export failed


def describe_failure(e: BaseException) -> str:
    """One line naming what the exporter could not handle: an operator without an ONNX
    translation, the model line with value-dependent control flow, or the deepest model line
    of the innermost error."""
    chain = _chain(e)
    text = "\n".join(str(x) for x in chain)
    op = re.search(r"No ONNX function found for <OpOverload\(op='([\w.]+)'", text)
    op = op or re.search(r"target=torch\.ops\.([\w]+\.[\w]+)", text)
    if op:
        return f"operator {op.group(1)} has no ONNX translation"
    kind = "data-dependent control flow" if "data-dependent" in text else "unsupported construct"
    call = re.search(r'raised this error:\s*File "([^"]+)", line (\d+), in \S+\s*\n\s*(.+)', text)
    if call:
        file, line, code = call.groups()
        return f"{kind} `{code.strip()}` ({Path(file).name}:{line})"
    root = chain[-1]
    summary = f"{type(root).__name__}: {first_line(root)}"
    frame = _model_frame(root)
    return f"{summary} at {frame}" if frame else summary


def _chain(e: BaseException) -> list[BaseException]:
    out = [e]  # e, its cause, the cause's cause, ...
    while (nxt := out[-1].__cause__ or out[-1].__context__) is not None and nxt not in out:
        out.append(nxt)
    return out


def first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    summary = next((ln for ln in lines if ln.startswith("<class")), None)
    return (summary or (lines[0] if lines else "")).split(">: ", 1)[-1][:300]


def _model_frame(e: BaseException) -> str | None:
    """`file:line \\`code\\`` of the deepest traceback frame in the model's code (not in torch,
    onnx or this module)."""
    skip = (str(Path(torch.__file__).parent), __file__)
    frames = traceback.extract_tb(e.__traceback__)
    frames = [f for f in frames if not f.filename.startswith(skip) and "/onnx" not in f.filename]
    if not frames:
        return None
    f = frames[-1]
    return f"{Path(f.filename).name}:{f.lineno} `{(f.line or '').strip()}`"


def require(package: str) -> Any:
    import importlib

    try:
        return importlib.import_module(package)
    except ImportError:
        raise ConfigError(f"ONNX export needs the {package} package", fix=INSTALL) from None
