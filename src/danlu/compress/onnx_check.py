"""Checking an exported file against its model, and ONNX Runtime int8 quantization of an export.

parity(model, path, [x_a, x_b])                          # {"max_abs_diff": 3e-7, ...}
quantize_onnx(path, out_dir / "model.int8.onnx")         # dynamic int8 (ONNX Runtime)
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from danlu.compress.export import first_line, quiet, require, staging
from danlu.errors import CheckpointError, ConfigError
from danlu.models.compressed import device_of

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
    require("onnx")
    require("onnxruntime")
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with staging(dst.parent, dst.name) as tmp, quiet():
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
                f"ONNX Runtime cannot quantize '{src.name}': {first_line(error)}",
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
