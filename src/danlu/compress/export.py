"""Export a model to a file other runtimes load: ONNX, TorchScript or safetensors.

    path = export(model, "onnx", out_dir, example)          # out_dir / "model.onnx"
    parity(model, path, [x_a, x_b])                          # {"max_abs_diff": 3e-7, ...}
    quantize_onnx(path, out_dir / "model.int8.onnx")         # dynamic int8 (ONNX Runtime)

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

from danlu.errors import CheckpointError, ConfigError, DanluError
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
        with _staging(out_dir, FILES[fmt]) as tmp:
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
            f"{_first_line(e)}",
            fix="export with an example batch from the run's data",
        ) from e


@contextlib.contextmanager
def _staging(out_dir: Path, name: str) -> Iterator[Path]:
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

    onnx = _require("onnx")
    _require("onnxscript")
    axes = (0, 1) if example.dtype == torch.int64 and example.dim() == 2 else (0,)  # ids: (N, T)
    size = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    try:
        with GeneralPath(), _quiet():
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
def _quiet() -> Iterator[None]:
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
    summary = f"{type(root).__name__}: {_first_line(root)}"
    frame = _model_frame(root)
    return f"{summary} at {frame}" if frame else summary


def _chain(e: BaseException) -> list[BaseException]:
    out = [e]  # e, its cause, the cause's cause, ...
    while (nxt := out[-1].__cause__ or out[-1].__context__) is not None and nxt not in out:
        out.append(nxt)
    return out


def _first_line(e: BaseException) -> str:
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


# -------------------------------------------------------------------------------- parity


def parity(
    model: nn.Module, path: Path, inputs: list[torch.Tensor], *, tolerance: float = 1e-3
) -> dict[str, float]:
    """Compare the torch model with the exported file on held-out batches: max and mean
    absolute difference of the outputs, argmax agreement (outputs with a last axis > 1, e.g.
    (N, C) class scores) and the number of batches. Raises ConfigError above `tolerance`."""
    path = Path(path)
    assert inputs, "parity needs at least one input batch"
    run = _runner(model, path)
    was_training = model.training
    model.eval()
    try:
        pairs = [(_torch_output(model, x), run(x)) for x in inputs]
    finally:
        model.train(was_training)
    result = _compare(pairs)
    if not result["max_abs_diff"] <= tolerance:  # NaN fails too
        raise ConfigError(
            f"the exported {path.name} does not reproduce the torch model: max abs diff "
            f"{result['max_abs_diff']:.3g} > tolerance {tolerance:g} on {len(inputs)} held-out "
            "batches",
            fix="export again with another --format, or raise the tolerance if the difference "
            "is expected (e.g. int8)",
        )
    return result


@torch.no_grad()
def _torch_output(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(x.to(device_of(model))).float().cpu()


def _runner(model: nn.Module, path: Path):
    """A function input → float32 CPU output for the exported file at `path`."""
    if not path.is_file():
        raise CheckpointError(f"exported file '{path}' not found", fix="export the model first")
    if path.suffix == ".onnx":
        from danlu.models.onnx_runtime import OnnxModel

        session = OnnxModel(path)
        return lambda x: session(x.cpu())
    if path.name.endswith(".pt"):
        loaded = torch.jit.load(str(path), map_location=device_of(model))
        return lambda x: _torch_output(loaded, x)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        from danlu.models import restore

        clone = copy.deepcopy(model).eval()
        restore(clone, load_file(str(path)))
        return lambda x: _torch_output(clone, x)
    raise ConfigError(f"cannot check '{path.name}'", fix="give a .onnx, .pt or .safetensors file")


def _compare(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, float]:
    diffs = []
    agree = total = 0
    for ref, out in pairs:
        if ref.shape != out.shape:
            raise ConfigError(
                f"the exported file gives outputs of shape {tuple(out.shape)}, the torch model "
                f"{tuple(ref.shape)}",
                fix="export again from the same model",
            )
        diffs.append((ref - out).abs().flatten())
        if ref.dim() >= 2 and ref.shape[-1] > 1:
            agree += int((ref.argmax(-1) == out.argmax(-1)).sum())
            total += ref.argmax(-1).numel()
    diff = torch.cat(diffs)
    result = {"max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean())}
    if total:
        result["argmax_agreement"] = agree / total
    return result | {"inputs": len(pairs)}


# ---------------------------------------------------------------------------- quantization


def quantize_onnx(src: Path, dst: Path) -> Path:
    """Dynamic int8 quantization (ONNX Runtime): int8 weights, activations quantized per call.
    The model is pre-processed first (shape inference, graph optimization); when that fails,
    the exporter's recorded intermediate shapes are dropped instead."""
    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise CheckpointError(f"ONNX model '{src}' not found", fix="export the model first")
    _require("onnx")
    _require("onnxruntime")
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with _staging(dst.parent, dst.name) as tmp, _quiet():
        error: Exception | None = None
        for prepare in (_pre_process, _drop_shapes):  # pre-processing fails on some graphs
            try:
                prepare(src, tmp / "pre.onnx")
                quantize_dynamic(tmp / "pre.onnx", tmp / dst.name, weight_type=QuantType.QInt8)
                break
            except Exception as e:  # onnx / onnxruntime raise many kinds
                error = e
        else:
            raise ConfigError(
                f"ONNX Runtime cannot quantize '{src.name}': {_first_line(error)}",
                fix="keep the fp32 ONNX export, or quantize in torch (int8_weight)",
            ) from error
        (tmp / "pre.onnx").unlink()
    return dst


def _pre_process(src: Path, dst: Path) -> None:
    from onnxruntime.quantization.shape_inference import quant_pre_process

    # onnx shape inference and graph optimization; the symbolic shape inference is skipped:
    # it fails on transformers' graphs, leaving a sym_shape_infer_temp.onnx in the cwd
    quant_pre_process(src, dst, skip_symbolic_shape=True)


def _drop_shapes(src: Path, dst: Path) -> None:
    """Without the recorded intermediate shapes, which can disagree with what the quantizer
    infers ("Inferred shape and existing shape differ")."""
    import onnx

    proto = onnx.load(str(src))
    del proto.graph.value_info[:]
    onnx.save(proto, str(dst))


def _require(package: str) -> Any:
    import importlib

    try:
        return importlib.import_module(package)
    except ImportError:
        raise ConfigError(f"ONNX export needs the {package} package", fix=INSTALL) from None
